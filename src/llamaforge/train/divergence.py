"""Divergence: which steps are bad, when a run has diverged, and the rules that keep its good work.

A step is bad when its loss or gradient is not finite (the update was skipped) or when its loss is a
spike: above `train.spike_factor` x the median of the last SPIKE_WINDOW good losses (once that many
are known; 0 turns spikes off). `train.max_bad_steps` bad steps in a row is a divergence. Then, by
`train.on_divergence`:
- `stop` (default): exit 2 naming the newest healthy checkpoint and the fix;
- `rollback`: back to the newest healthy checkpoint (weights, optimizer, RNG, schedule), the data
  window that was being read skipped, every learning rate times ROLLBACK_LR_FACTOR, an event row;
  at most MAX_ROLLBACKS times a run, then `stop`.
A checkpoint is written only from finite weights and records whether the run was healthy (no bad
step in the current streak); rotation never deletes the newest healthy one (train/checkpoint.py).
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from pathlib import Path

from ..errors import UserError
from . import checkpoint as ckpt

log = logging.getLogger(__name__)

SPIKE_WINDOW = 50  # good losses the spike threshold's median is taken over
ROLLBACK_LR_FACTOR = 0.5  # each rollback halves every learning rate
MAX_ROLLBACKS = 3


class Health:
    """The bad-step streak and the recent good losses; saved in every checkpoint (exact resume)."""

    def __init__(self, spike_factor: float, max_bad_steps: int):
        self.spike_factor, self.max_bad_steps = spike_factor, max_bad_steps
        self.recent: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self.streak = 0
        self.good = 0  # good steps of the run so far: a run with none publishes nothing

    def observe(self, loss: float, skipped: bool) -> str | None:
        """'non-finite', 'spike' or None (a good step) for one step's loss."""
        bad = "non-finite" if skipped else None
        if not bad and self.spike_factor and len(self.recent) == SPIKE_WINDOW \
                and loss > self.spike_factor * statistics.median(self.recent):
            bad = "spike"
        if bad:
            self.streak += 1
        else:
            self.streak, self.good = 0, self.good + 1
            self.recent.append(loss)
        return bad

    @property
    def healthy(self) -> bool:
        return self.streak == 0

    @property
    def diverged(self) -> bool:
        return self.streak >= self.max_bad_steps

    def threshold(self) -> float | None:
        return self.spike_factor * statistics.median(self.recent) if len(self.recent) == SPIKE_WINDOW else None

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "streak": self.streak, "good": self.good}

    def load_state_dict(self, state: dict) -> None:
        self.recent = deque((float(x) for x in state.get("recent", [])), maxlen=SPIKE_WINDOW)
        self.streak = int(state.get("streak", 0))
        self.good = int(state.get("good", len(self.recent) or 1))  # earlier checkpoints: they trained


class Divergence:
    """The Trainer's part that handles a bad step or an out-of-memory step (a mixin: it uses the
    Trainer's health, metrics, batches, optimizer, scheduler and restore)."""

    def bad_step(self, why: str, stats) -> bool:
        """A non-finite step (its update skipped) or a loss spike; after max_bad_steps in a row: divergence."""
        streak = self.health.streak
        log.warning("step %d: %s; %d bad steps in a row", self.step, "loss or gradient not finite, update skipped"
                    if why == "non-finite" else f"loss {stats.loss:.3f} spiked above {self.health.threshold():.3f}", streak)
        self.metrics.log("event", self.step, event="skipped_step" if why == "non-finite" else "loss_spike",
                         loss=stats.loss, grad_norm=stats.grad_norm)
        if not self.health.diverged:
            return False
        found = ckpt.newest_healthy(self.run_dir)  # rank 0's choice, for every rank (as a resume's)
        name = self.d.broadcast(found.name if found is not None else None)
        healthy = ckpt.checkpoints_dir(self.run_dir) / name if name else None
        if healthy is not None and not healthy.is_dir():
            raise UserError(f"rank {self.d.rank} cannot read checkpoint {name}, which rank 0 rolls back to; put the "
                            "run directory on a filesystem every node shares")
        if self.t.on_divergence == "rollback" and healthy is not None and self.rollbacks < MAX_ROLLBACKS:
            self.rollback(healthy)
            return True
        where = f"the last healthy checkpoint is {healthy.relative_to(self.run_dir)}" if healthy else \
            "no healthy checkpoint was saved"
        hint = ("set --train.on_divergence rollback" if self.t.on_divergence != "rollback" else
                f"it already rolled back {self.rollbacks} times" if healthy else "rollback needs a healthy checkpoint")
        raise UserError(f"the run diverged at step {self.step} ({streak} bad steps in a row: {why}); {where}: run the "
                        f"same command with a lower --lr (it resumes from there); {hint}")

    def rollback(self, path: Path) -> None:
        """Back to healthy checkpoint `path`, past the data window that diverged, every LR scaled down."""
        position = self.batches.state_dict()  # where the reader is now: the diverging window is skipped
        failed_at, scale, count = self.step, self.lr_scale * ROLLBACK_LR_FACTOR, self.rollbacks + 1
        self.restore(path, ckpt.load_weights(path, self.model))
        self.batches.load_state_dict(position)
        self.lr_scale, self.rollbacks = scale, count
        sched = self.scheduler
        sched.base_lrs = [peak * scale for peak in self.peak_lrs]
        for group, base, fn in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * fn(sched.last_epoch)
        self.metrics.rewind(self.step)
        self.metrics.log("event", self.step, event="rollback", checkpoint=path.name, diverged_at=failed_at,
                         lr_scale=self.lr_scale, rollbacks=self.rollbacks)
        log.warning("diverged at step %d: rolled back to %s with every learning rate x %g", failed_at, path.name,
                    self.lr_scale)

    def out_of_memory(self, micro: int, smaller: int) -> None:
        """A step ran out of memory: it is redone in smaller micro-batches (train/step.fitting_step)."""
        self.optimizer.zero_grad(set_to_none=True)
        log.warning("step %d: out of memory with micro-batch %d; the step again with %d", self.step + 1, micro, smaller)
        self.metrics.log("event", self.step + 1, event="out_of_memory", micro_batch=micro, retry_with=smaller)
