"""To and from transformers' stock `LlamaForCausalLM`: same tensors, other names.

Both models use the rotate-half RoPE layout, so no permutation is needed, only a renaming.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .hf.configuration_llamaforge import LlamaForgeConfig
from .hf.modeling_llamaforge import LlamaForgeForCausalLM

# our module names -> transformers' Llama names (inside model.layers.N.)
_LAYER_NAMES = {
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
}
_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
)


def _rename(state: dict[str, torch.Tensor], table: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for ours, theirs in table.items():
            key = key.replace(f".{ours}.", f".{theirs}.")
        out[key] = value
    return out


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
    state = _rename(model.state_dict(), _LAYER_NAMES)
    llama.load_state_dict(state, strict=not c.tie_word_embeddings)
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
    back = {theirs: ours for ours, theirs in _LAYER_NAMES.items()}
    model.load_state_dict(_rename(llama.state_dict(), back), strict=not c.tie_word_embeddings)
    return model.eval()
