"""`llamaforge export`: a model folder, run directory or checkpoint written as a llamaforge, stock
Llama or stock GPT-2 folder, its card carried over (plus any eval results given)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..publish.card import model_records, read_records
from ..publish.export import export
from ..tokenizer import load_tokenizer
from ..model.usercode import BUILTIN, ModelCode
from .common import load_model_arg
from .evaluate import read_results


def export_model(model_path: str | Path, out: str | Path, fmt: str = "llama", evals: list[str] = (),
                 code: ModelCode = BUILTIN) -> Path:
    """A user's model (`code`) is written as itself: its code, weights, tokenizer and card."""
    if not code.builtin and fmt != "llamaforge":
        raise UserError(f"--format {fmt} converts llamaforge's own model; a model of your own code exports as itself: "
                        "--format llamaforge (its code travels with the weights)")
    model, tok_dir = load_model_arg(model_path, code)
    results = [read_results(e) for e in evals]
    previous = read_records(tok_dir) or {}
    records = model_records(model, previous.get("tokenizer", "see tokenizer files"), evals=results, previous=previous)
    return export(model, load_tokenizer(str(tok_dir)), out, fmt, records)
