"""The registry of model checks: name -> a small function + the bug it catches.

A check takes a `Subject` (how to build the model under test, small and at the preset's size, and
a little real text) and returns a `Row`. `run_checks` runs them in registry order; a check that
raises is a FAIL naming the exception (a user's model may raise anywhere), never a crash.
Adding a check: one function with `@check(...)` in one of the modules below, and its test.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..model.usercode import LLAMA_FIELDS, ModelCode


@dataclass
class Row:
    check: str
    status: str  # "pass" | "fail" | "skip"
    value: object = None  # the measured number (or a short text)
    hint: str | None = None  # FAIL: what is probably wrong and where to look; SKIP: why

    def to_dict(self) -> dict:
        return {"check": self.check, "status": self.status, "value": self.value, "hint": self.hint}


@dataclass
class Subject:
    """What the checks get: the code, the small and the preset-size config fields, real text."""

    code: ModelCode
    small: dict  # standard Llama fields of the fast model
    full: dict  # the preset's fields (built on the meta device only)
    tokens: torch.Tensor  # (N,) token ids of real text, N >= 64, below small["vocab_size"]
    preset: str = "llama-150m"
    min_non_embedding: int | None = None  # the course's floor when the preset is its model
    name_map: list[tuple[str, str]] = field(default_factory=list)  # user name regex -> stock Llama name

    def config(self, **over):
        return self.code.make_config({**self.small, **over})

    def build(self, seed: int = 0, **over):
        """The small model (fp32, eval mode), deterministic for a seed."""
        return self.code.build(self.config(**over), seed).float().eval()

    def batch(self, rows: int = 2, T: int = 16, offset: int = 0) -> torch.Tensor:
        """(rows, T) windows of the real text."""
        return torch.stack([self.tokens[offset + i * T : offset + (i + 1) * T] for i in range(rows)])


@dataclass(frozen=True)
class Check:
    name: str
    fn: Callable[[Subject], Row]
    catches: str  # the bug it catches, one line (docs/own-model.md lists them)


CHECKS: dict[str, Check] = {}


def check(name: str, catches: str):
    """Register `fn(subject) -> Row | (status, value, hint)` under `name`."""
    def register(fn):
        CHECKS[name] = Check(name, fn, catches)
        return fn
    return register


def run_checks(subject: Subject, only: list[str] | None = None, progress: Callable[[str], None] | None = None) -> list[Row]:
    rows = []
    for name, c in CHECKS.items():
        if only and name not in only:
            continue
        if progress:
            progress(name)
        try:
            row = c.fn(subject)
        except Exception as e:  # noqa: BLE001 - the user's model may raise anything
            frame = traceback.extract_tb(e.__traceback__)[-1]
            row = Row(name, "fail", None, f"raised {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''} "
                                          f"at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}")
        rows.append(row)
    return rows


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.float() - b.float()).abs().max()
    return float(d) if torch.isfinite(d) else math.inf


def given_fields(subject: Subject) -> dict:
    return {k: subject.small[k] for k in LLAMA_FIELDS if k in subject.small}
