"""What several workflows share: loading a `--model` argument and publishing a run's final/ folder."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..model.io import load_model, save_model
from ..publish.card import card_files, model_records
from ..runs import RunRecord, final_dir, resolve_model
from ..train.checkpoint import model_from_checkpoint
from ..train.loop import TrainResult


def load_model_arg(path: str | Path):
    """(model, folder holding its tokenizer) for a model folder, run directory or checkpoint."""
    ref = resolve_model(path)
    if ref.kind == "folder":
        return load_model(ref.path), ref.tokenizer
    try:
        return model_from_checkpoint(ref.path), ref.tokenizer
    except ValueError as e:
        raise UserError(f"{e}; the checkpoint is damaged or from another model") from None


def publish_final(run_dir: Path, result: TrainResult, tokenizer, record: RunRecord) -> Path:
    """RUN_DIR/final: the trained model as a Hugging Face folder with its card (main process only)."""
    final = final_dir(run_dir)
    if result.main and result.model is not None:
        previous = record.previous_card
        tokenizer_name = record.tokenizer or previous.get("tokenizer", "see tokenizer files")
        rec = model_records(result.model, tokenizer_name, run_dir, previous=previous)
        save_model(result.model, tokenizer, final, card_files(rec, final.name))
    return final
