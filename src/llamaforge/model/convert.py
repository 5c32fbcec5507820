"""To and from transformers' stock `LlamaForCausalLM` (same tensors, same names: our model uses
transformers' Llama module names) and GPT-2 (fused, transposed Conv1D weights); and the renaming of
checkpoints written by earlier llamaforge versions, which used nanoGPT-style names.

Both Llama implementations use the rotate-half RoPE layout, so no permutation is needed.
"""

from __future__ import annotations

import re

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .hf.configuration_llamaforge import LlamaForgeConfig
from .hf.modeling_llamaforge import LlamaForgeForCausalLM

# Earlier llamaforge versions (model_type "llamaforge") named the modules nanoGPT-style; today's names
# are transformers' Llama names. Regex -> replacement on checkpoint keys (applied by rename_legacy).
_LEGACY = {
    r"\.attention_norm\.": ".input_layernorm.",
    r"\.ffn_norm\.": ".post_attention_layernorm.",
    r"\.attention\.wq\.": ".self_attn.q_proj.",
    r"\.attention\.wk\.": ".self_attn.k_proj.",
    r"\.attention\.wv\.": ".self_attn.v_proj.",
    r"\.attention\.wo\.": ".self_attn.o_proj.",
    r"\.feed_forward\.w3\.": ".mlp.up_proj.",
    r"\.feed_forward\.w2\.": ".mlp.down_proj.",
}


def legacy_key_mapping(gated: bool) -> dict[str, str]:
    """Old names -> new; `w1` was SwiGLU's gate (LLaMA) or GPT-2's c_fc (now up_proj)."""
    return {**_LEGACY, r"\.feed_forward\.w1\.": ".mlp.gate_proj." if gated else ".mlp.up_proj."}


def rename_legacy(state: dict[str, torch.Tensor], gated: bool) -> dict[str, torch.Tensor]:
    """A state dict with old module names renamed (new names pass through unchanged)."""
    table = legacy_key_mapping(gated)
    out = {}
    for key, value in state.items():
        for pattern, new in table.items():
            key = re.sub(pattern, new, key)
        out[key] = value
    return out


def uses_legacy_names(keys) -> bool:
    return any(".attention.w" in k or ".feed_forward." in k for k in keys)


_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
)


def _rope(config) -> dict:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope = dict(rope)
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.pop("type", "default"))
    return rope


def to_llama(model: LlamaForgeForCausalLM) -> LlamaForCausalLM:
    """A stock LlamaForCausalLM carrying the same weights (and the same rope scaling)."""
    c = model.config
    config = LlamaConfig(
        **{k: getattr(c, k) for k in _CONFIG_FIELDS}, rope_parameters=_rope(c), attention_bias=False, mlp_bias=False
    )
    llama = LlamaForCausalLM(config).to(model.dtype)
    llama.load_state_dict(model.state_dict(), strict=not c.tie_word_embeddings)
    return llama.eval()


def from_llama(llama: LlamaForCausalLM) -> LlamaForgeForCausalLM:
    """Our model from a stock Llama; refuses features we do not implement (biases, other rope types)."""
    c = llama.config
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError("Llama checkpoints with attention or MLP biases are not supported")
    if getattr(c, "head_dim", c.hidden_size // c.num_attention_heads) != c.hidden_size // c.num_attention_heads:
        raise ValueError("Llama checkpoints with a custom head_dim are not supported")
    rope = _rope(c)
    config = LlamaForgeConfig(**{k: getattr(c, k) for k in _CONFIG_FIELDS}, rope_scaling=rope)
    config.rope_factor  # raises on an unsupported rope type
    model = LlamaForgeForCausalLM(config).to(llama.dtype)
    model.load_state_dict(llama.state_dict(), strict=not c.tie_word_embeddings)
    return model.eval()


# our names -> GPT-2's (inside model.layers.N. / transformer.h.N.)
_GPT2_NORMS = (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2"))
_GPT2_LINEARS = (("self_attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj"))


def _is_gpt2(config) -> bool:
    return getattr(config, "position_embedding_type", "rope") == "learned"


def to_gpt2(model: LlamaForgeForCausalLM):
    """A stock GPT2LMHeadModel with the same weights (GPT-2 switches only: LayerNorm, GELU, learned
    positions, biases, tied head). GPT-2 stores linear weights as Conv1D (in, out) and fuses q, k, v."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    if not (_is_gpt2(c) and c.norm_type == "layernorm" and c.hidden_act == "gelu_new" and c.attention_bias
            and c.mlp_bias and c.tie_word_embeddings and c.num_key_value_heads == c.num_attention_heads):
        raise ValueError("only a GPT-2-shaped model (gpt2 presets) converts to GPT2LMHeadModel")
    config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.max_position_embeddings, n_embd=c.hidden_size,
                        n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, n_inner=c.intermediate_size,
                        activation_function="gelu_new", layer_norm_epsilon=c.rms_norm_eps, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                        pad_token_id=c.pad_token_id, tie_word_embeddings=True)
    gpt2 = GPT2LMHeadModel(config).to(model.dtype)
    src = model.state_dict()
    out = {"transformer.wte.weight": src["model.embed_tokens.weight"],
           "transformer.wpe.weight": src["model.embed_positions.weight"],
           "transformer.ln_f.weight": src["model.norm.weight"], "transformer.ln_f.bias": src["model.norm.bias"],
           "lm_head.weight": src["model.embed_tokens.weight"]}
    for i in range(c.num_hidden_layers):
        a, h = f"model.layers.{i}.", f"transformer.h.{i}."
        for ours, theirs in _GPT2_NORMS:
            out[h + theirs + ".weight"], out[h + theirs + ".bias"] = src[a + ours + ".weight"], src[a + ours + ".bias"]
        out[h + "attn.c_attn.weight"] = torch.cat([src[a + f"self_attn.{x}_proj.weight"] for x in "qkv"]).t()
        out[h + "attn.c_attn.bias"] = torch.cat([src[a + f"self_attn.{x}_proj.bias"] for x in "qkv"])
        for ours, theirs in _GPT2_LINEARS:
            out[h + theirs + ".weight"] = src[a + ours + ".weight"].t()
            out[h + theirs + ".bias"] = src[a + ours + ".bias"]
    gpt2.load_state_dict(out, strict=False)  # attention bias buffers of older versions are not weights
    return gpt2.eval()


def from_gpt2(gpt2) -> LlamaForgeForCausalLM:
    """Our model (GPT-2 switches) from a stock GPT2LMHeadModel."""
    c = gpt2.config
    if getattr(c, "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"GPT-2 activation {c.activation_function!r} is not supported")
    config = LlamaForgeConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.n_inner or 4 * c.n_embd,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_head,
        max_position_embeddings=c.n_positions, rms_norm_eps=c.layer_norm_epsilon, tie_word_embeddings=True,
        hidden_act="gelu_new", norm_type="layernorm", position_embedding_type="learned", attention_bias=True,
        mlp_bias=True, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    model = LlamaForgeForCausalLM(config).to(gpt2.dtype)
    src, d = gpt2.state_dict(), c.n_embd
    out = {"model.embed_tokens.weight": src["transformer.wte.weight"],
           "model.embed_positions.weight": src["transformer.wpe.weight"],
           "model.norm.weight": src["transformer.ln_f.weight"], "model.norm.bias": src["transformer.ln_f.bias"]}
    for i in range(c.n_layer):
        a, h = f"model.layers.{i}.", f"transformer.h.{i}."
        for ours, theirs in _GPT2_NORMS:
            out[a + ours + ".weight"], out[a + ours + ".bias"] = src[h + theirs + ".weight"], src[h + theirs + ".bias"]
        w, b = src[h + "attn.c_attn.weight"].t(), src[h + "attn.c_attn.bias"]
        for j, x in enumerate("qkv"):
            out[a + f"self_attn.{x}_proj.weight"], out[a + f"self_attn.{x}_proj.bias"] = w[j * d : (j + 1) * d], b[j * d : (j + 1) * d]
        for ours, theirs in _GPT2_LINEARS:
            out[a + ours + ".weight"] = src[h + theirs + ".weight"].t()
            out[a + ours + ".bias"] = src[h + theirs + ".bias"]
    model.load_state_dict({k: v.contiguous() for k, v in out.items()}, strict=False)  # lm_head is tied
    return model.eval()
