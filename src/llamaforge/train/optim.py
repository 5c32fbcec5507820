"""Optimizers (AdamW, or Muon for the hidden matrices with AdamW for the rest) and LR schedules
(warmup + cosine, or warmup-stable-decay).

Muon (Keller Jordan 2024; "Muon is Scalable for LLM Training", Moonshot 2025) orthogonalizes each
hidden weight matrix's momentum with a few Newton-Schulz iterations: every direction of the matrix
moves at the same rate. It is meant for the 2-D matrices inside the blocks (attention and MLP
projections); embeddings, the output head, norms and biases stay with AdamW. We use PyTorch's own
`torch.optim.Muon` (torch >= 2.9) with Keller's "original" LR scaling, where the reference learning
rate is ~0.02 (torch's default 1e-3 would make steps ~20x too small). torch's Muon runs Newton-Schulz
in bf16 whatever the hardware; on a CPU without AVX512-BF16/AMX (or a GPU before compute capability
8.0) bf16 is emulated, ~100x slower than fp32, and a Muon step cost 28x an AdamW step. `Muon` below is
torch's class (its parameter groups, momentum buffers, state dict, LR adjustment) with one change: the
Newton-Schulz iteration runs in `ns_dtype`, the dtype this hardware is fast in (`muon_ns_dtype`).

WSD (Hägele et al. 2024): linear warmup, a constant LR, then a decay to `min_lr_ratio` over the last
`decay_fraction` of the steps. Because the LR is flat until the decay, a run can be continued past its
planned length from any checkpoint taken before the decay starts (resume with a larger --max-steps).
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..errors import UserError
from ..model.adapter import find_blocks
from .precision import choose as choose_precision

OPTIMIZERS = ("adamw", "muon")
NS_DTYPES = ("auto", "bf16", "fp32")


def ns_dtype_for(device: torch.device, requested: str = "auto") -> torch.dtype:
    """Newton-Schulz's dtype: bf16 where `train.precision: auto` would pick bf16 on this hardware
    (AMX/AVX512-BF16 CPUs, CUDA compute capability >= 8.0), fp32 elsewhere (bf16 is emulated there)."""
    if requested not in NS_DTYPES:
        raise UserError(f"train.muon_ns_dtype {requested!r} is not one of {', '.join(NS_DTYPES)}")
    name = choose_precision("auto", device).name if requested == "auto" else requested
    return torch.bfloat16 if name == "bf16" else torch.float32


def newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """The quintic Newton-Schulz orthogonalization of torch.optim.Muon (Keller Jordan's), in `dtype`:
    with bf16 it is torch's computation operation for operation (tests/test_recipe.py checks it)."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T  # (m, n) with m <= n: the Gram matrix x @ x.T is the small one
    x.div_(x.norm().clamp(min=eps))  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T  # (m, m)
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, update, x, beta=a)
    return x.T if tall else x


_TorchMuon = getattr(torch.optim, "Muon", torch.optim.Optimizer)  # torch < 2.9 has none: loop.check_runnable refuses
try:
    from torch.optim._muon import _adjust_lr  # torch >= 2.9 (the same code 2.9 to 2.13; tests/test_recipe.py)
except ImportError:
    _adjust_lr = None


class Muon(_TorchMuon):
    """torch.optim.Muon with Newton-Schulz in `ns_dtype` (torch's own step hard-codes bf16). The
    groups, momentum buffers, state dict and LR adjustment are torch's; the update follows torch's
    `_single_tensor_muon` line for line.

    Under DDP (`split=True` in an initialized process group) every rank holds the same averaged
    gradients, so instead of each rank orthogonalizing all matrices, rank r orthogonalizes its
    share (`owners`: matrices dealt out by cost) and one all-gather hands every rank the others'
    (modded-nanogpt's and torchtitan's way). The same computation runs on the same input, so the
    result is bit for bit the one-rank update; every rank still keeps every momentum buffer, so the
    state dict (saved by rank 0) is unchanged."""

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, split: bool = False, **kw):
        super().__init__(params, **kw)
        self.ns_dtype, self.split = ns_dtype, split

    @torch.no_grad()
    def step(self, closure=None):
        """`self.found_inf` (a 0-dim device flag, set by train/step.py like GradScaler sets fused
        AdamW's): 1 skips this update on the device (momentum kept, no decay, update x 0), so the
        host need not wait for the gradients to decide."""
        rank, world = _rank_world() if self.split else (0, 1)
        flag = getattr(self, "found_inf", None)
        ok = None if flag is None else flag == 0
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            owner = owners([p.shape for p in params], world)
            updates = []
            for i, (p, g, buf) in enumerate(zip(params, grads, bufs)):
                if ok is not None:  # a skipped step leaves the momentum as it was (g may be NaN)
                    g = torch.where(ok, g, buf)
                buf.lerp_(g, 1 - mu)
                update = g.lerp(buf, mu) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.ns_dtype) if owner[i] == rank else None
                if world == 1:  # applied at once: no matrix of updates is held
                    _apply(p, update, lr, wd, group["adjust_lr_fn"], ok)
                else:
                    updates.append(update)
            if world > 1:
                updates = all_gather_updates(updates, [p.shape for p in params], owner, rank, world, self.ns_dtype,
                                             params[0].device)
                for p, update in zip(params, updates):
                    _apply(p, update, lr, wd, group["adjust_lr_fn"], ok)


def _apply(p, update, lr: float, wd: float, adjust_lr_fn, ok: torch.Tensor | None = None) -> None:
    """Decay and update (`ok` False: neither, decided on the device; True: the same values bit for bit)."""
    if ok is None:
        p.mul_(1 - lr * wd)
    else:
        p.mul_(torch.where(ok, 1 - lr * wd, 1.0).to(p.dtype))
        update = update * ok.to(update.dtype)
    p.add_(update, alpha=-_adjust_lr(lr, adjust_lr_fn, p.shape))  # torch's own adjustment


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def owners(shapes, world: int) -> list[int]:
    """Which rank orthogonalizes each matrix: largest Newton-Schulz cost (m^2 n, m <= n) first, each
    to the least loaded rank (ties: the lowest rank), so every rank does about 1/world of the work."""
    cost = [min(s) ** 2 * max(s) for s in shapes]
    load, out = [0] * world, [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-cost[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[i], load[r] = r, load[r] + cost[i]
    return out


def all_gather_updates(updates, shapes, owner, rank: int, world: int, dtype: torch.dtype,
                       device: torch.device) -> list[torch.Tensor]:
    """Every rank's orthogonalized matrices on every rank: each rank packs its own into one flat
    buffer (padded to the largest share), one all_gather_into_tensor, then unpack. The bytes travel
    as uint8, so the values arrive exactly (any backend, any dtype)."""
    import torch.distributed as dist

    sizes = [math.prod(s) for s in shapes]
    width = max(sum(n for n, o in zip(sizes, owner) if o == r) for r in range(world))
    mine = torch.zeros(width, dtype=dtype, device=device)
    mine_parts = [u.reshape(-1) for u, o in zip(updates, owner) if o == rank]
    if mine_parts:
        torch.cat(mine_parts, out=mine[: sum(t.numel() for t in mine_parts)])
    everyone = torch.empty(world, width, dtype=dtype, device=device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the new name in torch 2.13
    gather(everyone.view(torch.uint8).view(-1), mine.view(torch.uint8))
    offset = [0] * world
    out = []
    for u, o, n, s in zip(updates, owner, sizes, shapes):
        out.append(u if o == rank else everyone[o, offset[o] : offset[o] + n].view(s))
        offset[o] += n
    return out


def _adamw(groups, lr, betas, device) -> torch.optim.AdamW:
    fused = device.type in ("cuda", "cpu")  # one kernel for all parameters (faster than foreach here)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
                    device: torch.device | None = None, kind: str = "adamw", muon_lr: float = 0.02,
                    muon_momentum: float = 0.95, muon_weight_decay: float = 0.0,
                    muon_ns_dtype: str = "auto", muon_split: bool = False) -> torch.optim.Optimizer:
    """AdamW: decay matrices (dim >= 2: linear weights, embeddings), not norms or biases.
    muon: Muon (torch's, Newton-Schulz in the hardware's fast dtype) for the blocks' 2-D matrices,
    AdamW (as above) for everything else; `muon_split`: Newton-Schulz shared out over the DDP ranks."""
    if kind not in OPTIMIZERS:
        raise UserError(f"train.optimizer {kind!r} is not one of {', '.join(OPTIMIZERS)}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    device = device or named[0][1].device
    in_blocks = {id(p) for block in find_blocks(model) for p in block.parameters()} if kind == "muon" else set()
    hidden = [p for _, p in named if p.dim() == 2 and id(p) in in_blocks]  # the blocks' matrices (any model's names)
    if kind == "muon" and not hidden:
        raise UserError(f"train.optimizer muon: no transformer blocks found in {type(model).__name__} (Muon trains their "
                        "matrices); name the block class in _no_split_modules, keep the blocks in an nn.ModuleList, "
                        "or use --train.optimizer adamw")
    ids = {id(p) for p in hidden}
    rest = [p for _, p in named if id(p) not in ids]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    adamw = _adamw([g for g in groups if g["params"]], lr, betas, device)
    if not hidden:
        return adamw
    muon = Muon(hidden, ns_dtype=ns_dtype_for(device, muon_ns_dtype), split=muon_split, lr=muon_lr,
                weight_decay=muon_weight_decay, momentum=muon_momentum, adjust_lr_fn="original")
    return MuonWithAdamW(muon, adamw)


class MuonWithAdamW(torch.optim.Optimizer):
    """Two torch optimizers seen as one: their param_groups (the same dicts, so an LR scheduler and a
    GradScaler act on both), one step, one state dict {"muon": ..., "adamw": ...}."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        super().__init__([p for o in (muon, adamw) for g in o.param_groups for p in g["params"]], {})
        self.muon, self.adamw = muon, adamw
        self.param_groups = muon.param_groups + adamw.param_groups

    @torch.no_grad()
    def step(self, closure=None):
        flag = getattr(self, "found_inf", None)  # the device-side skip (train/step.py), handed to both
        for opt in (self.muon, self.adamw):
            if flag is not None:
                opt.found_inf = flag
            try:
                opt.step()
            finally:
                opt.__dict__.pop("found_inf", None)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError("optimizer state is not a Muon + AdamW state (was the run started with another optimizer?)")
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = self.muon.param_groups + self.adamw.param_groups  # loading made new group dicts


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float = 0.1, schedule: str = "cosine",
              decay_fraction: float = 0.2, decay_shape: str = "linear") -> float:
    """The LR multiplier at `step` (0-based). Linear warmup to 1 over `warmup_steps`, then
    cosine: decay to `min_ratio` at `max_steps`; wsd: 1 until the last `decay_fraction` of the
    steps, then down to `min_ratio` (linearly, or as 1 - sqrt(progress))."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(decay_fraction * max_steps))
    start = max_steps - decay_steps
    if step < start:
        return 1.0
    progress = min(1.0, (step - start + 1) / decay_steps)
    down = progress if decay_shape == "linear" else math.sqrt(progress)
    return min_ratio + (1 - min_ratio) * (1 - down)


def decay_start(max_steps: int, schedule: str, decay_fraction: float) -> int | None:
    """The first step whose LR is below the peak (WSD), None for cosine."""
    return max_steps - max(1, round(decay_fraction * max_steps)) if schedule == "wsd" else None


def build_scheduler(optimizer, warmup_steps: int, max_steps: int, min_ratio: float = 0.1, schedule: str = "cosine",
                    decay_fraction: float = 0.2, decay_shape: str = "linear") -> LambdaLR:
    return LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, max_steps, min_ratio, schedule, decay_fraction,
                                                   decay_shape))
