"""Per-layer adaptive precision: calibration records every call site, chooses the fastest
candidate meeting the bar, saves and loads as JSON, and applying the plan runs each site at its
precision (CPU: the quantized emulation)."""

import pytest
import torch

import omniattn as oa
from omniattn.nn import Attention
from omniattn.quant import calibrate, load_plan
from omniattn.quant.calibrate import SPEED_ORDER


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Attention(128, 4, causal=True)
        self.b = Attention(128, 2, score="sigmoid")

    def forward(self, x):
        return self.b(self.a(x))


def _model_and_batches():
    torch.manual_seed(0)
    model = TwoLayers().eval()
    batches = [torch.randn(2, 48, 128) for _ in range(2)]
    return model, batches


def test_calibrate_records_sites_and_picks_by_accuracy(tmp_path):
    model, batches = _model_and_batches()
    plan = calibrate(model, batches, candidates=("int8", "int4-fp8"), min_cos=0.999)
    assert len(plan.sites) == 2
    for site in plan.sites:
        assert set(site.cos) == {"int8", "int4-fp8"} and all(0.9 < c <= 1.0 for c in site.cos.values())
        assert site.cos["int4-fp8"] < site.cos["int8"]  # 15 levels against 255
        meets = [c for c in SPEED_ORDER if c in site.cos and site.cos[c] >= 0.999]
        assert site.precision == (meets[0] if meets else "exact"), site
    # a bar between the two: int4 is refused where it misses it
    softmax_site = plan.sites[0]
    bar = (softmax_site.cos["int4-fp8"] + softmax_site.cos["int8"]) / 2
    assert calibrate(model, batches, candidates=("int4-fp8",), min_cos=bar).precisions[0] == "exact"
    strict = calibrate(model, batches, candidates=("int8",), min_cos=1.0)
    assert strict.precisions == ["exact", "exact"]
    path = tmp_path / "plan.json"
    plan.save(path)
    again = load_plan(path)
    assert again.precisions == plan.precisions and again.sites[0].cos == plan.sites[0].cos


def test_applying_a_plan_runs_each_site_at_its_precision():
    model, batches = _model_and_batches()
    plan = calibrate(model, batches, candidates=("int8",), min_cos=0.999)
    x = batches[0]
    with torch.no_grad():
        exact = model(x)
        with plan.apply(model):
            planned = model(x)
            twice = model(x)  # the site count restarts at every forward pass
        seen = []
        real = oa.backends._run

        def spy(spec, call, backend):
            seen.append(spec.precision)
            return real(spec, call, backend)

        oa.backends._run = spy
        try:
            with plan.apply(model):
                model(x)
        finally:
            oa.backends._run = real
    assert seen == ["int8", "int8"]
    assert torch.equal(planned, twice) and not torch.equal(planned, exact)
    assert torch.nn.functional.cosine_similarity(planned.flatten(), exact.flatten(), 0) > 0.999


def test_plan_errors_are_clear(tmp_path):
    model, batches = _model_and_batches()
    with pytest.raises(ValueError, match="candidates"):
        calibrate(model, batches, candidates=("int3",))
    with pytest.raises(ValueError, match="at least one"):
        calibrate(model, [], candidates=("int8",))
    plan = calibrate(model, batches, candidates=("int8",), min_cos=0.999)
    other = Attention(128, 8)
    with pytest.raises(ValueError, match="does not match"), torch.no_grad(), plan.apply(other):
        other(batches[0])
    bad = tmp_path / "bad.json"
    bad.write_text('{"sites": 3}')
    with pytest.raises(ValueError, match="not an omniattn calibration plan"):
        load_plan(bad)


def test_calibrated_plan_on_a_transformers_model():
    """End to end: a tiny random Llama (head dim 32) through attn_implementation="omniattn",
    calibrated on two padded batches; the plan's logits stay close to exact ones."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    import omniattn.integrations.transformers as oa_hf

    oa_hf.register()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="omniattn").eval()
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 128, (2, 40), generator=gen)
        mask = torch.ones(2, 40, dtype=torch.long)
        mask[1, :7] = 0
        batches.append(dict(input_ids=ids, attention_mask=mask))
    plan = calibrate(model, batches, candidates=("int8", "int4-fp8"), min_cos=0.999)
    assert len(plan.sites) == 2 and all(s.precision in ("int8", "int4-fp8", "exact") for s in plan.sites)
    with torch.no_grad():
        exact = model(**batches[0]).logits
        with plan.apply(model):
            planned = model(**batches[0]).logits
    real = batches[0]["attention_mask"].bool()
    cos = torch.nn.functional.cosine_similarity(planned[real].flatten(), exact[real].flatten(), 0)
    assert cos > 0.999
