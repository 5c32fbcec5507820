"""`llamaforge sft`: supervised fine-tuning on conversations with the training loop
(same logging, checkpoints, exact resume, DDP); loss only on assistant tokens (see data/sft.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from .config import RunConfig
from .data.sft import CHAT_TEMPLATE, SFTBatches, SFTStats, split_val, tokenize_conversations

log = logging.getLogger(__name__)


def sft(cfg: RunConfig, model_path: str, data: str, run_dir: str | Path, strict: bool = False,
        val_fraction: float = 0.05, resume: bool | None = None, progress: bool = True) -> tuple[Path, SFTStats]:
    from .models import load_any
    from .tokenizer import load_tokenizer
    from .train.loop import train

    model, tok_dir = load_any(model_path)
    tokenizer = load_tokenizer(str(tok_dir))
    tokenizer.chat_template = tokenizer.chat_template or CHAT_TEMPLATE
    convs, stats = tokenize_conversations(data, tokenizer, cfg.train.seq_len, strict)
    train_set, val_set = split_val(convs, val_fraction)
    seqs = cfg.train.batch_tokens // cfg.train.seq_len  # conversations per optimizer step
    if cfg.train.sample_prompt:  # sample in the chat format, BOS left to the tokenizer
        chat = tokenizer.apply_chat_template([{"role": "user", "content": cfg.train.sample_prompt}], tokenize=False,
                                             add_generation_prompt=True)
        cfg.train.sample_prompt = chat.removeprefix(tokenizer.bos_token)

    def factory(rank: int, world: int):
        return SFTBatches(train_set, val_set, seqs, tokenizer.pad_token_id, rank, world, cfg.train.seed,
                          cfg.train.micro_batch)

    from .card import read_records

    records = {"previous_card": read_records(tok_dir) or {},
               "sft": {"from": str(model_path), "data": str(data), "train_conversations": len(train_set),
                       "val_conversations": len(val_set),
                       "skipped": stats.skipped}}
    return train(cfg, model, tokenizer, factory, run_dir, resume, progress, records), stats
