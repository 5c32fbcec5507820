"""Long context by linear Position Interpolation (Chen et al. 2023, arXiv 2306.15595).

A model trained at L positions is run at L' > L by dividing every position by factor = L' / L, so
RoPE sees only angles it was trained on; a short fine-tune at L' then adapts it. The factor is
stored where transformers' Llama keeps it (`rope_parameters` / `rope_scaling`, type "linear"), so
the llamaforge folder and the stock Llama export use the same positions.

`extend` also measures the evidence: validation loss by position bucket at the new length for
(a) the original model extrapolating, (b) interpolation without fine-tuning, (c) after it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig, check_range
from ..data.loader import PretrainBatches, to_pair
from ..data.prepare import open_split
from ..errors import UserError
from ..eval.loss import windowed_loss
from ..fsutil import atomic_write_bytes
from ..model.adapter import is_builtin
from ..model.io import load_model, read_config_json
from ..model.usercode import BUILTIN, ModelCode
from ..modelcheck import Subject
from ..modelcheck.behaviour import position_interpolation
from ..publish.card import read_records
from ..runs import RunRecord, positions_path
from ..tokenizer import load_tokenizer
from ..train.loop import train
from ..train.precision import Precision
from ..train.precision import choose as choose_precision
from .check import SMALL
from .common import check_vocab, load_model_arg, publish_final, run_directory
from .pretrain import data_record

log = logging.getLogger(__name__)


def interpolate(model, seq_len: int, factor: float | None = None, code: ModelCode = BUILTIN):
    """A copy of `model` reading `seq_len` positions with linear interpolation (same weights). A
    user's model is rebuilt from its config with `rope_scaling` (buffers such as RoPE's frequencies
    are computed from it) and given the same parameters."""
    if not is_builtin(model):
        return _interpolate_user(model, seq_len, factor, code)
    config = model.config
    if getattr(config, "position_embedding_type", None) != "rope":
        raise UserError("this model has no rotary embeddings to interpolate (learned positions: GPT-2); "
                        "extend works on LLaMA models")
    old = config.max_position_embeddings
    if seq_len <= old:
        raise UserError(f"--seq-len {seq_len} is not larger than the model's {old} positions; pass a longer length")
    factor = factor if factor is not None else config.rope_factor * seq_len / old
    check_range("--factor", factor, *FACTORS)
    new = copy.deepcopy(model)
    new.config.max_position_embeddings = seq_len
    rope = {"rope_type": "linear", "factor": float(factor), "rope_theta": float(config.rope_theta)}
    if hasattr(new.config, "rope_parameters"):
        new.config.rope_parameters = rope
    else:
        new.config.rope_scaling = rope
    return new


FACTORS = (1.0, 1e4)  # Position Interpolation compresses positions: a factor below 1 would extrapolate


def _linear_factor(config) -> float:
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    return float(rope.get("factor", 1.0)) if kind == "linear" else 1.0


def _interpolate_user(model, seq_len: int, factor: float | None, code: ModelCode):
    old = model.config.max_position_embeddings
    if seq_len <= old:
        raise UserError(f"--seq-len {seq_len} is not larger than the model's {old} positions; pass a longer length")
    factor = factor if factor is not None else _linear_factor(model.config) * seq_len / old
    check_range("--factor", factor, *FACTORS)
    fields = dict(model.config.to_dict(), max_position_embeddings=seq_len,
                  rope_scaling={"rope_type": "linear", "type": "linear", "factor": float(factor)})
    fields.pop("rope_parameters", None)
    new = code.build(code.config_from_dict(fields)).to(next(model.parameters()).dtype)
    new.load_state_dict(dict(model.named_parameters()), strict=False)  # parameters; buffers follow the config
    return new


def require_interpolation(code: ModelCode, vocab_size: int) -> None:
    """Refuse, before any work, a user's model whose rope_scaling does not interpolate positions."""
    tokens = torch.arange(512) % vocab_size
    subject = Subject(code, dict(SMALL, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=None),
                      {}, tokens)
    row = position_interpolation(subject)
    if row.status != "pass":
        raise UserError(f"extend needs Position Interpolation, and your model's position_interpolation check gives "
                        f"{row.status.upper()}: {row.hint}; run `llamaforge check --model-code {code.path}`")


def loss_by_position(model, tokens: np.ndarray, seq_len: int, buckets: int = 4, max_windows: int = 64,
                     batch: int = 4, device: torch.device | None = None, precision: Precision | None = None) -> list[float]:
    """Mean next-token loss in each of `buckets` equal position ranges of `seq_len`-token windows."""
    n = min(max_windows, (len(tokens) - 1) // seq_len)
    if n <= 0:
        raise UserError(f"validation split has fewer than {seq_len + 1} tokens; prepare more validation data")
    windows = (to_pair(np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(s, min(n, s + batch))]))
               for s in range(0, n, batch))
    autocast = precision.autocast if precision is not None else contextlib.nullcontext
    per_pos = windowed_loss(model.to(device) if device else model, windows, device, per_position=True,
                            autocast=autocast).by_position / n
    return [float(c.mean()) for c in per_pos.chunk(buckets)]


def position_report(base, tuned, tokens: np.ndarray, seq_len: int, factor: float, buckets: int = 4,
                    device: torch.device | None = None, precision: Precision | None = None,
                    code: ModelCode = BUILTIN) -> dict:
    """The three curves of the evidence, and the gap of the fine-tuned one beyond the trained length."""
    trained = base.config.max_position_embeddings
    on = {"device": device, "precision": precision}
    extrapolate = copy.deepcopy(base)
    extrapolate.config.max_position_embeddings = seq_len  # same rope, positions beyond training
    curves = {
        "extrapolation (no PI, no fine-tune)": loss_by_position(extrapolate, tokens, seq_len, buckets, **on),
        "interpolation, no fine-tune": loss_by_position(interpolate(base, seq_len, factor, code), tokens, seq_len,
                                                        buckets, **on),
        "interpolation + fine-tune": loss_by_position(tuned, tokens, seq_len, buckets, **on),
    }
    edges = [round(seq_len * i / buckets) for i in range(buckets + 1)]
    labels = [f"{a}-{b}" for a, b in zip(edges[:-1], edges[1:])]
    beyond = [i for i, a in enumerate(edges[:-1]) if a >= trained]
    best_other = {k: float(np.mean([v[i] for i in beyond])) for k, v in curves.items()} if beyond else {}
    tuned_key = "interpolation + fine-tune"
    gap = None
    if best_other:
        others = min(v for k, v in best_other.items() if k != tuned_key)
        gap = others - best_other[tuned_key]
    return {"seq_len": seq_len, "trained_len": trained, "factor": factor, "buckets": labels, "loss": curves,
            "mean_loss_beyond_trained": best_other, "gap_beyond_trained": gap}


def extend(cfg: RunConfig, model_path: str, data_dir: str | Path, run_dir: str | Path, seq_len: int,
           factor: float | None = None, resume: bool | None = None, progress: bool = True,
           code: ModelCode = BUILTIN) -> Path:
    """`llamaforge extend`: interpolate, fine-tune at `seq_len` with the training loop, publish,
    then measure the evidence (once, in the main process, from the published model)."""
    check_range("--seq-len", seq_len, 2, 1 << 20)
    cfg_file = Path(model_path) / "config.json"
    if cfg_file.exists() and code.builtin:
        folder = read_config_json(Path(model_path))
        kind, learned = folder.get("model_type"), folder.get("position_embedding_type") == "learned"
        if kind not in ("llamaforge", "llama") or learned:
            raise UserError(f"{model_path} holds a {kind!r} model, which has no rotary embeddings to interpolate; "
                            "extend works on llamaforge and llama models")
    base, tok_dir = load_model_arg(model_path, code)
    if not code.builtin:
        require_interpolation(code, base.config.vocab_size)
    model = interpolate(base, seq_len, factor, code)
    factor = _linear_factor(model.config)
    tokenizer = load_tokenizer(str(tok_dir))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=seq_len))  # the caller's cfg is kept
    meta, data = data_record(data_dir)
    record = RunRecord(tokenizer=meta.tokenizer, data=data, previous_card=read_records(tok_dir) or {}, code=code.record(),
                       extend={"from": str(model_path), "trained_len": base.config.max_position_embeddings,
                               "seq_len": seq_len, "factor": factor})
    check_vocab(model, meta.vocab_size, str(data_dir))
    with run_directory(run_dir):
        result = train(cfg, model, tokenizer, lambda r, w: PretrainBatches(data_dir, cfg.train, r, w), run_dir, resume,
                       progress, record)
        final = publish_final(Path(run_dir), result, tokenizer, record)
    if result.main:  # once, on the main rank's device, from the published folder (the process group is gone)
        device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
        precision = choose_precision(cfg.train.precision, device)
        tuned = load_model(final, code=code).eval()
        tokens, split = open_split(data_dir, "val"), "val"
        if len(tokens) <= seq_len:  # tiny corpora: the tail of train, as the loop's validation does
            tokens, split = open_split(data_dir, "train")[-64 * seq_len - 1 :], "train (tail: the val split is too short)"
        report = position_report(base, tuned, tokens, seq_len, factor, device=device, precision=precision, code=code)
        report.update(measured_on=split, device=str(device), precision=precision.label())
        atomic_write_bytes(positions_path(Path(run_dir)), (json.dumps(report, indent=2) + "\n").encode())
    return final
