"""`make gpu-check` / `python -m benchmarks.gpu_check`: does llamaforge's GPU path work on this machine?

On a CUDA machine: the model's own attention runs on the fused SDPA kernel the card has (causal and
left-padded, GQA and not): flash in bf16 from compute capability 8.0, the memory-efficient kernel in
fp16 before it (T4, V100; K/V expanded for GQA there); `llama-150m` trains STEPS steps through the ordinary
`llamaforge train` code eager, with the blocks compiled, and with the fused loss's chunks compiled
too (`train.compile_loss`; losses must agree within bf16 tolerance), at a micro-batch sized from the
card's memory (`plan`); peak memory, tokens/s and MFU are printed (MFU against the GPU's spec peak
when known, else a labelled measured matmul), then the time split of a step (data wait, forward,
loss, backward, optimizer) for each, and the fused loss's compiled chunks against eager (loss and
gradients on llama-150m's head shape), and Muon's Newton-Schulz batched over same-shape matrices (the GPU
default) against one at a time (update and time). With 2+ GPUs, in fresh processes after this one has released
its memory: DDP with the preset's Muon and FSDP2 with AdamW (torchrun, 2 processes) against one GPU
with twice the accumulation (loss and gradient norm), and a DDP Muon run killed with SIGKILL and
resumed against the same run uninterrupted. The estimated duration is printed first; every figure
and comparison (with its tolerance) goes to runs/gpu-check.json. Exits 1 on any mismatch or failure.
On a machine without CUDA it says so and exits 0. `--quick`: 20 steps, eager and compiled only.

    python -m benchmarks.gpu_check --data DATA_DIR [--steps 50] [--quick] [--micro-batch N (default: from memory)]

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
from pathlib import Path

import torch

from llamaforge.config import load_config
from llamaforge.data.prepare import prepare
from llamaforge.model.io import load_model
from llamaforge.runs import read_metrics
from llamaforge.train.metrics import spec_peak_flops, train_flops_per_token
from llamaforge.workflows.pretrain import pretrain

from benchmarks.gpu_plan import Plan, agree, check_attention, estimate_seconds, plan
from benchmarks.time_split import compare_loss_kernels, time_split

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
    return {"losses": [r["loss"] for r in recs], "grad_norms": [r["grad_norm"] for r in recs], "tokens_per_s": tps, "flops_per_s": tps * flops, "wall_s": wall,
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
            "start": next((r for r in read_metrics(out) if r.get("event") == "started"), {})}


def _losses(run: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run) if r["type"] == "train"}


def _same(name: str, ref: Path, got: Path, tolerance: float, fail: list[str]) -> dict:
    """Per-step loss AND gradient norm of two runs (a wrong global gradient scale, e.g. loss x world,
    moves the gradient norm even where clipping hides it in the loss)."""
    out = {}
    for key, tol in (("loss", tolerance), ("grad_norm", tolerance * 10)):
        a, b = _losses(ref, key), _losses(got, key)
        ok, figures = agree([a[s] for s in sorted(a)], [b.get(s, float("inf")) for s in sorted(a)], tol, tol)
        out[key] = dict(figures, agree=ok and sorted(a) == sorted(b))
        print(f"{name}: {key} {figures}")
        if not out[key]["agree"]:
            fail.append(f"{name}: per-step {key} disagrees ({figures})")
    return out


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
                       preset: str = "llama-150m", env: dict | None = None) -> dict:
    """DDP with the preset's optimizer (Muon: its Newton-Schulz split and exact all-gather) and FSDP2
    with AdamW (FSDP2 refuses Muon) on 2 processes, each against 1 process with 2 micro-batches per
    step, loss and gradient norm; then SIGKILL + resume of the DDP run. Every run is a fresh
    `llamaforge train` process (torchrun for 2). On CPU (gloo) the tests run this with a micro model."""
    env = {**os.environ, **(env or {})}
    base = [sys.executable, "-m", "llamaforge", "train", "--data", data, "--preset", preset, "--max-steps", str(steps),
            "--eval-every", "0", "--train.eval_tasks", "null", "--train.sample_prompt", "The", *overrides]
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", "-m",
                "llamaforge", *base[3:]]
    adamw = ["--train.optimizer", "adamw"]

    def run(cmd, out, *extra) -> bool:
        done = subprocess.run([*cmd, "--out", str(out), *extra], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            fail.append(f"{out.name} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
        return done.returncode == 0

    one, ddp, one_adamw, fsdp, killed = (tmp / n for n in ("one-gpu", "ddp", "one-gpu-adamw", "fsdp2", "ddp-killed"))
    out: dict = {}
    if run(base, one, "--save-every", "0") and run(torchrun, ddp, "--save-every", "0"):
        out["DDP vs 1 process"] = _same("DDP (2 processes, preset optimizer) vs 1 process", one, ddp, tolerance, fail)
    if run(base, one_adamw, "--save-every", "0", *adamw) and run(torchrun, fsdp, "--save-every", "0", "--train.fsdp",
                                                                  "true", *adamw):
        out["FSDP2 vs 1 process"] = _same("FSDP2 (2 processes, AdamW) vs 1 process", one_adamw, fsdp, tolerance, fail)
    if not ddp.exists():
        return out
    save = max(1, steps // 3)
    proc = subprocess.Popen([*torchrun, "--out", str(killed), "--save-every", str(save)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (killed / "checkpoints" / f"step_{save}").is_dir():
        time.sleep(0.02)
    if proc.poll() is not None:
        fail.append("the DDP run ended before it could be killed; use more --steps")
        return out
    for pid in [proc.pid, *_descendants(proc.pid)]:  # torchrun and its workers (own sessions), as a node failure would
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    if not run(torchrun, killed, "--save-every", str(save)):
        return out
    resumed = [r for r in read_metrics(killed) if r.get("event") == "resumed"]
    if not resumed or resumed[0]["checkpoint"] == f"step_{steps}":
        fail.append("the DDP run was not killed before its end; use more --steps")
    else:
        out["DDP kill + resume"] = _same(f"DDP killed after step {save} and resumed vs uninterrupted", ddp, killed,
                                         tolerance, fail)
    return out


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


def compare_runs(runs: dict, fail: list[str]) -> dict:
    """Every run's loss falls; compiled runs track eager; fp16 + loss scaling tracks the default: every
    step within an absolute tolerance and the mean of the last steps within a tighter one
    (benchmarks/gpu_plan.agree), so a head that does not learn cannot pass."""
    out = {}
    for label, r in runs.items():
        if not r["losses"][-1] < r["losses"][0] - 1.0:
            fail.append(f"{label}: the loss did not fall: {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}")
    for a, b in (("eager", "compile"), ("compile", "compile+loss"), ("eager", "fp16")):
        if a not in runs or b not in runs:
            continue
        ok, figures = agree(runs[a]["losses"], runs[b]["losses"])
        out[f"{a} vs {b}"] = dict(figures, agree=ok)
        print(f"{a} vs {b}: {figures}")
        if not ok:
            fail.append(f"{a} and {b} losses disagree ({figures})")
    return out


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


def newton_schulz_check(fail: list[str]) -> dict:
    """Muon's Newton-Schulz over llama-150m's matrices batched (the GPU default) vs one at a time:
    the update must agree within NS_TOL (relative); the speed-up is recorded."""
    from benchmarks.__main__ import interleaved
    from benchmarks.optimizer import newton_schulz_batching

    try:
        r = newton_schulz_batching(torch.device("cuda"), 5, interleaved)
    except Exception as e:  # noqa: BLE001
        fail.append(f"batched Newton-Schulz failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return {}
    print(f"Muon Newton-Schulz, {r['matrices']} matrices: one at a time {r['one_at_a_time_ms']} ms, batched "
          f"{r['batched_ms']} ms ({r['batched_speedup']}x); updates differ by {r['update_rel_diff']:.1e} (tol {NS_TOL})")
    if not r["update_rel_diff"] <= NS_TOL:
        fail.append(f"batched Newton-Schulz gives another update ({r['update_rel_diff']:.2g} > {NS_TOL})")
    return {**r, "tolerance": NS_TOL}


NS_TOL = 0.05  # relative; bf16 rounding: ~3e-3 (CPU, benchmarks muon_ns); one matrix wrong: ~0.1-1


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


def release_memory() -> None:
    """Give this process's cached GPU memory back before the multi-GPU runs start on the same GPUs
    (its allocator pool after the one-GPU runs is ~10 GB: a 16 GB card's rank 0 would run out)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="a prepared data folder (default: prepare the offline sample corpus)")
    p.add_argument("--steps", type=int, help="training steps per run (default 50; --quick: 20)")
    p.add_argument("--quick", action="store_true", help="eager and compiled only, 20 steps, no time split")
    p.add_argument("--micro-batch", type=int, help="default: sized from the card's memory (at most 64)")
    p.add_argument("--json", default="runs/gpu-check.json", help="the figures and comparisons (default: %(default)s)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; nothing to check (exit 0)")
        return 0
    steps = a.steps or (20 if a.quick else 50)
    name = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    dtype = torch.bfloat16 if (props.major, props.minor) >= (8, 0) else torch.float16
    peak = spec_peak_flops(name, dtype)
    pl = plan((props.major, props.minor), props.total_memory, a.micro_batch, a.quick, peak / 1e12 if peak else None)
    gpus = torch.cuda.device_count()
    print(f"gpu-check on {name} x {gpus}, compute capability {props.major}.{props.minor}, torch {torch.__version__}; "
          f"{pl.why}; estimated {estimate_seconds(pl, steps, gpus, a.quick) / 60:.1f} min (from the H100 figures)")
    start = time.perf_counter()
    fail: list[str] = check_attention(pl)
    print("attention: " + ("; ".join(fail) if fail else f"the model's attention runs on {pl.kernel.lower()} SDPA"))
    report: dict = {"device": name, "gpus": gpus, "torch": torch.__version__, "plan": pl.why, "steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data
        if data is None:
            data = str(Path(tmp) / "data")
            prepare("sample", data, progress=False)
        report["loss_kernels"] = loss_kernel_check(pl, fail)
        report["newton_schulz"] = newton_schulz_check(fail)
        runs = training_runs(data, Path(tmp), pl, steps, name, fail)
        report["runs"] = {k: {kk: vv for kk, vv in v.items() if kk != "start"} for k, v in runs.items()}
        report["comparisons"] = compare_runs(runs, fail)
        report["time_split_ms"] = {} if a.quick else time_splits(data, pl, fail)
        if gpus < 2:
            print("DDP / FSDP2 against one GPU: skipped (needs 2+ GPUs)")
        else:
            release_memory()
            m = max(1, pl.micro_batch // 2)
            report["distributed"] = distributed_checks(data, Path(tmp), min(steps, 20), [
                "--train.micro_batch", str(m), "--batch-tokens", str(2 * m * 256)], fail, tolerance=0.05)
    report.update(failures=fail, wall_s=round(time.perf_counter() - start, 1))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    for line in fail:
        print(f"gpu-check: FAIL: {line}")
    print(f"gpu-check: {'FAILED' if fail else 'passed'} in {report['wall_s'] / 60:.1f} min; figures in {a.json}")
    return 1 if fail else 0


if __name__ == "__main__":
    sys.exit(main())
