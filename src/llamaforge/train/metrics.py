"""Metrics: always RUN_DIR/metrics.jsonl; TensorBoard when installed; wandb when asked (offline works).

One JSON object per line, with `type` = "train" (every step), "eval" (every eval interval),
"sample" (a generation from the fixed prompt) or "event" (resume, skipped step, checkpoint...).
"""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

import torch

from ..fsutil import atomic_write_bytes
from ..runs import metrics_path, parse_metrics

log = logging.getLogger(__name__)


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU's model name from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KB


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, budget_s: float = 0.05) -> float:
    """Measured matmul FLOP/s on this device in the training dtype: the denominator of MFU.
    The size doubles from 256 up to `n` while one product takes under `budget_s`, so a dtype the
    hardware only emulates (bf16 on an AVX2 CPU: a 2048^3 product takes seconds) costs no minutes."""
    size, best = 256, float("inf")
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        best = float("inf")
        for i in range(5):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 2:
                best = min(best, time.perf_counter() - t)
        if size >= n or best > budget_s:
            return 2 * size**3 / best
        size *= 2


# Dense (no sparsity) tensor-core peaks from the vendors' data sheets, TFLOP/s: (bf16, fp16, fp32 with
# TF32 off); 0 = no such units. Keyed by the name torch.cuda.get_device_name() reports, without the
# "NVIDIA " / "Tesla " / "GeForce " prefix, and matched EXACTLY: "L40" is not an L4, "H100 NVL" not a
# PCIe H100, "A10G" (AWS's, no public data sheet) not an A10. A card not listed falls back to a timed
# matmul, and the `started` event says which.
SPEC_TFLOPS = {
    "H200": (989, 989, 67), "H200 NVL": (835, 835, 60), "H100 80GB HBM3": (989, 989, 67),
    "H100 SXM5 80GB": (989, 989, 67), "H100 PCIe": (756, 756, 51), "H100 NVL": (835, 835, 60),
    "A100-SXM4-80GB": (312, 312, 19.5), "A100-SXM4-40GB": (312, 312, 19.5), "A100-PCIE-40GB": (312, 312, 19.5),
    "A100 80GB PCIe": (312, 312, 19.5), "L40S": (362, 362, 91.6), "L40": (181, 181, 90.5), "L4": (121, 121, 30.3),
    "A10": (125, 125, 31.2), "RTX 4090": (165, 165, 82.6), "RTX 3090": (71, 71, 35.6), "T4": (0, 65, 8.1),
    "V100-SXM2-16GB": (0, 125, 15.7), "V100-SXM2-32GB": (0, 125, 15.7), "V100-PCIE-16GB": (0, 112, 14),
    "V100-PCIE-32GB": (0, 112, 14),
}
_PREFIXES = ("NVIDIA ", "Tesla ", "GeForce ")


def spec_peak_flops(name: str, dtype: torch.dtype) -> float | None:
    """The data-sheet peak of a GPU (by its exact reported name) for `dtype`, FLOP/s; None when unknown."""
    key = name.strip()
    for prefix in _PREFIXES:
        key = key.removeprefix(prefix)
    col = {torch.bfloat16: 0, torch.float16: 1}.get(dtype, 2)
    peak = SPEC_TFLOPS.get(key, (0, 0, 0))[col]
    return peak * 1e12 if peak else None


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The MFU denominator and where it comes from: a GPU's spec sheet, else a timed matmul (on an H100
    a 2048^3 matmul is host-bound, so measuring there would read MFU 1.4-2.3x too high)."""
    if device.type == "cuda":
        spec = spec_peak_flops(torch.cuda.get_device_name(device), dtype)
        if spec:
            return spec, "spec sheet"
    return matmul_peak_flops(device, dtype), "measured 2048^3 matmul"


def train_flops_per_token(config, seq_len: int) -> float:
    """6 x matmul parameters (no input embedding) + causal attention (6 L T d)."""
    d, L = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    mlp_matrices = 3 if getattr(config, "hidden_act", "silu") == "silu" else 2  # SwiGLU vs GPT-2's GELU MLP
    per_layer = 2 * d * d + 2 * d * kv + mlp_matrices * d * config.intermediate_size
    return 6 * (L * per_layer + d * config.vocab_size) + 6 * L * seq_len * d


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool = True, wandb_project: str | None = None, config: dict | None = None,
                 truncate_after_step: int | None = None, tensorboard: bool = True):
        self.enabled = enabled
        self.path = metrics_path(run_dir)
        self.tb = self.wandb = None
        if not enabled:
            return
        if truncate_after_step is not None and self.path.exists():
            self._truncate(truncate_after_step)
        self.file = open(self.path, "a")
        if tensorboard:  # used when installed; a run that requires it was refused up front without it
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                pass
        if wandb_project:  # installed: checked up front (llamaforge[wandb])
            import wandb

            self.wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config or {})

    def rewind(self, step: int) -> None:
        """Forget the records after `step` (a rollback trains those steps again)."""
        if self.enabled:
            self.file.close()
            self._truncate(step, keep_events=True)  # the bad steps' events stay: the report counts them
            self.file = open(self.path, "a")

    def _truncate(self, step: int, keep_events: bool = False) -> None:
        """Drop records past the checkpoint we resume from (the resumed run writes them again) and any
        damaged line (a partial last line after a power cut); rewritten atomically."""
        keep = [r for r in parse_metrics(self.path.read_text(errors="replace"))
                if r.get("step", 0) <= step or (keep_events and r.get("type") == "event")]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())

    def log(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        record = {"type": kind, "step": step, "time": round(time.time(), 3), **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(f"{kind}/{k}", v, step)
            if kind == "sample":
                self.tb.add_text("sample", str(values.get("text", "")), step)
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in numbers.items()}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
