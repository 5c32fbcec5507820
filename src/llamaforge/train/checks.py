"""Checks that refuse, before any work, a training configuration that cannot run."""

from __future__ import annotations

import torch

from ..config import RunConfig, micro_batch_for
from ..errors import UserError, require_extra
from ..eval.tasks import check_names, expand
from . import schedules
from .optim import get_optimizer


def check_runnable(cfg: RunConfig, model_config, world: int) -> None:
    """Refuse, before any work, a configuration that cannot run."""
    t = cfg.train
    if t.seq_len > model_config.max_position_embeddings:
        raise UserError(f"seq_len {t.seq_len} exceeds the model's max_position_embeddings "
                        f"{model_config.max_position_embeddings}; lower --train.seq_len or use `llamaforge extend`")
    micro = micro_batch_for(t, world)
    per_micro = t.seq_len * micro * world
    if t.batch_tokens % per_micro:
        if t.batch_tokens % (t.seq_len * world) == 0:
            fix = "change --batch-tokens, or leave train.micro_batch out to derive it"
        else:
            fix = f"make --batch-tokens a multiple of seq_len x processes = {t.seq_len * world}"
        raise UserError(f"batch_tokens {t.batch_tokens} is not a multiple of micro_batch x seq_len x processes "
                        f"= {micro} x {t.seq_len} x {world} = {per_micro}; {fix}")
    get_optimizer(t.optimizer)  # an unknown name: one line with the known ones (the registries own them)
    schedules.get(t.schedule).check(t)
    if t.optimizer == "muon" and t.fsdp and world > 1:
        raise UserError("train.optimizer muon with train.fsdp: Muon needs whole matrices and FSDP2 shards them; "
                        "run (or resume) it under DDP (--train.fsdp false), or start with --train.optimizer adamw for FSDP")
    if t.micro_batch == "auto" and t.fsdp and world > 1:
        raise UserError("train.micro_batch auto with train.fsdp: FSDP2 gathers weights inside the forward and backward, "
                        "so the ranks cannot agree to redo a step one of them ran out of memory in; give a number "
                        "(--train.micro_batch N), or use DDP (--train.fsdp false)")
    if t.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        raise UserError(f"train.optimizer muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}: "
                        "pip install 'torch>=2.9' (docs/gpu.md), or --train.optimizer adamw")
    if t.max_steps <= 0 or t.lr <= 0:
        raise UserError("max_steps and lr must be positive")
    if t.wandb:
        require_extra("wandb", "wandb")
    if t.tensorboard:
        require_extra("tensorboard", "tensorboard")
    if t.eval_tasks:
        try:
            require_extra("lm_eval", "eval")
        except UserError as e:
            raise UserError(f"train.eval_tasks ({t.eval_tasks}): {e}, or --train.eval_tasks null") from None
        check_names(task_list(t.eval_tasks))
        if t.eval_tasks_limit is not None and t.eval_tasks_limit < 1:
            raise UserError(f"train.eval_tasks_limit is {t.eval_tasks_limit}; it must be at least 1 (or null: every item)")


def task_list(text: str) -> list[str]:
    """train.eval_tasks ("capability", "hellaswag_offline,piqa_offline") -> task names."""
    return expand([s.strip() for s in str(text).split(",") if s.strip()])
