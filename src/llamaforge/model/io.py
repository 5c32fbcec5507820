"""Create, save and load models as Hugging Face folders.

A llamaforge folder holds config.json (with `auto_map`), the two self-contained .py files,
model.safetensors, generation_config.json and the tokenizer files, so
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` needs nothing from llamaforge.
A LLaMA-shaped folder is also a stock Llama folder (model_type "llama", transformers' tensor names):
without `trust_remote_code` transformers loads it as its own LlamaForCausalLM. Folders written by
earlier versions (model_type "llamaforge", nanoGPT-style names) load too, renamed on the way in.
Folders are written beside their destination and renamed into place (fsutil.atomic_folder).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import GenerationConfig, GPT2LMHeadModel, LlamaForCausalLM, PreTrainedTokenizerBase

from ..config import ModelConfig, model_kwargs
from ..errors import UserError
from ..fsutil import atomic_folder
from .convert import from_gpt2, from_llama, rename_legacy, uses_legacy_names
from .hf import LlamaForgeConfig, LlamaForgeForCausalLM
from .usercode import BUILTIN, LLAMA_FIELDS, TOKEN_FIELDS, ModelCode

log = logging.getLogger(__name__)
RECORDS = "llamaforge.json"  # what is known about the model (publish/card.py); also marks the folder as ours


def is_model_folder(path: Path) -> bool:
    """A Hugging Face folder llamaforge wrote (config.json + llamaforge.json), so it may be replaced."""
    return (Path(path) / "config.json").is_file() and (Path(path) / RECORDS).is_file()


def build_model(m: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None, seed: int = 0,
                code: ModelCode = BUILTIN):
    """A freshly initialized model (deterministic for a seed): ours, or the user's `code` given the
    standard Llama fields of `m` (docs/own-model.md)."""
    kwargs = model_kwargs(m)
    if tokenizer is not None:
        if len(tokenizer) > m.vocab_size:
            raise UserError(f"tokenizer has {len(tokenizer)} tokens but vocab_size is {m.vocab_size}; raise model.vocab_size")
        kwargs.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if not code.builtin:
        kwargs = {k: v for k, v in kwargs.items() if k in LLAMA_FIELDS + TOKEN_FIELDS}
        kwargs["num_key_value_heads"] = kwargs.get("num_key_value_heads") or m.num_attention_heads
        return code.build(code.make_config(kwargs), seed)
    torch.manual_seed(seed)
    return LlamaForgeForCausalLM(LlamaForgeConfig(**kwargs))


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total (tied weights once) and non-embedding (without token embedding and output head)."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    emb = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    embedding = sum(p.numel() for p in model.parameters() if id(p) in emb)
    return {"total": total, "non_embedding": total - embedding}


def nonfinite_parameters(model) -> list[str]:
    """Names of parameters holding NaN/inf (one device sync; sharded parameters check their shard)."""
    named = [(n, p.to_local() if hasattr(p, "to_local") else p) for n, p in model.named_parameters()]
    if not named:
        return []
    flags = torch.stack([torch.isfinite(p).all() for _, p in named]).cpu()
    return [n for (n, _), ok in zip(named, flags.tolist()) if not ok]


def save_model(model, tokenizer: PreTrainedTokenizerBase | None, out: str | Path,
               files: dict[str, str] | None = None) -> Path:
    """Write a Hugging Face folder atomically (stock Llama / GPT-2 models too: no custom code then),
    plus extra text `files` by name (the model card: publish/card.py renders them)."""
    out = Path(out)
    bad = nonfinite_parameters(model)
    if bad:  # never publish NaN/inf weights
        raise UserError(f"the model's weights are not finite ({len(bad)} tensors, first {bad[0]}); nothing was written "
                        f"to {out}: train again from a healthy checkpoint with a lower learning rate")
    with atomic_folder(out, is_model_folder, "model folder with config.json and llamaforge.json") as tmp:
        model.generation_config = GenerationConfig(
            bos_token_id=model.config.bos_token_id,
            eos_token_id=model.config.eos_token_id,
            pad_token_id=model.config.pad_token_id,
        )
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            _set_tokenizer_flags(tmp / "tokenizer_config.json", tokenizer)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    return out


def _set_tokenizer_flags(path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """Say add_bos_token / add_eos_token explicitly, so evaluators tokenize as training did."""
    cfg = json.loads(path.read_text())
    ids = tokenizer("a").input_ids
    cfg["add_bos_token"] = bool(ids) and ids[0] == tokenizer.bos_token_id
    cfg["add_eos_token"] = bool(ids) and ids[-1] == tokenizer.eos_token_id
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def safetensors_problem(file: Path) -> str | None:
    """Why a safetensors file cannot be read (a header that does not fit the file's size, garbage,
    no tensors), or None. Reads the header only; the tensors are checked against the config on load."""
    try:
        with safe_open(str(file), "pt") as f:  # checks the header's offsets against the file size
            if not list(f.keys()):
                return "it holds no tensors"
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'unreadable'}"
    return None


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, code: ModelCode = BUILTIN):
    """Our model from a llamaforge folder or a stock Llama folder (converted); with the user's `code`,
    their model class reads the folder (its own, or any whose tensor names it uses)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise UserError(f"{path} is not a model folder (no config.json); pass a folder written by init, train or export")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UserError(f"{path} has no weights (*.safetensors); pass a folder written by init, train or export")
    for weights in sorted(path.glob("*.safetensors")):  # a truncated or garbage file: one line, never a traceback
        why = safetensors_problem(weights)
        if why:
            raise UserError(f"{weights} is damaged ({why}); copy the folder again, or re-publish it from its run "
                            "(`llamaforge export --model RUN_DIR/checkpoints/step_N --out DIR`)")
    cfg = read_config_json(path)
    model_type = cfg.get("model_type")
    ours = model_type == "llamaforge" or "LlamaForgeForCausalLM" in json.dumps(cfg.get("auto_map") or {})
    if code.builtin and cfg.get("auto_map") and not ours:  # code is run only when the user names it
        raise UserError(f"{path} holds a model with its own code ({', '.join(folder_code(path)) or 'auto_map'}); "
                        f"pass --model-code {path} to run that code (llamaforge runs no code you did not name)")
    try:
        if not code.builtin:
            model, info = code.load_folder(path, dtype)
        elif ours and _legacy_weights(path):  # an earlier version's names: renamed while loading
            model, info = _load_legacy(path, dtype)
        elif ours:
            model, info = LlamaForgeForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
        elif model_type == "llama":
            llama, info = LlamaForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
            model = from_llama(llama)
        elif model_type == "gpt2":
            gpt2, info = GPT2LMHeadModel.from_pretrained(path, dtype=dtype, output_loading_info=True)
            model = from_gpt2(gpt2)
        else:
            raise UserError(f"{path} holds a {model_type!r} model; llamaforge reads llamaforge, llama and gpt2 folders")
    except (RuntimeError, ValueError, OSError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"cannot load {path}: {str(e).strip().splitlines()[0][:300]}; re-export the folder") from None
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise UserError(f"{path} does not match its config ({bad}); re-export the folder")
    if code.builtin:
        try:
            model.config.rope_factor  # the one rotary kind we compute: default or linear interpolation
        except ValueError as e:
            raise UserError(f"{path / 'config.json'}: {e} (llamaforge computes plain and linearly interpolated RoPE); "
                            "use a model folder without that rope_parameters") from None
    bad = nonfinite_parameters(model)
    if bad:
        raise UserError(f"{path} holds non-finite weights ({bad[0]}); re-publish it from a healthy checkpoint")
    return model.eval()


def folder_code(path: Path) -> list[str]:
    """The .py files a model folder carries (a user's model saved with save_pretrained)."""
    return sorted(p.name for p in Path(path).glob("*.py"))


def read_config_json(path: Path) -> dict:
    """A model folder's config.json as a dict, or one line saying it is damaged."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
        if not isinstance(cfg, dict):
            raise ValueError
    except (OSError, ValueError, UnicodeDecodeError):
        raise UserError(f"{Path(path) / 'config.json'} is not a valid JSON config; re-export the folder") from None
    return cfg


def _legacy_weights(path: Path) -> bool:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return False
    with safe_open(str(files[0]), "pt") as f:
        return uses_legacy_names(f.keys())


def _load_legacy(path: Path, dtype: torch.dtype):
    """A folder of llamaforge <= 0.2 (nanoGPT-style names): built from its config, weights renamed.
    (Not transformers' `key_mapping`: a model loaded that way would save the old names back.)"""
    config = LlamaForgeConfig.from_pretrained(path)
    model = LlamaForgeForCausalLM(config)
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(rename_legacy(state, config.hidden_act == "silu"), strict=False)
    tied = [k for k in missing if k == "lm_head.weight" and config.tie_word_embeddings]
    info = {"missing_keys": [k for k in missing if k not in tied], "unexpected_keys": list(unexpected)}
    return model.to(dtype), info
