"""Create, save and load models as Hugging Face folders.

A llamaforge folder holds config.json (with `auto_map`), the two self-contained .py files,
model.safetensors, generation_config.json and the tokenizer files, so
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` needs nothing from llamaforge.
Folders are written beside their destination and renamed into place: never half-written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from .config import ModelConfig, model_kwargs
from .errors import UserError
from .hf import LlamaForgeConfig, LlamaForgeForCausalLM

log = logging.getLogger(__name__)


def build_model(m: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None, seed: int = 0) -> LlamaForgeForCausalLM:
    """A freshly initialized model (deterministic for a seed)."""
    kwargs = model_kwargs(m)
    if tokenizer is not None:
        if len(tokenizer) > m.vocab_size:
            raise UserError(f"tokenizer has {len(tokenizer)} tokens but vocab_size is {m.vocab_size}; raise model.vocab_size")
        kwargs.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForgeForCausalLM(LlamaForgeConfig(**kwargs))


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total (tied weights once) and non-embedding (without token embedding and output head)."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    emb = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    embedding = sum(p.numel() for p in model.parameters() if id(p) in emb)
    return {"total": total, "non_embedding": total - embedding}


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished folder into place; an older `out` is removed only after the new one exists."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_model(model, tokenizer: PreTrainedTokenizerBase | None, out: str | Path, records: dict | None = None) -> Path:
    """Write a Hugging Face folder atomically (stock Llama models too: no custom code then), with a
    model card rendered from `records` (card.model_records) when given."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.generation_config = GenerationConfig(
            bos_token_id=model.config.bos_token_id,
            eos_token_id=model.config.eos_token_id,
            pad_token_id=model.config.pad_token_id,
        )
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            _set_tokenizer_flags(tmp / "tokenizer_config.json", tokenizer)
        if records is not None:
            from .card import write_card

            write_card(tmp, records)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _set_tokenizer_flags(path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """Say add_bos_token / add_eos_token explicitly, so evaluators tokenize as training did."""
    cfg = json.loads(path.read_text())
    ids = tokenizer("a").input_ids
    cfg["add_bos_token"] = bool(ids) and ids[0] == tokenizer.bos_token_id
    cfg["add_eos_token"] = bool(ids) and ids[-1] == tokenizer.eos_token_id
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> LlamaForgeForCausalLM:
    """Our model from a llamaforge folder or a stock Llama folder (converted)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise UserError(f"{path} is not a model folder (no config.json); pass a folder written by init, train or export")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UserError(f"{path} has no weights (*.safetensors); pass a folder written by init, train or export")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    try:
        if model_type == "llamaforge":
            model, info = LlamaForgeForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
        elif model_type == "llama":
            from transformers import LlamaForCausalLM

            from .convert import from_llama

            llama, info = LlamaForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
            model = from_llama(llama)
        elif model_type == "gpt2":
            from transformers import GPT2LMHeadModel

            from .convert import from_gpt2

            gpt2, info = GPT2LMHeadModel.from_pretrained(path, dtype=dtype, output_loading_info=True)
            model = from_gpt2(gpt2)
        else:
            raise UserError(f"{path} holds a {model_type!r} model; llamaforge reads llamaforge, llama and gpt2 folders")
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f"cannot load {path}: {str(e).strip().splitlines()[0][:300]}; re-export the folder") from None
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise UserError(f"{path} does not match its config ({bad}); re-export the folder")
    return model.eval()


def load_any(path: str | Path) -> tuple[LlamaForgeForCausalLM, Path]:
    """A model from a Hugging Face folder, a run directory (its final/ or latest checkpoint) or a
    checkpoint folder; returns it with the folder holding its tokenizer."""
    from .train.checkpoint import checkpoints, load_weights

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a model folder, run directory or checkpoint")
    if (path / "config.json").exists():
        return load_model(path), path
    if (path / "final" / "config.json").exists():
        return load_model(path / "final"), path / "final"
    if not (path / "state.json").exists():
        found = checkpoints(path)
        if not found:
            raise UserError(f"{path} is not a model folder, run directory or checkpoint; pass one of those")
        path = found[-1]
    state = json.loads((path / "state.json").read_text())
    config = LlamaForgeConfig(**{k: v for k, v in state["model_config"].items() if k not in ("architectures", "auto_map")})
    model = LlamaForgeForCausalLM(config)
    try:
        load_weights(path, model)
    except ValueError as e:
        raise UserError(f"{e}; the checkpoint is damaged or from another model") from None
    return model.eval(), path.parent.parent / "tokenizer"


def export(model, tokenizer_dir: str, out: str, fmt: str, records: dict) -> None:
    """Save `model` as a llamaforge, stock Llama or stock GPT-2 folder, with the tokenizer and card."""
    from .convert import to_gpt2, to_llama
    from .tokenizer import load_tokenizer

    if fmt == "llama" and model.config.position_embedding_type != "rope":
        raise UserError("a GPT-2 model exports with --format gpt2, not llama")
    if fmt == "gpt2":
        try:
            model = to_gpt2(model)
        except ValueError as e:
            raise UserError(f"{e}; use --format llama or llamaforge") from None
    elif fmt == "llama":
        model = to_llama(model)
    save_model(model, load_tokenizer(tokenizer_dir), out, records)
