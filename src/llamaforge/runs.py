"""What a run directory holds, read back: the final numbers of a run from its metrics.jsonl.

Used by the model card and the report; needs no optional extra (no matplotlib).
"""

from __future__ import annotations

from pathlib import Path

from .train.metrics import read_metrics


def run_summary(run: Path) -> dict:
    """Final numbers of a run, from its records (also used by the model card)."""
    records = read_metrics(run)
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    out = {"steps": train[-1]["step"] if train else 0, "tokens_seen": train[-1]["tokens_seen"] if train else 0}
    if train:
        tail = train[-min(10, len(train)) :]
        out["train_loss"] = sum(r["loss"] for r in tail) / len(tail)  # last 10 steps: less noise
        out["wall_s"] = train[-1]["time"] - train[0]["time"] + train[0]["step_s"]
        out["tokens_per_s"] = sum(r["tokens_per_s"] for r in tail) / len(tail)
    if evals:
        out.update(val_loss=evals[-1]["val_loss"], val_bpb=evals[-1].get("val_bpb"))
    samples = [r for r in records if r["type"] == "sample"]
    out["samples"] = [(r["step"], r["prompt"], r["text"]) for r in samples[-3:]]
    return out
