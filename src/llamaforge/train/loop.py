"""The training loop shared by `train`, `extend` and `sft`.

Every step: one batch of `batch_tokens` tokens (all ranks, all micro-batches) -> train_step ->
scheduler -> metrics. Every `eval_every` steps: validation loss, bits per byte and a sample from a
fixed prompt. Every `save_every` steps, on Ctrl-C/SIGTERM and at the end: an atomic checkpoint.
A run directory holding a checkpoint is resumed from it (exactly: same next batch, same RNG, same
optimizer and scheduler state). The loop only trains: publishing RUN_DIR/final is the workflows' job.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import pickle
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from ..config import RunConfig, micro_batch_for, save_config
from ..errors import UserError, require_extra
from ..eval.loss import windowed_loss
from ..fsutil import atomic_write_bytes
from ..runs import RunRecord, config_path, describe_recipe, metrics_path, read_metrics, tokenizer_dir
from . import checkpoint as ckpt
from .distributed import Dist, compile_blocks, setup, teardown, unwrap, wrap
from .metrics import MetricsLogger, device_name, peak_flops, peak_memory_gb, train_flops_per_token
from .optim import build_optimizer, build_scheduler, decay_start
from .precision import choose as choose_precision
from .step import train_step

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


def split_micro(batch: tuple[torch.Tensor, torch.Tensor], micro: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) -> micro-batches of at most `micro` rows."""
    x, y = batch
    return [(x[i : i + micro], y[i : i + micro]) for i in range(0, len(x), micro)]


@torch.no_grad()
def sample_text(model, tokenizer, prompt: str, device: torch.device, max_new_tokens: int = 32) -> str:
    was_training = model.training
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


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
    if t.optimizer == "muon" and t.fsdp and world > 1:
        raise UserError("train.optimizer muon with train.fsdp: Muon needs whole matrices and FSDP2 shards them; "
                        "use DDP (--train.fsdp false) with Muon, or --train.optimizer adamw with FSDP")
    if t.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        raise UserError(f"train.optimizer muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}")
    if t.max_steps <= 0 or t.lr <= 0:
        raise UserError("max_steps and lr must be positive")
    if t.wandb:
        require_extra("wandb", "wandb")
    if t.tensorboard:
        require_extra("tensorboard", "tensorboard")


def copy_metrics(source_run: Path, run_dir: Path, step: int) -> None:
    """The source run's metrics up to `step`, as the start of this run's metrics.jsonl."""
    kept = [json.dumps(r) + "\n" for r in read_metrics(source_run) if r.get("step", 0) <= step]
    if kept:
        atomic_write_bytes(metrics_path(run_dir), "".join(kept).encode())


def _install_sigterm():
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def train(cfg: RunConfig, model, tokenizer, batches_factory, run_dir: str | Path, resume: bool | None = None,
          progress: bool = True, record: RunRecord | None = None) -> TrainResult:
    """Train `model` (its weights are replaced by the latest checkpoint when resuming).

    `batches_factory(rank, world)` returns the Batches; `resume`: None = when a checkpoint exists,
    True = require one, False = refuse a run directory that has one. `record` (what the run is
    trained from) is kept in every checkpoint. Publishing the result is the caller's job."""
    d = setup()
    try:
        return _train(cfg, model, tokenizer, batches_factory, Path(run_dir), resume, progress, d, record or RunRecord())
    finally:
        teardown()


def _train(cfg, model, tokenizer, batches_factory, run_dir: Path, resume, progress, d: Dist,
           record: RunRecord) -> TrainResult:
    t = cfg.train
    check_runnable(cfg, model.config, d.world)
    found = ckpt.checkpoints(run_dir)
    usable, rejected = ckpt.newest_valid(found)
    continued = None
    if t.resume_from and not found:  # a new run directory continuing another run's checkpoint
        continued = Path(t.resume_from)
        why = ckpt.problem(continued) if continued.is_dir() else "no such checkpoint folder"
        if why:
            raise UserError(f"train.resume_from {continued}: {why}; give a run's checkpoints/step_N folder")
        usable = continued
    if d.world > 1:  # rank 0 decides; every rank must then see that very checkpoint
        chosen = d.broadcast(usable.name if usable else None)
        if chosen is not None and (usable is None or usable.name != chosen):
            raise UserError(f"rank {d.rank} cannot read checkpoint {chosen} in {run_dir}, which rank 0 resumes from; "
                            "put the run directory on a filesystem every node shares")
        if chosen is None and usable is not None:
            usable, found = None, []  # rank 0 starts fresh (sees no checkpoint): so does everyone
    if found and usable is None:
        raise UserError(f"no usable checkpoint in {run_dir / 'checkpoints'} ({rejected[0][1]} in {rejected[0][0].name}, "
                        f"{len(rejected)} damaged); move the damaged step_N folders away to start over, or pass another --out")
    for path, why in rejected:  # one line each; the run goes on from `usable`
        log.warning("checkpoint %s is damaged (%s); resuming from %s", path.name, why, usable.name)
    if resume is True and not found:
        raise UserError(f"--resume: {run_dir} has no checkpoint; drop --resume to start a new run")
    if resume is False and found:
        raise UserError(f"{run_dir} already holds checkpoints; resume it (default) or pass another --out")
    batches = batches_factory(d.rank, d.world)
    torch.manual_seed(t.seed)
    device = d.device
    model.to(device).train()
    if t.activation_checkpointing:
        model.model.gradient_checkpointing = True
    step, tokens_seen = 0, 0
    try:  # before wrapping: plain tensors
        state = ckpt.load_weights(usable, model) if usable else None
    except ValueError as e:
        raise UserError(f"{e}; resume with the model settings the run was started with, or pass another --out") from None
    if d.main:  # written only once the configuration and the checkpoint have been checked
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial(run_dir)
        save_config(cfg, config_path(run_dir))
        if not tokenizer_dir(run_dir).exists():
            tokenizer.save_pretrained(tokenizer_dir(run_dir))  # checkpoints load with it (runs.resolve_model)
    precision = choose_precision(t.precision, device)
    if t.compile:  # each block, before DDP/FSDP wraps the model
        compile_blocks(model)
    wrapped = wrap(model, d, t.fsdp, precision.dtype if precision.name == "bf16" else None)
    # FSDP2 replaces parameters: the optimizer is built after wrapping
    optimizer = build_optimizer(wrapped, t.lr, t.weight_decay, (t.beta1, t.beta2), device, t.optimizer, t.muon_lr,
                                t.muon_momentum, t.muon_weight_decay)
    scheduler = build_scheduler(optimizer, t.warmup_steps, t.max_steps, t.min_lr_ratio, t.schedule, t.decay_fraction,
                                t.decay_shape)
    micro_batch = micro_batch_for(t, d.world)
    stable_end = decay_start(t.max_steps, t.schedule, t.decay_fraction)
    sharded = t.fsdp and d.world > 1
    scaler = torch.amp.GradScaler(device.type) if precision.needs_scaler else None
    if state is not None:
        try:  # weights_only loading: a pickle that would run code is refused, never executed
            ckpt.load_training_state(usable, wrapped, optimizer, sharded)
        except (pickle.UnpicklingError, RuntimeError, ValueError, KeyError) as e:
            where = usable.relative_to(run_dir) if usable.is_relative_to(run_dir) else usable
            raise UserError(f"{where} has an optimizer or RNG state that cannot be read safely "
                            f"({type(e).__name__}); move that checkpoint away to resume from an older one") from None
        scheduler.load_state_dict(state["scheduler"])
        for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * fn(scheduler.last_epoch)  # this run's schedule (a longer run: not the saved LR)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        batches.load_state_dict(state["loader"])
        step, tokens_seen = state["step"], state["tokens_seen"]
    if step == 0 and d.main:
        metrics_path(run_dir).unlink(missing_ok=True)
    if continued is not None and d.main and not metrics_path(run_dir).exists():
        copy_metrics(continued.parent.parent, run_dir, step)  # the curves start where the source run began
    metrics = MetricsLogger(run_dir, enabled=d.main, wandb_project=t.wandb_project if t.wandb else None,
                            tensorboard=t.tensorboard is not False,
                            config=asdict(cfg), truncate_after_step=step)
    peak, peak_source = peak_flops(device, precision.dtype)
    metrics.log("event", step, event="started", device=device_name(device), world=d.world,
                precision=precision.label(), precision_reason=precision.reason, fsdp=sharded, micro_batch=micro_batch,
                recipe=describe_recipe(asdict(t)),
                mfu_peak_tflops=round(peak / 1e12, 2), mfu_peak_source=peak_source)
    log.info("precision: %s (%s)", precision.label(), precision.reason)
    for path, why in rejected:
        metrics.log("event", step, event="checkpoint_invalid", checkpoint=path.name, reason=why)
    if usable:
        metrics.log("event", step, event="resumed", checkpoint=usable.name)
    eval_model = unwrap(wrapped)
    flops_per_token = train_flops_per_token(model.config, t.seq_len)

    def state() -> dict:
        out = {"scheduler": scheduler.state_dict(), "loader": batches.state_dict(), "tokens_seen": tokens_seen,
               "model_config": model.config.to_dict(), "records": record.to_dict(), "precision": precision.name}
        if scaler is not None:
            out["scaler"] = scaler.state_dict()
        return out

    def save(tag: str) -> None:
        full = ckpt.gather_full_state(wrapped, optimizer) if sharded else None  # a collective: every rank
        if not d.main:
            return
        try:
            path = ckpt.save_checkpoint(run_dir, step, model, optimizer, state(), keep=t.keep_last, full=full,
                                        pin=tag == "decay_start")
            metrics.log("event", step, event="checkpoint", path=str(path.relative_to(run_dir)), reason=tag)
        except Exception as e:  # noqa: BLE001 - disk full, read-only, permission, safetensors' own errors
            metrics.log("event", step, event="checkpoint_failed", error=f"{type(e).__name__}: {e}")
            previous = ckpt.checkpoints(run_dir)
            kept = f"{previous[-1].relative_to(run_dir)} is intact" if previous else "no earlier checkpoint exists"
            raise UserError(f"the checkpoint of step {step} could not be written ({str(e).splitlines()[0][:160]}); "
                            f"{kept}: free disk space or fix the permissions, then run the same command "
                            "to resume") from None

    def evaluate() -> None:
        eval_batches = batches.eval_batches()
        if d.world > 1 and not sharded:  # each rank scores its share of the windows; FSDP needs every rank
            eval_batches = itertools.islice(eval_batches, d.rank, None, d.world)  # in every forward
        s = windowed_loss(eval_model, eval_batches, device, autocast=precision.autocast)
        sums = torch.tensor([s.total, float(s.count)], dtype=torch.float64, device=device)
        if d.world > 1 and not sharded:
            d.all_reduce(sums)
        loss, n = float(sums[0] / max(sums[1], 1)), int(sums[1])
        values = {"val_loss": loss, "val_tokens": n}
        if batches.bytes_per_token:
            values["val_bpb"] = loss / math.log(2) / batches.bytes_per_token
        metrics.log("eval", step, **values)
        if t.sample_prompt:
            metrics.log("sample", step, prompt=t.sample_prompt, text=sample_text(eval_model, tokenizer, t.sample_prompt, device))

    old_handler = _install_sigterm()
    bar = tqdm(total=t.max_steps, initial=step, desc=f"train ({precision.name})", unit="step", disable=None if progress and d.main else True)
    bad_streak, interrupted = 0, False
    try:
        while step < t.max_steps:
            batch = batches.next_batch()
            if device.type == "cuda":  # pinned once, so each micro-batch's copy is asynchronous
                batch = (batch[0].pin_memory(), batch[1].pin_memory())
            micro = split_micro(batch, micro_batch)
            start = time.perf_counter()
            stats = train_step(wrapped, optimizer, micro, t.grad_clip, device, d.all_reduce if d.world > 1 else None,
                               d.world, precision, scaler)
            lrs = {"lr": optimizer.param_groups[-1]["lr"]}  # the LR this step used (AdamW's; Muon's apart)
            if t.optimizer == "muon":
                lrs["muon_lr"] = optimizer.param_groups[0]["lr"]
            scheduler.step()
            step += 1
            seconds = time.perf_counter() - start
            if stats.skipped:
                bad_streak += 1
                log.warning("step %d: loss or gradient not finite; update skipped (%d in a row)", step, bad_streak)
                metrics.log("event", step, event="skipped_step", loss=stats.loss, grad_norm=stats.grad_norm)
                if bad_streak >= t.max_bad_steps:
                    raise UserError(f"loss or gradient was not finite for {bad_streak} steps in a row (step {step}); "
                                    "lower --lr, raise warmup_steps or check the data")
                continue
            bad_streak = 0
            tokens_seen += stats.tokens
            tps = stats.tokens / seconds
            metrics.log("train", step, loss=stats.loss, **lrs, grad_norm=stats.grad_norm, tokens=stats.tokens,
                        tokens_seen=tokens_seen, tokens_per_s=tps, step_s=seconds,
                        mfu=flops_per_token * tps / d.world / peak, peak_mem_gb=peak_memory_gb(device))
            bar.set_postfix(loss=f"{stats.loss:.3f}", lr=f"{lrs['lr']:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
            bar.update()
            if t.eval_every and (step % t.eval_every == 0 or step == t.max_steps):
                evaluate()
            if step == stable_end and step < t.max_steps:  # WSD: the checkpoint a longer run continues from
                save("decay_start")
            elif t.save_every and step % t.save_every == 0 and step < t.max_steps:
                save("interval")
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted at step %d: saving a checkpoint", step)
    finally:
        bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    save("interrupt" if interrupted else "end")
    full = ckpt.gather_full_state(wrapped, optimizer) if sharded and not interrupted else None  # a collective
    metrics.close()
    d.barrier()
    if interrupted:
        log.warning("checkpoint saved at step %d; run the same command again to resume", step)
        raise KeyboardInterrupt
    if full is not None:  # FSDP: hand back an unsharded copy, on the main rank
        model = None
        if d.main:
            model = type(eval_model)(eval_model.config)
            model.load_state_dict(full[0])
    return TrainResult(model, d.main, step)
