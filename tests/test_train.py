"""The training loop: exact resume after SIGKILL, Ctrl-C, DDP parity, faults, refusals, learning."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import PRECISIONS, TOLERANCE, assert_user_error, dotlist, micro, run_cli, stories_data
from llamaforge.runs import checkpoints
from llamaforge.runs import read_metrics
from llamaforge.config import load_config
from llamaforge.train.schedules import lr_factor
from llamaforge.workflows.pretrain import pretrain

MICRO = [*micro(layers=2, positions=64), "--train.seq_len", "32", "--train.micro_batch", "2", "--train.eval_tokens", "512", "--train.warmup_steps", "2",
         "--train.sample_prompt", "The", "--lr", "0.01", "--batch-tokens", "256",
         "--train.precision", "fp32",  # exact comparisons across processes: the same kernels on every CPU
         "--train.optimizer", "adamw", "--train.schedule", "cosine"]  # the loop's mechanics; Muon + WSD: test_recipe.py
MUON_WSD = ["--train.optimizer", "muon", "--train.schedule", "wsd"]  # tiny's default recipe


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    stories_data(root, 600)
    return root / "d"


def train_cmd(data, out, *extra):
    return [sys.executable, "-m", "llamaforge", "train", "--data", str(data), "--out", str(out), "--preset", "tiny",
            *MICRO, *map(str, extra)]


def losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run) if r["type"] == "train"}


def wait_for(pred, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.returncode}")
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    t = load_config(overrides=["train.warmup_steps=10", "train.max_steps=100", "train.schedule=cosine",
                               "train.min_lr_ratio=0.1"]).train
    assert lr_factor(0, t) == pytest.approx(0.1)
    assert lr_factor(9, t) == pytest.approx(1.0)
    assert lr_factor(55, t) == pytest.approx(0.55)
    assert lr_factor(100, t) == pytest.approx(0.1)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_sigkill_and_resume_give_identical_losses_and_loss_falls(data, tmp_path, precision):
    straight = tmp_path / "straight"
    p = ("--train.precision", precision)
    subprocess.run(train_cmd(data, straight, "--max-steps", 10, "--save-every", 3, "--eval-every", 5, *p), check=True,
                   capture_output=True)
    want = losses(straight)
    assert sorted(want) == list(range(1, 11))
    evals = [r["val_loss"] for r in read_metrics(straight) if r["type"] == "eval"]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.3  # it learns
    assert all(r["val_bpb"] > 0 for r in read_metrics(straight) if r["type"] == "eval")
    assert (straight / "final" / "model.safetensors").exists() and (straight / "config.yaml").exists()
    assert [p.name for p in checkpoints(straight)] == ["step_9", "step_10"]  # keep_last 2

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(data, killed, "--max-steps", 10, "--save-every", 3, "--eval-every", 5, *p),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: 7 in losses(killed), proc)  # past the step-6 checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()
    (killed / "checkpoints" / ".step_9.tmp-1").mkdir()  # as a kill during a save leaves it
    subprocess.run(train_cmd(data, killed, "--max-steps", 10, "--save-every", 3, "--eval-every", 5, *p), check=True,
                   capture_output=True)
    got = losses(killed)
    assert got == want  # identical per-step losses, each step logged once
    assert not list((killed / "checkpoints").glob(".step_*"))
    assert any(r.get("event") == "resumed" and r["checkpoint"] == "step_6" for r in read_metrics(killed))


@pytest.mark.torchcompat
@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
@pytest.mark.parametrize("precision", PRECISIONS)
def test_ddp_two_processes_equal_one_process_with_twice_the_accumulation(data, tmp_path, precision):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--max-steps", 4, "--save-every", 0, "--eval-every", 0, "--train.micro_batch", 2, "--train.precision", precision,
            *MUON_WSD]  # Muon under DDP: every rank orthogonalizes the same all-reduced gradients
    subprocess.run(train_cmd(data, one, *args), check=True, capture_output=True)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "llamaforge"] + train_cmd(data, two, *args)[3:]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert abs(a[s] - b[s]) <= TOLERANCE[precision], (s, a[s], b[s])
    started = [r for r in read_metrics(two) if r.get("event") == "started"][0]
    assert started["precision"].startswith(precision) and started["world"] == 2


def test_configs_that_cannot_run_are_refused_before_training(data, tmp_path):
    run = tmp_path / "r"
    assert_user_error(run_cli("train", "--data", data, "--out", run, "--preset", "tiny", "--train.seq_len", "512"),
                      "max_position_embeddings")
    assert_user_error(run_cli("train", "--data", data, "--out", run, "--preset", "tiny", "--batch-tokens", "1000"),
                      "not a multiple")
    assert_user_error(run_cli("train", "--data", tmp_path, "--out", run, "--preset", "tiny"), "meta.json")
    assert_user_error(run_cli("train", "--data", data, "--out", run, "--preset", "tiny", "--resume"), "no checkpoint")
    assert not run.exists()


def test_non_finite_steps_are_skipped_then_abort(data, tmp_path, monkeypatch):
    from llamaforge.config import load_config
    from llamaforge.errors import UserError
    from llamaforge.train import loop
    from llamaforge.train.step import StepStats

    calls = []

    def bad_step(model, *a, **k):
        calls.append(1)
        return StepStats(float("nan"), float("nan"), 256, True)

    monkeypatch.setattr(loop, "train_step", bad_step)
    cfg = load_config("tiny", overrides=dotlist(MICRO, skip=("--lr",)) + ["train.max_bad_steps=3"])
    with pytest.raises(UserError, match=r"diverged at step 3 \(3 bad steps in a row: non-finite\); no healthy checkpoint"):
        pretrain(cfg, data, tmp_path / "r", progress=False)
    assert len(calls) == 3
    events = [r["event"] for r in read_metrics(tmp_path / "r") if r["type"] == "event"]
    assert events.count("skipped_step") == 3


def test_train_step_skips_update_on_nan(small_model):
    from llamaforge.train.optim import build_optimizer
    from llamaforge.train.step import train_step

    m = small_model().train()
    opt = build_optimizer(m, lr=0.1)
    with torch.no_grad():
        m.model.norm.weight[0] = float("nan")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randint(0, 512, (2, 17))
    stats = train_step(m, opt, [(x[:, :-1], x[:, 1:])])
    assert stats.skipped
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]) or k == "model.norm.weight"


def test_fused_adamw_skips_a_non_finite_step_on_the_device(small_model, monkeypatch):
    """The skip decision reaches fused AdamW as a device flag (found_inf), set before step() reads it:
    no update, no step count, and the next finite step updates as usual."""
    from llamaforge.train.optim import build_optimizer
    from llamaforge.train.step import takes_found_inf, train_step

    m = small_model().train()
    opt = build_optimizer(m, lr=0.1)
    assert takes_found_inf(opt)
    seen = []
    real = type(opt).step

    def spy(self, *a, **k):
        seen.append(getattr(self, "found_inf", None))
        return real(self, *a, **k)

    monkeypatch.setattr(type(opt), "step", spy)
    x = torch.randint(0, 512, (2, 17))
    assert not train_step(m, opt, [(x[:, :-1], x[:, 1:])]).skipped
    steps = [float(s["step"]) for s in opt.state.values()]
    with torch.no_grad():
        m.model.norm.weight[0] = float("nan")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert train_step(m, opt, [(x[:, :-1], x[:, 1:])]).skipped
    assert [float(f) for f in seen] == [0.0, 1.0]  # a tensor flag each time, decided on the device
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items() if k != "model.norm.weight")
    assert [float(s["step"]) for s in opt.state.values()] == steps  # the skipped step is not counted


def test_muon_skips_a_non_finite_step_on_the_device_and_matches_bit_for_bit_otherwise(small_model):
    """Muon + AdamW with the device flag: a finite step gives exactly the host-decided update, a
    non-finite one changes no weight and no momentum."""
    from llamaforge.train.optim import build_optimizer
    from llamaforge.train.step import takes_found_inf, train_step

    x = torch.randint(0, 512, (2, 17))
    batch = [(x[:, :-1], x[:, 1:])]
    a, b = small_model(seed=1).train(), small_model(seed=1).train()
    oa, ob = (build_optimizer(m, lr=0.01, kind="muon", muon_ns_dtype="fp32") for m in (a, b))
    assert takes_found_inf(oa)
    for _ in range(2):
        train_step(a, oa, batch)  # the device flag (0)
        loss = b(input_ids=batch[0][0], shift_labels=batch[0][1]).loss  # the host path: plain step()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)
        ob.step()
        ob.zero_grad(set_to_none=True)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    with torch.no_grad():
        a.model.norm.weight[0] = float("nan")
    before = {k: v.clone() for k, v in a.state_dict().items()}
    momentum = [s["momentum_buffer"].clone() for s in oa.muon.state.values()]
    assert train_step(a, oa, batch).skipped
    assert all(torch.equal(v, before[k]) for k, v in a.state_dict().items() if k != "model.norm.weight")
    assert all(torch.equal(m, s["momentum_buffer"]) for m, s in zip(momentum, oa.muon.state.values()))


def test_failed_save_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    from llamaforge.config import load_config
    from llamaforge.train import checkpoint

    real = checkpoint.torch.save
    count = {"n": 0}

    def flaky(obj, path, *a, **k):
        count["n"] += 1
        if count["n"] > 2:  # the first checkpoint (optimizer.pt + rng.pt) succeeds, then the disk is "full"
            raise OSError(28, "No space left on device")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", flaky)
    over = dotlist(MICRO)
    cfg = load_config("tiny", overrides=over + ["train.max_steps=4", "train.save_every=2", "train.eval_every=0"])
    from llamaforge.errors import UserError

    with pytest.raises(UserError, match=r"step 4 could not be written .*step_2 is intact"):  # stops cleanly
        pretrain(cfg, data, tmp_path / "r", progress=False)
    (only,) = checkpoints(tmp_path / "r")
    assert only.name == "step_2" and (only / "optimizer.pt").exists()
    events = [r.get("event") for r in read_metrics(tmp_path / "r")]
    assert "checkpoint_failed" in events
    assert not list((tmp_path / "r" / "checkpoints").glob(".step_*"))


@pytest.mark.torchcompat
@pytest.mark.skipif(not Path(sys.executable).with_name("torchrun").exists(), reason="torchrun not installed")
@pytest.mark.parametrize("precision", PRECISIONS)
def test_fsdp2_matches_one_process_and_resumes_exactly(data, tmp_path, precision):
    """FSDP2 (fully_shard) on gloo: same per-step losses as one plain process; a run that lost its
    last checkpoint resumes from the sharded-and-gathered one with the same losses. In bf16 FSDP2
    gathers bf16 weights (MixedPrecisionPolicy) and reduces gradients in fp32."""
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    args = ["--max-steps", 4, "--save-every", 2, "--eval-every", 0, "--train.micro_batch", 2, "--train.precision", precision]
    subprocess.run(train_cmd(data, one, *args), check=True, capture_output=True)
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", "-m",
                "llamaforge"]
    cmd = torchrun + train_cmd(data, fsdp, *args, "--train.fsdp", "true")[3:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = losses(one), losses(fsdp)
    assert sorted(b) == [1, 2, 3, 4] and all(abs(a[s] - b[s]) <= TOLERANCE[precision] for s in a), (a, b)
    assert (fsdp / "final" / "model.safetensors").exists() and (fsdp / "checkpoints" / "step_2" / "FSDP").exists()
    shutil.rmtree(fsdp / "checkpoints" / "step_4")  # as if the run died after the step-2 checkpoint
    shutil.rmtree(fsdp / "final")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(fsdp) == b


def test_activation_checkpointing_gives_the_same_gradients(small_model):
    from llamaforge.train.optim import build_optimizer
    from llamaforge.train.step import train_step

    x = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt_on in (False, True):
        m = small_model().train()
        m.model.gradient_checkpointing = ckpt_on
        opt = build_optimizer(m, lr=0.0)
        m.zero_grad()
        loss = m(input_ids=x[:, :-1], shift_labels=x[:, 1:]).loss
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
        assert not train_step(m, opt, [(x[:, :-1], x[:, 1:])]).skipped
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_compiled_training_matches_eager(data, tmp_path, precision):
    """train.compile: each block compiled (inductor on CPU) gives the eager per-step losses, fp32 and
    bf16 autocast; the evaluation runs eager (set_stance) and gives the eager validation loss."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    args = ["--max-steps", 2, "--save-every", 0, "--eval-every", 2, "--train.precision", precision]
    subprocess.run(train_cmd(data, eager, *args), check=True, capture_output=True)
    done = subprocess.run(train_cmd(data, compiled, *args, "--train.compile", "true"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = losses(eager), losses(compiled)
    assert sorted(b) == [1, 2] and all(abs(a[s] - b[s]) <= max(1e-4, TOLERANCE[precision]) for s in a), (a, b)
    val = [[r["val_loss"] for r in read_metrics(run) if r["type"] == "eval"] for run in (eager, compiled)]
    assert len(val[1]) == 1 and abs(val[0][0] - val[1][0]) <= max(1e-4, TOLERANCE[precision])


def test_evaluation_and_sampling_add_no_graphs_to_a_compiled_run(data, tmp_path, monkeypatch):
    """Evaluation and the sample run eager (torch.compiler.set_stance) inside a compiled run: dynamo's
    graph count is the training graphs' alone, so no recompilation per layer or per cache length. The
    blocks compile with dynamo's "eager" backend here: the graphs are the frontend's, the test stays fast."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from llamaforge.config import load_config
    from llamaforge.train import compiling, loop

    monkeypatch.setattr(loop, "compile_blocks", lambda m: [b.compile(backend="eager") for b in m.model.layers])
    monkeypatch.setattr(compiling, "_PROBED", {"cpu": ""})  # the inductor probe's own graph is not counted
    over = dotlist(MICRO) + ["train.compile=true", "train.compile_loss=false", "train.max_steps=3", "train.save_every=0"]
    graphs = []
    for every in (0, 1):  # without, then with an evaluation and a sample after every step
        torch._dynamo.reset()
        counters.clear()
        pretrain(load_config("tiny", overrides=over + [f"train.eval_every={every}"]), data, tmp_path / f"r{every}",
                 progress=False)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[0], graphs
    assert len([r for r in read_metrics(tmp_path / "r1") if r["type"] == "sample"]) == 3


@pytest.mark.torchcompat
@pytest.mark.skipif(not Path(sys.executable).with_name("torchrun").exists(), reason="torchrun not installed")
@pytest.mark.parametrize("precision", [p for p in PRECISIONS if getattr(p, "values", [p])[0] == "bf16"])
def test_fsdp2_bf16_does_not_round_the_token_count(data, tmp_path, precision):
    """630 targets a step (2 ranks x 5 windows of 63): bf16 rounds 630 to 632. FSDP2's mixed precision
    casts floating-point forward inputs to bf16; the count is an integer tensor, so the first step's
    loss (the same bf16 weights in both runs) equals one process's."""
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    args = ["--max-steps", 1, "--save-every", 0, "--eval-every", 0, "--train.precision", precision,
            "--train.seq_len", 63, "--batch-tokens", 630, "--train.micro_batch", 5]
    subprocess.run(train_cmd(data, one, *args), check=True, capture_output=True)
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", "-m",
                "llamaforge"]
    done = subprocess.run(torchrun + train_cmd(data, fsdp, *args, "--train.fsdp", "true")[3:], capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = losses(one)[1], losses(fsdp)[1]
    assert abs(a - b) <= 2e-3 * a, (a, b)  # the rounded count was 0.3% off


@pytest.mark.slow
def test_stress_sigkill_at_random_moments_then_resume_is_exact(data, tmp_path):
    """Kill at random moments (between steps, inside a checkpoint write, right after a rename, during
    evaluation and the sample, during the final export), resume, and compare every step's loss with an
    uninterrupted run. LLAMAFORGE_STRESS_ITERATIONS sets the number of kills (default 12)."""
    import random

    args = ("--max-steps", 12, "--save-every", 2, "--eval-every", 3)
    straight = tmp_path / "straight"
    start = time.time()
    subprocess.run(train_cmd(data, straight, *args), check=True, capture_output=True)
    duration = time.time() - start
    want = losses(straight)
    rng = random.Random(0)
    for i in range(int(os.environ.get("LLAMAFORGE_STRESS_ITERATIONS", "12"))):
        run = tmp_path / f"k{i}"
        for _ in range(3):  # up to three kills in one run, each at a random moment
            proc = subprocess.Popen(train_cmd(data, run, *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                proc.wait(timeout=rng.uniform(0.3, 1.0) * duration)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        subprocess.run(train_cmd(data, run, *args), check=True, capture_output=True)
        got = losses(run)
        bad = {s: (got.get(s), want[s]) for s in want if got.get(s) != want[s]}
        assert not bad, f"kill round {i}: steps differ {bad}"


def test_the_ranks_votes_ride_in_the_steps_own_all_reduce(small_model):
    """Under several ranks a step makes exactly two all-reduces (the target count, then loss + votes):
    the stop vote adds no collective. Two identical ranks stood in by doubling: the loss is the one
    process's, the votes are summed, the gradients are DDP's average (reduce_gradients)."""
    from llamaforge.train.optim import build_optimizer
    from llamaforge.train.step import Ranks, reduce_gradients, train_step

    x = torch.randint(0, 512, (2, 17))
    batch = [(x[:, :-1], x[:, 1:])]
    m = small_model().train()
    one = train_step(m, build_optimizer(m, lr=0.1), batch)
    calls = []

    def twice(t):  # the sum over two ranks holding the same values
        calls.append(t.numel())
        t.mul_(2)

    m = small_model().train()
    two = train_step(m, build_optimizer(m, lr=0.1), batch, ranks=Ranks(twice, 2, lambda: [0.0, 1.0, 0.0, 0.0]))
    assert calls == [1, 6] and two.votes == [0.0, 2.0, 0.0, 0.0]
    assert abs(two.loss - one.loss) < 1e-6 and not one.votes
    p = torch.nn.Linear(3, 3)
    p.weight.grad, p.bias.grad = torch.ones(3, 3), torch.full((3,), 3.0)

    def other_rank_adds_one(t):  # the sum with a rank whose gradients are one higher
        calls.append(t.numel())
        t.mul_(2).add_(1)

    reduce_gradients(p, Ranks(other_rank_adds_one, 2), bucket=4)  # buckets of at most 4 elements: 9 alone, then 3
    assert calls[2:] == [9, 3]
    assert torch.equal(p.weight.grad, torch.full((3, 3), 1.5)) and torch.equal(p.bias.grad, torch.full((3,), 3.5))


def test_several_ranks_vote_on_their_own_only_when_work_ran_since_the_steps_vote():
    """Trainer.stop_reason under 2 ranks: the step's vote is used as it is (no collective); after
    validation, scoring or a save (vote_stale) one small all-reduce, then not again."""
    from types import SimpleNamespace

    from llamaforge.train.loop import Trainer
    from llamaforge.train.preempt import StopFlag

    calls = []
    t = Trainer.__new__(Trainer)  # only what stop_reason reads
    t.d = SimpleNamespace(world=2, device=torch.device("cpu"), all_reduce=lambda v: (calls.append(1), v.mul_(2)))
    t.flag, t.slowest_step_s, t.slowest_save_s = StopFlag(), 0.0, 0.0
    t.agree_stop([0.0, 0.0, 0.0, 0.0])
    assert t.stop_reason() is None and not calls
    t.agree_stop([0.0, 1.0, 0.0, 0.0])  # a rank voted SIGINT in the step's all-reduce
    assert t.stop_reason() == "SIGINT" and not calls
    t.vote_stale, t.flag.received = True, "SIGTERM"
    assert t.stop_reason() == "SIGTERM" and calls == [1]
    assert t.stop_reason() == "SIGTERM" and calls == [1]
