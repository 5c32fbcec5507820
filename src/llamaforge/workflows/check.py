"""`llamaforge check`: build the model under test small (fast) and at a preset's size (meta device,
for the parameter count), run every registered check, write the rows as JSON when asked."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import load_config, model_kwargs
from ..errors import UserError
from ..fsutil import atomic_write_bytes
from ..model.usercode import LLAMA_FIELDS, ModelCode
from ..modelcheck import CHECKS, Row, Subject, run_checks
from ..tokenizer import load_tokenizer

COURSE_PRESET, COURSE_MIN = "llama-150m", 100_000_000  # the course: >= 100M non-embedding parameters
# The fast model: every check in seconds. Non-default eps and theta, so a field not stored shows.
SMALL = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=50000.0, tie_word_embeddings=False)
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
        "was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything "
        "before us, we had nothing before us, we were all going direct to Heaven, we were all going direct the "
        "other way - in short, the period was so far like the present period, that some of its noisiest "
        "authorities insisted on its being received, for good or for evil, in the superlative degree of "
        "comparison only. There were a king with a large jaw and a queen with a plain face, on the throne of "
        "England; there were a king with a large jaw and a queen with a fair face, on the throne of France.")


def read_name_map(path: str | None) -> list[tuple[str, str]]:
    """--reference-names FILE: a JSON list of [regex, replacement] pairs (your names -> transformers')."""
    if not path:
        return []
    try:
        pairs = json.loads(Path(path).read_text())
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
                                                  for p in pairs):
            raise ValueError
    except (OSError, ValueError, UnicodeDecodeError):
        raise UserError(f"--reference-names {path} is not a JSON list of [regex, replacement] pairs; "
                        'write e.g. [["\\\\.attention\\\\.wq\\\\.", ".self_attn.q_proj."]]') from None
    return [(a, b) for a, b in pairs]


def make_subject(code: ModelCode, preset: str = COURSE_PRESET, tokenizer: str = "mistral",
                 name_map: list[tuple[str, str]] | None = None) -> Subject:
    tok = load_tokenizer(tokenizer)
    tokens = torch.tensor(tok(TEXT).input_ids * 2, dtype=torch.long)  # twice: >= 200 tokens for any tokenizer
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    full_cfg = load_config(preset).model
    full = {k: v for k, v in model_kwargs(full_cfg).items() if k in LLAMA_FIELDS}
    full["num_key_value_heads"] = full["num_key_value_heads"] or full["num_attention_heads"]
    small = dict(SMALL, vocab_size=len(tok), **ids)
    return Subject(code, small, dict(full, vocab_size=max(full["vocab_size"], len(tok)), **ids), tokens, preset,
                   COURSE_MIN if preset == COURSE_PRESET else None, name_map or [])


def check_model(code: ModelCode, preset: str = COURSE_PRESET, only: list[str] | None = None,
                json_out: str | Path | None = None, name_map: list[tuple[str, str]] | None = None,
                progress=None) -> list[Row]:
    """Every check (or `only` those) on `code`'s model; the rows, also written to `json_out`."""
    unknown = [n for n in only or [] if n not in CHECKS]
    if unknown:
        raise UserError(f"unknown check {unknown[0]!r}; choose from: {', '.join(CHECKS)}")
    subject = make_subject(code, preset, name_map=name_map)
    rows = run_checks(subject, only, progress)
    if json_out:
        atomic_write_bytes(Path(json_out), (json.dumps([r.to_dict() for r in rows], indent=2, default=str) + "\n").encode())
    return rows


def format_rows(rows: list[Row]) -> str:
    """One table: check, status, value, and the hint of a FAIL or SKIP."""
    def show(v) -> str:
        if isinstance(v, float):
            return f"{v:.2e}"
        if isinstance(v, dict):
            return ", ".join(f"{k} {x:,}" if isinstance(x, int) else f"{k} {x}" for k, x in v.items())
        return "" if v is None else str(v)

    width = max(len(r.check) for r in rows)
    lines = [f"{'check':<{width}}  status  value"]
    for r in rows:
        lines.append(f"{r.check:<{width}}  {r.status.upper():<6}  {show(r.value)}")
        if r.hint and r.status != "pass":
            lines.append(f"{'':<{width}}          -> {r.hint}")
    failed = [r.check for r in rows if r.status == "fail"]
    lines.append(f"{len(rows) - len(failed)} of {len(rows)} checks passed or skipped"
                 + (f"; failed: {', '.join(failed)}" if failed else ""))
    return "\n".join(lines)
