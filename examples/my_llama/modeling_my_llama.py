"""LLaMA from scratch: pre-norm RMSNorm, rotary positions (RoPE), SwiGLU, grouped-query attention.

A complete, minimal model of the kind the course asks for, written to llamaforge's contract
(README, "Bring your own model"): a PreTrainedModel whose forward(input_ids, attention_mask,
position_ids) returns logits. Parameter names follow transformers' Llama (model.layers.N.self_attn.q_proj
...), so `llamaforge check` can also compare it against the stock LlamaForCausalLM. It imports
nothing of llamaforge.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_my_llama import MyLlamaConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()  # the mean of squares in fp32: it underflows in bf16
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)


def rope_factor(config) -> float:
    """Linear Position Interpolation: positions are divided by this factor (1.0 = none)."""
    rope = getattr(config, "rope_scaling", None) or {}
    return float(rope.get("factor", 1.0)) if rope.get("rope_type", rope.get("type")) == "linear" else 1.0


def rotate(x, position_ids, theta: float, factor: float):
    """x: (B, n_head, T, head_dim) rotated by position; pairs (i, i + head_dim/2), transformers' layout."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float) / d))  # (d/2,)
    angles = (position_ids[..., None].float() / factor) * inv_freq  # (B, T, d/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, d)
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = x.float() * angles.cos() + torch.cat((-x2, x1), dim=-1) * angles.sin()
    return rotated.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: MyLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.theta, self.factor = config.rope_theta, rope_factor(config)
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, position_ids, mask, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, n_kv, T, head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = rotate(q, position_ids, self.theta, self.factor), rotate(k, position_ids, self.theta, self.factor)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, n_kv, T_past + T, head_dim)
        k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)  # (B, n_head, T_kv, head_dim)
        v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, n_head, T, head_dim)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: MyLlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, config: MyLlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, position_ids, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), position_ids, mask, cache)  # pre-norm residual
        return x + self.mlp(self.post_attention_layernorm(x))


def causal_mask(attention_mask, T: int, past: int, device) -> torch.Tensor:
    """(B or 1, 1, T, past + T) booleans, True = may attend: causal, and never to padding. A padded
    query row may see itself, so no row is all False (softmax would give NaN)."""
    q = torch.arange(past, past + T, device=device)[:, None]
    k = torch.arange(past + T, device=device)[None, :]
    mask = (k <= q)[None, None]  # (1, 1, T, past + T)
    if attention_mask is not None:
        keys = attention_mask[:, None, None, : past + T].bool()  # (B, 1, 1, past + T)
        mask = mask & (keys | (k == q)[None, None])
    return mask


class MyLlamaPreTrainedModel(PreTrainedModel):
    config_class = MyLlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]  # the block: FSDP shards and torch.compile compiles one each

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class MyLlamaModel(MyLlamaPreTrainedModel):
    def __init__(self, config: MyLlamaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:  # left padding: each row's first real token is position 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past : past + T]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device)[None].expand(B, T)
        mask = causal_mask(attention_mask, T, past, input_ids.device)
        x = self.embed_tokens(input_ids)  # (B, T, hidden)
        for layer in self.layers:
            x = layer(x, position_ids, mask, cache)
        return self.norm(x)


class MyLlamaForCausalLM(MyLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MyLlamaConfig):
        super().__init__(config)
        self.model = MyLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, cache=None,
                use_cache=None, labels=None, **kwargs):
        cache = cache if cache is not None else past_key_values  # transformers >= 5.24 says `cache`
        if use_cache and cache is None:
            cache = DynamicCache()
        logits = self.lm_head(self.model(input_ids, attention_mask, position_ids, cache))  # (B, T, vocab)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{field: cache if use_cache else None})
