"""omniattn.nn.Attention (score functions, GQA, QK-norm, LayerScale, rotary, packed inputs),
MultiheadAttention as a torch.nn.MultiheadAttention drop-in, and the tiny training example."""

import pytest
import torch

import omniattn as oa
from omniattn.nn import Attention, MultiheadAttention
from omniattn.nn.attention import _rope
from omniattn.nn.recall import train

from .helpers import max_err


@pytest.mark.parametrize("score", ["softmax", "sigmoid", "silu"])
def test_attention_module_matches_the_reference(score):
    torch.manual_seed(41)
    norm = dict(silu_norm=8.0) if score == "silu" else {}  # a fixed norm, so packed and dense calls agree
    attn = Attention(32, 4, num_kv_heads=2, score=score, qk_norm=True, layer_scale=0.5, rope=True, causal=True,
                     **norm).double()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    q = attn.q_norm(attn.q_proj(x).unflatten(-1, (4, 8)))
    k = attn.k_norm(attn.k_proj(x).unflatten(-1, (2, 8)))
    v = attn.v_proj(x).unflatten(-1, (2, 8))
    pos = torch.arange(11)
    ref = oa.reference.attention(_rope(q, pos, 1e4), _rope(k, pos, 1e4), v, score=score, causal=True, **norm)
    want = attn.out_proj(ref.flatten(-2)) * 0.5
    assert max_err(attn(x), want) < 1e-12
    # packed: two sequences, positions restart in each
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    packed = attn(x[0], cu_seqlens=cu, max_seqlen=7)
    assert max_err(packed[:4], attn(x[:1, :4])[0]) < 1e-12 and max_err(packed[4:], attn(x[:1, 4:])[0]) < 1e-12


def test_flash_sigmoid_recipe():
    attn = Attention.flash_sigmoid(64, 4)
    assert attn.score == "sigmoid" and attn.sigmoid_bias is None  # b = -ln(n) of each sequence
    assert isinstance(attn.q_norm, torch.nn.LayerNorm) and torch.equal(attn.layer_scale, torch.full((64,), 1e-4))
    with pytest.raises(ValueError, match="num_kv_heads"):
        Attention(64, 4, num_kv_heads=3)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("extra", [{}, {"add_bias_kv": True, "add_zero_attn": True}, {"kdim": 12, "vdim": 10}])
def test_multihead_attention_is_a_drop_in(batch_first, extra):
    torch.manual_seed(42)
    ref = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first, dtype=torch.float64, **extra).eval()
    ours = MultiheadAttention(16, 4, batch_first=batch_first, dtype=torch.float64, **extra).eval()
    ours.load_state_dict(ref.state_dict())
    b, lq, ls = 3, 7, 9
    shape = lambda n, e: (b, n, e) if batch_first else (n, b, e)  # noqa: E731
    q = torch.randn(shape(lq, 16), dtype=torch.float64)
    k = torch.randn(shape(ls, extra.get("kdim", 16)), dtype=torch.float64)
    v = torch.randn(shape(ls, extra.get("vdim", 16)), dtype=torch.float64)
    pad = torch.zeros(b, ls, dtype=torch.bool)
    pad[1, 5:], pad[2, :2] = True, True
    am = torch.rand(lq, ls) < 0.2
    for kw in [{}, dict(key_padding_mask=pad), dict(attn_mask=am), dict(key_padding_mask=pad, attn_mask=am),
               dict(need_weights=False, key_padding_mask=pad), dict(average_attn_weights=False, attn_mask=am.double() * -2)]:
        want_out, want_w = ref(q, k, v, **kw)
        got_out, got_w = ours(q, k, v, **kw)
        assert max_err(got_out, want_out) < 1e-12, kw
        assert (want_w is None) == (got_w is None) and (want_w is None or max_err(got_w, want_w) < 1e-12)


def test_softmax_and_sigmoid_train_to_the_same_loss():
    """Associative recall (chance: loss ln 8 = 2.08): both score functions learn it, to the same loss."""
    soft, sig = train("softmax", steps=300), train("sigmoid", steps=300)
    assert soft["loss"] < 0.35 and sig["loss"] < 0.35, (soft, sig)
    assert soft["accuracy"] > 0.9 and sig["accuracy"] > 0.9
    assert abs(soft["loss"] - sig["loss"]) < 0.25
