"""transformers with attn_implementation="omniattn": tiny random Llama, Mistral (sliding window) and
Gemma-2 (softcap) models give the logits of transformers' own attention on a padded batch (DESIGN's
tolerance rule against the same model in float64), the same greedy generate() tokens, and 0 fallbacks."""

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import omniattn.integrations.transformers as oa_hf  # noqa: E402
from omniattn.accuracy import bound, max_err  # noqa: E402
from omniattn.usage import stats  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3)


def _models():
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    return {
        "llama": (LlamaConfig(**TINY), LlamaForCausalLM, "sdpa"),
        "mistral": (MistralConfig(**TINY, sliding_window=5), MistralForCausalLM, "sdpa"),
        # transformers' sdpa refuses softcap: Gemma-2's reference is its eager attention
        "gemma2": (Gemma2Config(**TINY, head_dim=16, sliding_window=5, attn_logit_softcapping=3.0,
                                final_logit_softcapping=None), Gemma2ForCausalLM, "eager"),
    }


def _build(cfg, cls, impl, state=None, dtype=torch.float32):
    model = cls._from_config(copy.deepcopy(cfg), attn_implementation=impl)  # each model its own config
    if state is not None:
        model.load_state_dict(state)
    return model.to(dtype).eval()


@pytest.fixture(scope="module", autouse=True)
def registered():
    oa_hf.register()


def _padded_batch(gen):
    ids = torch.randint(0, 128, (3, 13), generator=gen)
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, :9] = 0
    return ids, mask


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2"])
def test_padded_logits_and_greedy_generation(name):
    cfg, cls, base = _models()[name]
    torch.manual_seed(0)
    ref = _build(cfg, cls, base)
    state = ref.state_dict()
    ours = _build(cfg, cls, "omniattn", state)
    ref64 = _build(cfg, cls, base, state, torch.float64)
    gen = torch.Generator().manual_seed(1)
    ids, mask = _padded_batch(gen)
    stats(reset=True)
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).logits
        s = stats()
        # references: each row alone, unpadded, at the positions it has in the batch (transformers'
        # float64 eager attention turns left padding into NaN, so the padded batch is no reference)
        for b in range(ids.shape[0]):
            n = int(mask[b].sum())
            row = dict(input_ids=ids[b : b + 1, -n:], position_ids=torch.arange(13 - n, 13).view(1, n))
            want, want64 = ref(**row).logits[0], ref64(**row).logits[0]
            err, limit = max_err(got[b, -n:], want64), bound(want64, want, torch.float32)
            assert err <= limit, f"{name}, row {b}: logits error {err:.2e} > {limit:.2e}"

    assert s["transformers"] == 2 and s["transformers.varlen"] == 2  # both layers, the padded path
    out_ref = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, out_ref)
    s = stats()
    assert s["transformers"] == 2 + 2 * 8 and not any("fallback" in key for key in s)


def test_mistral_window_is_exercised():
    """The sliding window must matter for the test above to test it: with it removed the logits move."""
    cfg, cls, _ = _models()["mistral"]
    torch.manual_seed(0)
    windowed = _build(cfg, cls, "omniattn")
    no_window = copy.deepcopy(cfg)
    no_window.sliding_window = None
    full = _build(no_window, cls, "omniattn", windowed.state_dict())
    ids, mask = _padded_batch(torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = windowed(input_ids=ids, attention_mask=mask).logits
        b = full(input_ids=ids, attention_mask=mask).logits
    assert (a - b)[0, -1].abs().max() > 1e-2


def test_sigmoid_variant_padded_equals_unpadded_and_cache_is_consistent():
    cfg, cls, _ = _models()["llama"]
    torch.manual_seed(0)
    model = _build(cfg, cls, "omniattn-sigmoid")
    ids, mask = _padded_batch(torch.Generator().manual_seed(2))
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits
        for b in range(3):
            n = int(mask[b].sum())
            alone = model(input_ids=ids[b : b + 1, -n:]).logits
            assert max_err(batched[b, -n:], alone[0]) < 1e-4
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    uncached = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert oa_hf._sigmoid_bias(model.model.layers[0].self_attn) == -math.log(256)


def test_custom_four_d_mask_goes_through_the_masked_path():
    """A model that passes its own 4-D mask: omniattn reads it as given (no fallback)."""
    cfg, cls, _ = _models()["llama"]
    torch.manual_seed(0)
    ref = _build(cfg, cls, "sdpa")
    ours = _build(cfg, cls, "omniattn", ref.state_dict())
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    allowed = torch.ones(9, 9, dtype=torch.bool).tril()
    allowed[5:, 1:3] = False  # a pattern neither causal nor padding
    mask4 = torch.zeros(2, 1, 9, 9).masked_fill(~allowed, torch.finfo(torch.float32).min)
    stats(reset=True)
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask4).logits
        want = ref(input_ids=ids, attention_mask=mask4).logits
    assert max_err(got, want) < 1e-4
    assert stats()["transformers.masked"] == 2
