"""`llamaforge train`: a fresh model of `cfg.model` trained on prepared data, published to RUN_DIR/final."""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig
from ..data.loader import PretrainBatches
from ..data.prepare import Meta, read_meta
from ..errors import UserError
from ..model.io import build_model
from ..model.usercode import BUILTIN, ModelCode
from ..runs import RunRecord
from ..tokenizer import load_tokenizer
from ..train.loop import train
from .common import publish_final, run_directory


def data_record(data_dir: str | Path) -> tuple[Meta, dict]:
    """(meta.json, the RunRecord's `data` entry) of a prepared data folder."""
    meta = read_meta(data_dir)
    return meta, {"source": meta.source, "dir": str(data_dir), "train_tokens": meta.splits["train"].tokens}


def pretrain(cfg: RunConfig, data_dir: str | Path, run_dir: str | Path, resume: bool | None = None,
             progress: bool = True, code: ModelCode = BUILTIN) -> Path:
    """Train (or resume the run's checkpoint) and write RUN_DIR/final; returns its path."""
    meta, data = data_record(data_dir)
    tokenizer = load_tokenizer(str(Path(data_dir) / "tokenizer"))
    if meta.vocab_size > cfg.model.vocab_size:
        raise UserError(f"the data's tokenizer has {meta.vocab_size} tokens, the model {cfg.model.vocab_size}; "
                        "set --model.vocab_size")
    model = build_model(cfg.model, tokenizer, seed=cfg.train.seed, code=code)
    record = RunRecord(tokenizer=meta.tokenizer, data=data, code=code.record())
    with run_directory(run_dir):
        result = train(cfg, model, tokenizer, lambda rank, world: PretrainBatches(data_dir, cfg.train, rank, world),
                       run_dir, resume, progress, record)
        return publish_final(Path(run_dir), result, tokenizer, record)
