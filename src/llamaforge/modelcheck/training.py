"""Checks of what training needs: a sane first loss, a gradient for every weight, a model that learns."""

from __future__ import annotations

import math

import torch

from ..model.adapter import causal_loss
from .registry import Row, Subject, check


def _pair(s: Subject, rows: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = s.batch(rows, T + 1)
    return ids[:, :-1], ids[:, 1:]


@check("initial_loss", "a bad initialization or output scale (the first loss far from ln(vocab))")
def initial_loss(s: Subject) -> Row:
    model, (x, y) = s.build(), _pair(s, 2, 31)
    with torch.no_grad():
        loss = float(causal_loss(model, x, y))
    expected = math.log(s.small["vocab_size"])
    value = {"loss": round(loss, 3), "ln_vocab": round(expected, 3)}
    if not abs(loss - expected) <= 1.0:
        return Row("initial_loss", "fail", value, f"the first loss is {loss:.2f}, ln(vocab) = {expected:.2f}: "
                   "initialize weights with a small std (config.initializer_range, 0.02) in _init_weights, and do "
                   "not scale the logits or embeddings up")
    return Row("initial_loss", "pass", value)


@check("gradients", "a weight that never gets a gradient (an unused matrix, a detached branch) or a NaN gradient")
def gradients(s: Subject) -> Row:
    model, (x, y) = s.build().train(), _pair(s, 2, 31)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for attempt in range(3):  # a weight initialized to zero gets its gradient after a step: not a bug
        opt.zero_grad(set_to_none=True)
        causal_loss(model, x, y).backward()
        named = list(model.named_parameters())
        missing = [n for n, p in named if p.requires_grad and (p.grad is None or not bool(p.grad.abs().max() > 0))]
        bad = [n for n, p in named if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        if bad:
            return Row("gradients", "fail", bad[:3], f"non-finite gradient in {bad[0]}; look for a division, a sqrt "
                       "or an exp in its path")
        if not missing:
            return Row("gradients", "pass", f"{len(named)} parameters")
        opt.step()
    return Row("gradients", "fail", missing[:3], f"{len(missing)} parameters get no gradient, first {missing[0]}: "
               "it is not used in forward, or its output is detached (.detach(), .data, torch.no_grad)")


@check("learns", "a model that does not learn (the course's hint: then the bug is in your code)")
def learns(s: Subject, steps: int = 80, target: float = 1.0) -> Row:
    model, (x, y) = s.build().train(), _pair(s, 2, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = causal_loss(model, x, y)
        loss.backward()
        opt.step()
        loss = float(loss.detach())
        first = loss if first is None else first
        if loss < target:
            return Row("learns", "pass", {"loss": round(loss, 3), "from": round(first, 3), "steps": step})
    value = {"loss": round(loss, 3), "from": round(first, 3), "steps": steps}
    return Row("learns", "fail", value, f"one batch of 64 tokens is still at loss {loss:.2f} after {steps} "
               "AdamW steps (lr 3e-3): the gradient does not reach the weights that matter; run the gradients check "
               "and look at the residual stream and the head")
