"""GPU-only: the drop-ins on the Triton kernels, bf16: SDPA with padding / general masks / dropout,
the flash-attn compat functions and KV cache, a tiny transformers model, hstu_mha."""

import copy

import pytest
import torch

import omniattn as oa
from omniattn.api import _torch_sdpa
from omniattn.compat import flash_attn as fa
from omniattn.compat.generative_recommenders import hstu_mha
from omniattn.usage import stats

from ..helpers import assert_tolerance, check_outputs_and_grads, dense_problem, max_err

DEV = "cuda"


def _sdpa_check(q, k, v, **kw):
    got = oa.scaled_dot_product_attention(q, k, v, **kw)
    m = kw.get("attn_mask")
    kw64 = kw if m is None or m.dtype == torch.bool else {**kw, "attn_mask": m.double()}
    ref64 = _torch_sdpa(q.double(), k.double(), v.double(), **kw64)
    assert_tolerance("out", got, ref64, _torch_sdpa(q, k, v, **kw), q.dtype)


@pytest.mark.parametrize("kind", ["padding", "general", "float-bias"])
def test_sdpa_masks_on_gpu(kind):
    stats(reset=True)
    g = torch.Generator(device=DEV).manual_seed(1)
    b, h, n = 4, 8, 1000
    q, k, v = (torch.randn(b, h, n, 128, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(3))
    if kind == "padding":
        keep = torch.arange(n, device=DEV).view(1, n) < torch.tensor([1000, 3, 517, 0], device=DEV).view(b, 1)
        mask = keep.view(b, 1, 1, n)
    elif kind == "general":
        mask = torch.rand(b, 1, n, n, device=DEV, generator=g) > 0.3
    else:
        mask = torch.randn(1, h, n, n, device=DEV, generator=g, dtype=torch.bfloat16)
    _sdpa_check(q, k, v, attn_mask=mask)
    assert stats().get("sdpa.fallback", 0) == 0


def test_sdpa_dropout_on_gpu_is_seeded():
    q = torch.randn(2, 4, 300, 64, device=DEV, dtype=torch.bfloat16)
    torch.manual_seed(3)
    a = oa.scaled_dot_product_attention(q, q, q, dropout_p=0.2)
    torch.manual_seed(3)
    b = oa.scaled_dot_product_attention(q, q, q, dropout_p=0.2)
    assert torch.equal(a, b) and not torch.equal(a, oa.scaled_dot_product_attention(q, q, q))


def test_flash_attn_func_on_gpu():
    gen = torch.Generator().manual_seed(4)
    p = dense_problem(2, 777, 901, 8, 2, 128, 128, torch.bfloat16, gen, DEV)
    check_outputs_and_grads(
        p, "triton", gen,
        fn=lambda: fa.flash_attn_func(p.q, p.k, p.v, causal=True, window_size=(255, 255), softcap=30.0),
        ref=lambda dt: oa.reference.attention(p.q, p.k, p.v, causal=True, window=(255, 0), softcap=30.0, dtype=dt),
    )


@pytest.mark.parametrize("paged", [False, True])
def test_flash_attn_with_kvcache_on_gpu(paged):
    b, hq, hk, d, cap = 4, 32, 8, 128, 4096
    q = torch.randn(b, 1, hq, d, device=DEV, dtype=torch.bfloat16)
    knew, vnew = (torch.randn(b, 1, hk, d, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    kc, vc = (torch.randn(b, cap, hk, d, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    seqlens = torch.tensor([4000, 17, 0, 2048], device=DEV, dtype=torch.int32)
    kw = dict(cache_seqlens=seqlens, causal=True)
    kc0, vc0 = kc.clone(), vc.clone()
    if paged:
        page = 256
        perm = torch.randperm(b * cap // page, device=DEV)
        table = perm.view(b, cap // page).to(torch.int32)
        kp = torch.empty(b * cap // page, page, hk, d, device=DEV, dtype=torch.bfloat16)
        vp = torch.empty_like(kp)
        kp[table.long()] = kc.view(b, cap // page, page, hk, d)
        vp[table.long()] = vc.view(b, cap // page, page, hk, d)
        out = fa.flash_attn_with_kvcache(q, kp, vp, knew, vnew, block_table=table, **kw)
    else:
        out = fa.flash_attn_with_kvcache(q, kc, vc, knew, vnew, **kw)
    for i, s in enumerate(seqlens.tolist()):
        keys = torch.cat([kc0[i, :s], knew[i]])[None]
        vals = torch.cat([vc0[i, :s], vnew[i]])[None]
        ref64 = oa.reference.attention(q[i : i + 1], keys, vals, causal=True)
        same = oa.reference.attention(q[i : i + 1], keys, vals, causal=True, dtype=torch.bfloat16)
        assert_tolerance("out", out[i : i + 1], ref64, same, torch.bfloat16)


def test_tiny_llama_on_gpu():
    transformers = pytest.importorskip("transformers")
    import omniattn.integrations.transformers as oa_hf

    oa_hf.register()
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, initializer_range=0.1)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").to(DEV, torch.bfloat16).eval()
    ours = transformers.LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="omniattn").to(DEV, torch.bfloat16).eval()
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 128, (4, 300), device=DEV)
    mask = torch.ones_like(ids)
    mask[1, :100], mask[3, :299] = 0, 0
    stats(reset=True)
    with torch.no_grad():
        a, b = ref(input_ids=ids, attention_mask=mask).logits, ours(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert max_err(a[keep], b[keep]) < 0.1 * a[keep].abs().max().item()  # bf16 model, two implementations
    g1 = ref.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    g2 = ours.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    print("greedy tokens equal:", torch.equal(g1, g2), "agreement:", (g1 == g2).float().mean().item())
    assert stats()["transformers.varlen"] >= 2 and not any("fallback" in key for key in stats())


def test_hstu_mha_on_gpu():
    lens = [700, 1, 0, 1024, 33]
    offsets = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=DEV)
    q, k, v = (torch.randn(sum(lens), 4, 128, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    nt = torch.tensor([20, 0, 0, 20, 5], device=DEV)
    kw = dict(num_targets=nt, max_attn_len=128, min_full_attn_seq_len=64)
    got = hstu_mha(1024, 0.1, q, k, v, offsets, **kw)
    full = oa.hstu_attention(q, k, v, offsets, 1024, alpha=0.1, num_targets=nt, max_attn_len=0)
    limited = oa.hstu_attention(q, k, v, offsets, 1024, alpha=0.1, num_targets=nt, max_attn_len=128)
    last = offsets[1:][torch.tensor(lens, device=DEV) > 0] - 1  # targets: full attention rows
    assert torch.equal(got[last], full[last]) and not torch.equal(full, limited)
