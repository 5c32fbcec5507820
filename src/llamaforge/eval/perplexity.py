"""Perplexity and bits per byte over non-overlapping windows of a token stream."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError


@torch.no_grad()
def stream_loss(model, tokens: np.ndarray, seq_len: int, max_tokens: int | None = None, batch: int = 4) -> tuple[float, int]:
    """Summed next-token loss (nats) and target count over consecutive windows of `seq_len` targets
    (the last window may be shorter)."""
    model.eval()
    device = next(model.parameters()).device
    n = len(tokens) - 1
    if max_tokens is not None:
        n = min(n, max_tokens)
    if n < 1:
        raise UserError("fewer than 2 tokens to evaluate; pass a longer text or more validation data")
    starts = list(range(0, n, seq_len))
    full = [s for s in starts if s + seq_len <= n]
    groups = [(full[i : i + batch], seq_len) for i in range(0, len(full), batch)]
    groups += [([s], n - s) for s in starts if s + seq_len > n]  # the shorter last window
    total, count = 0.0, 0
    for rows, width in groups:
        x = torch.from_numpy(np.stack([np.asarray(tokens[r : r + width + 1], dtype=np.int64) for r in rows]))
        logits = model(input_ids=x[:, :-1].to(device)).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten().to(device),
                                                          reduction="sum"))
        count += x[:, 1:].numel()
    return total, count


def summarize(total: float, count: int, nbytes: int | None) -> dict:
    loss = total / count
    out = {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
    if nbytes:
        out["bits_per_byte"] = total / math.log(2) / nbytes
    return out


def perplexity_on_split(model, data_dir: str | Path, split: str = "val", max_tokens: int | None = None) -> dict:
    """On prepared data; bytes are pro-rated from the split's tokens/bytes when only part is read."""
    from ..data.prepare import open_split, read_meta

    meta = read_meta(data_dir)["splits"][split]
    tokens = open_split(data_dir, split)
    total, count = stream_loss(model, tokens, model.config.max_position_embeddings, max_tokens)
    out = summarize(total, count, round(meta["bytes"] * count / max(meta["tokens"] - 1, 1)))
    out["source"] = f"{data_dir}:{split}"
    return out


def perplexity_on_text(model, tokenizer, path: str | Path) -> dict:
    """On any text file: <s> + its tokens, every token scored once; bytes = its UTF-8 size."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"text file {path} does not exist; pass an existing file to --text")
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = np.array(tokenizer(text).input_ids, dtype=np.int64)
    total, count = stream_loss(model, ids, model.config.max_position_embeddings)
    out = summarize(total, count, len(text.encode("utf-8")))
    out["source"] = str(path)
    return out
