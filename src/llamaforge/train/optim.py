"""AdamW with decoupled weight decay on weight matrices only, and warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
                    device: torch.device | None = None) -> torch.optim.AdamW:
    """Decay matrices (dim >= 2: linear weights, embeddings), not norms or biases.

    Fused AdamW (one kernel for all parameters) where the device supports it: CUDA, and CPU for
    fp32; measured faster than the foreach default on the benchmark model here."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    device = device or params[0].device
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to 1 over `warmup_steps`, then cosine decay to `min_ratio` at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, warmup_steps: int, max_steps: int, min_ratio: float = 0.1) -> LambdaLR:
    return LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, max_steps, min_ratio))
