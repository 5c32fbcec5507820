"""Data parallelism on PyTorch's own engine, set up from torchrun's environment.

`torchrun --nproc_per_node N -m llamaforge train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; we join
the process group (NCCL on CUDA, gloo on CPU) and wrap the model in DDP, or shard it with FSDP2
(`fully_shard`, one unit per transformer block). The model code knows nothing of this.

`torch.compile` is applied to each transformer block before wrapping (torchtitan's way), not to the
DDP/FSDP module: the wrapper's hooks and collectives stay outside the compiled graphs, every block
reuses one graph, and the state-dict names stay the model's own.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..model.adapter import find_blocks


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, max_op: bool = False) -> None:
        """Sum (or the largest value) over ranks, in place."""
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX if max_op else dist.ReduceOp.SUM)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (a collective)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


# How long a collective may wait: rank 0 alone scores the benchmarks (train.eval_tasks) while the
# others wait in a barrier, minutes at llama-150m; NCCL's default of 10 minutes would kill the run.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)


def setup(device: str | None = None) -> Dist:
    """Join torchrun's process group if there is one (PROCESS_GROUP_TIMEOUT); pick the device
    (`cuda:LOCAL_RANK` or cpu)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return Dist(rank, world, local, dev)


def compile_blocks(model: torch.nn.Module) -> None:
    """Compile every transformer block in place (`nn.Module.compile`: parameter names unchanged);
    the blocks of a user's model are found by model.adapter.find_blocks."""
    for block in find_blocks(model):
        block.compile()


def fsdp_param_dtype(precision) -> torch.dtype | None:
    """The dtype FSDP2 gathers weights in: autocast's (bf16, or fp16 on T4/V100: half the traffic of
    fp32, which autocast would recast anyway); None (fp32) without autocast."""
    return precision.dtype if precision.name in ("bf16", "fp16") else None


def wrap(model: torch.nn.Module, d: Dist, fsdp: bool = False, param_dtype: torch.dtype | None = None,
         by_hand: bool = False) -> torch.nn.Module:
    """DDP, or FSDP2 with `param_dtype` (bf16, or fp16 on T4/V100) for the gathered weights the blocks
    compute with, gradients reduced in fp32, and fp32 shards kept for the optimizer. `by_hand`: no
    wrapper (rank 0's weights broadcast once); the step averages the gradients itself after the whole
    backward (train/step.reduce_gradients: `micro_batch: auto`, whose ranks agree on out-of-memory first)."""
    if d.world == 1:
        return model
    if by_hand:
        for t in (*model.parameters(), *model.buffers()):
            dist.broadcast(t.data, src=0)
        return model
    if fsdp:
        try:  # torch >= 2.6
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError:  # torch 2.5
            from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
        for block in find_blocks(model):
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # no buffer broadcast before each forward: a model's buffers (RoPE's inv_freq) are built the same on
    # every rank, and a collective inside the forward would keep ranks from agreeing on an out-of-memory
    # (torch >= 2.13 names it forward_sync_buffers; broadcast_buffers is deprecated there)
    quiet = "forward_sync_buffers" in inspect.signature(DDP).parameters
    return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
               **{"forward_sync_buffers" if quiet else "broadcast_buffers": False})


def grad_sync(model: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP no_sync / FSDP2 requires_gradient_sync)."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
