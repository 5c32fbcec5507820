"""gpu-check's decisions, as pure functions the CPU tests drive with the properties of a T4, V100,
A10, L4, A100-40/80, H100 and H200: what to run on the card (kernel, dtype, micro-batch, runs), how
long the check will take (an estimate from the one H100 measurement), when two loss curves agree,
and the attention check that runs the model's own Attention module (so it tests exactly the
kernel the model will use on that card)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

# llama-150m at seq 256 on an H100 (docs/gpu.md: measured): 14.8 GB peak eager at micro-batch
# 64, 10.9 GB compiled; ~2.6 GB of it is weights, gradients and optimizer states (162M x 16 B).
FIXED_GB, PER_SEQ_GB = 2.6, (14.8 - 2.6) / 64  # eager, the larger of the two
MEMORY_SHARE = 0.8  # of the card's memory, for the allocator's fragmentation and the CUDA context
H100_TOKENS_S = {"eager": 150_761, "compile": 248_013}  # measured, bf16, micro-batch 64 (docs/gpu.md)
H100_TFLOPS = 989.0
COMPILE_S = 90.0  # an estimate: the first compiled step of llama-150m with a cold inductor cache
WARM_COMPILE_S = 20.0  # an estimate: the same graphs again (cache hits), in the later compiled runs
NS_CHECK_S = 10.0  # an estimate: Muon's Newton-Schulz batched vs one at a time, 14 steps of 112 matrices
SETUP_S = 60.0  # an estimate: imports, the sample corpus prepared, the CUDA context, per training process
RUNS = (("eager", "false", "false", "auto"), ("compile", "true", "false", "auto"), ("compile+loss", "true", "true", "auto"))
# Two runs' losses agree when every step is within STEP_TOL nats and the mean of the last LAST steps
# within MEAN_TOL: a head that does not learn while the blocks do stays ~1 nat above after 50 steps.
STEP_TOL, MEAN_TOL, LAST = 0.25, 0.05, 10


@dataclass(frozen=True)
class Plan:
    kernel: str  # the SDPA backend the model's unpadded attention runs on: FLASH_ATTENTION | EFFICIENT_ATTENTION
    dtype: torch.dtype  # what `train.precision: auto` computes in on this card
    micro_batch: int
    runs: tuple[tuple[str, str, str, str], ...]  # (label, train.compile, train.compile_loss, precision)
    why: str
    tflops: float  # the card's spec peak in `dtype` (TFLOP/s; an estimate's input)


def plan(capability: tuple[int, int], total_memory: int, micro_batch: int | None = None, quick: bool = False,
         tflops: float | None = None) -> Plan:
    """What to check on a card of this compute capability and memory (bytes)."""
    gb = total_memory / 1e9
    fits = max(1, int((MEMORY_SHARE * gb - FIXED_GB) / PER_SEQ_GB))
    micro = micro_batch or max(1, min(64, 2 ** max(0, fits.bit_length() - 1)))  # a power of two, at most the preset's
    why = (f"{gb:.1f} GB card: micro-batch {micro} (estimate {FIXED_GB + micro * PER_SEQ_GB:.1f} GB eager, from the "
           f"H100 measurement of {FIXED_GB} GB + {PER_SEQ_GB:.2f} GB per sequence)")
    if micro_batch:
        why = f"{gb:.1f} GB card: micro-batch {micro} as asked"
    runs = RUNS[:2] if quick else RUNS
    if capability >= (8, 0):  # native bf16 and flash attention
        return Plan("FLASH_ATTENTION", torch.bfloat16, micro, runs + (() if quick else (("fp16", "false", "false", "fp16"),)),
                    why, tflops or H100_TFLOPS)
    return Plan("EFFICIENT_ATTENTION", torch.float16, micro, runs,  # auto is fp16 + loss scaling here
                why + f"; compute capability {capability[0]}.{capability[1]}: no flash kernel, fp16 (GQA: K/V expanded)",
                tflops or 65.0)


def estimate_seconds(p: Plan, steps: int, gpus: int, quick: bool = False) -> float:
    """The check's wall time, scaled from the H100 figures by the card's spec peak (an estimate:
    printed at the start so a short GPU loan can be planned)."""
    tokens = steps * p.micro_batch * 256 * 2
    speed = p.tflops / H100_TFLOPS
    total, compiled = SETUP_S + NS_CHECK_S, 0
    for label, compile_, _, _ in p.runs:
        rate = H100_TOKENS_S["compile" if compile_ == "true" else "eager"] * speed
        if compile_ == "true":
            total += COMPILE_S if compiled == 0 else WARM_COMPILE_S
            compiled += 1
        total += tokens / rate + SETUP_S / 2
    if not quick:  # the time splits: 15 steps eager, compiled, compiled + loss (warm caches)
        total += 3 * (15 * p.micro_batch * 256 * 2 / (H100_TOKENS_S["eager"] * speed)) + 2 * WARM_COMPILE_S
    if gpus >= 2:
        dist_tokens = min(steps, 20) * p.micro_batch * 256 * 2
        total += 6 * (SETUP_S + dist_tokens / (H100_TOKENS_S["eager"] * speed))  # 1-GPU refs, DDP, FSDP2, kill + resume
    return total


def agree(a: list[float], b: list[float], step_tol: float = STEP_TOL, mean_tol: float = MEAN_TOL) -> tuple[bool, dict]:
    """Two runs' per-step values: every step within `step_tol` (absolute) and the mean of the last
    LAST steps within `mean_tol`; (agree, the figures)."""
    if not a or len(a) != len(b):
        return False, {"steps": (len(a), len(b))}
    worst = max(abs(x - y) for x, y in zip(a, b))
    last = abs(statistics.fmean(a[-LAST:]) - statistics.fmean(b[-LAST:]))
    return worst <= step_tol and last <= mean_tol, {"largest_step_diff": worst, "step_tol": step_tol,
                                                     "last_mean_diff": last, "mean_tol": mean_tol}


def check_attention(p: Plan, device: str = "cuda") -> list[str]:
    """The model's own Attention (llama-150m's 12 heads, and GQA with 4 KV heads), causal and
    left-padded, with SDPA restricted to the kernel it must use on this card: the plan's for
    unpadded batches, the memory-efficient one for padded (flash takes no mask). Problems found."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from llamaforge.model.hf import LlamaForgeConfig
    from llamaforge.model.hf.modeling_llamaforge import Attention, build_attention_mask, rope_cos_sin

    problems = []
    for n_kv in (12, 4):
        cfg = LlamaForgeConfig(hidden_size=768, num_attention_heads=12, num_key_value_heads=n_kv)
        attn = Attention(cfg, 0).to(device=device, dtype=p.dtype)
        x = torch.randn(4, 256, 768, device=device, dtype=p.dtype)
        pos = torch.arange(256, device=device)[None].expand(4, 256)
        cos, sin = rope_cos_sin(pos, 64, 10000.0, 1.0, p.dtype)
        padding = torch.ones(4, 256, dtype=torch.long, device=device)
        padding[0, :7] = 0
        for label, mask, kernel in (("causal", None, p.kernel),
                                    ("left-padded", build_attention_mask(padding, 256, 0), "EFFICIENT_ATTENTION")):
            backends = [getattr(SDPBackend, kernel)] if device == "cuda" else [SDPBackend.MATH]
            try:
                with torch.no_grad(), sdpa_kernel(backends):
                    attn(x, cos, sin, mask, None)
            except RuntimeError as e:
                problems.append(f"{kernel.lower()} SDPA does not take the model's {label} attention with {n_kv} KV "
                                f"heads: {str(e).splitlines()[0]}")
    return problems
