"""HSTU layer, recommendation data, metrics, Stochastic Length, M-FALCON, training and the CLI."""

import io
import json
import math
import zipfile

import pytest
import torch
import torch.nn.functional as F

import omniattn as oa
from omniattn import cli
from omniattn.nn import HSTULayer
from omniattn.recsys import (HSTU, SASRec, Split, TrainConfig, Trainer, candidate_representations, load, movielens_1m,
                             movielens_20m, movielens_100k, popularity_metrics, synthetic)
from omniattn.recsys.data import ML100K_MEMBER, make_batch
from omniattn.backends.triton import supported as triton_supported
from omniattn.hstu import RelativeBias
from omniattn.recsys.train import metrics_from_ranks, ranks_of, stochastic_length

from .helpers import max_err

# ----------------------------------------------------------------------------------- HSTU layer


def test_hstu_layer_is_the_paper_formula():
    """project -> hstu_attention -> LayerNorm(AV) * U -> W2 -> + x, written out with the reference."""
    torch.manual_seed(0)
    layer = HSTULayer(dim=12, num_heads=2, max_seq_len=16, dropout=0.0).double()
    with torch.no_grad():
        layer.rab.pos_w.normal_()
        layer.rab.ts_w.normal_()
    x = torch.randn(20, 12, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([0, 7, 7, 20])
    ts = torch.arange(20) * 13
    nt = torch.tensor([2, 0, 3])
    got = layer(x, offsets, timestamps=ts, num_targets=nt)
    u, v, q, k = F.silu(layer.uvqk(F.layer_norm(x, (12,), layer.input_norm.weight, layer.input_norm.bias))).split(
        [12, 12, 12, 12], -1)
    av = oa.reference.hstu_attention(q.view(20, 2, 6), k.view(20, 2, 6), v.view(20, 2, 6), offsets, 16,
                                     num_targets=nt, rab=layer.rab, timestamps=ts)
    want = x + layer.output(layer.output_norm(av.reshape(20, 12)) * u)
    assert max_err(got, want) < 1e-12
    got.sum().backward()
    assert layer.rab.pos_w.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------------------- data


def _wheel(tmp_path, rows):
    """A wheel-shaped zip holding ``rows`` (user, item, rating, timestamp) as RecBole's ml-100k.inter."""
    text = io.StringIO()
    text.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
    for u, i, r, t in rows:
        text.write(f"{u}\t{i}\t{r}\t{t}\n")
    path = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(ML100K_MEMBER, text.getvalue())
    return path


def test_ml100k_from_the_recbole_wheel_format(tmp_path):
    rows = [(7, 50, 4, 300), (7, 51, 3, 100), (7, 52, 5, 200), (9, 51, 1, 10), (9, 53, 2, 20), (9, 50, 2, 30),
            (9, 54, 2, 40), (8, 50, 5, 1), (8, 51, 5, 2)]  # user 8 has two events: dropped
    wheel = _wheel(tmp_path, rows)
    for path in (str(wheel), str(tmp_path)):
        data = movielens_100k(path)
        assert data.num_users == 2 and data.num_items == 5
        # user 7 in time order: 51 (t=100), 52 (200), 50 (300); ids assigned in first-seen order
        assert data.items[0].tolist() == [1, 2, 3] and data.times[0].tolist() == [100, 200, 300]
        assert data.items[1].tolist() == [1, 4, 3, 5]
    assert load(f"ml-100k:{wheel}").num_items == 5


def test_ml1m_and_ml20m_raw_files(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::10::5::978300760\n1::11::3::978300000\n1::12::4::978302109\n")
    data = movielens_1m(str(tmp_path))
    assert data.items[0].tolist() == [1, 2, 3] and data.times[0].tolist() == [978300000, 978300760, 978302109]
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n2,5,3.5,30\n2,6,4.0,10\n2,5,1.0,20\n")
    data = movielens_20m(str(tmp_path / "ratings.csv"))
    assert data.items[0].tolist() == [1, 2, 2] and data.times[0].tolist() == [10, 20, 30]
    with pytest.raises(ValueError, match="ml-1m:PATH"):
        load("ml-1m")
    with pytest.raises(ValueError, match="dataset: expected"):
        load("netflix")


def test_synthetic_catalogue_leaves_hr200_informative():
    """With 200 items every ranking put the target in its top 200 (HR@200 = 1.0 for any model):
    the default catalogue is ten times the largest cutoff."""
    data = synthetic()
    assert data.num_items >= 2000 and max(int(s.max()) for s in data.items) <= data.num_items
    pop = popularity_metrics(Split.leave_one_out(data), "test")
    assert pop["hr@200"] < 0.5, pop


def test_leave_one_out_by_time():
    data = synthetic(num_users=5, num_items=20, length=(5, 8), seed=1)
    split = Split.leave_one_out(data)
    for u, seq in enumerate(data.items):
        assert torch.equal(split.train[u], seq[:-2])
        assert split.valid_target[u] == seq[-2] and split.test_target[u] == seq[-1]
    hist, _, target = split.histories("test")
    assert torch.equal(hist[0], data.items[0][:-1]) and torch.equal(target, split.test_target)


def test_metrics_known_values():
    scores = torch.tensor([[0.0, 0.9, 0.5, 0.7], [0.0, 0.1, 0.2, 0.3]])
    ranks = ranks_of(scores, torch.tensor([2, 3]))
    assert ranks.tolist() == [2, 0]
    m = metrics_from_ranks(ranks, ks=(1, 3))
    assert m["hr@1"] == 0.5 and m["hr@3"] == 1.0
    assert math.isclose(m["ndcg@3"], (1 / math.log2(4) + 1.0) / 2)


def test_stochastic_length():
    gen = torch.Generator().manual_seed(0)
    short = torch.arange(20)
    keep = int(200**0.6)  # 24
    assert torch.equal(stochastic_length(short, short, 200, 1.2, gen)[0], short)  # 20 <= 24: kept
    long = torch.arange(400)
    kept, sampled = 0, 0
    for _ in range(400):
        s, t = stochastic_length(long, long * 10, 200, 1.2, gen)
        if s.shape[0] == 400:
            kept += 1
        else:
            sampled += 1
            assert s.shape[0] == keep and torch.all(s[1:] > s[:-1]) and torch.equal(t, s * 10)
    assert abs(kept / 400 - keep**2 / 400**2) < 0.02 and sampled > 350  # kept with probability L^2 / n^2


# -------------------------------------------------------------------------------------- M-FALCON


def _small_hstu():
    torch.manual_seed(0)
    model = HSTU(40, dim=16, num_blocks=2, num_heads=2, max_seq_len=32, dropout=0.0).double()
    with torch.no_grad():
        for layer in model.layers:
            layer.rab.pos_w.normal_()
            layer.rab.ts_w.normal_()
    hist = [torch.randint(1, 41, (n,)) for n in (5, 12, 1, 20)]
    times = [torch.sort(torch.randint(0, 10**6, (len(h),))).values for h in hist]
    return model, hist, times, torch.tensor([2, 3, 4, 5]) * 10**6


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_mfalcon_micro_batches_equal_each_candidate_alone(use_kv_cache):
    model, hist, times, request = _small_hstu()
    cands = torch.randint(1, 41, (4, 9))
    run = lambda c: candidate_representations(model, hist, times, cands, request, micro_batch=c, use_kv_cache=use_kv_cache)
    together, chunks, alone = run(9), run(4), run(1)
    assert max_err(together, alone) < 1e-12 and max_err(chunks, alone) < 1e-12
    # and equal to a plain forward pass of history + that one candidate as a target
    for i in range(4):
        for j in (0, 8):
            batch = make_batch([torch.cat([hist[i], cands[i, j:j + 1]])], [torch.cat([times[i], request[i:i + 1]])])
            with torch.no_grad():
                full = model.encode(batch, num_targets=torch.ones(1, dtype=torch.long))[-1]
            assert max_err(full, alone[i, j]) < 1e-12


def test_mfalcon_with_no_candidates_or_no_users_returns_empty():
    model, hist, times, request = _small_hstu()
    for use_kv_cache in (True, False):
        none = candidate_representations(model, hist, times, torch.zeros(4, 0, dtype=torch.long), request,
                                         use_kv_cache=use_kv_cache)
        assert none.shape == (4, 0, 16)
        nobody = candidate_representations(model, [], [], torch.zeros(0, 3, dtype=torch.long), request[:0],
                                           use_kv_cache=use_kv_cache)
        assert nobody.shape == (0, 3, 16)


def test_mfalcon_kv_cache_handles_empty_history_and_shared_or_per_head_bias():
    """A user with no history attends to its own key only; a per-head bias reads each head's weights."""
    torch.manual_seed(3)
    model = HSTU(30, dim=12, num_blocks=2, num_heads=3, max_seq_len=16, dropout=0.0).double()
    with torch.no_grad():
        model.layers[1].rab = RelativeBias(16, 8, num_heads=3, dtype=torch.float64)
        for layer in model.layers:
            layer.rab.pos_w.normal_()
            layer.rab.ts_w.normal_()
    hist = [torch.randint(1, 31, (n,)) for n in (0, 15, 7)]
    times = [torch.sort(torch.randint(0, 10**5, (len(h),))).values for h in hist]
    request = torch.tensor([10**5, 2 * 10**5, 3 * 10**5])
    cands = torch.randint(1, 31, (3, 5))
    cached = candidate_representations(model, hist, times, cands, request, micro_batch=2)
    for i in range(3):
        for j in range(5):
            batch = make_batch([torch.cat([hist[i], cands[i, j:j + 1]])], [torch.cat([times[i], request[i:i + 1]])])
            with torch.no_grad():
                full = model.encode(batch, num_targets=torch.ones(1, dtype=torch.long))[-1]
            assert max_err(full, cached[i, j]) < 1e-12


def test_mfalcon_check_can_fail():
    """The same candidates as plain causal tokens (not targets) see each other: results differ."""
    model, hist, times, request = _small_hstu()
    cands = torch.randint(1, 41, (1, 5))
    alone = candidate_representations(model, hist[:1], times[:1], cands, request[:1], micro_batch=1)
    batch = make_batch([torch.cat([hist[0], cands[0]])], [torch.cat([times[0], request[:1].repeat(5)])])
    with torch.no_grad():
        causal = model.encode(batch)[-5:]
    assert max_err(causal[1:], alone[0, 1:]) > 1e-3


# ------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("model", ["hstu", "sasrec"])
def test_short_training_beats_popularity(model):
    data = synthetic(num_users=400, num_items=120, seed=2)
    cfg = TrainConfig(model=model, dim=32, blocks=2, heads=2, max_len=64, epochs=6, batch_size=64, negatives=64,
                      dropout=0.1, seed=0)
    trainer = Trainer(cfg, data)
    trainer.fit()
    test = trainer.test()
    pop = popularity_metrics(trainer.split, "test")
    assert test["ndcg@10"] > 1.5 * pop["ndcg@10"] and test["hr@10"] > pop["hr@10"], (test, pop)


def test_models_use_omniattn_attention(monkeypatch):
    """Both recommenders call omniattn (not a private attention): count the calls."""
    from omniattn import api

    calls = []
    real_hstu, real_varlen = api.hstu_attention, api.attention_varlen
    monkeypatch.setattr("omniattn.nn.hstu_layer.hstu_attention", lambda *a, **k: calls.append("hstu") or real_hstu(*a, **k))
    monkeypatch.setattr("omniattn.recsys.models.attention_varlen",
                        lambda *a, **k: calls.append("softmax") or real_varlen(*a, **k))
    batch = make_batch([torch.tensor([1, 2, 3]), torch.tensor([4])], [torch.arange(3), torch.arange(1)])
    HSTU(10, dim=8, num_blocks=2, max_seq_len=8).encode(batch)
    SASRec(10, dim=8, num_blocks=3, max_seq_len=8).encode(batch)
    assert calls == ["hstu", "hstu", "softmax", "softmax", "softmax"]


def test_cli_train_checkpoint_resume_eval(tmp_path, capsys):
    ckpt, out = str(tmp_path / "m.pt"), str(tmp_path / "m.json")
    args = ["recsys", "train", "--dataset", "synthetic", "--model", "hstu", "--dim", "16", "--max-len", "32",
            "--batch-size", "128", "--negatives", "32", "--no-progress", "--checkpoint", ckpt]
    assert cli.main(args + ["--epochs", "1"]) == 0
    assert cli.main(args + ["--epochs", "2", "--resume", "--json", out]) == 0
    text = capsys.readouterr().out
    assert "epoch 1/1" in text and "epoch 2/2" in text and "popularity" in text
    doc = json.loads(open(out).read())
    assert [row["epoch"] for row in doc["history"]] == [1, 2]  # resumed, not restarted
    assert cli.main(["recsys", "eval", "--checkpoint", ckpt]) == 0
    assert "hstu" in capsys.readouterr().out


def test_model_bench_runs_on_cpu_and_methods_agree():
    """``omniattn.bench.hstu_model`` at toy sizes: every M-FALCON method scores the same candidates
    alike (bf16 rounding apart) and the layer step reports the attention's share."""
    from omniattn.bench import hstu_model

    cpu = torch.device("cpu")
    rows = hstu_model.mfalcon_rows(users=2, history=20, candidates=12, per_candidate=3, dev=cpu, dim=16, heads=2,
                                   micro_batches=(5,))
    assert [r["method"] for r in rows] == ["kv-cache", "kv-cache", "targets", "targets", "per-candidate"]
    assert all(r["cand_per_s"] > 0 and r["max_err"] < 0.05 for r in rows)
    steps = hstu_model.layer_step_rows(batch=3, n=40, dev=cpu, dim=16, heads=2, head_dim=8)
    assert [r["rab"] for r in steps] == [False, True]
    assert all(0 < r["attention_share"] and r["ms"] > 0 for r in steps)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(not triton_supported(torch.device(DEVICE), explicit=True)[0],
                    reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")
def test_mfalcon_kv_cache_on_the_triton_kernels():
    """The cached path's cross attention (SiLU, float bias mask, -inf padding, silu_norm) on the
    Triton kernels (the interpreter on CI; float32) against the targets path on the same kernels."""
    torch.manual_seed(5)
    model = HSTU(40, dim=16, num_blocks=2, num_heads=2, max_seq_len=32, dropout=0.0, backend="triton").to(DEVICE)
    with torch.no_grad():
        for layer in model.layers:
            layer.rab.pos_w.normal_()
            layer.rab.ts_w.normal_()
    hist = [torch.randint(1, 41, (n,)) for n in (5, 19, 0)]
    times = [torch.sort(torch.randint(0, 10**6, (len(h),))).values for h in hist]
    request = torch.tensor([2, 3, 4]) * 10**6
    cands = torch.randint(1, 41, (3, 6))
    cached = candidate_representations(model, hist, times, cands, request, micro_batch=4)
    targets = candidate_representations(model, hist, times, cands, request, micro_batch=6, use_kv_cache=False)
    assert torch.isfinite(cached).all() and max_err(cached, targets) < 1e-4
