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
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..model.adapter import find_blocks
from . import schedules
from .precision import choose as choose_precision

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
    with bf16 it is torch's computation operation for operation (tests/test_recipe.py checks it).
    `g`: one matrix (m, n), or a stack (k, m, n) of same-shape matrices done together (batched)."""
    a, b, c = coefficients
    x = g.to(dtype, copy=g.dim() == 2)  # never the caller's tensor (a momentum buffer) divided in place
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT  # (m, n) with m <= n: the Gram matrix x @ x.T is the small one
    if x.dim() == 2:
        x.div_(x.norm().clamp(min=eps))  # spectral norm <= Frobenius norm <= 1
        mm = torch.addmm
    else:
        x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
        mm = torch.baddbmm
    for _ in range(steps):
        gram = x @ x.mT  # (m, m)
        update = mm(gram, gram, gram, beta=b, alpha=c)
        x = mm(x, update, x, beta=a)
    return x.mT if tall else x


STACK_ELEMENTS = 1 << 26  # at most 64M elements per stack (256 MB of fp32 momenta): bounded at any model size


def same_shapes(shapes, limit: int = STACK_ELEMENTS) -> list[list[int]]:
    """Indices of matrices that can be orthogonalized as one stack: the same (short, long) sides
    (a tall matrix counts as its transpose: gate/up (f, h) go with down (h, f)), in first-seen order,
    each stack at most `limit` elements (a 7B model's 128 attention matrices would be 8.6 GB at once)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(shapes):
        groups.setdefault((min(s), max(s)), []).append(i)
    out = []
    for (m, n), idx in groups.items():
        per = max(1, limit // (m * n))
        out += [idx[k : k + per] for k in range(0, len(idx), per)]
    return out


def orthogonalize(mats: list[torch.Tensor], group: dict, dtype: torch.dtype) -> list[torch.Tensor]:
    """Newton-Schulz of same-shape matrices as one stack (one kernel per operation for all of them);
    a lone matrix on its own, exactly as torch does it."""
    args = (group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
    if len(mats) == 1:
        return [newton_schulz(mats[0], *args)]
    wide = [m.size(0) <= m.size(1) for m in mats]
    done = newton_schulz(torch.stack([(m if w else m.T).to(dtype) for m, w in zip(mats, wide)]), *args)
    return [x if w else x.T for x, w in zip(done, wide)]


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
    result is bit for bit the one-rank update (stacked, a rank's stacks hold only its share: on a GPU
    equal within rounding; every rank applies the same gathered bytes either way); every rank still
    keeps every momentum buffer, so the state dict (saved by rank 0) is unchanged."""

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, split: bool = False, batched: bool = False,
                 **kw):
        super().__init__(params, **kw)
        self.ns_dtype, self.split, self.batched = ns_dtype, split, batched

    @torch.no_grad()
    def step(self, closure=None):
        """`self.found_inf` (a 0-dim device flag, set by train/step.py like GradScaler sets fused
        AdamW's): 1 skips this update on the device (momentum kept, no decay, update x 0), so the
        host need not wait for the gradients to decide. `batched`: same-shape matrices go through
        Newton-Schulz as one stack (`same_shapes`: ~25 kernels per shape, not per matrix)."""
        rank, world = _rank_world() if self.split else (0, 1)
        flag = getattr(self, "found_inf", None)
        ok = None if flag is None else flag == 0
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            lr, wd = group["lr"], group["weight_decay"]
            shapes = [p.shape for p in params]
            owner = owners(shapes, world)
            updates: list = [None] * len(params)
            for idx in same_shapes(shapes) if self.batched else [[i] for i in range(len(params))]:
                moments = [_momentum(grads[i], bufs[i], group, ok) for i in idx]  # every rank keeps every buffer
                mine = [i for i in idx if owner[i] == rank]
                if mine:
                    done = orthogonalize([m for i, m in zip(idx, moments) if owner[i] == rank], group, self.ns_dtype)
                    for i, u in zip(mine, done):
                        updates[i] = u
                if world == 1:  # applied at once: only this shape's updates are held
                    for i in idx:
                        _apply(params[i], updates[i], lr, wd, group["adjust_lr_fn"], ok)
                        updates[i] = None
            if world > 1:
                updates = all_gather_updates(updates, shapes, owner, rank, world, self.ns_dtype, params[0].device)
                for p, update in zip(params, updates):
                    _apply(p, update, lr, wd, group["adjust_lr_fn"], ok)


def _momentum(g: torch.Tensor, buf: torch.Tensor, group: dict, ok: torch.Tensor | None) -> torch.Tensor:
    """torch's momentum step: the buffer updated in place, the (Nesterov) update returned (`ok`
    False: a skipped step leaves the momentum as it was; g may be NaN)."""
    if ok is not None:
        g = torch.where(ok, g, buf)
    buf.lerp_(g, 1 - group["momentum"])
    return g.lerp(buf, group["momentum"]) if group["nesterov"] else buf


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


def batch_newton_schulz(device: torch.device) -> bool:
    """Newton-Schulz over same-shape matrices as one stack on a GPU, where ~25 small kernels per
    matrix leave it waiting on Python (llama-150m: 112 matrices, 3 stacks); one at a time on a CPU,
    which is compute-bound (`python -m benchmarks muon_ns`: stacked 0.76-0.78x as fast on a Zen 4 CPU)."""
    return device.type == "cuda"


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
    get_optimizer(kind)
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
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay, "lr_name": "lr"},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr_name": "lr"}]
    adamw = _adamw([g for g in groups if g["params"]], lr, betas, device)
    if not hidden:
        return adamw
    muon = Muon([{"params": hidden, "lr_name": "muon_lr"}], ns_dtype=ns_dtype_for(device, muon_ns_dtype),
                split=muon_split, batched=batch_newton_schulz(device), lr=muon_lr, weight_decay=muon_weight_decay,
                momentum=muon_momentum, adjust_lr_fn="original")
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
        for group in self.muon.param_groups:  # checkpoints of earlier versions did not name them
            group.setdefault("lr_name", "muon_lr")


# -- THE optimizers: one registry (name -> how to build it from the train config, and its words) ----
@dataclass(frozen=True)
class OptimizerKind:
    build: Callable  # (model, train config, device, split over DDP ranks) -> a torch optimizer
    describe: Callable  # (train section as a dict) -> words for the recipe


def _describe_adamw(t: dict) -> str:
    return (f"AdamW (betas {t.get('beta1')}, {t.get('beta2')}; weight decay {t.get('weight_decay')}; "
            f"peak LR {t.get('lr')})")


OPTIMIZERS: dict[str, OptimizerKind] = {
    "adamw": OptimizerKind(
        lambda model, t, device, split: build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), device),
        _describe_adamw),
    "muon": OptimizerKind(
        lambda model, t, device, split: build_optimizer(
            model, t.lr, t.weight_decay, (t.beta1, t.beta2), device, "muon", t.muon_lr, t.muon_momentum,
            t.muon_weight_decay, t.muon_ns_dtype, muon_split=split),
        lambda t: (f"Muon for the blocks' matrices (peak LR {t.get('muon_lr')}, momentum {t.get('muon_momentum')}, "
                   f"weight decay {t.get('muon_weight_decay')}) + {_describe_adamw(t)} for embeddings, head and norms")),
}


def get_optimizer(name: str) -> OptimizerKind:
    if name not in OPTIMIZERS:
        raise UserError(f"train.optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def optimizer_for(model: torch.nn.Module, t, device: torch.device, split: bool = False) -> torch.optim.Optimizer:
    """The optimizer train config `t` names (`split`: Muon's Newton-Schulz shared out over DDP ranks)."""
    return get_optimizer(t.optimizer).build(model, t, device, split)


def lr_values(optimizer) -> dict[str, float]:
    """The LR of each named kind of parameter group this step ({"lr": ..., "muon_lr": ...})."""
    out: dict[str, float] = {}
    for group in optimizer.param_groups:
        out.setdefault(group.get("lr_name", "lr"), group["lr"])
    return out


def describe_recipe(t: dict) -> str:
    """The optimizer and LR schedule of a `train:` section, in words (start event, card, report);
    "unknown" for a section that names none we know (a card of an old or foreign run)."""
    if t.get("optimizer") not in OPTIMIZERS or t.get("schedule") not in schedules.SCHEDULES:
        return "unknown"
    return f"{get_optimizer(t.get('optimizer')).describe(t)}; {schedules.describe(t)}; clip {t.get('grad_clip')}"
