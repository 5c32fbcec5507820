"""Precision chosen from the hardware at run time (`train.precision: auto | fp32 | bf16 | fp16`).

auto: bf16 autocast on CPUs with AMX or AVX512-BF16 (bf16 matmuls ~6x fp32 there) and on CUDA GPUs
with native bf16 (compute capability >= 8.0; `torch.cuda.is_bf16_supported()` also says yes on
V100/T4 through emulation); fp16 autocast with a GradScaler on older GPUs; fp32 elsewhere (on AVX2-only
CPUs bf16 is ~100x slower than fp32). Master weights and optimizer states stay fp32; RMSNorm,
softmax and the loss are computed in fp32 by the model itself.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

CHOICES = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    device_type: str  # cpu | cuda
    reason: str  # why, in words (metrics.jsonl, progress, report, card)

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    @property
    def needs_scaler(self) -> bool:
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def label(self) -> str:
        return "fp32" if self.name == "fp32" else f"{self.name} autocast" + (" + loss scaling" if self.needs_scaler else "")


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def decide(requested: str, device_type: str, flags: set[str], capability: tuple[int, int] | None) -> Precision:
    """The choice as a pure function of the request and the hardware (what the tests drive)."""
    if requested not in CHOICES:
        raise UserError(f"train.precision {requested!r} is not one of {', '.join(CHOICES)}")
    fast_cpu_bf16 = bool({"amx_bf16", "avx512_bf16"} & flags)
    if device_type == "cuda":
        native = capability is not None and capability >= (8, 0)
        cc = f"compute capability {capability[0]}.{capability[1]}" if capability else "unknown compute capability"
        if requested == "auto":
            return Precision("bf16", "cuda", f"auto: {cc} has native bf16") if native else \
                Precision("fp16", "cuda", f"auto: {cc} has no native bf16; fp16 with loss scaling")
        note = "" if requested != "bf16" or native else " (emulated on this GPU: slow)"
        return Precision(requested, "cuda", f"asked for {requested}{note}")
    if requested == "fp16":
        raise UserError("train.precision fp16 is for CUDA GPUs; on a CPU use bf16 (with AMX/AVX512-BF16) or fp32")
    if requested == "auto":
        if fast_cpu_bf16:
            which = "AMX" if "amx_bf16" in flags else "AVX512-BF16"
            return Precision("bf16", "cpu", f"auto: this CPU has {which}: bf16 matmuls are fast")
        return Precision("fp32", "cpu", "auto: this CPU has no AVX512-BF16/AMX: bf16 would be far slower than fp32")
    note = "" if requested != "bf16" or fast_cpu_bf16 else " (this CPU has no AVX512-BF16/AMX: slow)"
    return Precision(requested, "cpu", f"asked for {requested}{note}")


def choose(requested: str, device: torch.device) -> Precision:
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return decide(requested, device.type, cpu_flags() if device.type == "cpu" else set(), capability)


@contextlib.contextmanager
def tf32_matmuls(device: torch.device, enabled: bool):
    """TF32 tensor cores for fp32 matmuls on CUDA inside the block (evaluation: ~8x an fp32 GPU's
    plain rate; training numerics are untouched), the previous setting restored after."""
    if not enabled or device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
