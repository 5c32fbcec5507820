"""One optimizer step over several micro-batches, the loss normalized per target token over the
whole step (not per micro-batch), gradient all-reduce skipped on all but the last micro-batch."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..model.adapter import causal_loss
from .distributed import grad_sync
from .optim import Muon, MuonWithAdamW
from .precision import Precision


@dataclass
class StepStats:
    loss: float  # mean loss per target token over the step (all ranks)
    grad_norm: float  # before clipping
    tokens: int  # target tokens in the step (all ranks)
    skipped: bool  # non-finite loss or gradient: no update
    scaler_skipped: bool = False  # fp16: the loss scaler found inf/NaN gradients and skipped this update


def split_micro(batch: tuple[torch.Tensor, torch.Tensor], micro: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) -> micro-batches of at most `micro` rows."""
    x, y = batch
    return [(x[i : i + micro], y[i : i + micro]) for i in range(0, len(x), micro)]


def takes_found_inf(optimizer) -> bool:
    """torch's fused Adam/AdamW read `optimizer.found_inf` (a device flag, as GradScaler sets it) and
    skip the update on the device; our Muon multiplies its update by it (train/optim.py); Muon +
    AdamW hands it to both."""
    if isinstance(optimizer, MuonWithAdamW):
        return takes_found_inf(optimizer.adamw)
    return isinstance(optimizer, Muon) or (isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and all(
        g.get("fused") for g in optimizer.param_groups))


def smaller_micro(rows: int, micro: int) -> int | None:
    """The largest micro-batch at most half of `micro` that divides `rows` (None below 1)."""
    return next((m for m in range(micro // 2, 0, -1) if rows % m == 0), None)


def fitting_step(run, batch: tuple[torch.Tensor, torch.Tensor], micro: int, world: int, on_smaller):
    """`run(micro_batches)` (a train_step); on out-of-memory the same batch again in micro-batches
    half the size (the same batch_tokens, so the same update), `on_smaller(old, new)` told each time.
    Returns (stats, the micro-batch that fitted). Several processes cannot agree mid-step: refused."""
    while True:
        try:
            return run(split_micro(batch, micro)), micro
        except torch.OutOfMemoryError as e:
            if not getattr(e, "llamaforge_retryable", False):  # in the update itself: the step cannot be redone
                raise UserError("out of memory in the optimizer step (the model, its gradients and optimizer state "
                                "do not fit); turn on train.fsdp under torchrun, or use a smaller model") from None
            smaller = smaller_micro(len(batch[0]), micro)
            if world > 1 or smaller is None:
                raise UserError(f"out of memory with {micro} sequences per forward pass "
                                f"({'under several processes' if world > 1 else 'the smallest possible'}); "
                                + (f"set --train.micro_batch {smaller} and run the same command (it resumes)"
                                   if smaller else "lower train.seq_len, turn on train.activation_checkpointing "
                                   "or train.fsdp")) from None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            on_smaller(micro, smaller)
            micro = smaller


def train_step(model, optimizer, micro_batches, grad_clip: float = 1.0, device=None, all_reduce=None,
               world: int = 1, precision: Precision | None = None, scaler=None) -> StepStats:
    """`micro_batches`: list of (inputs, targets) of shape (b, T); targets -100 are ignored.

    `all_reduce(tensor)` sums over data-parallel ranks (None: single process). The summed loss of
    each micro-batch is divided by the step's total target count across ranks, so gradients equal
    those of one big batch. DDP and FSDP *average* gradients over the `world` ranks, so the
    backward pass scales by `world` to turn that average back into the sum. `precision` gives the
    autocast (train/precision.py); fp16 passes a GradScaler, whose skipped steps are not errors."""
    device = device or next(model.parameters()).device
    autocast = precision.autocast if precision is not None else contextlib.nullcontext
    n_local = sum(int((y != -100).sum()) for _, y in micro_batches)
    # an integer tensor: FSDP2's MixedPrecisionPolicy casts floating-point forward inputs to bf16, which
    # rounded counts such as 257 (by up to 0.4%); the model divides by it in fp32 (exact below 2^24)
    n_total = torch.tensor(n_local, dtype=torch.long, device=device)
    if all_reduce is not None:
        all_reduce(n_total)
    loss_sum = torch.zeros((), device=device)
    try:
        for i, (x, y) in enumerate(micro_batches):
            with grad_sync(model, enabled=i == len(micro_batches) - 1), autocast():
                loss = causal_loss(model, x.to(device, non_blocking=True), y.to(device, non_blocking=True), n_total)
                scaled = loss * world if world > 1 else loss
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            loss_sum += loss.detach()
    except torch.OutOfMemoryError as e:  # before any update: the step can be redone in smaller pieces
        e.llamaforge_retryable = True
        raise
    if all_reduce is not None:
        all_reduce(loss_sum)
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    scaler_skipped = False
    if scaler is not None:  # an overflow lowers the scale and skips the update: expected, not a bad step
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        scaler_skipped = scaler.get_scale() < scale  # update() lowers the scale exactly when it skipped
        finite = bool(torch.isfinite(loss_sum))
    elif takes_found_inf(optimizer):  # the skip decided on the device: no host sync before the update
        norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
        bad = (~(torch.isfinite(loss_sum) & torch.isfinite(norm))).float()
        optimizer.found_inf = bad  # fused AdamW skips its update and step count where this is 1; Muon x 0
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        finite = not bool(bad)  # read once the step is queued
    else:  # an unfused optimizer: decided on the host
        finite = bool(torch.isfinite(loss_sum)) and bool(torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(float(loss_sum), float(grad_norm), int(n_total), not finite, scaler_skipped)
