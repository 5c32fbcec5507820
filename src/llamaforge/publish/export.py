"""Write a model as a llamaforge, stock Llama or stock GPT-2 Hugging Face folder, with its card."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from ..errors import UserError
from ..model.convert import to_gpt2, to_llama
from ..model.io import save_model
from .card import card_files

FORMATS = ("llamaforge", "llama", "gpt2")


def export(model, tokenizer: PreTrainedTokenizerBase, out: str | Path, fmt: str, records: dict) -> Path:
    """Save `model` in format `fmt` with the tokenizer and a card rendered from `records`."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "llama" and getattr(model.config, "position_embedding_type", "rope") != "rope":
        raise UserError("a GPT-2 model exports with --format gpt2, not llama")
    if fmt == "gpt2":
        try:
            model = to_gpt2(model)
        except ValueError as e:
            raise UserError(f"{e}; use --format llama or llamaforge") from None
    elif fmt == "llama":
        model = to_llama(model)
    return save_model(model, tokenizer, out, card_files(records, Path(out).name))
