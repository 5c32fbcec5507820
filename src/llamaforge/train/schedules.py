"""THE learning-rate schedules: one registry, from which the LR, the checkpoint kept at a decay's
start, the recipe's words (start event, card, report), config validation (`check_runnable`) and
the tests all read. Adding a schedule is one `@schedule` entry here and its test
(docs/contributing.md); an unknown name fails in `get` with the known ones, never falls through.

Every schedule warms up linearly over `train.warmup_steps`; after that its `factor(step, t)` gives
the multiplier of the peak LR (`train.lr`, and `train.muon_lr` for Muon's matrices).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch.optim.lr_scheduler import LambdaLR

from ..errors import UserError


@dataclass(frozen=True)
class Schedule:
    factor: Callable  # (step, train config) -> multiplier after warmup
    describe: Callable  # (train section as a dict) -> words for the recipe
    decay_start: Callable = lambda t: None  # (train config) -> the first step below the peak, kept (PINNED)
    check: Callable = lambda t: None  # (train config) -> raise UserError for settings it cannot run


SCHEDULES: dict[str, Schedule] = {}


def schedule(name: str, **kw):
    """Register `factor(step, t)` as schedule `name`."""
    def register(fn):
        SCHEDULES[name] = Schedule(fn, **kw)
        return fn
    return register


def get(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise UserError(f"train.schedule {name!r} is not one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def lr_factor(step: int, t) -> float:
    """The LR multiplier at `step` (0-based) under train config `t`."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    return get(t.schedule).factor(step, t)


def build_scheduler(optimizer, t) -> LambdaLR:
    get(t.schedule)  # refused here too, not at the first step
    return LambdaLR(optimizer, lambda s: lr_factor(s, t))


def decay_start(t) -> int | None:
    return get(t.schedule).decay_start(t)


def describe(t: dict) -> str:
    warm = f"{t.get('warmup_steps')} warmup steps"
    return get(t.get("schedule")).describe(dict(t, warm=warm))


# -- the schedules -----------------------------------------------------------------------------------
@schedule("cosine", describe=lambda t: f"{t['warm']}, cosine to {t.get('min_lr_ratio')} of peak")
def _cosine(step: int, t) -> float:
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _wsd_start(t) -> int:
    return t.max_steps - max(1, round(t.decay_fraction * t.max_steps))


def _wsd_check(t) -> None:
    if t.decay_shape not in ("linear", "1-sqrt"):
        raise UserError(f"train.decay_shape {t.decay_shape!r} is not one of linear, 1-sqrt")


@schedule("wsd", decay_start=_wsd_start, check=_wsd_check,
          describe=lambda t: (f"warmup-stable-decay: {t['warm']}, constant, then {t.get('decay_shape')} decay over "
                              f"the last {t.get('decay_fraction')} of the steps to {t.get('min_lr_ratio')} of peak"))
def _wsd(step: int, t) -> float:
    """1 until the last `decay_fraction` of the steps, then down to `min_lr_ratio`, linearly or as
    1 - sqrt(progress)."""
    start = _wsd_start(t)
    if step < start:
        return 1.0
    progress = min(1.0, (step - start + 1) / (t.max_steps - start))
    down = progress if t.decay_shape == "linear" else math.sqrt(progress)
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * (1 - down)
