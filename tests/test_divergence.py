"""A diverging run keeps its good work (issue: "Nothing lost, ever"): healthy checkpoints survive,
NaN weights are never written or published, `rollback` finishes with a finite loss; a resume trains
what it records; chat data in the formats people have."""

import json

import pytest
import torch

from helpers import ddp_train_worker, dotlist, free_port, micro, run_cli, stories_data
from llamaforge.config import load_config
from llamaforge.errors import UserError
from llamaforge.runs import checkpoints, read_metrics, read_state
from llamaforge.train import loop
from llamaforge.train.divergence import SPIKE_WINDOW, Health
from llamaforge.train.step import StepStats
from llamaforge.workflows.pretrain import pretrain

MICRO = [*micro(layers=1, positions=64), "--train.seq_len", "32", "--train.micro_batch", "2", "--batch-tokens", "128",
         "--train.eval_tokens", "128", "--train.warmup_steps", "1", "--train.precision", "fp32",
         "--train.optimizer", "adamw", "--train.schedule", "cosine", "--eval-every", "0", "--lr", "0.003",
         "--train.tensorboard", "false", "--train.sample_prompt", "The"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return stories_data(tmp_path_factory.mktemp("data"), 300)


def diverging(monkeypatch, bad_calls: set[int]):
    """train_step that returns a non-finite step (no update) on the given call numbers, the real
    step otherwise: a run that diverges for a while, deterministically."""
    real, calls = loop.train_step, []

    def step(*a, **k):
        calls.append(1)
        if len(calls) in bad_calls:
            return StepStats(float("nan"), float("nan"), 128, True)
        return real(*a, **k)

    monkeypatch.setattr(loop, "train_step", step)
    return calls


def cfg(*extra):
    return load_config("tiny", overrides=dotlist([*MICRO, *map(str, extra)]))


def test_a_diverging_run_stops_naming_its_last_healthy_checkpoint_which_rotation_kept(data, tmp_path, monkeypatch):
    diverging(monkeypatch, {5, 6, 7, 8, 9})  # steps 5-9 bad: checkpoints 5-8 are written while diverging
    run = tmp_path / "r"
    with pytest.raises(UserError, match=r"diverged at step 9 .*last healthy checkpoint is checkpoints/step_4"):
        pretrain(cfg("--max-steps", 12, "--save-every", 1, "--train.keep_last", 2, "--train.max_bad_steps", 5),
                 data, run, progress=False)
    kept = [p.name for p in checkpoints(run)]
    assert "step_4" in kept and kept[-2:] == ["step_7", "step_8"]  # rotation kept the healthy one
    assert read_state(run / "checkpoints" / "step_4")["healthy"] is True
    assert read_state(run / "checkpoints" / "step_8")["healthy"] is False
    assert not (run / "final").exists()
    monkeypatch.undo()  # resuming picks the healthy checkpoint, not the newer diverging ones
    pretrain(cfg("--max-steps", 6, "--save-every", 0, "--train.keep_last", 2), data, run, progress=False)
    assert any(r.get("event") == "resumed" and r["checkpoint"] == "step_4" for r in read_metrics(run))


def test_rollback_skips_the_window_halves_the_lr_and_finishes_finite(data, tmp_path, monkeypatch):
    calls = diverging(monkeypatch, {5, 6, 7})
    run = tmp_path / "r"
    pretrain(cfg("--max-steps", 8, "--save-every", 2, "--train.max_bad_steps", 3, "--train.on_divergence", "rollback"),
             data, run, progress=False)
    events = [r for r in read_metrics(run) if r["type"] == "event" and r["event"] == "rollback"]
    assert len(events) == 1 and events[0]["checkpoint"] == "step_4" and events[0]["lr_scale"] == 0.5
    train = [r for r in read_metrics(run) if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))  # steps 5-8 trained again after the rollback
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert len(calls) == 11  # 4 good + 3 bad + 4 after the rollback
    state = read_state(checkpoints(run)[-1])
    assert state["lr_scale"] == 0.5 and state["rollbacks"] == 1
    assert (run / "final" / "model.safetensors").exists()


def test_nan_weights_are_never_saved_nor_published(data, tmp_path, monkeypatch):
    """An update that makes the weights NaN on the last step: no checkpoint, no final/, exit 2."""
    real = loop.train_step

    def poisoning(model, *a, **k):
        stats = real(model, *a, **k)
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return stats

    monkeypatch.setattr(loop, "train_step", poisoning)
    with pytest.raises(UserError, match="weights are not finite at step 1"):
        pretrain(cfg("--max-steps", 1), data, tmp_path / "r", progress=False)
    assert not checkpoints(tmp_path / "r") and not (tmp_path / "r" / "final").exists()


def test_a_real_explosion_publishes_nothing(data, tmp_path):
    done = run_cli("train", "--data", data, "--out", tmp_path / "r", "--preset", "tiny", *MICRO, "--lr", "10",
                   "--train.warmup_steps", "0", "--train.grad_clip", "0", "--max-steps", "8", "--save-every", "0",
                   "--train.weight_decay", "0")
    if done.returncode == 0:  # the loss stayed finite: then the weights are finite too
        from llamaforge.model.io import load_model, nonfinite_parameters

        assert not nonfinite_parameters(load_model(tmp_path / "r" / "final"))
    else:
        assert done.returncode == 2 and not (tmp_path / "r" / "final").exists(), done.stderr


def test_spikes_count_as_bad_steps_once_the_window_is_full():
    h = Health(spike_factor=3.0, max_bad_steps=2)
    for _ in range(SPIKE_WINDOW):
        assert h.observe(4.0, False) is None
    assert h.observe(11.0, False) is None and h.observe(13.0, False) == "spike" and not h.diverged
    assert h.observe(float("nan"), True) == "non-finite" and h.diverged
    again = Health(3.0, 2)
    again.load_state_dict(json.loads(json.dumps(h.state_dict())))
    assert again.streak == 2 and list(again.recent) == list(h.recent)


def test_a_resume_trains_the_lr_it_records_and_refuses_other_changes(data, tmp_path):
    run = tmp_path / "r"
    base = ["train", "--data", data, "--out", run, "--preset", "tiny", *MICRO, "--save-every", "4"]
    run_cli(*base, "--max-steps", "4", check_rc=0)
    run_cli(*base, "--max-steps", "8", "--lr", "0.01", check_rc=0)
    rows = read_metrics(run)
    change = [r for r in rows if r.get("event") == "lr_changed"]
    assert len(change) == 1 and change[0]["from"][0] == pytest.approx(0.003) and change[0]["to"][0] == pytest.approx(0.01)
    lrs = {r["step"]: r["lr"] for r in rows if r["type"] == "train"}
    straight = tmp_path / "straight"  # the same schedule at the new peak from the start
    run_cli("train", "--data", data, "--out", straight, "--preset", "tiny", *MICRO, "--max-steps", "8", "--lr", "0.01",
            check_rc=0)
    want = {r["step"]: r["lr"] for r in read_metrics(straight) if r["type"] == "train"}
    assert all(lrs[s] == pytest.approx(want[s]) for s in range(5, 9))  # trained at the lr it records
    assert "lr: 0.01" in (run / "config.yaml").read_text()
    card = (run / "final" / "README.md").read_text()
    assert "0.003" in card and "0.01" in card  # the card states both
    done = run_cli(*base, "--max-steps", "10", "--train.warmup_steps", "3")
    assert done.returncode == 2 and "train.warmup_steps 1 -> 3" in done.stderr


def test_chat_content_parts_and_templates_without_markers_train_the_assistant_tokens(tmp_path, mistral):
    from llamaforge.data.sft import tokenize_conversations

    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Say "}, "cat"]},
                          {"role": "assistant", "content": [{"type": "text", "text": "cat cat."}]}]}
    plain = {"messages": [{"role": "user", "content": "Say cat"}, {"role": "assistant", "content": "cat cat."}]}
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(parts) + "\n" + json.dumps(plain) + "\n")
    (a, la), (b, lb) = tokenize_conversations(str(path), mistral, 64)[0]
    assert a == b and la == lb  # a list of text parts is its text, not the Python text of the list
    assert "[{" not in mistral.decode(a)
    mistral.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    try:  # no {% generation %} markers: llamaforge's own masking, never zero targets
        convs, _ = tokenize_conversations(str(path), mistral, 64)
    finally:
        mistral.chat_template = None
    ids, labels = convs[0]
    trained = mistral.decode([t for t in labels if t != -100])
    assert "cat cat." in trained and "Say" not in trained
    (tmp_path / "img.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image", "url": "x"}]}, {"role": "assistant", "content": "hi"}]}) + "\n")
    with pytest.raises(UserError, match="image"):
        tokenize_conversations(str(tmp_path / "img.jsonl"), mistral, 64, strict=True)


def test_out_of_memory_halves_the_micro_batch_and_redoes_the_step(data, tmp_path, monkeypatch):
    """torch.OutOfMemoryError injected above 2 sequences per forward: `auto` starts at the whole step
    (8 sequences), halves twice in step 1, then trains exactly as micro_batch 2 does."""
    from llamaforge.train import step as step_module

    real = step_module.causal_loss

    def small_memory(model, inputs, *a, **k):  # the forward of a micro-batch above 2 sequences
        if len(inputs) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(model, inputs, *a, **k)

    monkeypatch.setattr(step_module, "causal_loss", small_memory)
    common = ("--max-steps", 3, "--save-every", 3, "--batch-tokens", 256)
    pretrain(cfg(*common, "--train.micro_batch", "auto"), data, tmp_path / "auto", progress=False)
    pretrain(cfg(*common, "--train.micro_batch", 2), data, tmp_path / "two", progress=False)
    events = [(r["micro_batch"], r["retry_with"]) for r in read_metrics(tmp_path / "auto")
              if r.get("event") == "out_of_memory"]
    assert events == [(8, 4), (4, 2)]
    a, b = ({r["step"]: r["loss"] for r in read_metrics(p) if r["type"] == "train"} for p in (tmp_path / "auto", tmp_path / "two"))
    assert sorted(a) == [1, 2, 3] and all(abs(a[s] - b[s]) < 1e-5 for s in a), (a, b)
    assert read_state(checkpoints(tmp_path / "auto")[-1])["micro_batch"] == 2
    monkeypatch.setattr(step_module, "causal_loss", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.raises(UserError, match="out of memory with 1 sequences"):
        pretrain(cfg(*common, "--train.micro_batch", 1), data, tmp_path / "one", progress=False)
    monkeypatch.setattr(step_module, "causal_loss", real)  # in the optimizer step: not redone, one line
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.raises(UserError, match="out of memory in the optimizer step"):
        pretrain(cfg(*common, "--train.micro_batch", "auto"), data, tmp_path / "opt", progress=False)


@pytest.mark.slow  # two 2-process runs: ~40 s
def test_out_of_memory_on_one_rank_is_redone_by_every_rank_under_ddp(data, tmp_path):
    """2 gloo ranks, `micro_batch: auto`, out of memory injected on rank 1 only above 1 sequence: both
    ranks agree (in the step's loss all-reduce), halve twice and train exactly as micro-batch 1 does
    under DDP's own reduction; rank 0 logs the events; the size that fitted is kept."""
    common = ["--max-steps", "3", "--save-every", "3", "--batch-tokens", "256"]
    runs = {}
    for name, extra, oom in (("auto", ["--train.micro_batch", "auto"], 1), ("one", ["--train.micro_batch", "1"], None)):
        runs[name] = tmp_path / name
        torch.multiprocessing.spawn(ddp_train_worker, nprocs=2, args=(
            2, free_port(), dotlist([*MICRO, *common, *extra]), str(data), str(runs[name]), oom, 1))
    events = [(r["micro_batch"], r["retry_with"]) for r in read_metrics(runs["auto"]) if r.get("event") == "out_of_memory"]
    assert events == [(4, 2), (2, 1)]  # 256 tokens / (2 ranks x 32) = 4 sequences per rank
    a, b = ({r["step"]: r["loss"] for r in read_metrics(p) if r["type"] == "train"} for p in runs.values())
    assert sorted(a) == [1, 2, 3] and all(abs(a[s] - b[s]) < 1e-5 for s in a), (a, b)
    assert read_state(checkpoints(runs["auto"])[-1])["micro_batch"] == 1


@pytest.mark.slow  # one 2-process run: ~20 s
def test_a_sigterm_during_validation_under_ddp_saves_before_another_step(data, tmp_path):
    """Rank 1 alone is signalled as validation after step 2 starts: both ranks abandon it, vote before
    the next step (validation ran since the vote in the step's all-reduce) and save step 2."""
    run = tmp_path / "r"
    torch.multiprocessing.spawn(ddp_train_worker, nprocs=2, args=(
        2, free_port(), dotlist([*MICRO, "--max-steps", "6", "--eval-every", "1"]),
        str(data), str(run), None, 1, 2))
    assert (tmp_path / "r.stopped").read_text() == "2"
    assert [p.name for p in checkpoints(run)] == ["step_2"]
    assert max(r["step"] for r in read_metrics(run) if r["type"] == "train") == 2
    assert any(r.get("event") == "abandoned" for r in read_metrics(run))


def test_auto_micro_batch_under_fsdp_is_refused_before_any_work():
    from llamaforge.train.checks import check_runnable

    fsdp, ddp = cfg("--train.micro_batch", "auto", "--train.fsdp", "true"), cfg("--train.micro_batch", "auto")
    with pytest.raises(UserError, match="micro_batch auto with train.fsdp"):
        check_runnable(fsdp, fsdp.model, 2)
    check_runnable(ddp, ddp.model, 2)  # DDP: the ranks agree


def test_a_run_with_no_finite_step_publishes_nothing(data, tmp_path, monkeypatch):
    diverging(monkeypatch, {1, 2, 3})  # every step non-finite, fewer than max_bad_steps
    with pytest.raises(UserError, match="none of the 3 steps had a finite loss"):
        pretrain(cfg("--max-steps", 3, "--train.max_bad_steps", 5), data, tmp_path / "r", progress=False)
    assert not (tmp_path / "r" / "final").exists()


def test_two_rollbacks_scale_the_configured_lr_once_each(data, tmp_path, monkeypatch):
    """Rolled back twice: every LR is the configured schedule x 0.25 (not compounded), and the
    checkpoint each rollback restored is kept as it was."""
    straight = tmp_path / "straight"
    pretrain(cfg("--max-steps", 10, "--save-every", 2), data, straight, progress=False)
    want = {r["step"]: r["lr"] for r in read_metrics(straight) if r["type"] == "train"}
    diverging(monkeypatch, {5, 6, 7, 10, 11, 12})
    run = tmp_path / "r"
    pretrain(cfg("--max-steps", 10, "--save-every", 2, "--train.max_bad_steps", 3, "--train.on_divergence", "rollback"),
             data, run, progress=False)
    rows = read_metrics(run)
    scales = [r["lr_scale"] for r in rows if r.get("event") == "rollback"]
    assert scales == [0.5, 0.25]
    got = {r["step"]: r["lr"] for r in rows if r["type"] == "train"}
    assert all(got[s] == pytest.approx(0.25 * want[s]) for s in range(7, 11)), (got, want)
    assert not any(r.get("event") == "lr_changed" for r in rows)
    assert read_state(run / "checkpoints" / "step_10")["lr_scale"] == 0.25
