"""`llamaforge init`: a freshly initialized model as a Hugging Face folder with its card."""

from __future__ import annotations

from pathlib import Path

from ..config import RANGES, RunConfig, check_range
from ..model.io import build_model, count_parameters, save_model
from ..model.usercode import BUILTIN, ModelCode
from ..publish.card import card_files, model_records
from ..tokenizer import load_tokenizer


def init_model(cfg: RunConfig, out: str | Path, tokenizer: str | None = None, seed: int = 0,
               code: ModelCode = BUILTIN) -> dict[str, int]:
    """Write the folder (a user's model with its code beside the weights); returns the parameter counts."""
    check_range("--seed", seed, *RANGES["seed"][:2])
    name = tokenizer or cfg.tokenizer
    tok = load_tokenizer(name)
    model = build_model(cfg.model, tok, seed=seed, code=code)
    save_model(model, tok, out, card_files(model_records(model, name), Path(out).name))
    return count_parameters(model)
