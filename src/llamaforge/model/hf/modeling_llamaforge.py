"""LlamaForge: a LLaMA-architecture causal LM, native to Hugging Face.

Design decisions, up front:
- pre-normalization with RMSNorm computed in fp32 (bf16 variance underflows), no biases anywhere;
- SwiGLU MLP: down_proj(silu(gate_proj x) * up_proj x);
- rotary embeddings in the rotate-half layout used by transformers' Llama, so weights map 1:1;
  linear Position Interpolation divides the frequencies by `factor` (arXiv 2306.15595);
- grouped-query attention through F.scaled_dot_product_attention (flash kernels on GPU);
- untied head by default; GPT-2/LLaMA init (std 0.02, residual-output projections / sqrt(2 L));
- loss with ignore_index=-100, summed and divided by `num_items_in_batch` when given, so gradient
  accumulation normalizes per token over the whole optimizer step;
- KV cache through transformers' Cache API; a 2-D `attention_mask` (left padding) is honoured.
  transformers renamed the cache argument and output field from `past_key_values` to `cache` (5.24):
  both names are accepted and the cache is returned under the field the installed version has.
Self-contained: imports nothing from llamaforge, so it travels with the weights (trust_remote_code).

Why transformers' Llama names (q_proj, gate_proj, input_layernorm... where nanoGPT-style code says
wq, w1, attention_norm): a folder we write is then also a stock Llama folder (`model_type: llama`,
`architectures: [LlamaForCausalLM]`, the same tensor names), so this class loads it with
`trust_remote_code=True`, transformers' own LlamaForCausalLM without it, and PEFT, vLLM, llama.cpp's
converter and every other Llama reader need no conversion step.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# The output field that holds the cache: `cache` from transformers 5.24, `past_key_values` before.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# Arguments callers (generate, pipelines, PEFT, Trainer) may pass that change nothing here.
_IGNORED_KWARGS = {"return_dict", "output_attentions", "output_hidden_states", "cache_position", "token_type_ids"}


def _output(loss, logits, cache) -> CausalLMOutputWithPast:
    return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

from .configuration_llamaforge import LlamaForgeConfig  # copied next to this file as remote code


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # fp32: the mean of squares underflows in bf16
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(config: LlamaForgeConfig) -> nn.Module:
    if config.norm_type == "layernorm":  # GPT-2
        return nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
    return RMSNorm(config.hidden_size, config.rms_norm_eps)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, factor: float, dtype: torch.dtype):
    """cos, sin of shape (B, T, head_dim) for integer positions (B, T); positions are divided by `factor`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float) / head_dim))
    inv_freq = inv_freq / factor  # linear Position Interpolation
    angles = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, head_dim): rotate-half layout
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, n_head, T, head_dim); cos/sin: (B, T, head_dim). Returns x's dtype: under autocast q, k
    are bf16 while cos/sin are fp32, and an fp32 q, k would make attention run in fp32."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, head_dim)
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


def native_gqa(q: torch.Tensor, mask) -> bool:
    """Whether SDPA's `enable_gqa` keeps this call on a fused kernel: on CUDA only flash runs GQA
    (capability >= 8.0, fp16/bf16, no mask); elsewhere K/V are expanded (the math kernel would
    materialize every score). CPUs run GQA as before."""
    return not q.is_cuda or gqa_flash(torch.cuda.get_device_capability(q.device), q.dtype, mask is not None)


def gqa_flash(capability: tuple[int, int], dtype: torch.dtype, masked: bool) -> bool:
    return capability >= (8, 0) and dtype in (torch.float16, torch.bfloat16) and not masked


class Attention(nn.Module):
    def __init__(self, config: LlamaForgeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.num_attention_heads
        self.n_kv_head = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=bias)
        self.o_proj.residual_out = True  # scaled init, see _init_weights

    def forward(self, x, cos, sin, mask, past_key_values):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if cos is not None:  # rotary positions (None: learned absolute positions were added to the input)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)  # (B, n_kv_head, T_past + T, head_dim)
        gqa = self.n_kv_head != self.n_head
        if gqa and not native_gqa(q, mask):  # K/V expanded: the fused kernel instead of the math one
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, n_head, T_kv, head_dim)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            gqa = False
        if mask is None:  # whole causal block, no padding: the flash / efficient kernels apply
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, hidden)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU down(silu(gate x) * up x) for LLaMA; GPT-2's down(gelu(up x)) when hidden_act is gelu_new."""

    def __init__(self, config: LlamaForgeConfig):
        super().__init__()
        self.gated = config.hidden_act == "silu"
        bias = config.mlp_bias
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)  # GPT-2: c_fc
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)  # GPT-2: c_proj
        self.down_proj.residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: LlamaForgeConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(config)  # pre-norm before attention
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)  # pre-norm before the MLP
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, past_key_values):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, past_key_values)
        return x + self.mlp(self.post_attention_layernorm(x))


def build_attention_mask(attention_mask: torch.Tensor | None, T: int, past: int,
                         device: torch.device | None = None) -> torch.Tensor | None:
    """Boolean (B, 1, T, past + T) mask, True = attend; None when plain causal attention is exact.

    Padded query rows may attend causally to anything (their outputs are never used), which keeps
    every row non-empty so softmax never sees an all-masked row (NaN).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask  # already expanded by the caller
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and (past == 0 or T == 1):
        return None  # is_causal (past == 0) or a single query that sees every cached key
    device = attention_mask.device if attention_mask is not None else device  # never a CPU mask for GPU inputs
    q_pos = torch.arange(past, past + T, device=device)[:, None]
    k_pos = torch.arange(past + T, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, past + T)
    if padded:
        keys = attention_mask[:, None, None, : past + T].bool()  # (B, 1, 1, past + T)
        queries = attention_mask[:, None, past : past + T, None].bool()  # (B, 1, T, 1)
        mask = mask & (keys | ~queries)
    return mask


class LlamaForgePreTrainedModel(PreTrainedModel):
    config_class = LlamaForgeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "residual_out", False):
                std = std / math.sqrt(2 * self.config.num_hidden_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class LlamaForgeModel(LlamaForgePreTrainedModel):
    def __init__(self, config: LlamaForgeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned":  # GPT-2
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        B, T = input_ids.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                # left padding: a prompt's first real token is position 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past : past + T]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device)[None].expand(B, T)
        x = self.embed_tokens(input_ids)  # (B, T, hidden)
        if self.config.position_embedding_type == "learned":
            x = x + self.embed_positions(position_ids)
            cos = sin = None
        else:
            cos, sin = rope_cos_sin(
                position_ids, self.config.head_dim, self.config.rope_theta, self.config.rope_factor, x.dtype
            )
        mask = build_attention_mask(attention_mask, T, past, input_ids.device)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, past_key_values)
        return self.norm(x), past_key_values


class LlamaForgeForCausalLM(LlamaForgePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LlamaForgeConfig):
        super().__init__(config)
        self.model = LlamaForgeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.compiled_loss = False  # training: the fused head + loss's chunks compiled (train.compile_loss)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`labels` follow transformers (aligned with input_ids, shifted here); `shift_labels` are
        already the next-token targets. -100 is ignored. With `num_items_in_batch` the summed loss
        is divided by it (per-token normalization over a whole accumulated step).
        The KV cache comes as `cache` (transformers >= 5.24) or `past_key_values` (earlier)."""
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the KV cache as `cache` or `past_key_values`, not both")
        past_key_values = cache if cache is not None else past_key_values
        unknown = {k for k, v in kwargs.items() if v is not None and k not in _IGNORED_KWARGS}
        if unknown:  # an input we do not read must never be dropped silently (as `cache` once was)
            raise TypeError(f"LlamaForgeForCausalLM.forward got unexpected arguments: {sorted(unknown)}")
        use_cache = self.config.use_cache if use_cache is None and not self.training else bool(use_cache)
        h, past_key_values = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        if shift_labels is None and labels is not None:
            shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
        if shift_labels is not None and self.training:
            # training: fused head + loss, the (B, T, vocab) logits are never materialized
            loss = linear_cross_entropy(h, self.lm_head.weight, shift_labels, num_items_in_batch,
                                        compiled=self.compiled_loss)
            return _output(loss, None, past_key_values if use_cache else None)
        logits = self.lm_head(h)  # (B, T, vocab)
        loss = None if shift_labels is None else causal_lm_loss(logits, shift_labels, num_items_in_batch)
        return _output(loss, logits, past_key_values if use_cache else None)


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy in fp32 over (B, T, vocab) logits and (B, T) targets, -100 ignored."""
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten().to(logits.device), ignore_index=-100, reduction=reduction
    )
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return loss


def _chunk_loss_and_grads(hc, weight, tc, need_grad: bool):
    """One chunk of the fused head + loss: the summed loss of rows `hc` (n, d) against targets `tc`
    (n,), and when `need_grad` the gradients (softmax - onehot) @ weight and its transpose @ hc."""
    valid = (tc != -100)[:, None]  # (n, 1)
    idx = tc.clamp(min=0)[:, None]
    logits = (hc @ weight.t()).float()  # (n, vocab), fp32 for the softmax
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    loss = ((lse - logits.gather(1, idx)) * valid).sum()
    if not need_grad:
        return loss, None, None
    p = logits.sub_(lse).exp_()  # softmax, in place
    p.scatter_add_(1, idx, -valid.float()).mul_(valid)  # softmax - onehot; ignored rows 0
    p = p.to(hc.dtype)
    return loss, p @ weight.to(hc.dtype), (p.t() @ hc).float()


_COMPILED_CHUNK = {}


def _compiled_chunk(hc, weight, tc, need_grad: bool):
    """The same chunk as one compiled graph (inductor fuses the fp32 passes over the (n, vocab)
    logits). It returns new tensors and the accumulation stays eager outside, so no gradient is
    formed inside a traced autograd.Function."""
    if "fn" not in _COMPILED_CHUNK:
        _COMPILED_CHUNK["fn"] = torch.compile(_chunk_loss_and_grads, dynamic=False)
    return _COMPILED_CHUNK["fn"](hc, weight, tc, need_grad)


class _LinearCrossEntropy(torch.autograd.Function):
    """Output head + cross-entropy, chunked over rows. The gradient (softmax - onehot) is formed in
    the forward pass, chunk by chunk, so the (N, vocab) logits, their log-softmax and its backward
    never exist whole: same FLOPs as lm_head + F.cross_entropy, far less memory traffic."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, compiled):
        # h (N, d), weight (vocab, d), targets (N,) with -100 = ignore; returns the summed loss
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        ctx.weight_dtype = weight.dtype
        one = _compiled_chunk if compiled else _chunk_loss_and_grads
        if compiled and torch.is_autocast_enabled(h.device.type):  # one cast of the head, not one per chunk
            weight = weight.to(torch.get_autocast_dtype(h.device.type))
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s : s + chunk], targets[s : s + chunk]
            n = hc.shape[0]
            if compiled and n < chunk:  # the last chunk padded with ignored rows: one graph for every length
                hc = torch.cat([hc, hc.new_zeros(chunk - n, hc.shape[1])])
                tc = torch.cat([tc, tc.new_full((chunk - n,), -100)])
            loss_c, gh, gw = one(hc, weight, tc, need_grad)
            loss += loss_c
            if need_grad:
                grad_h[s : s + chunk] = gh[:n]
                grad_w += gw
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * g.to(grad_h.dtype), (grad_w * g).to(ctx.weight_dtype), None, None, None


@torch.compiler.disable  # kept out of compiled graphs: on CUDA, torch.compile (2.11) turned the gradients
# this Function forms in its forward pass into zeros (seen on an H100: the compiled run never learned).
# `compiled` compiles only the per-chunk math inside it (LlamaForgeForCausalLM.compiled_loss; off by default)
def linear_cross_entropy(h, weight, targets, num_items_in_batch=None, chunk: int = 1024,
                         compiled: bool = False) -> torch.Tensor:
    """Loss of lm_head(h) against (B, T) targets; mean over targets, or sum / num_items_in_batch."""
    total = _LinearCrossEntropy.apply(h.flatten(0, 1), weight, targets.flatten().to(h.device), chunk, compiled)
    denom = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
    return total / denom
