"""The training loop shared by `train`, `extend` and `sft`, as a Trainer of named steps.

Every step: one batch of `batch_tokens` tokens (all ranks, all micro-batches) -> train_step ->
scheduler -> metrics. Every `eval_every` steps: validation loss, bits per byte and a sample from a
fixed prompt. Every `save_every` steps and at the end: an atomic checkpoint. Between steps the ranks
agree whether to stop (a SIGTERM/SIGINT/SIGUSR1, or `train.time_limit` about to run out: preempt.py);
then one checkpoint is saved and `Stopped` raised. A run directory holding a checkpoint is resumed
from it (exactly: same next batch, same RNG, same optimizer and scheduler state), under any process
count and wrapper (checkpoint.py converts the optimizer state). The loop only trains: publishing
RUN_DIR/final is the workflows' job.
"""

from __future__ import annotations

import gc
import logging
import pickle
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from ..config import RunConfig, micro_batch_for, parse_duration, save_config
from ..data.loader import Prefetched
from ..errors import UserError
from ..model.adapter import enable_activation_checkpointing, is_builtin
from ..model.io import nonfinite_parameters
from ..runs import RunRecord, config_path, copy_metrics, metrics_path, tokenizer_dir
from . import checkpoint as ckpt
from .bench import InLoopEvaluation, prepare_tasks
from .checks import check_runnable
from .compiling import choose as choose_compile
from .distributed import Dist, compile_blocks, fsdp_param_dtype, setup, teardown, unwrap, wrap
from .metrics import MetricsLogger, device_name, peak_flops, peak_memory_gb, train_flops_per_token
from .divergence import Divergence, Health
from .optim import describe_recipe, lr_values, optimizer_for
from .schedules import build_scheduler, decay_start
from .preempt import STOP_CODES, StopFlag, Stopped
from .precision import choose as choose_precision
from .step import Ranks, fitting_step, train_step

log = logging.getLogger(__name__)


class Batches(Protocol):
    """What the loop needs from a dataset: this rank's (inputs, targets) per step, each (b, T) with
    -100 where no loss is taken; resumable state; validation batches; bytes per token for bpb."""

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def eval_batches(self): ...
    bytes_per_token: float | None


@dataclass
class TrainResult:
    """What `train` hands back: the trained model (unsharded when FSDP sharded it; None on ranks
    other than the main one under FSDP) and whether this process is the main one."""

    model: torch.nn.Module | None
    main: bool
    step: int


def train(cfg: RunConfig, model, tokenizer, batches_factory, run_dir: str | Path, resume: bool | None = None,
          progress: bool = True, record: RunRecord | None = None) -> TrainResult:
    """Train `model` (its weights are replaced by the latest checkpoint when resuming).

    `batches_factory(rank, world)` returns the Batches; `resume`: None = when a checkpoint exists,
    True = require one, False = refuse a run directory that has one. `record` (what the run is
    trained from) is kept in every checkpoint. Raises `Stopped` after the checkpoint of a run
    stopped early (signal, time limit). Publishing the result is the caller's job."""
    d = setup()
    trainer = None
    try:
        with StopFlag(parse_duration(cfg.train.time_limit)) as flag:
            trainer = Trainer(cfg, model, tokenizer, batches_factory, Path(run_dir), resume, progress, d,
                              record or RunRecord(), flag)
            return trainer.run()
    finally:
        if trainer is not None:  # the DDP wrapper (its reducer holds the process group) goes first, while
            trainer.wrapped = trainer.optimizer = None  # every rank is still here, not after teardown
            gc.collect()
        teardown()


class Trainer(Divergence, InLoopEvaluation):
    """One run: checks and set-up in __init__ (refusals before anything is written), then `run`."""

    def __init__(self, cfg, model, tokenizer, batches_factory, run_dir: Path, resume, progress, d: Dist,
                 record: RunRecord, flag: StopFlag):
        self.cfg, self.t, self.tokenizer, self.run_dir, self.d, self.record, self.flag = \
            cfg, cfg.train, tokenizer, run_dir, d, record, flag
        self.model, self.progress = model, progress
        check_runnable(cfg, model.config, d.world)
        usable, continued, rejected = ckpt.choose(self.t, run_dir, d, resume)
        if d.main:  # the benchmarks' task files, before training (not in the first scoring, others waiting)
            prepare_tasks(self.t.eval_tasks)
        if usable is not None:  # the same code (a user's model: its sha256) and the settings exact resume needs
            ckpt.check_code(usable, record.code, self.t.allow_code_change)
            ckpt.check_resume_changes(usable, self.t)
        self.batches = Prefetched(batches_factory(d.rank, d.world), pin=d.device.type == "cuda")
        self.step, self.tokens_seen = 0, 0
        self.health = Health(self.t.spike_factor, self.t.max_bad_steps)
        self.lr_scale, self.rollbacks, self.lr_change = 1.0, 0, None  # rollbacks halve the LR (divergence.py)
        self.slowest_step_s, self.slowest_save_s, self.steps_here = 0.0, 0.0, 0  # for train.time_limit
        self.agreed_stop: str | None = None  # several ranks: the stop they agreed on in the last step
        self.vote_stale = True  # work ran since that vote (validation, scoring, a save): vote again
        self.saved_step: int | None = None  # the step of the checkpoint on disk that this process wrote or resumed
        state = self.load_weights(usable)
        self.build()
        if state is not None:
            self.restore(usable, state)
        if d.main:  # written only once the configuration and the checkpoint have been checked
            self.write_run_dir()
        self.open_metrics(usable, continued, rejected)

    # -- set-up -------------------------------------------------------------------------------
    def load_weights(self, usable: Path | None) -> dict | None:
        """The checkpoint's weights into the plain model (before wrapping); its state.json."""
        torch.manual_seed(self.t.seed)
        self.model.to(self.d.device).train()
        if self.t.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        try:
            return ckpt.load_weights(usable, self.model) if usable else None
        except ValueError as e:
            raise UserError(f"{e}; resume with the model settings the run was started with, or pass another --out") from None

    def write_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial(self.run_dir)
        save_config(self.cfg, config_path(self.run_dir))
        if not tokenizer_dir(self.run_dir).exists():
            self.tokenizer.save_pretrained(tokenizer_dir(self.run_dir))  # checkpoints load with it (runs.resolve_model)

    def build(self) -> None:
        """Precision, compiled blocks, the DDP/FSDP2 wrapper, then optimizer, schedule and scaler."""
        t, d = self.t, self.d
        self.precision = choose_precision(t.precision, d.device)
        self.compiled = choose_compile(t.compile, t.compile_loss, d.device, t.max_steps, self.model.config.hidden_size,
                                       self.precision.name)
        if self.compiled.blocks:  # each block, before DDP/FSDP wraps the model
            compile_blocks(self.model)
        if is_builtin(self.model):  # a user's model computes its logits; the loss is the adapter's
            self.model.compiled_loss = self.compiled.loss
        self.sharded = t.fsdp and d.world > 1
        # micro_batch auto under DDP: the ranks agree on an out-of-memory before reducing by hand (step.py)
        self.agree_on_oom = t.micro_batch == "auto" and d.world > 1 and not self.sharded
        self.wrapped = wrap(self.model, d, t.fsdp, fsdp_param_dtype(self.precision), by_hand=self.agree_on_oom)
        self.eval_model = unwrap(self.wrapped)
        # FSDP2 replaces parameters: the optimizer is built after wrapping
        self.optimizer = optimizer_for(self.wrapped, t, d.device, split=d.world > 1)  # DDP (Muon refuses FSDP2)
        self.scheduler = build_scheduler(self.optimizer, t)
        self.peak_lrs = list(self.scheduler.base_lrs)  # this run's configured peaks (rollbacks scale these)
        self.scaler = torch.amp.GradScaler(d.device.type) if self.precision.needs_scaler else None
        self.micro_batch = micro_batch_for(t, d.world)
        self.stable_end = decay_start(t)  # a schedule's decay start: the checkpoint a longer run continues from

    def restore(self, usable: Path, state: dict) -> None:
        """Optimizer, RNG, schedule, scaler and loader position of checkpoint `usable`."""
        try:  # weights_only loading: a pickle that would run code is refused, never executed
            ckpt.load_training_state(usable, self.wrapped, self.optimizer, self.sharded)
        except ckpt.OptimizerMismatch as e:
            raise UserError(f"{e}; resume with the settings the run was started with (its config.yaml), "
                            "or pass another --out") from None
        except (pickle.UnpicklingError, RuntimeError, ValueError, KeyError) as e:
            where = usable.relative_to(self.run_dir) if usable.is_relative_to(self.run_dir) else usable
            raise UserError(f"{where} has an optimizer or RNG state that cannot be read safely "
                            f"({type(e).__name__}); move that checkpoint away to resume from an older one") from None
        self.apply_schedule(state)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.batches.load_state_dict(state["loader"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.health.load_state_dict(state.get("health", {}))
        if self.t.micro_batch == "auto" and isinstance(state.get("micro_batch"), int):
            self.micro_batch = state["micro_batch"]  # what fitted before
        self.saved_step = self.step if usable.parent.parent == self.run_dir else None

    def apply_schedule(self, state: dict) -> None:
        """The checkpoint's schedule position with THIS run's peak LRs (a resume trains what config.yaml
        and the card record: a changed lr / muon_lr takes effect from here, with an lr_changed event),
        times the rollbacks' scale."""
        sched = self.scheduler
        configured = list(self.peak_lrs)  # from this run's config (the optimizer state overwrote the groups)
        sched.load_state_dict(state["scheduler"])
        saved = [b / state.get("lr_scale", 1.0) for b in sched.base_lrs]
        self.lr_scale, self.rollbacks = float(state.get("lr_scale", 1.0)), int(state.get("rollbacks", 0))
        sched.base_lrs = [b * self.lr_scale for b in configured]
        for group, base, fn, peak in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, configured):
            group["initial_lr"], group["lr"] = peak, base * fn(sched.last_epoch)
        if any(abs(a - b) > 1e-12 * max(abs(a), abs(b), 1e-30) for a, b in zip(saved, configured)):
            self.lr_change = {"from": saved, "to": configured}

    def open_metrics(self, usable: Path | None, continued: Path | None, rejected: list) -> None:
        d, t, run_dir = self.d, self.t, self.run_dir
        if self.step == 0 and d.main:
            metrics_path(run_dir).unlink(missing_ok=True)
        if continued is not None and d.main and not metrics_path(run_dir).exists():
            copy_metrics(continued.parent.parent, run_dir, self.step)  # the curves start where the source run began
        self.metrics = MetricsLogger(run_dir, enabled=d.main, wandb_project=t.wandb_project if t.wandb else None,
                                     tensorboard=t.tensorboard is not False, config=asdict(self.cfg),
                                     truncate_after_step=self.step)
        self.peak, peak_source = peak_flops(d.device, self.precision.dtype)
        p = self.precision
        self.metrics.log("event", self.step, event="started", device=device_name(d.device), world=d.world,
                         precision=p.label(), precision_reason=p.reason, fsdp=self.sharded, micro_batch=self.micro_batch,
                         recipe=describe_recipe(asdict(t)), mfu_peak_tflops=round(self.peak / 1e12, 2),
                         mfu_peak_source=peak_source, compile=self.compiled.label(), compile_reason=self.compiled.reason)
        log.info("precision: %s (%s); %s (%s)", p.label(), p.reason, self.compiled.label(), self.compiled.reason)
        for path, why in rejected:
            self.metrics.log("event", self.step, event="checkpoint_invalid", checkpoint=path.name, reason=why)
        if usable:
            self.metrics.log("event", self.step, event="resumed", checkpoint=usable.name)
        if self.lr_change:
            self.metrics.log("event", self.step, event="lr_changed", **self.lr_change)
        self.flops_per_token = train_flops_per_token(self.model.config, t.seq_len)

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        t, d = self.t, self.d
        bar = tqdm(total=t.max_steps, initial=self.step, desc=f"train ({self.precision.name})", unit="step",
                   disable=None if self.progress and d.main else True)
        stopped = None
        try:
            while self.step < t.max_steps:
                stopped = self.stop_reason()
                if stopped:
                    break
                start = time.perf_counter()
                self.train_one_step(bar)
                if self.saved_step == self.step:  # a rollback just restored this very checkpoint: keep it as it is
                    pass
                elif self.step == self.stable_end and self.step < t.max_steps:  # WSD: what a longer run continues from
                    self.save("decay_start")
                elif t.save_every and self.step % t.save_every == 0 and self.step < t.max_steps:
                    self.save("interval")
                self.steps_here += 1
                if self.steps_here > 1:  # the first step compiles and warms up: not what the next one costs
                    self.slowest_step_s = max(self.slowest_step_s, time.perf_counter() - start)
        finally:
            bar.close()
            self.batches.close()
        return self.finish(stopped)

    def stop_reason(self) -> str | None:
        """Whether to stop before the next step: this process's flag; under several ranks what they
        agreed on in the last step (each rank's `stop_vote` travels in the step's loss all-reduce), or
        a vote of its own when validation, scoring or a save ran since (the same on every rank)."""
        if self.d.world == 1:
            return self.own_reason()
        if self.vote_stale:
            votes = torch.tensor(self.stop_vote(), device=self.d.device)
            self.d.all_reduce(votes)
            self.agree_stop(votes.tolist())
        return self.agreed_stop

    def agree_stop(self, votes: list[float]) -> None:
        """The ranks' summed one-hot votes -> the agreed reason (the last code voted for), or None."""
        self.agreed_stop = next((c for c, n in reversed(list(zip(STOP_CODES, votes))) if n > 0), None)
        self.vote_stale = False

    def own_reason(self) -> str | None:
        """This process's reason to stop: a signal, or a time limit that two of the slowest steps and
        saves so far might overrun."""
        return self.flag.reason(2 * self.slowest_step_s, 2 * self.slowest_save_s)

    def stop_vote(self) -> list[float]:
        """This rank's reason to stop as a one-hot over STOP_CODES (summed over the ranks: the last
        code with a vote wins), cast once the step's backward is done."""
        mine = self.own_reason()
        return [float(mine == code) for code in STOP_CODES]

    def ranks(self) -> Ranks | None:
        """How a step meets the other ranks; `micro_batch: auto` under DDP reduces the gradients after
        the backward so that an out-of-memory on one rank is redone by all (FSDP2 is refused that)."""
        if self.d.world == 1:
            return None
        return Ranks(self.d.all_reduce, self.d.world, self.stop_vote, self.agree_on_oom)

    def train_one_step(self, bar) -> None:
        t = self.t
        start = time.perf_counter()  # the batch's loading counts (a slow filesystem shows in tokens/s)
        batch = self.batches.next_batch()  # read ahead during the previous step; the wait counts
        ranks = self.ranks()
        stats, self.micro_batch = fitting_step(
            lambda micro: train_step(self.wrapped, self.optimizer, micro, t.grad_clip, self.d.device, ranks,
                                     self.precision, self.scaler), batch, self.micro_batch, self.out_of_memory)
        if stats.votes:
            self.agree_stop(stats.votes)
        lrs = lr_values(self.optimizer)  # the LRs this step used, by group kind (lr; muon_lr)
        self.scheduler.step()
        self.step += 1
        seconds = time.perf_counter() - start
        if stats.scaler_skipped:  # fp16: an update lost to overflow, counted in the report
            self.metrics.log("event", self.step, event="scaler_skip", grad_norm=stats.grad_norm,
                             scale=self.scaler.get_scale())
        bad = self.health.observe(stats.loss, stats.skipped)
        if bad and (self.bad_step(bad, stats) or stats.skipped):
            return  # rolled back, or no update was made
        self.tokens_seen += stats.tokens
        tps = stats.tokens / seconds
        self.metrics.log("train", self.step, loss=stats.loss, **lrs, grad_norm=stats.grad_norm, tokens=stats.tokens,
                         tokens_seen=self.tokens_seen, tokens_per_s=tps, step_s=seconds,
                         mfu=self.flops_per_token * tps / self.d.world / self.peak,
                         peak_mem_gb=peak_memory_gb(self.d.device))
        bar.set_postfix(loss=f"{stats.loss:.3f}", lr=f"{lrs['lr']:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
        bar.update()
        if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.max_steps):
            self.evaluate()
        every = t.eval_tasks_every or t.eval_every
        if t.eval_tasks and every and (self.step % every == 0 or self.step == t.max_steps):
            self.score_tasks()

    def state_dict(self) -> dict:
        """state.json's content (checkpoint.py adds the step)."""
        out = {"scheduler": self.scheduler.state_dict(), "loader": self.batches.state_dict(),
               "tokens_seen": self.tokens_seen, "model_config": self.model.config.to_dict(),
               "records": self.record.to_dict(), "precision": self.precision.name, "optimizer": self.t.optimizer,
               "world": self.d.world, "fsdp": self.sharded, "train": asdict(self.t), "healthy": self.health.healthy,
               "health": self.health.state_dict(), "lr_scale": self.lr_scale, "rollbacks": self.rollbacks,
               "micro_batch": self.micro_batch}
        if self.scaler is not None:
            out["scaler"] = self.scaler.state_dict()
        return out

    def save(self, tag: str) -> None:
        """An atomic checkpoint of this step (FSDP: gathered on every rank, written by the main one)."""
        start = time.perf_counter()
        self.vote_stale = True  # a stop signalled meanwhile is voted on before the next step
        bad = torch.tensor([float(bool(nonfinite_parameters(self.wrapped)))], device=self.d.device)
        self.d.all_reduce(bad)  # every rank agrees (FSDP: each checks its shard)
        if float(bad) > 0:  # never written: a NaN checkpoint would rotate the healthy ones away
            healthy = ckpt.newest_healthy(self.run_dir)
            raise UserError(f"the weights are not finite at step {self.step}; no checkpoint was written and "
                            f"{'the last healthy one is ' + str(healthy.relative_to(self.run_dir)) if healthy else 'none is healthy'}"
                            ": run the same command with a lower --lr, or set --train.on_divergence rollback")
        full = ckpt.gather_full_state(self.wrapped, self.optimizer) if self.sharded else None  # a collective
        if self.d.main:
            self.write_checkpoint(tag, full)
        self.saved_step = self.step
        self.slowest_save_s = max(self.slowest_save_s, time.perf_counter() - start)

    def write_checkpoint(self, tag: str, full) -> None:
        run_dir, step = self.run_dir, self.step
        try:
            path = ckpt.save_checkpoint(run_dir, step, self.model, self.optimizer, self.state_dict(),
                                        keep=self.t.keep_last, full=full, pin=tag == "decay_start")
            self.metrics.log("event", step, event="checkpoint", path=str(path.relative_to(run_dir)), reason=tag)
        except Exception as e:  # noqa: BLE001 - disk full, read-only, permission, safetensors' own errors
            self.metrics.log("event", step, event="checkpoint_failed", error=f"{type(e).__name__}: {e}")
            previous = ckpt.checkpoints(run_dir)
            kept = f"{previous[-1].relative_to(run_dir)} is intact" if previous else "no earlier checkpoint exists"
            raise UserError(f"the checkpoint of step {step} could not be written ({str(e).splitlines()[0][:160]}); "
                            f"{kept}: free disk space or fix the permissions, then run the same command "
                            "to resume") from None

    def finish(self, stopped: str | None) -> TrainResult:
        """The last checkpoint; then `Stopped` (stopped early), or the model (FSDP: an unsharded copy)."""
        if self.saved_step != self.step:  # a run stopped (or rerun) right after a save keeps that checkpoint
            self.save(stopped or "end")
        full = ckpt.gather_full_state(self.wrapped, self.optimizer) if self.sharded and not stopped else None
        if stopped:
            self.metrics.log("event", self.step, event="stopped", reason=stopped)
        self.metrics.close()
        self.d.barrier()
        if stopped:  # the CLI says it in one line, exit 75
            raise Stopped(self.step, stopped)
        if self.health.good == 0:  # every step was skipped: the weights are the untrained ones
            raise UserError(f"none of the {self.step} steps had a finite loss and gradient, so nothing was trained "
                            "and nothing is published; lower --lr, raise warmup_steps or check the data")
        model = self.model
        if full is not None:  # FSDP: hand back an unsharded copy, on the main rank
            model = None
            if self.d.main:
                model = type(self.eval_model)(self.eval_model.config)
                model.load_state_dict(full[0])
        return TrainResult(model, self.d.main, self.step)

