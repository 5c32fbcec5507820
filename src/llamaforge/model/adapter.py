"""What the trainer and evaluators ask of any model, ours or a user's: logits, a loss, its blocks.

- `forward_logits`: the logits of a forward pass, from an output with `.logits` or a plain tensor,
  passing only the arguments the model's forward accepts (a user's model need not know `use_cache`).
- `causal_loss`: the training loss for (inputs, next-token targets, target count). Our model fuses
  the head and the loss (the logits never exist whole); a user's model returns logits, scored by
  `logits_cross_entropy`, which forms the gradient chunk by chunk in the forward pass, so no fp32
  copy, log-softmax or second full tensor of the logits is ever held.
- `find_blocks`: the transformer blocks, for FSDP2 units and per-block torch.compile: the classes
  named by transformers' `_no_split_modules`, else the largest repeated `ModuleList`.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from torch import nn

from ..errors import UserError
from .hf import LlamaForgeForCausalLM

IGNORE = -100


def inner(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 keeps the model's own class)."""
    return model.module if hasattr(model, "module") else model


def is_builtin(model: nn.Module) -> bool:
    return isinstance(inner(model), LlamaForgeForCausalLM)


@lru_cache(maxsize=64)
def _accepts(forward_owner: type, name: str) -> bool:
    params = inspect.signature(forward_owner.forward).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def forward_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, vocab) logits; no KV cache is built where the model takes `use_cache`."""
    kwargs = {"input_ids": input_ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if _accepts(type(inner(model)), "use_cache"):
        kwargs["use_cache"] = False
    out = model(**kwargs)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{type(inner(model)).__name__}.forward returned {type(out).__name__}, neither logits "
                        "nor an output with .logits")
    return logits


def causal_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                count: torch.Tensor | int | None = None) -> torch.Tensor:
    """Summed cross-entropy of the next-token `targets` (-100 ignored) divided by `count` (all
    targets of the optimizer step), or the mean when `count` is None."""
    if is_builtin(model):
        return model(input_ids=inputs, shift_labels=targets, num_items_in_batch=count).loss
    logits = forward_logits(model, inputs)
    total = logits_cross_entropy(logits, targets.to(logits.device))
    return total / (count if count is not None else (targets != IGNORE).sum().clamp(min=1))


class _LogitsCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy over (N, vocab) logits; the gradient softmax - onehot is formed in the
    forward pass, one fp32 chunk at a time, into a tensor of the logits' own dtype (the gradient
    autograd would hold anyway)."""

    @staticmethod
    def forward(ctx, logits, targets, chunk):
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        loss = torch.zeros((), dtype=torch.float32, device=logits.device)
        for s in range(0, logits.shape[0], chunk):
            z, t = logits[s : s + chunk].float(), targets[s : s + chunk]  # fp32 logits: z IS them (never modified)
            valid = (t != IGNORE)[:, None]
            idx = t.clamp(min=0)[:, None]
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            loss += ((lse - z.gather(1, idx)) * valid).sum()
            if grad is not None:
                p = (z - lse).exp_()  # a new chunk-sized tensor: the model's logits stay as they were
                p.scatter_add_(1, idx, -valid.float()).mul_(valid)
                grad[s : s + chunk] = p
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None


def logits_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Summed next-token loss of (B, T, vocab) `logits` against (B, T) `targets` (-100 ignored)."""
    return _LogitsCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), chunk)


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: modules of the classes in `_no_split_modules`, else the
    children of the largest ModuleList whose entries share one class."""
    model = inner(model)
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names] if names else []
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and len({type(c) for c in m}) == 1]
    return list(max(lists, key=len)) if lists else []


def enable_activation_checkpointing(model) -> None:
    """Recompute each block in the backward pass: ours by its flag, a user's by transformers' API."""
    if is_builtin(model):
        model.model.gradient_checkpointing = True
    elif getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise UserError(f"train.activation_checkpointing: {type(model).__name__} does not support gradient checkpointing "
                        "(supports_gradient_checkpointing = False); drop the setting or add it to your model")
