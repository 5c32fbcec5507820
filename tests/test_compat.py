"""The installed transformers' generate() against our model files, the way users call it.

transformers 5.24 renamed the KV-cache argument from `past_key_values` to `cache`; a model that read
only the old name silently decoded every step without its past. These tests would have caught it:
greedy decoding with the cache == without it == the stock model (LlamaForCausalLM / GPT2LMHeadModel)
loaded from the exported folder, for one prompt and a left-padded batch; seeded sampling is the same
with and without the cache. They are part of `make test-latest` (marker `compat`).
"""

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from helpers import small_config
from llamaforge.model.convert import to_gpt2, to_llama
from llamaforge.model.io import build_model

pytestmark = pytest.mark.compat

GPT2 = dict(hidden_act="gelu_new", norm_type="layernorm", position_embedding_type="learned", attention_bias=True,
            mlp_bias=True, tie_word_embeddings=True, num_key_value_heads=4)
VARIANTS = {"llama": ({}, to_llama, LlamaForCausalLM), "gpt2": (GPT2, to_gpt2, GPT2LMHeadModel)}


def _model(variant: str):
    """A small model whose next-token choice is clear (no near-ties between ours and the stock kernels)."""
    model = build_model(small_config(**VARIANTS[variant][0]), seed=3).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def _prompts(batched: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    lengths = (5, 12, 8) if batched else (9,)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):  # left padding, as generate expects for decoder-only models
        ids[i, T - n :] = torch.randint(3, 512, (n,), generator=g)
        mask[i, T - n :] = 1
    return ids, mask


@pytest.mark.parametrize("batched", [False, True], ids=["one-prompt", "left-padded-batch"])
@pytest.mark.parametrize("variant", ["llama", "gpt2"])
def test_greedy_generate_with_cache_equals_without_and_stock(tmp_path, variant, batched):
    model = _model(variant)
    _, convert, stock_cls = VARIANTS[variant]
    convert(model).save_pretrained(tmp_path / "stock")
    stock = stock_cls.from_pretrained(tmp_path / "stock").eval()
    ids, mask = _prompts(batched)
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kw)
    fresh = model.generate(ids, use_cache=False, **kw)
    theirs = stock.generate(ids, use_cache=True, **kw)
    assert cached.shape == (ids.shape[0], ids.shape[1] + 16)
    assert len(set(cached[0, ids.shape[1] :].tolist())) > 1, "degenerate continuation: the test would prove little"
    assert torch.equal(cached, fresh)
    assert torch.equal(cached, theirs)


@pytest.mark.parametrize("variant", ["llama", "gpt2"])
def test_seeded_sampling_is_the_same_with_and_without_cache(variant):
    model = _model(variant)
    ids, mask = _prompts(batched=True)
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=True, top_k=50, top_p=0.95, temperature=1.0,
              eos_token_id=None, pad_token_id=0)
    out = []
    for use_cache in (True, False):
        torch.manual_seed(11)
        out.append(model.generate(ids, use_cache=use_cache, **kw))
    assert torch.equal(out[0], out[1])


def test_cache_is_accepted_under_both_names_and_returned(small_model, ids):
    """Old callers pass `past_key_values`, new ones `cache`; both continue a prefix like a full forward."""
    from transformers.cache_utils import DynamicCache

    model = small_model()
    with torch.no_grad():
        full = model(ids[:, :20]).logits[:, -1]
        for name in ("past_key_values", "cache"):
            out = model(ids[:, :19], use_cache=True, **{name: DynamicCache()})
            returned = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
            assert returned is not None and returned.get_seq_length() == 19
            step = model(ids[:, 19:20], use_cache=True, **{name: returned}).logits[:, -1]
            torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
        with pytest.raises(TypeError, match="unexpected"):
            model(ids[:, :4], kv_state=DynamicCache())  # an unknown input is never dropped silently
