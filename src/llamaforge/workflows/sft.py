"""`llamaforge sft`: supervised fine-tuning on conversations with the training loop
(same logging, checkpoints, exact resume, DDP); loss only on assistant tokens (see data/sft.py)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..config import RunConfig, check_range, micro_batch_for
from ..errors import UserError
from ..data.sft import CHAT_TEMPLATE, SFTBatches, SFTStats, chat_prompt, split_val, tokenize_conversations
from ..publish.card import read_records
from ..runs import RunRecord
from ..tokenizer import load_tokenizer
from ..train.loop import train
from ..model.usercode import BUILTIN, ModelCode
from .common import check_vocab, load_model_arg, publish_final, run_directory

log = logging.getLogger(__name__)


def sft(cfg: RunConfig, model_path: str, data: str, run_dir: str | Path, strict: bool = False,
        val_fraction: float = 0.05, resume: bool | None = None, progress: bool = True,
        code: ModelCode = BUILTIN) -> tuple[Path, SFTStats]:
    check_range("--val-fraction", val_fraction, 0, 0.99)
    model, tok_dir = load_model_arg(model_path, code)
    tokenizer = load_tokenizer(str(tok_dir))  # loaded here, so ours to set: the template is saved with final/
    tokenizer.chat_template = tokenizer.chat_template or CHAT_TEMPLATE
    convs, stats = tokenize_conversations(data, tokenizer, cfg.train.seq_len, strict)
    train_set, val_set = split_val(convs, val_fraction)
    if not train_set:
        raise UserError(f"no conversation is left to train on ({len(val_set)} held out for validation); "
                        "lower --val-fraction or give more conversations")
    seqs = cfg.train.batch_tokens // cfg.train.seq_len  # conversations per optimizer step
    if cfg.train.sample_prompt:  # sample in the chat format; the caller's cfg is kept
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, sample_prompt=chat_prompt(tokenizer, cfg.train.sample_prompt)))

    def factory(rank: int, world: int):
        return SFTBatches(train_set, val_set, seqs, tokenizer.pad_token_id, rank, world, cfg.train.seed,
                          micro_batch_for(cfg.train, world))

    record = RunRecord(previous_card=read_records(tok_dir) or {}, code=code.record(),
                       sft={"from": str(model_path), "data": str(data), "train_conversations": len(train_set),
                            "val_conversations": len(val_set), "skipped": stats.skipped})
    check_vocab(model, len(tokenizer), f"the tokenizer of {model_path}")
    with run_directory(run_dir):
        result = train(cfg, model, tokenizer, factory, run_dir, resume, progress, record)
        return publish_final(Path(run_dir), result, tokenizer, record), stats
