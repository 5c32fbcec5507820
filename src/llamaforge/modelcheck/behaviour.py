"""Checks of what a forward pass must do: shapes, causality, batches, padding, positions."""

from __future__ import annotations


import torch

from ..model.adapter import forward_logits
from ..model.io import count_parameters
from ..model.usercode import ModelCode
from .registry import Row, Subject, check, max_diff

TOL = 1e-4  # fp32 logits of the small model: equal up to summation order


@torch.no_grad()
def logits(model, ids, attention_mask=None, position_ids=None):
    return forward_logits(model, ids, attention_mask, position_ids).float()


@check("runs", "a forward pass that crashes, returns another shape, or NaN/inf (in fp32 or under bf16 autocast)")
def runs(s: Subject) -> Row:
    model, ids = s.build(), s.batch(2, 16)
    vocab = s.small["vocab_size"]
    for label, ctx in (("fp32", torch.autocast("cpu", enabled=False)), ("bf16", torch.autocast("cpu", torch.bfloat16))):
        with ctx:
            out = logits(model, ids)
        if tuple(out.shape) != (2, 16, vocab):
            return Row("runs", "fail", list(out.shape), f"{label}: logits are {tuple(out.shape)}, expected (batch, "
                       f"time, vocab) = (2, 16, {vocab}); check the head's output size and the final reshape")
        if not torch.isfinite(out).all():
            return Row("runs", "fail", label, f"{label}: logits hold NaN/inf; look for a division by zero, an "
                       "all-masked softmax row, or a norm computed in low precision")
    return Row("runs", "pass", "(2, 16, vocab), finite in fp32 and bf16")


@check("parameters", "a model of the wrong size (the course asks >= 100M non-embedding parameters)")
def parameters(s: Subject) -> Row:
    counts = count_at(s.code, s.full)
    value = {k: counts[k] for k in ("total", "non_embedding")}
    if s.min_non_embedding and counts["non_embedding"] < s.min_non_embedding:
        return Row("parameters", "fail", value, f"{counts['non_embedding'] / 1e6:.1f}M non-embedding parameters at "
                   f"{s.preset}, below {s.min_non_embedding / 1e6:.0f}M; raise hidden_size or num_hidden_layers")
    return Row("parameters", "pass", value)


def count_at(code: ModelCode, fields: dict) -> dict:
    """Total and non-embedding parameters, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = code.model_class(code.make_config(fields))
    return count_parameters(model)


@check("causal", "attention without a causal mask (a token sees the future: the loss drops, generation is garbage)")
def causal(s: Subject) -> Row:
    model, ids, t = s.build(), s.batch(2, 16), 7
    changed = ids.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % s.small["vocab_size"]
    d = max_diff(logits(model, ids)[:, : t + 1], logits(model, changed)[:, : t + 1])
    if d > TOL:
        return Row("causal", "fail", d, f"changing tokens after position {t} changed earlier logits by {d:.2e}: "
                   "the attention sees the future; apply a causal mask (is_causal=True or a lower-triangular mask), "
                   "and check heads are split with view(B, T, H, d).transpose(1, 2)")
    return Row("causal", "pass", d)


@check("batch_independent", "rows that leak into each other (a reshape or norm across the batch dimension)")
def batch_independent(s: Subject) -> Row:
    model, ids = s.build(), s.batch(3, 16)
    d = max(max_diff(logits(model, ids[:2])[0], logits(model, ids[:1])[0]),
            max_diff(logits(model, ids[:2])[0], logits(model, ids[[0, 2]])[0]))
    if d > TOL:
        return Row("batch_independent", "fail", d, f"a row's logits change by {d:.2e} with the other rows: something "
                   "mixes the batch dimension (a view/reshape over B and T, or a norm over the batch)")
    return Row("batch_independent", "pass", d)


@check("padding", "an ignored attention_mask (left-padded batches in generate and lm-eval are scored wrongly)")
def padding(s: Subject) -> Row:
    model, ids, pad = s.build(), s.batch(2, 16), 4
    short = ids[1:, pad:]  # (1, 12): the second row, unpadded
    padded = ids.clone()
    padded[1, :pad] = s.config().pad_token_id or 0
    mask = torch.ones_like(padded)
    mask[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate passes with left padding
    d = max_diff(logits(model, padded, mask, positions)[1, pad:], logits(model, short)[0])
    if d > TOL:
        return Row("padding", "fail", d, f"left-padded real tokens differ by {d:.2e} from the unpadded run: the "
                   "attention_mask is not applied to the keys; combine it with the causal mask")
    return Row("padding", "pass", d)


@check("relative_positions", "no RoPE or a broken rotation (an absolute position table, rotation of the wrong pairs "
       "or dimensions)")
def relative_positions(s: Subject) -> Row:
    model, ids = s.build(), s.batch(2, 16)
    pos = torch.arange(16)[None].expand(2, 16)
    d = max_diff(logits(model, ids, position_ids=pos), logits(model, ids, position_ids=pos + 9))
    moved = max_diff(logits(model, ids, position_ids=pos), logits(model, ids, position_ids=pos.flip(-1)))
    if d > 1e-3:
        return Row("relative_positions", "fail", d, f"shifting all positions by 9 changed the logits by {d:.2e}: "
                   "positions are absolute (a position table?) or the rotation is wrong; RoPE rotates q and k by "
                   "position, so only differences of positions matter")
    if moved < 1e-6:
        return Row("relative_positions", "fail", moved, "the logits ignore position_ids altogether; pass them to "
                   "the rotation of q and k")
    return Row("relative_positions", "pass", d)


@check("position_interpolation", "a rope_scaling the model ignores (extend's Position Interpolation would do nothing)")
def position_interpolation(s: Subject) -> Row:
    rope = {"rope_type": "linear", "type": "linear", "factor": 2.0}
    scaled_cfg = s.config(rope_scaling=rope)
    stored = getattr(scaled_cfg, "rope_scaling", None) or getattr(scaled_cfg, "rope_parameters", None)
    if not stored or float(dict(stored).get("factor", 1.0)) != 2.0:
        return Row("position_interpolation", "skip", None, "the config does not keep rope_scaling; store "
                   "self.rope_scaling = rope_scaling to let `llamaforge extend` interpolate positions")
    base = s.build()
    scaled = s.code.build(scaled_cfg).float().eval()
    scaled.load_state_dict(dict(base.named_parameters()), strict=False)  # parameters: buffers are the config's
    ids = s.batch(2, 16)
    pos = torch.arange(16)[None].expand(2, 16)
    d = max_diff(logits(base, ids, position_ids=pos), logits(scaled, ids, position_ids=2 * pos))
    if d > 1e-3:
        return Row("position_interpolation", "fail", d, f"with rope_scaling linear factor 2, positions 2t differ by "
                   f"{d:.2e} from t unscaled: divide the positions (or the frequencies) by "
                   "config.rope_scaling['factor'] when the rotation is computed")
    return Row("position_interpolation", "pass", d)
