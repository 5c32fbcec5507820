"""How long a stop takes: SIGTERM to a saved checkpoint and exit 75, wherever the run is: inside a
training step, during the first step while it compiles, during validation, and during the capability
scoring (train.eval_tasks). Each scenario is a real `llamaforge train` subprocess on the tiny preset;
the figure is the wall time from the signal to the process's exit (the checkpoint is written first)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rows(run: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def _one(data: Path, run: Path, extra: list[str], ready) -> dict:
    cmd = [sys.executable, "-m", "llamaforge", "train", "--data", str(data), "--out", str(run), "--preset", "tiny",
           "--train.tensorboard", "false", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 1800
    while not ready(_rows(run)):
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the run ended before the moment to stop it: {proc.stderr.read()[-500:]}")
        time.sleep(0.05)
    time.sleep(1.0)  # well inside the work
    start = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait()
    seconds = time.perf_counter() - start
    saved = sorted((run / "checkpoints").glob("step_*"))
    return {"seconds": round(seconds, 2), "exit": code, "checkpoint": saved[-1].name if saved else None}


def run(args, report) -> dict:
    from llamaforge.data.prepare import prepare
    from llamaforge.data.sources import sample_corpus

    work = Path(tempfile.mkdtemp(prefix="stop-time-"))
    data = work / "data"
    prepare(str(sample_corpus()), data, progress=False)
    steps = ["--max-steps", "400", "--save-every", "0"]
    scenarios = {
        "in a training step": (["--train.compile", "false", "--eval-every", "0", *steps],
                               lambda rows: any(r["type"] == "train" and r["step"] >= 3 for r in rows)),
        "first step, compiling": (["--train.compile", "true", "--eval-every", "0", *steps],
                                  lambda rows: any(r.get("event") == "started" for r in rows)),
        "during validation": (["--train.compile", "false", "--eval-every", "5", "--train.eval_tokens", "2000000", *steps],
                              lambda rows: any(r["type"] == "train" and r["step"] >= 5 for r in rows)),
        "during capability scoring": (["--train.compile", "false", "--eval-every", "5", "--train.eval_tasks",
                                       "capability", "--train.eval_tasks_limit", "100", *steps],
                                      lambda rows: any(r["type"] == "eval" and r["step"] >= 5 for r in rows)),
    }
    out = {}
    for name, (extra, ready) in scenarios.items():
        out[name] = _one(data, work / name.replace(" ", "_").replace(",", ""), extra, ready)
        print(f"stop_time: {name}: {out[name]['seconds']:.1f} s from SIGTERM to exit {out[name]['exit']} "
              f"({out[name]['checkpoint']} saved)")
    worst = max(v["seconds"] for v in out.values())
    row = report("stop_time", 30.0 / worst, 1.0, "SLURM's default KillWait (30 s)", "x the worst case")
    row["scenarios"] = out
    return row
