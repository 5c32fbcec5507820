"""`llamaforge demo`: the whole job, offline, on a CPU — data -> training -> long context ->
evaluation -> generation -> report — as the chain of ordinary subcommands. This module only lists
them (argv lists); the CLI replays each through its own entry point, printing it first so any step
can be rerun by hand. The last line printed is the report's path.
"""

from __future__ import annotations

from pathlib import Path

PROMPTS = ["The history of the city", "Scientists have discovered", "The president said"]


def report_path(out: Path) -> Path:
    return Path(out) / "report" / "report.md"


def steps(out: Path, quick: bool) -> list[list[str]]:
    data, pre, ext = out / "data", out / "pretrain", out / "extend"
    if quick:  # seconds: a micro model, a few steps, no MMLU download
        model = ["--model.hidden_size", "32", "--model.intermediate_size", "64", "--model.num_hidden_layers", "1",
                 "--model.num_attention_heads", "2", "--model.num_key_value_heads", "1"]
        train = ["--max-steps", "4", "--eval-every", "2", "--batch-tokens", "2048", "--train.micro_batch", "8",
                 "--train.eval_tokens", "2048"]
        extend = ["--max-steps", "2", "--eval-every", "2", "--batch-tokens", "2048", "--train.eval_tokens", "2048"]
        tasks: list[str] = []
    else:
        model, extend = [], []
        train = ["--max-steps", "320",  # Muon + WSD: fewer steps than AdamW needed
                 "--train.eval_tasks", "capability", "--train.eval_tasks_every", "80", "--train.eval_tasks_limit", "20"]
        tasks = ["--tasks", "mmlu_offline_100"]
    return [
        ["prepare", "--source", "sample", "--out", str(data)],
        ["train", "--data", str(data), "--out", str(pre), "--preset", "tiny", *model, *train],
        ["extend", "--model", str(pre), "--data", str(data), "--out", str(ext), "--seq-len", "1024",
         "--preset", "tiny-extend", *extend],
        ["eval", "--model", str(ext), "--data", str(data), *tasks, "--out", str(out / "eval.json"),
         *(["--max-tokens", "4096"] if quick else [])],
        ["generate", "--model", str(ext / "final"), "--max-new-tokens", "8" if quick else "40", "--seed", "0",
         *sum((["--prompt", p] for p in PROMPTS), [])],
        ["report", "--run", str(pre), "--run", str(ext), "--eval", str(out / "eval.json"), "--out", str(out / "report")],
    ]
