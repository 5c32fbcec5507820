"""Stopping a run cleanly: on a signal, or before a session's time limit.

Kaggle (12 h sessions), Colab, SLURM and spot instances end jobs with SIGTERM (SLURM's `--signal`
sends SIGUSR1 first); a user presses Ctrl-C (SIGINT). A handler that raised wherever the code was
could land between reading a batch and applying it, or inside the optimizer's per-matrix loop, and
save a state no uninterrupted run passes through. Here a signal only sets a flag; the loop looks at
it between steps (every rank, agreeing through the step's own loss all-reduce; one small vote of its
own only before the first step and after validation, scoring or a save), saves one checkpoint and stops with
EXIT_STOPPED. `train.time_limit` stops the same way when the next step and a checkpoint might not fit
in what is left of the limit.
"""

from __future__ import annotations

import contextlib
import signal
import time

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early with a checkpoint; run the same command to continue
SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
STOP_CODES = (*SIGNALS, "time limit")  # the reasons ranks vote on (train/loop.py); the last voted for wins


class Stopped(Exception):
    """Training stopped early after saving a checkpoint (a signal or the time limit)."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"stopped at step {step} ({reason}) with a checkpoint saved; run the same command to continue")
        self.step, self.reason = step, reason


class Abandoned(Exception):
    """A stop arrived during validation, sampling or benchmark scoring: that work is dropped so the
    checkpoint is saved at once (SLURM kills 30 s after SIGTERM by default)."""


@contextlib.contextmanager
def abandon_on_stop(model, flag: StopFlag, enabled: bool = True):
    """While active, each forward of `model` first looks at the flag and raises Abandoned when a
    signal has arrived (off under FSDP2, where every forward is a collective of all ranks)."""
    if not enabled:
        yield
        return

    def check(_module, _args):
        if flag.received:
            raise Abandoned(flag.received)

    handle = model.register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


class StopFlag:
    """Signal handlers that only record the signal, and the time-limit clock.

    Use as a context manager around the loop (installed on the main thread only; elsewhere signals
    keep their handlers). `reason()` is this process's answer; the loop makes the ranks agree."""

    def __init__(self, time_limit: float | None = None, clock=time.monotonic):
        self.time_limit, self.clock = time_limit, clock
        self.start = clock()
        self.received: str | None = None
        self._old: dict = {}

    def __enter__(self) -> StopFlag:
        for name in SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the signals alone
                break
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def reason(self, next_step_s: float = 0.0, save_s: float = 0.0) -> str | None:
        """Why to stop before the next step: a received signal, or a time limit that the next step
        (`next_step_s`, an estimate) and a checkpoint (`save_s`) might overrun; None to go on."""
        if self.received:
            return self.received
        if self.time_limit is not None and self.clock() - self.start + next_step_s + save_s >= self.time_limit:
            return "time limit"
        return None
