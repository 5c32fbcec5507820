"""`make gpu-check` / `python -m benchmarks.gpu_check`: does llamaforge's GPU path work on this machine?

On a CUDA machine: the fused SDPA kernel the card has accepts our attention call (causal, GQA and
not): flash in bf16 from compute capability 8.0, the memory-efficient kernel in fp16 before it (T4,
V100: PyTorch's flash kernel needs 8.0); `llama-150m` trains STEPS steps through the ordinary
`llamaforge train` code eager, with the blocks compiled, and with the fused loss's chunks compiled
too (`train.compile_loss`; losses must agree within bf16 tolerance), at a micro-batch sized from the
card's memory (`plan`); peak memory, tokens/s and MFU are printed (MFU against the GPU's spec peak
when known, else a labelled measured matmul), then the time split of a step (data wait, forward,
loss, backward, optimizer) for each, and the fused loss's compiled chunks against eager (loss and
gradients on llama-150m's head shape). With 2+ GPUs: DDP
and FSDP2 (torchrun, 2 processes) against one GPU with twice the accumulation, and a DDP run killed
with SIGKILL and resumed against the same run uninterrupted. Exits 1 on any mismatch or failure. On
a machine without CUDA it says so and exits 0.

    python -m benchmarks.gpu_check --data DATA_DIR [--steps 50] [--micro-batch N (default: from memory)]

DATA_DIR is a folder written by `llamaforge prepare` (default: prepare the offline sample corpus).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llamaforge.config import load_config
from llamaforge.data.prepare import prepare
from llamaforge.model.io import load_model
from llamaforge.runs import read_metrics
from llamaforge.train.metrics import spec_peak_flops, train_flops_per_token
from llamaforge.workflows.pretrain import pretrain

from benchmarks.time_split import compare_loss_kernels, time_split

# llama-150m at seq 256 on an H100 (make gpu-check, README): 14.8 GB peak eager at micro-batch 64,
# 10.9 GB compiled; ~2.6 GB of it is weights, gradients and optimizer states (162M parameters x 16 B).
FIXED_GB, PER_SEQ_GB = 2.6, (14.8 - 2.6) / 64  # eager, the larger of the two
MEMORY_SHARE = 0.8  # of the card's memory, for the allocator's fragmentation and the CUDA context
# eager; blocks compiled; blocks and the fused loss's chunks compiled (train.compile_loss, off by default
# on CUDA until this check has measured it: its losses are compared with the compiled run's)
RUNS = (("eager", "false", "false", "auto"), ("compile", "true", "false", "auto"), ("compile+loss", "true", "true", "auto"))


@dataclass(frozen=True)
class Plan:
    kernel: str  # the SDPA backend to check: FLASH_ATTENTION | EFFICIENT_ATTENTION
    dtype: torch.dtype  # what `train.precision: auto` computes in on this card
    micro_batch: int
    runs: tuple[tuple[str, str, str, str], ...]  # (label, train.compile, train.compile_loss, precision)
    why: str


def plan(capability: tuple[int, int], total_memory: int, micro_batch: int | None = None) -> Plan:
    """What to check on a card of this compute capability and memory (bytes): a pure function, so
    the tests drive it with the properties of a T4, V100, A100 or H100."""
    gb = total_memory / 1e9
    fits = max(1, int((MEMORY_SHARE * gb - FIXED_GB) / PER_SEQ_GB))
    micro = micro_batch or max(1, min(64, 2 ** max(0, fits.bit_length() - 1)))  # a power of two, at most the preset's
    why = (f"{gb:.1f} GB card: micro-batch {micro} (estimate {FIXED_GB + micro * PER_SEQ_GB:.1f} GB eager, from the "
           f"H100 measurement of {FIXED_GB} GB + {PER_SEQ_GB:.2f} GB per sequence)")
    if micro_batch:
        why = f"{gb:.1f} GB card: micro-batch {micro} as asked"
    if capability >= (8, 0):  # native bf16 and flash attention
        return Plan("FLASH_ATTENTION", torch.bfloat16, micro, RUNS + (("fp16", "false", "false", "fp16"),), why)
    return Plan("EFFICIENT_ATTENTION", torch.float16, micro, RUNS,  # auto is fp16 + loss scaling here
                why + f"; compute capability {capability[0]}.{capability[1]}: no flash kernel, fp16")


def check_attention(p: Plan, fail: list[str], device: str = "cuda") -> None:
    """The fused kernel of the plan accepts our call (heads 12 as llama-150m, and GQA)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for n_kv in (12, 4):
        q = torch.randn(4, 12, 256, 64, device=device, dtype=p.dtype)
        k = torch.randn(4, n_kv, 256, 64, device=device, dtype=p.dtype)
        v = torch.randn_like(k)
        try:
            with sdpa_kernel(getattr(SDPBackend, p.kernel)):
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_kv != 12)
            print(f"{p.kernel.lower()} SDPA ({str(p.dtype).replace('torch.', '')}): eligible (heads 12, kv heads {n_kv})")
        except RuntimeError as e:
            fail.append(f"{p.kernel.lower()} SDPA not eligible with kv heads {n_kv}: {str(e).splitlines()[0]}")


def overrides(steps: int, micro: int, compile_: str = "false", compile_loss: str = "false",
              precision: str = "auto") -> list[str]:
    return [f"train.max_steps={steps}", f"train.micro_batch={micro}", f"train.batch_tokens={micro * 256 * 2}",
            f"train.compile={compile_}", f"train.compile_loss={compile_loss}", "train.eval_every=0",
            "train.eval_tasks=null", f"train.save_every={steps}",
            "train.warmup_steps=10", "train.sample_prompt=''", "train.eval_tokens=65536", f"train.precision={precision}"]


def train_run(data: str, out: Path, steps: int, micro: int, compile_: str, compile_loss: str,
              precision: str = "auto") -> dict:
    cfg = load_config("llama-150m", overrides=overrides(steps, micro, compile_, compile_loss, precision))
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pretrain(cfg, data, out, progress=False)
    wall = time.perf_counter() - t0
    recs = [r for r in read_metrics(out) if r["type"] == "train"]
    steady = recs[len(recs) // 5 :]  # after compilation and warm-up
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    flops = train_flops_per_token(load_model(out / "final").config, 256)
    return {"losses": [r["loss"] for r in recs], "tokens_per_s": tps, "flops_per_s": tps * flops, "wall_s": wall,
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
            "start": next((r for r in read_metrics(out) if r.get("event") == "started"), {})}


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if r["type"] == "train"}


def _descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def distributed_checks(data: str, tmp: Path, steps: int, overrides: list[str], fail: list[str], tolerance: float,
                       preset: str = "llama-150m", env: dict | None = None) -> None:
    """DDP and FSDP2 on 2 processes vs 1 process with 2 micro-batches per step, and SIGKILL + resume of
    the DDP run; every run through `llamaforge train` (torchrun for 2 processes). On CPU (gloo) the
    same function runs in the tests with a micro model."""
    env = {**os.environ, **(env or {})}
    base = [sys.executable, "-m", "llamaforge", "train", "--data", data, "--preset", preset, "--max-steps", str(steps),
            "--eval-every", "0", "--train.eval_tasks", "null", "--train.sample_prompt", "The",
            "--train.optimizer", "adamw",  # FSDP2 refuses Muon
            *overrides]
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", "-m",
                "llamaforge", *base[3:]]

    def run(cmd, out, *extra) -> bool:
        done = subprocess.run([*cmd, "--out", str(out), *extra], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            fail.append(f"{out.name} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
        return done.returncode == 0

    one, ddp, fsdp, killed = (tmp / n for n in ("one-gpu", "ddp", "fsdp2", "ddp-killed"))
    if not (run(base, one, "--save-every", "0") and run(torchrun, ddp, "--save-every", "0")
            and run(torchrun, fsdp, "--save-every", "0", "--train.fsdp", "true")):
        return
    ref = _losses(one)
    for name, got in (("DDP", _losses(ddp)), ("FSDP2", _losses(fsdp))):
        worst = max((abs(ref[s] - got.get(s, float("inf"))) for s in ref), default=float("inf"))
        print(f"{name} (2 processes) vs 1 process with 2x accumulation: largest per-step loss difference {worst:.2e}")
        if sorted(got) != sorted(ref) or worst > tolerance:
            fail.append(f"{name} losses disagree with one process (largest difference {worst:.2e})")
    save = max(1, steps // 3)
    proc = subprocess.Popen([*torchrun, "--out", str(killed), "--save-every", str(save)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (killed / "checkpoints" / f"step_{save}").is_dir():
        time.sleep(0.02)
    if proc.poll() is not None:
        fail.append("the DDP run ended before it could be killed; use more --steps")
        return
    for pid in [proc.pid, *_descendants(proc.pid)]:  # torchrun and its workers (own sessions), as a node failure would
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    if not run(torchrun, killed, "--save-every", str(save)):
        return
    got, want = _losses(killed), _losses(ddp)
    worst = max((abs(want[s] - got.get(s, float("inf"))) for s in want), default=float("inf"))
    resumed = [r for r in read_metrics(killed) if r.get("event") == "resumed"]
    print(f"DDP killed after step {save} and resumed ({len(resumed)} resume): largest per-step loss difference "
          f"{worst:.2e} against the uninterrupted run")
    if not resumed or resumed[0]["checkpoint"] == f"step_{steps}":
        fail.append("the DDP run was not killed before its end; use more --steps")
    elif sorted(got) != sorted(want) or worst > tolerance:
        fail.append(f"DDP kill + resume does not reproduce the uninterrupted run (largest difference {worst:.2e})")


def training_runs(data: str, tmp: Path, pl: Plan, steps: int, name: str, fail: list[str]) -> dict:
    """Each run of the plan through `llamaforge train`: tokens/s, MFU, peak memory, losses."""
    runs, total = {}, torch.cuda.get_device_properties(0).total_memory / 1e9
    for label, compile_, compile_loss, precision in pl.runs:
        try:
            runs[label] = r = train_run(data, tmp / label, steps, pl.micro_batch, compile_, compile_loss, precision)
        except Exception as e:  # noqa: BLE001 - a check reports every failure and goes on
            fail.append(f"{label} training failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        peak = spec_peak_flops(name, pl.dtype)
        mfu = f"{r['flops_per_s'] / peak:.1%} of the {peak / 1e12:.0f} TFLOP/s spec peak" if peak else "spec peak unknown"
        print(f"{label:>12}: {r['tokens_per_s']:,.0f} tokens/s, MFU {mfu}, peak memory {r['peak_gb']:.1f} GB of "
              f"{total:.1f} GB (micro-batch {pl.micro_batch}), loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}, "
              f"wall {r['wall_s']:.0f} s, precision {r['start'].get('precision')} "
              f"({r['start'].get('precision_reason')}), MFU peak from {r['start'].get('mfu_peak_source')}")
    return runs


def compare_runs(runs: dict, fail: list[str]) -> None:
    """Every run's loss falls; compiled runs track eager; fp16 + loss scaling tracks the default."""
    for label, r in runs.items():
        if not r["losses"][-1] < r["losses"][0] - 1.0:
            fail.append(f"{label}: the loss did not fall: {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}")
    for a, b in (("eager", "compile"), ("compile", "compile+loss"), ("eager", "fp16")):
        if a not in runs or b not in runs:
            continue
        x, y = runs[a]["losses"], runs[b]["losses"]
        worst = max(abs(p - q) for p, q in zip(x, y))
        print(f"{a} vs {b}: largest per-step loss difference {worst:.4f} over {len(x)} steps")
        if len(x) != len(y) or worst > 0.05 * max(x[0], 1.0):
            fail.append(f"{a} and {b} losses disagree (largest difference {worst:.4f})")


def loss_kernel_check(pl: Plan, fail: list[str]) -> dict:
    """The fused loss eager vs compiled chunks on llama-150m's head: losses and gradients."""
    try:
        c = compare_loss_kernels(torch.device("cuda"), pl.dtype)
    except Exception as e:  # noqa: BLE001
        fail.append(f"the compiled fused loss failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return {}
    print(f"fused loss, compiled chunks vs eager: loss {c['loss_rel']:.1e}, grad h {c['grad_h_rel']:.1e}, "
          f"grad head {c['grad_w_rel']:.1e} (relative); compiled gradient norms {c['grad_h_norm']:.3g} / "
          f"{c['grad_w_norm']:.3g}")
    if not (c["grad_h_norm"] > 0 and c["grad_w_norm"] > 0) or max(c["loss_rel"], c["grad_h_rel"], c["grad_w_rel"]) > 2e-2:
        fail.append("the compiled fused loss does not give the eager loss and gradients")
    return c


def time_splits(data: str, pl: Plan, fail: list[str]) -> dict:
    """Where the time goes, eager / compiled blocks / compiled blocks and loss."""
    cfg = load_config("llama-150m", overrides=overrides(1, pl.micro_batch))
    out = {}
    for label, blocks, loss in (("eager", False, False), ("compile", True, False), ("compile+loss", True, True)):
        try:
            split = time_split(cfg, data, torch.device("cuda"), 15, blocks, loss)
        except Exception as e:  # noqa: BLE001
            fail.append(f"{label} time split failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        print(split.line(label))
        out[label] = split.ms
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="a prepared data folder (default: prepare the offline sample corpus)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--micro-batch", type=int, help="default: sized from the card's memory (at most 64)")
    p.add_argument("--json", help="append the results to this JSONL file")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; nothing to check (exit 0)")
        return 0
    name = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    pl = plan((props.major, props.minor), props.total_memory, a.micro_batch)
    print(f"gpu-check on {name} x {torch.cuda.device_count()}, compute capability {props.major}.{props.minor}, "
          f"torch {torch.__version__}; {pl.why}")
    fail: list[str] = []
    check_attention(pl, fail)
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data
        if data is None:
            data = str(Path(tmp) / "data")
            prepare("sample", data, progress=False)
        kernels = loss_kernel_check(pl, fail)
        runs = training_runs(data, Path(tmp), pl, a.steps, name, fail)
        compare_runs(runs, fail)
        splits = time_splits(data, pl, fail)
        if torch.cuda.device_count() < 2:
            print("DDP / FSDP2 against one GPU: skipped (needs 2+ GPUs)")
        else:
            m = max(1, pl.micro_batch // 2)
            distributed_checks(data, Path(tmp), min(a.steps, 20), ["--train.micro_batch", str(m),
                               "--batch-tokens", str(2 * m * 256)], fail, tolerance=0.05)
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps({"device": name, "torch": torch.__version__, "failures": fail, "loss_kernels": kernels,
                                "time_split_ms": splits,
                                **{k: {kk: vv for kk, vv in v.items() if kk != "start"} for k, v in runs.items()}}) + "\n")
    for line in fail:
        print(f"gpu-check: FAIL: {line}")
    print("gpu-check: " + ("FAILED" if fail else "passed"))
    return 1 if fail else 0


if __name__ == "__main__":
    sys.exit(main())
