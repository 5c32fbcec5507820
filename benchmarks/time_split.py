"""Where a training step's time goes, for `make gpu-check`: data wait, forward (the blocks),
loss (the fused head + loss, which forms its gradients in its forward), backward, optimizer; and the
fused loss eager against its compiled chunks (`train.compile_loss`), losses and gradients compared.

Both are plain functions of a device, so the tests run them on the CPU with a micro model. On CUDA
every part ends with a synchronize (the split costs a little throughput; the tokens/s of the
ordinary runs in gpu-check are the figures to quote).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace

import torch

from llamaforge.data.loader import Prefetched, PretrainBatches
from llamaforge.model.hf.modeling_llamaforge import linear_cross_entropy
from llamaforge.model.io import build_model
from llamaforge.train.distributed import compile_blocks
from llamaforge.train.optim import build_optimizer
from llamaforge.train.precision import choose

PARTS = ("data wait", "forward", "loss", "backward", "optimizer")


@dataclass
class Split:
    ms: dict[str, float]  # median milliseconds per part
    tokens_per_s: float

    def line(self, label: str) -> str:
        total = sum(self.ms.values())
        parts = ", ".join(f"{k} {v:.1f} ms ({v / total:.0%})" for k, v in self.ms.items())
        return f"{label:>12} time split: {parts}; {self.tokens_per_s:,.0f} tokens/s with a sync per part"


def time_split(cfg, data: str, device: torch.device, steps: int, compile_blocks_: bool, compile_loss: bool) -> Split:
    """`steps` steps of one micro-batch (cfg.train.micro_batch x seq_len tokens) of cfg's model and
    optimizer on `device`; the first third are warm-up (compilation) and not counted."""
    t = cfg.train
    precision = choose(t.precision, device)
    model = build_model(cfg.model).to(device).train()
    if compile_blocks_:
        compile_blocks(model)
    opt = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), device, t.optimizer, t.muon_lr)
    scaler = torch.amp.GradScaler(device.type) if precision.needs_scaler else None
    loader = Prefetched(PretrainBatches(data, replace(t, batch_tokens=t.micro_batch * t.seq_len)),
                        pin=device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {k: [] for k in PARTS}
    try:
        for i in range(steps):
            marks = [time.perf_counter()]
            x, y = (v.to(device, non_blocking=True) for v in loader.next_batch())
            sync()
            marks.append(time.perf_counter())
            with precision.autocast():
                h = model.model(x)[0]
                sync()
                marks.append(time.perf_counter())
                loss = linear_cross_entropy(h, model.lm_head.weight, y, compiled=compile_loss)
                sync()
                marks.append(time.perf_counter())
            (scaler.scale(loss) if scaler else loss).backward()
            sync()
            marks.append(time.perf_counter())
            _optimizer_step(model, opt, scaler, t.grad_clip)
            sync()
            marks.append(time.perf_counter())
            if i >= steps // 3:
                for k, a, b in zip(PARTS, marks, marks[1:]):
                    times[k].append((b - a) * 1e3)
    finally:
        loader.close()
    ms = {k: statistics.median(v) for k, v in times.items()}
    return Split(ms, t.micro_batch * t.seq_len / (sum(ms.values()) / 1e3))


def _optimizer_step(model, opt, scaler, grad_clip: float) -> None:
    if scaler is not None:
        scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)


def compare_loss_kernels(device: torch.device, dtype: torch.dtype, rows: int = 8192, dim: int = 768,
                         vocab: int = 32000) -> dict[str, float]:
    """The fused head + loss eager and with compiled chunks, under `dtype` autocast, on llama-150m's
    head shape: relative differences of the loss and both gradients, and the compiled gradients'
    norms (the CUDA failure this guards against made them zero)."""
    g = torch.Generator(device=device).manual_seed(0)
    h0 = torch.randn(rows, dim, device=device, generator=g)
    w0 = torch.randn(vocab, dim, device=device, generator=g) * dim**-0.5
    targets = torch.randint(0, vocab, (1, rows), device=device, generator=g)
    targets[0, : rows // 8] = -100
    out = []
    for compiled in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            loss = linear_cross_entropy(h[None], w, targets, compiled=compiled)
        loss.backward()
        out.append((loss.detach().float(), h.grad.float(), w.grad.float()))
    (la, ha, wa), (lb, hb, wb) = out

    def rel(a, b):
        return float((a - b).norm() / a.norm().clamp(min=1e-30))

    return {"loss_rel": rel(la, lb), "grad_h_rel": rel(ha, hb), "grad_w_rel": rel(wa, wb),
            "grad_h_norm": float(hb.norm()), "grad_w_norm": float(wb.norm())}
