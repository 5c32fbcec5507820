"""THE run-directory layout: the one module that knows where things live in RUN_DIR.

    RUN_DIR/
      config.yaml                 the run's configuration (written once it has been checked)
      metrics.jsonl               one JSON record per line: train / eval / sample / event
      tokenizer/                  the tokenizer, so checkpoints load on their own
      checkpoints/step_N/         model.safetensors, optimizer.pt, rng.pt, state.json (train/checkpoint.py)
      final/                      the Hugging Face folder of the finished run (model/io.py)
      positions.json              `extend` only: loss by position, the long-context evidence

Also here: what a run was trained from (`RunRecord`, stored in every checkpoint and in the model
card), reading metrics back, a run's final numbers, and resolving a `--model` argument (a model
folder, a run directory or a checkpoint) to where its weights and tokenizer are.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import UserError
from .fsutil import atomic_write_bytes, check_path, recover

CONFIG, METRICS, TOKENIZER, CHECKPOINTS, FINAL, POSITIONS, STATE, LOCK = (
    "config.yaml", "metrics.jsonl", "tokenizer", "checkpoints", "final", "positions.json", "state.json", ".lock")


def config_path(run: Path) -> Path:
    return Path(run) / CONFIG


def metrics_path(run: Path) -> Path:
    return Path(run) / METRICS


def tokenizer_dir(run: Path) -> Path:
    return Path(run) / TOKENIZER


def checkpoints_dir(run: Path) -> Path:
    return Path(run) / CHECKPOINTS


def checkpoint_dir(run: Path, step: int) -> Path:
    return checkpoints_dir(run) / f"step_{step}"


def final_dir(run: Path) -> Path:
    return Path(run) / FINAL


def positions_path(run: Path) -> Path:
    return Path(run) / POSITIONS


def is_run_dir(path: Path) -> bool:
    """A run directory llamaforge wrote (or began to write)."""
    return any((Path(path) / name).exists() for name in (CONFIG, METRICS, CHECKPOINTS, LOCK))


def check_run_dir(path: Path) -> None:
    """Refuse, before anything is written, an --out that holds files of someone else's."""
    path = Path(path)
    check_path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not a run directory; it was left untouched: pass another --out")
    if path.is_dir() and any(path.iterdir()) and not is_run_dir(path):
        raise UserError(f"{path} holds files that llamaforge did not write (no {CONFIG}, {METRICS} or {CHECKPOINTS}/); "
                        "it was left untouched: pass another --out")


@contextmanager
def locked(lock_file: Path, what: Path) -> Iterator[None]:
    """Hold an OS file lock (filelock; flock on Linux) on `lock_file` while `what` is in use: it dies
    with its process, so a SIGKILL never leaves a stale lock. A second process is refused at once,
    with the holder's PID (kept in LOCK_FILE.pid)."""
    lock_file = Path(lock_file)
    owner = lock_file.with_name(lock_file.name + ".pid")
    lock = FileLock(str(lock_file), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            pid = owner.read_text().strip() or "?"
        except OSError:
            pid = "?"
        raise UserError(f"{what} is in use by another llamaforge process (PID {pid}); wait for it to finish "
                        f"or stop it, or pass another --out") from None
    try:
        owner.write_text(str(os.getpid()))
        yield
    finally:
        lock.release()


@contextmanager
def lock_run(run: Path) -> Iterator[None]:
    """Create RUN_DIR if needed and hold its lock (RUN_DIR/.lock). A run refused before it wrote
    anything leaves no trace: a folder this call created that holds only the lock files is removed."""
    run = Path(run)
    try:  # exclusively: only the process that made the folder may remove it (another may hold it)
        run.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
    with locked(run / LOCK, run):
        try:
            yield
        except BaseException:  # removed while the lock is held: no other process can be using it
            if created and {p.name for p in run.iterdir()} <= {LOCK, LOCK + ".pid"}:
                shutil.rmtree(run, ignore_errors=True)
            raise


def checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints (their state.json written last), oldest first."""
    found = [p for p in checkpoints_dir(run).glob("step_*") if p.is_dir() and (p / STATE).exists()
             and p.name.split("_", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def read_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / STATE).read_text())


def latest_state(run: Path) -> dict:
    found = checkpoints(run)
    return read_state(found[-1]) if found else {}


def parse_metrics(text: str) -> list[dict]:
    """Records of metrics.jsonl; a damaged line (a partial last line after a power cut) is skipped."""
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "type" in record:
            out.append(record)
    return out


def read_metrics(run: Path) -> list[dict]:
    path = metrics_path(run)
    return parse_metrics(path.read_text(errors="replace")) if path.exists() else []


@dataclass
class RunRecord:
    """What a run was trained from: kept in each checkpoint's state.json and in the model card."""

    tokenizer: str | None = None  # the tokenizer's name, when the run chose it (pretrain, extend)
    data: dict | None = None  # source, dir, train_tokens
    extend: dict | None = None  # from, trained_len, seq_len, factor
    sft: dict | None = None  # from, data, train/val conversations, skipped
    previous_card: dict = field(default_factory=dict)  # the card of the model this run started from
    code: dict | None = None  # a user's model code: path, sha256, files, class (model/usercode.py)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> RunRecord:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def run_summary(run: Path) -> dict:
    """Final numbers of a run, from its metrics (used by the model card and the report)."""
    records = read_metrics(run)
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    out = {"steps": train[-1]["step"] if train else 0, "tokens_seen": train[-1]["tokens_seen"] if train else 0}
    if train:
        tail = train[-min(10, len(train)) :]
        out["train_loss"] = sum(r["loss"] for r in tail) / len(tail)  # last 10 steps: less noise
        out["wall_s"] = train[-1]["time"] - train[0]["time"] + train[0]["step_s"]
        out["tokens_per_s"] = sum(r["tokens_per_s"] for r in tail) / len(tail)
    if evals:
        out.update(val_loss=evals[-1]["val_loss"], val_bpb=evals[-1].get("val_bpb"))
    samples = [r for r in records if r["type"] == "sample"]
    out["samples"] = [(r["step"], r["prompt"], r["text"]) for r in samples[-3:]]
    return out


def recipe(run: Path) -> str:
    """The optimizer and schedule a run used, from its start event."""
    for r in read_metrics(run):
        if r.get("event") == "started" and r.get("recipe"):
            return r["recipe"]
    return "unknown"


def hardware(run: Path) -> str:
    """'WORLD x DEVICE (PRECISION)' from the run's start event."""
    for r in read_metrics(run):
        if r.get("event") == "started":
            why = f"; {r['precision_reason']}" if r.get("precision_reason") else ""
            return f"{r.get('world', 1)} x {r.get('device', '?')} ({r.get('precision', '?')}{why})"
    return "unknown"


@dataclass
class ModelRef:
    """Where a `--model` argument's weights are: a Hugging Face folder or a training checkpoint."""

    kind: str  # "folder" | "checkpoint"
    path: Path
    tokenizer: Path  # the folder holding its tokenizer files


def resolve_model(path: str | Path) -> ModelRef:
    """A model folder, a run directory (its final/, else its latest checkpoint) or a checkpoint folder."""
    path = Path(path)
    for folder in (path, final_dir(path)):  # a replacement killed between its renames: the old folder back
        if folder.parent.exists():
            recover(folder)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a model folder, run directory or checkpoint")
    if (path / "config.json").exists():
        return ModelRef("folder", path, path)
    if (final_dir(path) / "config.json").exists():
        return ModelRef("folder", final_dir(path), final_dir(path))
    if not (path / STATE).exists():
        found = checkpoints(path)
        if not found:
            raise UserError(f"{path} is not a model folder, run directory or checkpoint; pass one of those")
        path = found[-1]
    return ModelRef("checkpoint", path, tokenizer_dir(path.parent.parent))


def copy_metrics(source_run: Path, run_dir: Path, step: int) -> None:
    """The source run's metrics up to `step`, as the start of this run's metrics.jsonl."""
    kept = [json.dumps(r) + "\n" for r in read_metrics(source_run) if r.get("step", 0) <= step]
    if kept:
        atomic_write_bytes(metrics_path(run_dir), "".join(kept).encode())
