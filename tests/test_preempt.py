"""Preemption: a signal (SIGTERM, SIGINT, SIGUSR1) or `train.time_limit` stops the run at a step
boundary with a checkpoint; the same command then continues with the losses of an uninterrupted run,
in one process and under torchrun. And elastic resume: a checkpoint resumes under one process, DDP or
FSDP2 whatever wrote it."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check import _descendants
from helpers import TOLERANCE, dotlist, micro, stories_data
from llamaforge.config import load_config, parse_duration
from llamaforge.data.loader import PretrainBatches
from llamaforge.errors import UserError
from llamaforge.runs import checkpoints, read_metrics
from llamaforge.train import bench, loop, optim
from llamaforge.train.preempt import EXIT_STOPPED, StopFlag, Stopped
from llamaforge.workflows.pretrain import pretrain

TORCHRUN = Path(sys.executable).with_name("torchrun")
needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
MICRO = [*micro(layers=2, positions=64), "--train.seq_len", "32", "--train.micro_batch", "2",
         "--train.eval_tokens", "256", "--train.warmup_steps", "2", "--train.sample_prompt", "The", "--lr", "0.01",
         "--batch-tokens", "256", "--train.precision", "fp32"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return stories_data(tmp_path_factory.mktemp("data"), 400)


def cfg(*over: str):
    return load_config("tiny", overrides=dotlist(MICRO) + list(over))


def losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if r["type"] == "train"}


def cmd(data, out, *extra) -> list[str]:
    return [sys.executable, "-m", "llamaforge", "train", "--data", str(data), "--out", str(out), "--preset", "tiny",
            *MICRO, *map(str, extra)]


def test_durations_parse_and_bad_ones_are_refused():
    assert parse_duration("11h30m") == 41400 and parse_duration("90m") == 5400 and parse_duration("3600") == 3600
    assert parse_duration("1.5h") == 5400 and parse_duration(None) is None
    for bad in ("11x", "0", "h", "-5", "nan", "inf"):
        with pytest.raises(UserError, match="time_limit"):
            parse_duration(bad)
    with pytest.raises(UserError, match="time_limit"):
        load_config("tiny", overrides=["train.time_limit=soon"])


def test_the_time_limit_counts_the_next_step_and_the_save():
    now = [0.0]
    flag = StopFlag(100.0, clock=lambda: now[0])
    now[0] = 80.0
    assert flag.reason(next_step_s=10, save_s=5) is None
    assert flag.reason(next_step_s=15, save_s=5) == "time limit"  # 80 + 15 + 5 reaches the limit
    assert StopFlag(None, clock=lambda: 1e9).reason(1e9, 1e9) is None


@pytest.mark.torchcompat
def test_signals_inside_steps_stop_at_the_boundary_and_resume_exactly(data, tmp_path, monkeypatch):
    """SIGTERM inside a forward pass, SIGUSR1 inside Muon's per-matrix Newton-Schulz loop, SIGINT while
    the batch is read and SIGTERM during evaluation: each run stops after that step with a checkpoint
    of it (Stopped, the step the metrics reached); the same call then goes on; every step's loss
    equals the uninterrupted run's, each step logged once."""
    over = ["train.max_steps=10", "train.save_every=4", "train.eval_every=3", "train.optimizer=muon",
            "train.schedule=wsd"]
    straight = tmp_path / "straight"
    pretrain(cfg(*over), data, straight, progress=False)
    want = losses(straight)
    assert sorted(want) == list(range(1, 11))

    calls = {"n": 0}

    def signal_at(call: int, sig, real):
        def wrapped(*a, **k):
            calls["n"] += 1
            if calls["n"] == call:
                os.kill(os.getpid(), sig)  # the handler runs now, in the middle of the step
            return real(*a, **k)
        return wrapped

    model_forward = loop.train_step
    plan = [("train_step", loop, "train_step", 2, signal.SIGTERM),  # during step 2
            ("newton_schulz", optim, "newton_schulz", 7, signal.SIGUSR1),  # 7th matrix of the next step
            ("next_batch", PretrainBatches, "next_batch", 2, signal.SIGINT),
            ("windowed_loss", bench, "windowed_loss", 1, signal.SIGTERM)]  # inside an evaluation
    run = tmp_path / "run"
    stops = []
    for _, owner, attr, call, sig in plan:
        calls["n"] = 0
        with monkeypatch.context() as m:
            m.setattr(owner, attr, signal_at(call, sig, getattr(owner, attr)))
            with pytest.raises(Stopped) as stopped:
                pretrain(cfg(*over), data, run, progress=False)
        assert stopped.value.reason == sig.name
        assert checkpoints(run)[-1].name == f"step_{stopped.value.step}" == f"step_{max(losses(run))}"
        stops.append(stopped.value.step)
    assert loop.train_step is model_forward
    pretrain(cfg(*over), data, run, progress=False)  # the same command, to the end
    assert stops == sorted(stops) and len(set(stops)) == len(stops), stops
    assert losses(run) == want
    assert (run / "final" / "model.safetensors").exists()
    assert [r["reason"] for r in read_metrics(run) if r.get("event") == "stopped"] == [p[4].name for p in plan]


def test_time_limit_stops_with_a_checkpoint_and_says_how_to_continue(data, tmp_path, monkeypatch):
    """A clock that advances one second per look: a 6 s limit stops after a few steps with a
    checkpoint; the same command with the limit gone finishes with the uninterrupted losses."""
    over = ["train.max_steps=8", "train.save_every=0", "train.eval_every=0"]
    straight = tmp_path / "straight"
    pretrain(cfg(*over), data, straight, progress=False)
    ticks = iter(range(10**6))
    monkeypatch.setattr(loop, "StopFlag", lambda limit: StopFlag(limit, clock=lambda: float(next(ticks))))
    run = tmp_path / "run"
    with pytest.raises(Stopped, match=r"time limit.*run the same command to continue") as stopped:
        pretrain(cfg(*over, "train.time_limit=6s"), data, run, progress=False)
    assert 0 < stopped.value.step < 8 and checkpoints(run)[-1].name == f"step_{stopped.value.step}"
    pretrain(cfg(*over), data, run, progress=False)
    assert losses(run) == losses(straight)


@pytest.mark.slow  # ~40 s; the deterministic in-process test above covers each place in the fast tier
def test_sigterm_at_random_moments_then_the_same_command(data, tmp_path):
    """The real thing, in a fresh process: SIGTERM or SIGINT at random moments (three per run),
    each answered by one line and exit 75, then the same command: the uninterrupted losses."""
    args = ("--max-steps", 40, "--save-every", 0, "--eval-every", 10, "--train.optimizer", "muon")
    straight = tmp_path / "straight"
    subprocess.run(cmd(data, straight, *args), check=True, capture_output=True)
    want = losses(straight)
    rng = random.Random(0)
    run = tmp_path / "run"
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
        before = max(losses(run), default=0)
        proc = subprocess.Popen(cmd(data, run, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while max(losses(run), default=0) <= before + 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.2))  # somewhere inside a step, the evaluation or the sample
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        lines = [x for x in err.splitlines() if x.strip()]
        assert proc.returncode == EXIT_STOPPED and len(lines) == 1, (proc.returncode, err[-2000:])
        assert sig.name in lines[0] and "run the same command to continue" in lines[0]
    subprocess.run(cmd(data, run, *args), check=True, capture_output=True)
    assert losses(run) == want


@pytest.mark.slow  # ~35 s, three torchrun launches; CI runs the slow tier
@pytest.mark.torchcompat
@needs_torchrun
def test_sigterm_to_torchrun_saves_together_and_resumes_exactly(data, tmp_path):
    """2 processes on gloo: SIGTERM to torchrun mid-run; every rank is gone within a minute, the
    checkpoint is the step the ranks agreed on, and the same command gives, step for step, the losses
    of an uninterrupted 2-process run."""
    args = ["--max-steps", 12, "--save-every", 0, "--eval-every", 4, "--train.optimizer", "muon"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    launch = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "llamaforge"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(launch + cmd(data, straight, *args)[3:], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen(launch + cmd(data, run, *args)[3:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.time() + 180
    while 3 not in losses(run) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    workers = set(_descendants(proc.pid))
    assert len(workers) >= 2, workers
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert time.time() - signalled < 60, "ranks took over a minute to stop"
    assert not {p for p in workers if Path(f"/proc/{p}").exists()}, "a rank outlived torchrun"
    assert "stopped at step" in err and "SIGTERM" in err, err[-3000:]
    assert int(checkpoints(run)[-1].name.split("_")[1]) == max(losses(run)) < 12
    done = subprocess.run(launch + cmd(data, run, *args)[3:], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(run) == losses(straight)


def _continue_from(src: Path, dst: Path, step: int) -> None:
    """A copy of run `src` as it stood after checkpoint `step` (later checkpoints and final/ gone)."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "final", ignore_errors=True)
    for c in checkpoints(dst):
        if int(c.name.split("_")[1]) > step:
            shutil.rmtree(c)


@pytest.mark.torchcompat
@needs_torchrun
def test_elastic_resume_across_wrappers_and_process_counts(data, tmp_path):
    """AdamW, gloo: one process -> 2-process DDP (from step 2) -> 2-process FSDP2 (from step 3) ->
    one process (from FSDP2's step 4): each continued run logs the uninterrupted run's losses."""
    args = ["--max-steps", 6, "--save-every", 1, "--eval-every", 0, "--train.keep_last", 10, "--train.optimizer",
            "adamw", "--train.schedule", "cosine"]
    ref = tmp_path / "ref"
    subprocess.run(cmd(data, ref, *args), check=True, capture_output=True)
    want = losses(ref)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "llamaforge"]
    chain = [("ddp", ref, 2, torchrun, []), ("fsdp", "ddp", 3, torchrun, ["--train.fsdp", "true"]),
             ("one", "fsdp", 4, [sys.executable, "-m", "llamaforge"], [])]
    for name, src, step, launcher, extra in chain:
        run = tmp_path / name
        _continue_from(tmp_path / src if isinstance(src, str) else src, run, step)
        done = subprocess.run(launcher + cmd(data, run, *args, *extra)[3:], capture_output=True, text=True, env=env)
        assert done.returncode == 0, (name, done.stderr[-3000:])
        got = losses(run)
        assert sorted(got) == list(range(1, 7)), (name, got)
        assert all(abs(got[s] - want[s]) <= TOLERANCE["fp32"] for s in want), (name, got, want)
        resumed = [r for r in read_metrics(run) if r.get("event") == "resumed"][-1]
        assert resumed["checkpoint"] == f"step_{step}", name
    assert (tmp_path / "one" / "checkpoints" / "step_4" / "FSDP").exists()  # the last run resumed an FSDP2 checkpoint


def test_a_muon_checkpoint_under_fsdp_or_adamw_is_refused_without_blaming_the_checkpoint(data, tmp_path):
    run = tmp_path / "run"
    pretrain(cfg("train.max_steps=2", "train.optimizer=muon", "train.eval_every=0"), data, run, progress=False)
    with pytest.raises(UserError) as e:
        pretrain(cfg("train.max_steps=3", "train.optimizer=adamw", "train.eval_every=0"), data, run, progress=False)
    assert "train.optimizer 'muon' -> 'adamw'" in str(e.value) and "move" not in str(e.value)


def test_a_signal_during_benchmark_scoring_abandons_it_and_saves_at_once(data, tmp_path, monkeypatch):
    """Scoring that would run 1,000 forwards: the SIGTERM arriving during it stops the scoring at the
    next forward, and the run saves that step's checkpoint and stops (Stopped), with an event row."""
    forwards = {"after_signal": 0}

    def long_scoring(model, tokenizer, tasks, limit, autocast, batch, log_file=None):
        os.kill(os.getpid(), signal.SIGTERM)
        ids = torch.zeros(1, 4, dtype=torch.long)
        for _ in range(1000):
            forwards["after_signal"] += 1
            with torch.no_grad():
                model(input_ids=ids)
        return {}

    monkeypatch.setattr(bench, "score_tasks", long_scoring)
    monkeypatch.setattr(bench, "task_list", lambda text: ["copa_offline"])
    monkeypatch.setattr(bench, "include_paths", lambda tasks: [])
    monkeypatch.setattr(loop, "check_runnable", lambda *a, **k: None)
    run = tmp_path / "run"
    with pytest.raises(Stopped) as stopped:
        pretrain(cfg("train.max_steps=6", "train.eval_every=2", "train.eval_tasks=copa_offline"), data, run,
                 progress=False)
    assert forwards["after_signal"] == 1  # the first forward after the signal raised
    assert stopped.value.step == 2 and checkpoints(run)[-1].name == "step_2"
    assert any(r.get("event") == "abandoned" and r["work"] == "benchmarks" for r in read_metrics(run))
