"""Every bad input raises ValueError/TypeError naming the argument, whatever the backend."""

import pytest
import torch

import omniattn as oa
from omniattn.hstu import RelativeBias


def qkv(b=2, n=8, h=4, hkv=2, d=16, dtype=torch.float32):
    return torch.randn(b, n, h, d, dtype=dtype), torch.randn(b, n, hkv, d, dtype=dtype), torch.randn(b, n, hkv, d, dtype=dtype)


def packed(t=10, h=2, d=8):
    return torch.randn(t, h, d), torch.randn(t, h, d), torch.randn(t, h, d)


CU = torch.tensor([0, 4, 10], dtype=torch.int32)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "q: expected a 4-D"),
        (lambda q, k, v: (q, k[:1], v[:1]), ValueError, "k: expected batch 2"),
        (lambda q, k, v: (q, k[..., :8], v), ValueError, "k: expected head dim 16"),
        (lambda q, k, v: (q, k, v[:, :, :1]), ValueError, "v: expected 2 heads"),
        (lambda q, k, v: (q[:, :, :3], k, v), ValueError, "multiple of the number of key/value heads"),
        (lambda q, k, v: (q, k, v[:, :5]), ValueError, "v: expected the token shape"),
        (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, "q: expected dtype"),
        (lambda q, k, v: (q, k.half(), v), TypeError, "k: expected dtype torch.float32"),
        (lambda q, k, v: (q, k.to("meta"), v), ValueError, "k: expected a tensor on cpu"),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, "q: expected a torch.Tensor"),
        (lambda q, k, v: (q[..., :0], k[..., :0], v), ValueError, "head dimension must be > 0"),
    ],
)
def test_bad_tensors(mutate, exc, match):
    q, k, v = mutate(*qkv())
    with pytest.raises(exc, match=match):
        oa.attention(q, k, v)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(score="relu"), ValueError, "score: expected one of"),
        (dict(precision="int3"), ValueError, "precision: expected one of"),
        (dict(backend="cuda"), ValueError, "backend: expected one of"),
        (dict(score="sigmoid", return_lse=True), ValueError, "return_lse: only softmax"),
        (dict(window=(-2, 0)), ValueError, "window: expected a pair"),
        (dict(window=(3,)), ValueError, "window: expected a pair"),
        (dict(window=(1.5, 2)), ValueError, "window: expected a pair"),
        (dict(softcap=-1.0), ValueError, "softcap: expected 0"),
        (dict(softcap=float("inf")), ValueError, "softcap: expected a finite"),
        (dict(scale=float("nan")), ValueError, "scale: expected a finite"),
        (dict(sigmoid_bias=-1.0), ValueError, "sigmoid_bias: only used with score='sigmoid'"),
        (dict(silu_norm=2.0), ValueError, "silu_norm: only used with score='silu'"),
        (dict(score="silu", silu_norm=0.0), ValueError, "silu_norm: expected a float > 0"),
        (dict(causal=1), TypeError, "causal: expected a bool"),
        (dict(deterministic="yes"), TypeError, "deterministic: expected a bool"),
        (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes: expected shape \(4,\) or \(2, 4\)"),
        (dict(alibi_slopes=torch.ones(4, dtype=torch.int64)), TypeError, "alibi_slopes: expected a floating"),
        (dict(alibi_slopes=torch.ones(4, requires_grad=True)), ValueError, "alibi_slopes: ALiBi slopes are constants"),
    ],
)
def test_bad_keywords(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        oa.attention(*qkv(), **kwargs)


@pytest.mark.parametrize(
    "cu_q,max_q,exc,match",
    [
        (torch.tensor([1, 4, 10], dtype=torch.int32), 6, ValueError, "cu_seqlens_q: must start at 0"),
        (torch.tensor([0, 6, 4, 10], dtype=torch.int32), 6, ValueError, "cu_seqlens_q: must be non-decreasing"),
        (torch.tensor([0, 4, 9], dtype=torch.int32), 6, ValueError, r"cu_seqlens_q: must end at the number of tokens \(10\)"),
        (torch.tensor([0.0, 4.0, 10.0]), 6, TypeError, "cu_seqlens_q: expected dtype int32 or int64"),
        (torch.tensor([[0, 4, 10]]), 6, ValueError, "cu_seqlens_q: expected a 1-D"),
        ([0, 4, 10], 6, TypeError, "cu_seqlens_q: expected a 1-D int32/int64 torch.Tensor"),
        (CU, 5, ValueError, r"max_seqlen_q: 5 is smaller than the longest query sequence \(6\)"),
        (CU, -1, ValueError, "max_seqlen_q: expected an int >= 0"),
        (torch.tensor([0, 10], dtype=torch.int32), 10, ValueError, "cu_seqlens_k: expected 2 offsets"),
    ],
)
def test_bad_cu_seqlens(cu_q, max_q, exc, match):
    q, k, v = packed()
    with pytest.raises(exc, match=match):
        oa.attention_varlen(q, k, v, cu_q, CU, max_q, 6)


def test_varlen_wrong_rank():
    q, k, v = packed()
    with pytest.raises(ValueError, match="q: expected a 3-D"):
        oa.attention_varlen(q[None], k, v, CU, CU, 6, 6)


def hstu_args(**over):
    t, h, d = 10, 2, 8
    args = dict(q=torch.randn(t, h, d), k=torch.randn(t, h, d), v=torch.randn(t, h, d), seq_offsets=CU.long(), max_seq_len=6)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(seq_offsets=torch.tensor([0, 7, 4, 10])), ValueError, "seq_offsets: must be non-decreasing"),
        (dict(max_seq_len=5), ValueError, r"max_seq_len: 5 is smaller than the longest sequence \(6\)"),
        (dict(num_targets=torch.tensor([5, 1])), ValueError, r"num_targets: sequence 0 has 4 tokens but num_targets\[0\]=5"),
        (dict(num_targets=torch.tensor([1])), ValueError, r"num_targets: expected shape \(2,\)"),
        (dict(num_targets=torch.tensor([1.0, 1.0])), TypeError, "num_targets: expected dtype int32 or int64"),
        (dict(num_targets=torch.tensor([2, 1]), contextual_seq_len=3), ValueError, "contextual prefix must come before"),
        (dict(contextual_seq_len=-1), ValueError, "contextual_seq_len: expected an int >= 0"),
        (dict(max_attn_len=1.5), ValueError, "max_attn_len: expected an int >= 0"),
        (dict(alpha=float("inf")), ValueError, "alpha: expected a finite float"),
        (dict(rab=RelativeBias(6)), ValueError, "timestamps: rab needs the timestamp of every token"),
        (dict(rab=RelativeBias(6), timestamps=torch.arange(9)), ValueError, r"timestamps: expected shape \(10,\)"),
        (dict(timestamps=torch.arange(10)), ValueError, "timestamps: only used with rab"),
        (dict(rab=RelativeBias(5), timestamps=torch.arange(10)), ValueError, "rab: built for max_seq_len=5"),
        (dict(rab=RelativeBias(6, num_heads=3), timestamps=torch.arange(10)), ValueError, "rab: has weights for 3 heads"),
        (dict(rab=torch.zeros(3)), TypeError, "rab: expected an omniattn.hstu.RelativeBias"),
        (dict(k=torch.randn(9, 2, 8), v=torch.randn(9, 2, 8)), ValueError, "k: HSTU is self-attention"),
        (dict(causal=None), TypeError, "causal: expected a bool"),
        (dict(silu_norm=-2.0), ValueError, "silu_norm: expected a float > 0"),
        (dict(precision="fp4"), ValueError, "precision: expected one of"),
        (dict(deterministic=1), TypeError, "deterministic: expected a bool"),
    ],
)
def test_bad_hstu_inputs(over, exc, match):
    with pytest.raises(exc, match=match):
        oa.hstu_attention(**hstu_args(**over))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_seq_len=0), "max_seq_len: expected an int >= 1"),
        (dict(max_seq_len=8, num_buckets=0), "num_buckets: expected an int >= 1"),
        (dict(max_seq_len=8, bucketization="linear"), "bucketization: expected one of"),
        (dict(max_seq_len=8, num_heads=0), "num_heads: expected None"),
    ],
)
def test_bad_relative_bias(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RelativeBias(**kwargs)


def test_merge_attention_states_shapes():
    out, lse = torch.zeros(2, 5, 3, 4), torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match="out_b: expected shape"):
        oa.merge_attention_states(out, lse, out[:, :4], lse)
    with pytest.raises(ValueError, match=r"lse_b: expected shape \(2, 3, 5\)"):
        oa.merge_attention_states(out, lse, out, lse.transpose(1, 2))


def test_sdpa_gqa_needs_enable_gqa():
    q, k, v = (t.transpose(1, 2) for t in qkv())
    with pytest.raises(ValueError, match="enable_gqa=True"):
        oa.scaled_dot_product_attention(q, k, v)


def test_remembered_offsets_are_revalidated_after_an_in_place_change(monkeypatch):
    """GPU offsets are checked once per tensor (the check copies them to the host, a sync); an
    in-place change (a new _version) or another tensor object must be checked again."""
    from omniattn import spec

    monkeypatch.setattr(spec, "_cacheable", lambda t: True)  # as for a GPU tensor
    monkeypatch.setattr(spec, "_checked_offsets", {})
    calls = []
    real = spec._checked_lengths
    monkeypatch.setattr(spec, "_checked_lengths", lambda *a: calls.append(1) or real(*a))
    q = torch.randn(10, 2, 8)
    cu = torch.tensor([0, 4, 10])
    for _ in range(3):
        oa.hstu_attention(q, q, q, cu, 8, backend="torch")
    assert len(calls) == 1
    cu[1] = 11  # now decreasing: the remembered check must not hide it
    with pytest.raises(ValueError, match="non-decreasing"):
        oa.hstu_attention(q, q, q, cu, 8, backend="torch")
    with pytest.raises(ValueError, match="end at the number of tokens"):
        oa.hstu_attention(q, q, q, torch.tensor([0, 4, 9]), 8, backend="torch")
    nt = torch.tensor([1, 7])  # 7 targets in a 6-token sequence
    with pytest.raises(ValueError, match="num_targets"):
        oa.hstu_attention(q, q, q, torch.tensor([0, 4, 10]), 8, num_targets=nt, backend="torch")
