"""Whether to torch.compile, decided from the hardware and the run's length (`train.compile`,
`train.compile_loss`: auto | true | false).

What is compiled: each transformer block (distributed.compile_blocks, before DDP/FSDP wraps the
model) and, separately, the per-chunk math of the fused head + loss (the model's `compiled_loss`).

`auto` compiles where it pays: inductor must be able to build kernels here (a C++ compiler on a CPU,
triton on CUDA: probed once, by compiling a one-line function), and the run must be long enough to
repay the warm-up (`python -m benchmarks compile_cost` on a 2-core AMD EPYC Zen 4: a cold first step
of 15 s with the loss compiled, 22-29 s with the blocks, against 0.42 s a step saved by the loss in
bf16 at the `tiny` preset; docs/training.md: Compilation). The loss
chunks are compiled by `auto` on CPUs only: on CUDA an earlier compiled loss gave zero gradients, so
there it stays off until `make gpu-check` (which runs it both ways) has measured it on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError

MIN_STEPS = 200  # auto: shorter runs stay eager (a warm-up of ~15-30 s is not repaid in fewer steps)
BLOCKS_MIN_HIDDEN = 512  # auto on a CPU: narrower blocks measured no faster compiled
_PROBED: dict[str, str] = {}


@dataclass
class CompileChoice:
    blocks: bool
    loss: bool
    reason: str

    def label(self) -> str:
        parts = [name for name, on in (("blocks", self.blocks), ("fused loss", self.loss)) if on]
        return f"compiled: {' + '.join(parts)}" if parts else "eager"


def inductor_problem(device: torch.device) -> str:
    """'' when torch.compile's inductor builds and runs a kernel on this device type, else why not."""
    if device.type not in _PROBED:
        try:
            x = torch.arange(8.0, device=device)
            fn = torch.compile(lambda t: (t * 2 + 1).sin(), dynamic=False)
            ok = torch.allclose(fn(x), (x * 2 + 1).sin())
            _PROBED[device.type] = "" if ok else "a compiled kernel gave wrong values"
        except Exception as e:  # noqa: BLE001 - a missing compiler, triton or headers: any backend error
            _PROBED[device.type] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}" if str(e) else type(e).__name__
    return _PROBED[device.type]


def choose(compile_: str, compile_loss: str, device: torch.device, max_steps: int, hidden_size: int = 768,
           precision: str = "bf16") -> CompileChoice:
    """The blocks' and the loss's compilation for a run of `max_steps` on `device`, and why.

    `auto` on CUDA: the blocks (1.64x eager on an H100 at llama-150m: docs/gpu.md's gpu-check figures), not
    the loss (not yet measured there). On a CPU (benchmarks compile_cost, train_step): the blocks from
    hidden size BLOCKS_MIN_HIDDEN (1.32x eager at 512 in bf16 here; the issue measured 1.21x in fp32
    on an AVX2 EPYC; at 128 within noise of eager, with 22-29 s of warm-up), the loss in bf16 (0.72x
    the step time at the `tiny` preset; in fp32 within noise)."""
    if compile_ == "false" and compile_loss != "true":
        return CompileChoice(False, False, "train.compile: false")
    wanted = {"true": True, "false": False}
    blocks, loss = wanted.get(compile_), wanted.get(compile_loss)
    auto_blocks, auto_loss, reason = _auto(device, max_steps, hidden_size, precision)
    if blocks is None:
        blocks = auto_blocks
    else:
        reason = f"train.compile: {compile_}"
    if loss is None:
        loss = auto_loss
    for asked, on in (("train.compile", compile_ == "true"), ("train.compile_loss", compile_loss == "true")):
        if on and inductor_problem(device):
            raise UserError(f"{asked} is true but torch.compile cannot build kernels here ({inductor_problem(device)}); "
                            f"install a C++ compiler (CPU: apt install g++) or triton (CUDA), or set --{asked} false")
    return CompileChoice(blocks, loss, reason)


def _auto(device: torch.device, max_steps: int, hidden_size: int, precision: str) -> tuple[bool, bool, str]:
    if max_steps < MIN_STEPS:
        return False, False, f"auto: {max_steps} steps are too few to repay compiling (from {MIN_STEPS})"
    problem = inductor_problem(device)
    if problem:
        return False, False, f"auto: torch.compile cannot build kernels here ({problem})"
    if device.type == "cuda":
        return True, False, "auto: CUDA, inductor works (the fused loss's chunks: not until gpu-check has measured them)"
    blocks, loss = hidden_size >= BLOCKS_MIN_HIDDEN, precision == "bf16"
    if not (blocks or loss):
        return False, False, f"auto: on a CPU at hidden {hidden_size} in {precision} compiling measured no faster"
    said = [f"the blocks (hidden {hidden_size} >= {BLOCKS_MIN_HIDDEN})" if blocks else
            f"not the blocks (hidden {hidden_size} < {BLOCKS_MIN_HIDDEN})",
            "the fused loss (bf16)" if loss else f"not the fused loss ({precision})"]
    return blocks, loss, "auto: on a CPU, " + ", ".join(said)
