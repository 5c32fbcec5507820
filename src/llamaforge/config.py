"""Configuration as dataclasses (the schema), presets as YAML files in configs/, `--key value` overrides.

OmegaConf merges the dataclass schema, a YAML file (a preset is the name of one in `configs/`) and
dotted overrides with type checking, so no hand-written parser lives here. Where each default comes
from: the schema's train defaults are AdamW + cosine (what a YAML file without `optimizer` /
`schedule` gets, and the gpt2, extend and sft presets); the `tiny` and `llama-150m` presets set the
default recipe, Muon + WSD.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import asdict, dataclass, field, make_dataclass
from pathlib import Path
from typing import Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import UserError
from .fsutil import atomic_write_bytes
from .model.hf.configuration_llamaforge import LlamaForgeConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


# The model section IS the Hugging Face config's fields, with its defaults: one set of defaults, kept
# in model/hf/configuration_llamaforge.py. (Token ids, use_cache and rope scaling are set by the
# tokenizer and by `extend`, not by a preset.)
_HF_DEFAULTS = {k: p.default for k, p in inspect.signature(LlamaForgeConfig.__init__).parameters.items()}
_MODEL_FIELDS = [("vocab_size", int), ("hidden_size", int), ("intermediate_size", int), ("num_hidden_layers", int),
                 ("num_attention_heads", int), ("num_key_value_heads", Optional[int]), ("max_position_embeddings", int),
                 ("rope_theta", float), ("rms_norm_eps", float), ("tie_word_embeddings", bool),
                 ("initializer_range", float), ("hidden_act", str), ("norm_type", str),
                 ("position_embedding_type", str), ("attention_bias", bool), ("mlp_bias", bool)]
ModelConfig = make_dataclass("ModelConfig", [(n, t, field(default=_HF_DEFAULTS[n])) for n, t in _MODEL_FIELDS])
ModelConfig.__doc__ = "The `model:` section: LlamaForgeConfig's own field names and defaults (LLaMA unless switched to GPT-2)."


@dataclass
class TrainConfig:
    seq_len: int = 256
    batch_tokens: int = 16384  # tokens per optimizer step (all ranks, all micro-batches)
    micro_batch: Optional[str] = None  # sequences per forward on one rank: N | auto (the largest that fits:
    # out-of-memory halves it, train/step.py) | null (derived: micro_batch_for)
    max_steps: int = 300
    optimizer: str = "adamw"  # a name in train/optim.py's OPTIMIZERS: adamw | muon (Muon for the blocks' matrices)
    lr: float = 3e-3  # AdamW's peak LR (with muon: for embeddings, head, norms)
    muon_lr: float = 0.02  # Muon's peak LR (Keller Jordan's "original" scaling)
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    muon_ns_dtype: str = "auto"  # Newton-Schulz in: auto (bf16 where the hardware has fast bf16, else fp32) | bf16 | fp32
    schedule: str = "cosine"  # a name in train/schedules.py's SCHEDULES: cosine | wsd (warmup-stable-decay)
    min_lr_ratio: float = 0.1  # the schedule ends at this fraction of the peak LR
    decay_fraction: float = 0.2  # wsd: the last fraction of the steps that decays
    decay_shape: str = "linear"  # wsd: linear | 1-sqrt
    warmup_steps: int = 30
    resume_from: Optional[str] = None  # a checkpoints/step_N folder to continue from in a new run directory
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_tasks: Optional[str] = None  # lm-eval tasks scored during training, e.g. capability (eval/tasks.py)
    eval_tasks_every: int = 0  # steps between those scorings; 0: with every eval_every
    eval_tasks_limit: Optional[int] = 100  # items per task (the first N of each task's fixed order); null: all
    eval_tokens: int = 65536
    save_every: int = 100
    keep_last: int = 2
    seed: int = 1337
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (train/precision.py: chosen from the hardware)
    compile: str = "auto"  # auto | true | false: torch.compile the blocks (auto: where it pays, train/compiling.py)
    compile_loss: str = "auto"  # auto | true | false: compile the fused head + loss's chunks (auto: in bf16 on CPUs, train/compiling.py)
    activation_checkpointing: bool = False
    fsdp: bool = False
    time_limit: Optional[str] = None  # e.g. 11h30m: stop with a checkpoint before a session's hard limit (exit 75)
    max_bad_steps: int = 5  # bad steps (NaN/inf, or a loss spike) in a row: the run has diverged (train/divergence.py)
    spike_factor: float = 3.0  # a loss above this x the median of the last 50 good ones is a bad step; 0: off
    on_divergence: str = "stop"  # stop (exit 2, naming the last healthy checkpoint) | rollback (to it, LR halved)
    allow_code_change: bool = False  # resume a run of your own model code although the code changed (--allow-code-change)
    sample_prompt: str = "The meaning of life is"
    tensorboard: Optional[bool] = None  # None: when installed; true: required (llamaforge[tensorboard]); false: off
    wandb: bool = False  # true requires llamaforge[wandb]
    wandb_project: str = "llamaforge"


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tokenizer: str = "mistral"


def _lists_as_text(layer: DictConfig) -> DictConfig:
    """train.eval_tasks given as a list (YAML, or `--train.eval_tasks '[a,b]'`) -> "a,b"."""
    tasks = OmegaConf.select(layer, "train.eval_tasks", default=None)
    if isinstance(tasks, ListConfig):
        layer.train.eval_tasks = ",".join(str(t) for t in tasks)
    return layer


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(preset: str | None = None, file: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Schema defaults <- preset or YAML file <- `key=value` overrides (e.g. `train.lr=1e-3`)."""
    if preset and file:
        raise UserError("give --preset or --config, not both")
    schema = OmegaConf.structured(RunConfig)
    layers = [schema]
    if preset:
        path = CONFIG_DIR / f"{preset}.yaml"
        if not path.exists():
            raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(preset_names())}")
        file = path
    try:
        if file:
            if not Path(file).is_file():
                raise UserError(f"config file {file} does not exist or is not a file; pass an existing YAML file")
            try:
                loaded = OmegaConf.load(file)
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise UserError(f"config file {file} is not valid YAML ({str(e).splitlines()[0]}); fix it") from None
            if not isinstance(loaded, DictConfig):
                raise UserError(f"config file {file} is not a mapping of sections (model:, train:); fix it")
            layers.append(_lists_as_text(loaded))
        layers.append(_lists_as_text(OmegaConf.from_dotlist(list(overrides))))
        merged = OmegaConf.merge(*layers)
        cfg: RunConfig = OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ValueError) as e:
        raise UserError(f"bad configuration: {str(e).splitlines()[0]}; check the key names and types") from None
    validate_model(cfg.model)
    validate_train(cfg.train)
    return cfg


# THE ranges of the train section's numbers: (low, high, low included). Every number is also finite.
# A value outside is refused before any work, in one line naming the range (docs/guarantees.md).
_BIG = 2**62
RANGES = {
    "seq_len": (1, 1 << 20, True), "batch_tokens": (1, _BIG, True), "max_steps": (1, _BIG, True),
    "micro_batch": (1, 1 << 20, True), "lr": (0, 10, False), "muon_lr": (0, 10, False), "min_lr_ratio": (0, 1, True),
    "warmup_steps": (0, _BIG, True), "weight_decay": (0, 10, True), "muon_weight_decay": (0, 10, True),
    "muon_momentum": (0, 0.9999, True), "beta1": (0, 0.9999, True), "beta2": (0, 0.99999, True),
    "grad_clip": (0, 1e6, True), "decay_fraction": (0, 1, False), "eval_every": (0, _BIG, True),
    "eval_tasks_every": (0, _BIG, True), "eval_tokens": (1, _BIG, True), "save_every": (0, _BIG, True),
    "keep_last": (1, 1 << 20, True), "seed": (0, 2**63 - 1, True), "max_bad_steps": (1, 1 << 20, True),
    "spike_factor": (0, 1e6, True),
}
# (optimizer and schedule names belong to their registries, train/optim.py and train/schedules.py:
# checked there, by train/checks.check_runnable, before any work)
_CHOICES = {"precision": ("auto", "fp32", "bf16", "fp16"), "on_divergence": ("stop", "rollback"),
            "muon_ns_dtype": ("auto", "bf16", "fp32"), "compile": ("auto", "true", "false"),
            "compile_loss": ("auto", "true", "false")}
MICRO_TOKENS = 8192  # the derived micro-batch holds at most this many tokens (a memory cap)


def micro_batch_for(t: TrainConfig, world: int = 1) -> int:
    """train.micro_batch; `auto`: one process's whole share of the step (halved on out-of-memory while
    training); when not given, the largest number of sequences that divides one process's share of
    the step and holds at most MICRO_TOKENS tokens (at least 1)."""
    per_rank = max(1, t.batch_tokens // (t.seq_len * world))
    if t.micro_batch == "auto":
        return per_rank
    if t.micro_batch is not None:
        return int(t.micro_batch)
    cap = max(1, MICRO_TOKENS // t.seq_len)
    return max(m for m in range(1, min(per_rank, cap) + 1) if per_rank % m == 0)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([hms])")


def parse_duration(text: str | None) -> float | None:
    """'11h30m', '90m', '45s', '1.5h' or a number of seconds -> seconds; None stays None."""
    if text is None:
        return None
    s = str(text).strip().replace(" ", "")
    try:
        seconds = float(s)
    except ValueError:
        parts = _DURATION.findall(s)
        if not parts or "".join(n + u for n, u in parts) != s:
            raise UserError(f"train.time_limit {text!r} is not a duration; write it like 11h30m, 90m, 45s or 3600") from None
        seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if not 0 < seconds < float("inf"):
        raise UserError(f"train.time_limit {text!r} must be a positive, finite duration")
    return seconds


def check_range(label: str, value, low: float, high: float, closed: bool = True) -> None:
    """THE number check: finite and in [low, high] ((low, high] when not `closed`), else one line."""
    try:
        ok = math.isfinite(value) and (low <= value if closed else low < value) and value <= high
    except TypeError:
        ok = False
    if not ok:
        raise UserError(f"{label} is {value}; it must be a finite number in {'[' if closed else '('}{low:g}, {high:g}]")


def validate_train(t: TrainConfig) -> None:
    """Numbers that cannot run are refused here, before any work (not as a ZeroDivisionError later)."""
    if t.micro_batch is not None and str(t.micro_batch).strip().lower() == "auto":
        t.micro_batch = "auto"
    elif t.micro_batch is not None:
        try:
            t.micro_batch = int(str(t.micro_batch))
        except ValueError:
            raise UserError(f"train.micro_batch is {t.micro_batch!r}; give a number of sequences, auto, or null") from None
    for name, (low, high, closed) in RANGES.items():
        if getattr(t, name) not in (None, "auto"):  # micro_batch None: derived; auto: found while training
            check_range(f"train.{name}", getattr(t, name), low, high, closed)
    if 0 < t.spike_factor < 1.5:
        raise UserError(f"train.spike_factor is {t.spike_factor}; use 0 (off) or at least 1.5 (a spike is above it x "
                        "the recent median loss)")
    for name in ("compile", "compile_loss"):  # YAML's true/false arrive as True/False
        setattr(t, name, str(getattr(t, name)).lower())
    for name, choices in _CHOICES.items():
        if getattr(t, name) not in choices:
            raise UserError(f"train.{name} {getattr(t, name)!r} is not one of {', '.join(choices)}")
    if t.on_divergence == "rollback" and t.fsdp:
        raise UserError("train.on_divergence rollback reloads the whole model, which FSDP2 shards; use it under one "
                        "process or DDP (--train.fsdp false), or keep on_divergence stop")
    parse_duration(t.time_limit)


def validate_model(m: ModelConfig) -> None:
    """Finite sizes and numbers, then the model config class's own consistency checks (its ValueError
    becomes a one-line UserError)."""
    for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
        value = getattr(m, name)
        if not (math.isfinite(value) and 0 < value <= 1e9):
            raise UserError(f"model.{name} is {value}; it must be a finite, positive number")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings"):
        if not 0 < getattr(m, name) <= 1 << 24:
            raise UserError(f"model.{name} is {getattr(m, name)}; it must be in [1, {1 << 24:,}]")
    try:
        LlamaForgeConfig(**model_kwargs(m))
    except ValueError as e:
        raise UserError(str(e)) from None


def save_config(cfg: RunConfig, path: Path) -> None:
    atomic_write_bytes(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)).encode())


def model_kwargs(m: ModelConfig) -> dict:
    return asdict(m)
