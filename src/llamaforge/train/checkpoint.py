"""Atomic checkpoints that never unpickle arbitrary objects.

RUN_DIR/checkpoints/step_N/
  model.safetensors   weights (tied tensors stored once)
  optimizer.pt        optimizer state: tensors and numbers only, read with torch.load(weights_only=True);
                      torch's layout (keyed by parameter index), or under FSDP2 keyed by parameter name
                      (torch.distributed.checkpoint's full state dict, marked by a file FSDP). Either
                      resumes under one process, DDP or FSDP2 with any process count: converted on load.
  rng.pt              torch CPU (and CUDA) RNG states, read the same way
  state.json          step, scheduler, loader state, trainer counters, model config

A checkpoint is written into `.step_N.tmp-PID/`, each file fsynced, then renamed into place
(fsutil.atomic_folder): a SIGKILL during a save leaves the temporary folder (removed at the next
start) and the previous checkpoint untouched. Only the last `keep` checkpoints are kept. Where a
run keeps its checkpoints is runs.py's business; what a checkpoint holds is this module's.
"""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file, save_model
from safetensors.torch import load_model as load_into

from ..errors import UserError
from ..fsutil import atomic_folder
from ..model.convert import rename_legacy
from ..model.io import safetensors_problem
from ..model.adapter import is_builtin
from ..model.usercode import BUILTIN, ModelCode
from ..runs import STATE, checkpoint_dir, checkpoints, checkpoints_dir, read_state
from .distributed import Dist, unwrap
from .optim import MuonWithAdamW

log = logging.getLogger(__name__)


def clean_partial(run_dir: Path) -> None:
    """Temporary checkpoint folders left by a killed save."""
    for p in checkpoints_dir(run_dir).glob(".step_*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def gather_full_state(model, optimizer) -> tuple[dict, dict]:
    """FSDP2: full (unsharded, CPU) model and optimizer state dicts. A collective: call on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


PINNED = "PINNED"  # a checkpoint holding this file is never rotated away (WSD's decay start)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, keep: int = 2, pin: bool = False,
                    full: tuple[dict, dict] | None = None) -> Path:
    """Write checkpoint `step_{step}`; raises OSError on failure (the previous one is untouched).
    `full`: gathered (model, optimizer) state dicts of a sharded model, written instead of the live ones."""
    with atomic_folder(checkpoint_dir(run_dir, step)) as tmp:
        if full is None:
            save_model(model, str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        else:
            weights = {k: v.contiguous() for k, v in full[0].items()
                       if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
            save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            torch.save(full[1], tmp / "optimizer.pt")
            (tmp / "FSDP").write_text("optimizer.pt is keyed by parameter name (torch.distributed.checkpoint)\n")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / STATE).write_text(json.dumps(dict(state, step=step), indent=2))
        if pin:
            (tmp / PINNED).write_text("kept by rotation: the last checkpoint before the LR decay; "
                                      "continue a longer run from it with train.resume_from\n")
    rotating = [c for c in checkpoints(run_dir) if not (c / PINNED).exists()]
    keeper = newest_healthy(run_dir)  # never rotated away, however many diverging ones follow it
    for old in rotating[:-keep] if keep > 0 else []:
        if old != keeper:
            shutil.rmtree(old, ignore_errors=True)
    return checkpoint_dir(run_dir, step)


def is_healthy(path: Path) -> bool:
    """Written while no bad step was in progress (train/divergence.py); older checkpoints count as healthy."""
    try:
        return read_state(path).get("healthy", True) is True
    except (OSError, ValueError, AttributeError):
        return False


def newest_healthy(run_dir: Path) -> Path | None:
    return next((c for c in reversed(checkpoints(run_dir)) if is_healthy(c) and problem(c) is None), None)


# train settings a resumed run must share with its checkpoint (else it is not the same run); the
# others may change on resume: the peak LRs and the schedule's end (max_steps, min_lr_ratio, WSD's
# decay_fraction and decay_shape: a longer WSD run continues from its decay start), intervals,
# precision, the wrapper and the process count
LOCKED = ("seq_len", "batch_tokens", "optimizer", "schedule", "warmup_steps", "weight_decay", "beta1", "beta2",
          "grad_clip", "muon_momentum", "muon_weight_decay", "seed")


def check_resume_changes(path: Path, t) -> None:
    """Refuse, in one line naming the keys, a resume whose settings would break exact resume."""
    saved = read_state(path).get("train")
    if not isinstance(saved, dict):  # checkpoints of earlier versions did not record it
        return
    changed = [k for k in LOCKED if k in saved and saved[k] != getattr(t, k)]
    if changed:
        pairs = ", ".join(f"train.{k} {saved[k]!r} -> {getattr(t, k)!r}" for k in changed)
        raise UserError(f"resuming {path.name} with other settings ({pairs}) would not continue the same run; "
                        "resume with the run's values (its config.yaml), or start a new run with another --out")


def problem(path: Path) -> str | None:
    """Why checkpoint `path` cannot be resumed from (truncated or garbage files), or None if it can."""
    path = Path(path)
    try:
        state = read_state(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"state.json is unreadable ({type(e).__name__})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or \
            not all(isinstance(state.get(k), dict) and state.get(k) for k in ("scheduler", "loader", "model_config")):
        return "state.json lacks step, scheduler, loader or model_config"
    sched = state["scheduler"]
    if not isinstance(sched.get("last_epoch"), int) or not isinstance(sched.get("base_lrs"), list) or \
            not isinstance(state.get("tokens_seen", 0), int):
        return "state.json has a damaged scheduler or token count"
    why = safetensors_problem(path / "model.safetensors")
    if why:
        return f"model.safetensors is damaged ({why.split(':')[0]})"
    for name in ("optimizer.pt", "rng.pt"):
        try:
            zipfile.ZipFile(path / name).close()  # torch.save writes a zip; a truncated one has no directory
        except (OSError, zipfile.BadZipFile):
            return f"{name} is missing or truncated"
    return None


def newest_valid(found: list[Path]) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that passes `problem` and was healthy (else the newest that passes), and
    the newer ones passed over, with the reason."""
    rejected = []
    for path in reversed(found):
        why = problem(path) or (None if is_healthy(path) else "written while the run was diverging")
        if why is None:
            return path, rejected
        rejected.append((path, why))
    readable = [p for p, why in rejected if why == "written while the run was diverging"]
    if readable:  # no healthy one at all: the newest readable, rather than nothing
        return readable[0], rejected[: [p for p, _ in rejected].index(readable[0])]
    return None, rejected


def choose(t, run_dir: Path, d: Dist, resume: bool | None) -> tuple[Path | None, Path | None, list]:
    """(the checkpoint to resume from, the other run's checkpoint when continuing one, the damaged
    newer ones with the reason). Rank 0 decides; every rank must see that very checkpoint."""
    found = checkpoints(run_dir)
    usable, rejected = newest_valid(found)
    continued = None
    if t.resume_from and not found:  # a new run directory continuing another run's checkpoint
        continued = Path(t.resume_from)
        why = problem(continued) if continued.is_dir() else "no such checkpoint folder"
        if why:
            raise UserError(f"train.resume_from {continued}: {why}; give a run's checkpoints/step_N folder")
        usable = continued
    if d.world > 1:
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
    return usable, continued, rejected


def check_code(path: Path, code: dict | None, allow_change: bool = False) -> None:
    """Resume only with the model code a checkpoint was trained with (its sha256), unless allowed."""
    records = read_state(path).get("records")
    saved = records.get("code") if isinstance(records, dict) else None
    if not saved and not code:
        return
    if saved and not code:
        raise UserError(f"{path.name} was trained with your model code ({saved.get('path')}); pass --model-code PATH")
    if not saved:
        raise UserError(f"{path.name} was trained with llamaforge's own model; drop --model-code to resume it, "
                        "or pass another --out")
    if saved.get("sha256") != code.get("sha256") and not allow_change:
        raise UserError(f"the model code changed since {path.name} was saved (sha256 {str(saved.get('sha256'))[:12]} -> "
                        f"{str(code.get('sha256'))[:12]}); restore it, or pass --allow-code-change to resume with the "
                        "new code")


def load_weights(path: Path, model) -> dict:
    """Restore the model's weights in place; returns state.json's content."""
    path = Path(path)
    if not is_builtin(model):  # a user's model: its own names, tied tensors resolved by safetensors
        try:
            missing, unexpected = load_into(model, str(path / "model.safetensors"), strict=False)
        except RuntimeError as e:
            raise ValueError(f"checkpoint {path} does not fit the model ({str(e).strip().splitlines()[-1][:200]})") from None
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not fit the model (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]})")
        return read_state(path)
    try:
        state = rename_legacy(load_file(str(path / "model.safetensors")), model.config.hidden_act == "silu")
        if model.config.tie_word_embeddings:  # a tied pair is stored once, under either name
            for a, b in (("model.embed_tokens.weight", "lm_head.weight"), ("lm_head.weight", "model.embed_tokens.weight")):
                if a not in state and b in state:
                    state[a] = state[b]
        missing, unexpected = model.load_state_dict(state, strict=False)  # earlier versions' names renamed
    except RuntimeError as e:  # a tensor of another shape
        raise ValueError(f"checkpoint {path} does not fit the model ({str(e).strip().splitlines()[-1][:200]})") from None
    tied = {k for k in missing if k.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"checkpoint {path} does not fit the model (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    return read_state(path)


def model_from_checkpoint(path: Path, code: ModelCode = BUILTIN):
    """The model saved in a checkpoint folder, built from the config its state.json holds (a user's
    model from their `code`, which must be the code it was trained with: runs.check_code)."""
    state = read_state(path)
    saved = state.get("records", {}).get("code") if isinstance(state.get("records"), dict) else None
    if saved and code.builtin:
        raise UserError(f"{path} was trained with your model code ({saved.get('path')}); pass --model-code PATH to load it")
    if code.builtin:
        fields = {k: v for k, v in state["model_config"].items() if k not in ("architectures", "auto_map", "model_type")}
        model = BUILTIN.build(BUILTIN.config_class(**fields))
    else:
        model = code.build(code.config_from_dict(state["model_config"]))
    load_weights(path, model)
    return model.eval()


class OptimizerMismatch(ValueError):
    """A good checkpoint whose optimizer state belongs to another optimizer setting."""


def param_names(model, optimizer) -> list[str]:
    """The parameter names in the optimizer's order (the order of torch's integer keys)."""
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def by_name(optim: dict, names: list[str]) -> dict:
    """torch's index-keyed optimizer state -> torch.distributed.checkpoint's name-keyed one."""
    ids = [i for g in optim["param_groups"] for i in g["params"]]
    if len(ids) != len(names):
        raise OptimizerMismatch(f"the optimizer state holds {len(ids)} parameters, the model {len(names)}")
    name = dict(zip(ids, names))
    return {"state": {name[i]: v for i, v in optim["state"].items()},
            "param_groups": [dict(g, params=[name[i] for i in g["params"]]) for g in optim["param_groups"]]}


def by_index(optim: dict, names: list[str]) -> dict:
    """The name-keyed optimizer state -> torch's index-keyed one, in this optimizer's order."""
    index = {n: i for i, n in enumerate(names)}
    saved = [n for g in optim["param_groups"] for n in g["params"]]
    if sorted(saved) != sorted(names):
        raise OptimizerMismatch("the optimizer state's parameters are not this model's")
    return {"state": {index[n]: v for n, v in optim["state"].items()},
            "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in optim["param_groups"]]}


def _name_keyed(optim: dict) -> bool:
    return any(isinstance(n, str) for g in optim.get("param_groups", []) for n in g["params"])


def load_training_state(path: Path, model, optimizer, sharded: bool = False) -> None:
    """Restore optimizer and RNG states, whatever wrapper and process count wrote them: the
    optimizer state is converted between torch's index keys and FSDP2's parameter names."""
    path = Path(path)
    # on the CPU first: a checkpoint written on GPU loads on a CPU-only machine, and every rank reads it
    # without landing on GPU 0; load_state_dict then moves each state to its parameter's device
    optim = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    saved_muon, muon = set(optim) == {"muon", "adamw"}, isinstance(optimizer, MuonWithAdamW)
    if saved_muon != muon:
        kinds = {True: "muon", False: "adamw"}
        raise OptimizerMismatch(f"{path.name} was trained with train.optimizer {kinds[saved_muon]}, this run asks for "
                                f"{kinds[muon]}")
    if muon:  # never sharded (Muon needs whole matrices): torch's own layout
        optimizer.load_state_dict(optim)
    elif sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        named = optim if _name_keyed(optim) else by_name(optim, param_names(model, optimizer))
        set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(by_index(optim, param_names(model, optimizer)) if _name_keyed(optim) else optim)
    rng = torch.load(path / "rng.pt", weights_only=True, map_location="cpu")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
