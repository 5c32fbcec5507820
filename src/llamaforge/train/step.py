"""One optimizer step over several micro-batches, the loss normalized per target token over the
whole step (not per micro-batch), gradient all-reduce skipped on all but the last micro-batch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

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
    votes: list[float] = field(default_factory=list)  # Ranks.vote summed over the ranks


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


class StepOutOfMemory(Exception):
    """Out of memory in a step's forward or backward, before any update. `redo`: the step can run
    again in smaller micro-batches (one process, or ranks that agreed: `Ranks.agree_on_oom`)."""

    def __init__(self, redo: bool):
        super().__init__("out of memory in the forward or backward pass")
        self.redo = redo


def fitting_step(run, batch: tuple[torch.Tensor, torch.Tensor], micro: int, on_smaller):
    """`run(micro_batches)` (a train_step); on out-of-memory the same batch again in micro-batches
    half the size (the same batch_tokens, so the same update), `on_smaller(old, new)` told each time.
    Returns (stats, the micro-batch that fitted). Out of memory in the update: refused in one line."""
    while True:
        try:
            return run(split_micro(batch, micro)), micro
        except StepOutOfMemory as e:
            smaller = smaller_micro(len(batch[0]), micro)
            if not e.redo or smaller is None:
                raise UserError(f"out of memory with {micro} sequences per forward pass "
                                f"({'the smallest possible' if smaller is None else 'under several processes'}); "
                                + (f"set --train.micro_batch {smaller} and run the same command (it resumes; "
                                   "--train.micro_batch auto redoes such a step, except under FSDP2)" if smaller
                                   else "lower train.seq_len, turn on train.activation_checkpointing or train.fsdp")
                                ) from None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            on_smaller(micro, smaller)
            micro = smaller
        except torch.OutOfMemoryError:  # in the update itself: the step cannot be redone
            raise UserError("out of memory in the optimizer step (the model, its gradients and optimizer state "
                            "do not fit); turn on train.fsdp under torchrun, or use a smaller model") from None


@dataclass
class Ranks:
    """How a step meets the other data-parallel ranks (train_step's `ranks`; None: one process)."""
    all_reduce: Callable[[torch.Tensor], None]  # sums in place over the ranks
    world: int
    vote: Callable[[], list[float]] | None = None  # this rank's votes, summed with the loss (StepStats.votes)
    agree_on_oom: bool = False  # DDP only: gradients reduced after the backward, once no rank ran out of memory


def reduce_gradients(model: torch.nn.Module, ranks: Ranks, bucket: int = 1 << 24) -> None:
    """Average every gradient over the ranks, as DDP's own reduction would, in flat buckets of at
    most `bucket` elements per dtype (the agree-on-out-of-memory path, where DDP's is off)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for dtype in dict.fromkeys(g.dtype for g in grads):
        same = [g for g in grads if g.dtype == dtype]
        while same:
            take, n = [], 0
            while same and (not take or n + same[0].numel() <= bucket):
                n += same[0].numel()
                take.append(same.pop(0))
            flat = torch.cat([g.reshape(-1) for g in take])
            ranks.all_reduce(flat)
            flat.div_(ranks.world)
            torch._foreach_copy_(take, [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in take]), take)])


def train_step(model, optimizer, micro_batches, grad_clip: float = 1.0, device=None, ranks: Ranks | None = None,
               precision: Precision | None = None, scaler=None) -> StepStats:
    """`micro_batches`: list of (inputs, targets) of shape (b, T); targets -100 are ignored.

    The summed loss of each micro-batch is divided by the step's total target count across ranks,
    so gradients equal those of one big batch. DDP and FSDP *average* gradients over the ranks, so
    the backward pass scales by `world` to turn that average back into the sum. `precision` gives the
    autocast (train/precision.py); fp16 passes a GradScaler, whose skipped steps are not errors.
    The ranks' votes travel in the loss's all-reduce: no collective or host sync of their own."""
    device = device or next(model.parameters()).device
    autocast = precision.autocast if precision is not None else contextlib.nullcontext
    world, agree = (ranks.world, ranks.agree_on_oom) if ranks else (1, False)
    n_local = sum(int((y != -100).sum()) for _, y in micro_batches)
    # an integer tensor: FSDP2's MixedPrecisionPolicy casts floating-point forward inputs to bf16, which
    # rounded counts such as 257 (by up to 0.4%); the model divides by it in fp32 (exact below 2^24)
    n_total = torch.tensor(n_local, dtype=torch.long, device=device)
    if ranks is not None:
        ranks.all_reduce(n_total)
    loss_sum, out_of_memory = torch.zeros((), device=device), False
    try:
        for i, (x, y) in enumerate(micro_batches):
            with grad_sync(model, enabled=i == len(micro_batches) - 1 and not agree), autocast():
                loss = causal_loss(model, x.to(device, non_blocking=True), y.to(device, non_blocking=True), n_total)
                scaled = loss * world if world > 1 else loss
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            loss_sum += loss.detach()
    except torch.OutOfMemoryError:  # before any update: the step can be redone in smaller pieces
        out_of_memory = True
    if out_of_memory:  # outside the handler: the error's frames, and the activations they hold, are gone
        loss = scaled = None
        optimizer.zero_grad(set_to_none=True)
        if not agree:
            raise StepOutOfMemory(redo=ranks is None)
    votes = None
    if ranks is not None:
        mine = ranks.vote() if ranks.vote else []
        shared = torch.cat([loss_sum.view(1), _on(device, [float(out_of_memory), *mine])])
        ranks.all_reduce(shared)
        loss_sum, votes = shared[0], shared[2:]  # the votes are read after the update is queued
        if agree and bool(shared[1]):  # one rank ran out of memory: every rank redoes the step
            optimizer.zero_grad(set_to_none=True)
            raise StepOutOfMemory(redo=True)
        if agree:
            reduce_gradients(model, ranks)
    return _update(model, optimizer, grad_clip, scaler, loss_sum, n_total, votes)


def _on(device: torch.device, values: list[float]) -> torch.Tensor:
    """A small host list on `device` without waiting for the device's queue (pinned, asynchronous)."""
    host = torch.tensor(values, dtype=torch.float32)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


def _update(model, optimizer, grad_clip, scaler, loss_sum, n_total, votes) -> StepStats:
    """Clip, then the optimizer step unless the loss or the gradient is not finite; scalars read last."""
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
    return StepStats(float(loss_sum), float(grad_norm), int(n_total), not finite, scaler_skipped,
                     votes.tolist() if votes is not None else [])
