"""Perplexity and bits per byte over non-overlapping windows of a token stream."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..data.prepare import open_split, read_meta
from ..errors import UserError
from .loss import stream_windows, windowed_loss


def summarize(total: float, count: int, nbytes: int | None) -> dict:
    loss = total / count
    out = {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
    if nbytes:
        out["bits_per_byte"] = total / math.log(2) / nbytes
    return out


def perplexity_on_split(model, data_dir: str | Path, split: str = "val", max_tokens: int | None = None,
                        batch: int = 4) -> dict:
    """On prepared data; bytes are pro-rated from the split's tokens/bytes when only part is read."""
    meta = read_meta(data_dir).splits[split]
    tokens = open_split(data_dir, split)
    s = windowed_loss(model, stream_windows(tokens, model.config.max_position_embeddings, max_tokens, batch))
    total, count = s.total, s.count
    out = summarize(total, count, round(meta.bytes * count / max(meta.tokens - 1, 1)))
    out["source"] = f"{data_dir}:{split}"
    return out


def perplexity_on_text(model, tokenizer, path: str | Path, batch: int = 4) -> dict:
    """On any text file: <s> + its tokens, every token scored once; bytes = its UTF-8 size."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"text file {path} does not exist; pass an existing file to --text")
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = np.array(tokenizer(text).input_ids, dtype=np.int64)
    s = windowed_loss(model, stream_windows(ids, model.config.max_position_embeddings, batch=batch))
    out = summarize(s.total, s.count, len(text.encode("utf-8")))
    out["source"] = str(path)
    return out
