"""What several workflows share: loading a `--model` argument and publishing a run's final/ folder."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError
from ..model.io import load_model, save_model
from ..model.usercode import BUILTIN, ModelCode
from ..publish.card import card_files, model_records
from ..runs import RunRecord, check_run_dir, final_dir, lock_run, resolve_model
from ..train.checkpoint import model_from_checkpoint
from ..train.loop import TrainResult


def load_model_arg(path: str | Path, code: ModelCode = BUILTIN):
    """(model, folder holding its tokenizer) for a model folder, run directory or checkpoint; a
    user's model through their `code` (--model-code)."""
    ref = resolve_model(path)
    if ref.kind == "folder":
        return load_model(ref.path, code=code), ref.tokenizer
    try:
        return model_from_checkpoint(ref.path, code), ref.tokenizer
    except ValueError as e:
        raise UserError(f"{e}; the checkpoint is damaged or from another model") from None


@contextlib.contextmanager
def run_directory(run_dir: str | Path) -> Iterator[Path]:
    """Check RUN_DIR is a run directory (or new, or empty) and hold its lock for the whole workflow:
    training and publishing. Under torchrun only rank 0 takes the lock (all ranks share the folder)."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    if os.environ.get("RANK", "0") != "0":
        yield run_dir
        return
    with lock_run(run_dir):
        yield run_dir


def check_vocab(model, data_vocab: int, what: str) -> None:
    """Token ids of prepared data must fit the model's embedding (else an IndexError deep inside)."""
    if data_vocab > model.config.vocab_size:
        raise UserError(f"{what} uses a {data_vocab:,}-token vocabulary but the model has {model.config.vocab_size:,} "
                        "embeddings; prepare the data with the model's tokenizer (--tokenizer MODEL_DIR)")


def publish_final(run_dir: Path, result: TrainResult, tokenizer, record: RunRecord) -> Path:
    """RUN_DIR/final: the trained model as a Hugging Face folder with its card (main process only)."""
    final = final_dir(run_dir)
    if result.main and result.model is not None:
        previous = record.previous_card
        tokenizer_name = record.tokenizer or previous.get("tokenizer", "see tokenizer files")
        rec = model_records(result.model, tokenizer_name, run_dir, previous=previous)
        save_model(result.model, tokenizer, final, card_files(rec, final.name))
    return final
