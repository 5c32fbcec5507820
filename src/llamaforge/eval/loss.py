"""Next-token loss over batches of (inputs, targets): the one implementation behind validation during
training, perplexity and bits per byte, and the long-context evidence (loss by position).

Logits are scored in fp32, targets of -100 are ignored, and no KV cache is built (`use_cache=False`):
a loss evaluation never generates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..model.adapter import forward_logits


@dataclass
class LossSum:
    total: float  # summed loss (nats) over all targets
    count: int  # targets scored
    by_position: torch.Tensor | None = None  # (T,) summed loss per position, when asked for
    rows: int = 0  # windows scored

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1)


@torch.no_grad()
def windowed_loss(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device | None = None,
                  per_position: bool = False, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> LossSum:
    """Sum the loss of `model` over `batches` of (inputs, targets), each (b, T); `per_position`
    also sums it per position (every batch then has the same T). The model's mode is restored."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    out = LossSum(0.0, 0)
    try:
        for x, y in batches:
            with autocast():
                logits = forward_logits(model, x.to(device))  # (b, T, vocab); no KV cache where the model has one
            y = y.to(device)
            # flattened rows, not logits.transpose(1, 2): cross_entropy would copy the transposed logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100,
                                   reduction="none").view(y.shape)  # (b, T)
            out.total += float(loss.sum())
            out.count += int((y != -100).sum())
            out.rows += len(y)
            if per_position:
                sums = loss.sum(0).double().cpu()
                out.by_position = sums if out.by_position is None else out.by_position + sums
    finally:
        model.train(was_training)
    return out


def stream_windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None = None,
                   batch: int = 4) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows of `seq_len` targets covering `tokens` (every token after
    the first scored once; the last window may be shorter), batched."""
    n = len(tokens) - 1
    if max_tokens is not None:
        n = min(n, max_tokens)
    if n < 1:
        raise UserError("fewer than 2 tokens to evaluate; pass a longer text or more validation data")
    starts = list(range(0, n, seq_len))
    full = [s for s in starts if s + seq_len <= n]
    groups = [(full[i : i + batch], seq_len) for i in range(0, len(full), batch)]
    groups += [([s], n - s) for s in starts if s + seq_len > n]  # the shorter last window
    for rows, width in groups:
        t = torch.from_numpy(np.stack([np.asarray(tokens[r : r + width + 1], dtype=np.int64) for r in rows]))
        yield t[:, :-1], t[:, 1:]
