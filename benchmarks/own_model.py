"""Bring your own model: `llamaforge check`'s wall time, and a training step of the example model
(examples/my_llama: plain logits, scored by the adapter's chunked loss) against llamaforge's own model
of the same shape (fused head + loss: the logits never exist whole), in the same run."""

from __future__ import annotations

import time
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "my_llama"


def check_time(args, report) -> dict:
    """Every check on the example at the small size, timed end to end (the target: under a minute)."""
    from llamaforge.model.usercode import load_code
    from llamaforge.workflows.check import check_model

    code = load_code(EXAMPLE)
    check_model(code, only=["runs"])  # the tokenizer and imports warm, as a second command would find them
    start = time.perf_counter()
    rows = check_model(code)
    seconds = time.perf_counter() - start
    assert all(r.status == "pass" for r in rows), [(r.check, r.status) for r in rows]
    row = report("check_time", 60.0 / seconds, 1.0, "the target (one check run a minute)", "runs/minute")
    row["seconds"] = round(seconds, 2)
    print(f"check_time: every check on the example in {seconds:.1f} s (target < 60 s)")
    return row


def train_step(args, interleaved, report, shape: dict) -> dict:
    """Forward + backward + AdamW step, batch 8 x 256, in the precision `auto` picks here."""
    from llamaforge.config import ModelConfig
    from llamaforge.model.io import build_model
    from llamaforge.model.usercode import load_code
    from llamaforge.train.optim import build_optimizer
    from llamaforge.train.precision import choose
    from llamaforge.train.step import train_step as step

    B, T = 8, 256
    prec = choose("auto", torch.device("cpu"))
    x = torch.randint(0, shape["vocab_size"], (B, T + 1), generator=torch.Generator().manual_seed(0))
    batch = [(x[:, :-1], x[:, 1:])]
    runs = {}
    for name, code in (("ours", None), ("example", load_code(EXAMPLE))):
        kw = {} if code is None else {"code": code}
        model = build_model(ModelConfig(**shape), seed=0, **kw).train()
        opt = build_optimizer(model, 1e-4, device=torch.device("cpu"))
        runs[name] = (lambda m=model, o=opt: step(m, o, batch, precision=prec))
    times = interleaved(runs, args.warmup, args.reps)
    tokens = B * T
    return report("own_model_step", tokens / times["example"], tokens / times["ours"],
                  "llamaforge's model, same shape (fused head + loss)", "tokens/s",
                  {"precision": prec.name, "shape": "hidden 512, 8 layers, vocab 32000, 8 x 256"})
