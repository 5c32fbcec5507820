"""One place per idea (issue "One place per idea"): the capability set is its own versioned list, the
task cache follows the converters' content, lists are accepted where a comma string is, lm-eval's
own output goes to the run's log."""

import logging
import sys

import pytest

from llamaforge.config import load_config
from llamaforge.eval import tasks


def test_the_capability_set_is_its_own_list_and_a_new_task_does_not_change_it(monkeypatch):
    assert tasks.expand(["capability"]) == list(tasks.CAPABILITY_SET)
    assert set(tasks.CAPABILITY_SET) <= set(tasks.BENCHES)
    extra = tasks.Bench("new_offline", "new", "new/none", "acc", lambda r: r)
    monkeypatch.setitem(tasks.BENCHES, "new_offline", extra)  # a task added to the registry
    assert tasks.expand(["capability"]) == list(tasks.CAPABILITY_SET)  # the headline score keeps its tasks
    assert "9 tasks" in tasks.CAPABILITY_VERSION and len(tasks.CAPABILITY_SET) == 9


def test_the_task_cache_is_keyed_by_the_converters_content(monkeypatch):
    names = ["copa_offline", "piqa_offline"]
    before = tasks.task_key(names)
    assert tasks.task_key(list(reversed(names))) == before
    changed = tasks.replace(tasks.BENCHES["copa_offline"], convert=lambda r: {"query": "changed", **r})
    monkeypatch.setitem(tasks.BENCHES, "copa_offline", changed)
    assert tasks.task_key(names) != before  # a changed converter: new files, never the old rows


@pytest.mark.parametrize("given", ["train.eval_tasks=[copa_offline,piqa_offline]", "train.eval_tasks=copa_offline,piqa_offline"])
def test_eval_tasks_as_a_list_or_a_comma_string(given, tmp_path):
    assert load_config("tiny", overrides=[given]).train.eval_tasks == "copa_offline,piqa_offline"
    (tmp_path / "c.yaml").write_text("train:\n  eval_tasks: [copa_offline, piqa_offline]\n")
    assert load_config(file=tmp_path / "c.yaml").train.eval_tasks == "copa_offline,piqa_offline"


def test_third_party_output_goes_to_the_log_file(tmp_path, capsys):
    from llamaforge.eval.harness import third_party_to

    log = tmp_path / "lm-eval.log"
    with third_party_to(log):
        logging.getLogger("lm_eval.api.model").warning("Truncating 12 tokens from the left")
        print("progress bar", file=sys.stderr)
    out = capsys.readouterr()
    assert "Truncating" not in out.err + out.out and "progress bar" not in out.err
    assert "Truncating 12 tokens" in log.read_text() and "progress bar" in log.read_text()
    assert logging.getLogger("lm_eval").propagate  # put back as it was


def test_a_new_schedule_is_one_registry_entry_and_unknown_names_fail_with_the_known_ones(monkeypatch):
    """`linear` added the way docs/contributing.md says (one @schedule entry): the config takes it, the
    scheduler runs it, the recipe names it; nothing else had to learn the name. Unknown names: one line."""
    import torch

    from llamaforge.errors import UserError
    from llamaforge.train import optim, schedules
    from llamaforge.train.checks import check_runnable

    monkeypatch.setattr(schedules, "SCHEDULES", dict(schedules.SCHEDULES))
    schedules.schedule("linear", describe=lambda t: f"{t['warm']}, linear to {t['min_lr_ratio']} of peak")(
        lambda step, t: 1 - (1 - t.min_lr_ratio) * (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    cfg = load_config("tiny", overrides=["train.schedule=linear", "train.warmup_steps=0", "train.max_steps=10",
                                         "train.min_lr_ratio=0"])
    check_runnable(cfg, cfg.model, 1)
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([{"params": [p], "lr_name": "lr"}], lr=1.0)
    sched = schedules.build_scheduler(opt, cfg.train)
    lrs = []
    for _ in range(5):
        lrs.append(optim.lr_values(opt)["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6])
    assert "linear to 0.0 of peak" in optim.describe_recipe(vars(cfg.train))
    for key, bad, known in (("optimizer", "sgd", "adamw, muon"), ("schedule", "trapezoid", "cosine, wsd, linear")):
        cfg = load_config("tiny", overrides=[f"train.{key}={bad}"])
        with pytest.raises(UserError, match=f"train.{key} '{bad}' is not one of {known}"):
            check_runnable(cfg, cfg.model, 1)
    assert optim.describe_recipe({"optimizer": "sgd"}) == "unknown"  # a card of a foreign run: no crash


@pytest.mark.parametrize("name", __import__("llamaforge.config", fromlist=["preset_names"]).preset_names())
def test_every_preset_loads_and_can_run(name):
    """A preset is one YAML file: it loads against the schema and passes the refusals a run meets first."""
    from llamaforge.train.checks import check_runnable

    cfg = load_config(name)
    if "extend" in name:  # `extend` runs it on the interpolated model, at the preset's length
        cfg.model.max_position_embeddings = cfg.train.seq_len
    check_runnable(cfg, cfg.model, 1)
