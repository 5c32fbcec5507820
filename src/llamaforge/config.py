"""Configuration as dataclasses: model presets here, YAML files in configs/, `--key value` overrides.

OmegaConf merges a dataclass schema, a YAML file and dotted overrides with type checking, so no
hand-written parser lives here. A preset is the name of a YAML file in `configs/`.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import asdict, dataclass, field, make_dataclass
from pathlib import Path
from typing import Optional

import yaml
from omegaconf import DictConfig, OmegaConf
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
    micro_batch: Optional[int] = None  # sequences per forward pass on one rank; None: derived (micro_batch_for)
    max_steps: int = 300
    optimizer: str = "adamw"  # adamw | muon (Muon for the blocks' matrices, AdamW for the rest: train/optim.py)
    lr: float = 3e-3  # AdamW's peak LR (with muon: for embeddings, head, norms)
    muon_lr: float = 0.02  # Muon's peak LR (Keller Jordan's "original" scaling)
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    muon_ns_dtype: str = "auto"  # Newton-Schulz in: auto (bf16 where the hardware has fast bf16, else fp32) | bf16 | fp32
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay)
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
    max_bad_steps: int = 5  # NaN/inf steps in a row before aborting
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
            layers.append(loaded)
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg: RunConfig = OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ValueError) as e:
        raise UserError(f"bad configuration: {str(e).splitlines()[0]}; check the key names and types") from None
    validate_model(cfg.model)
    validate_train(cfg.train)
    return cfg


# train fields that must be > 0, and those that must be >= 0 (0 = off)
_POSITIVE = ("seq_len", "batch_tokens", "max_steps", "lr", "muon_lr", "eval_tokens", "keep_last", "max_bad_steps")
_NON_NEGATIVE = ("min_lr_ratio", "warmup_steps", "weight_decay", "muon_weight_decay", "grad_clip", "eval_every",
                 "save_every", "eval_tasks_every")
_CHOICES = {"precision": ("auto", "fp32", "bf16", "fp16"), "optimizer": ("adamw", "muon"),
            "muon_ns_dtype": ("auto", "bf16", "fp32"), "schedule": ("cosine", "wsd"),
            "decay_shape": ("linear", "1-sqrt"), "compile": ("auto", "true", "false"),
            "compile_loss": ("auto", "true", "false")}
MICRO_TOKENS = 8192  # the derived micro-batch holds at most this many tokens (a memory cap)


def micro_batch_for(t: TrainConfig, world: int = 1) -> int:
    """train.micro_batch, or when not given the largest number of sequences that divides one
    process's share of the step and holds at most MICRO_TOKENS tokens (at least 1)."""
    if t.micro_batch is not None:
        return t.micro_batch
    per_rank = max(1, t.batch_tokens // (t.seq_len * world))
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


def validate_train(t: TrainConfig) -> None:
    """Numbers that cannot run are refused here, before any work (not as a ZeroDivisionError later)."""
    for name in _POSITIVE:
        if not getattr(t, name) > 0:
            raise UserError(f"train.{name} is {getattr(t, name)}; it must be positive")
    for name in _NON_NEGATIVE:
        if not getattr(t, name) >= 0:
            raise UserError(f"train.{name} is {getattr(t, name)}; it must be 0 or more")
    if t.micro_batch is not None and t.micro_batch <= 0:
        raise UserError(f"train.micro_batch is {t.micro_batch}; it must be positive (or leave it out to derive it)")
    for name in ("compile", "compile_loss"):  # YAML's true/false arrive as True/False
        setattr(t, name, str(getattr(t, name)).lower())
    for name, choices in _CHOICES.items():
        if getattr(t, name) not in choices:
            raise UserError(f"train.{name} {getattr(t, name)!r} is not one of {', '.join(choices)}")
    if not 0 < t.decay_fraction <= 1:
        raise UserError(f"train.decay_fraction is {t.decay_fraction}; it must be in (0, 1]")
    if not 0 <= t.muon_momentum < 1:
        raise UserError(f"train.muon_momentum is {t.muon_momentum}; it must be in [0, 1)")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(t, name) < 1:
            raise UserError(f"train.{name} is {getattr(t, name)}; it must be in [0, 1)")
    parse_duration(t.time_limit)


def validate_model(m: ModelConfig) -> None:
    """The model config class itself checks consistency; its ValueError becomes a one-line UserError."""
    try:
        LlamaForgeConfig(**model_kwargs(m))
    except ValueError as e:
        raise UserError(str(e)) from None


def save_config(cfg: RunConfig, path: Path) -> None:
    atomic_write_bytes(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)).encode())


def model_kwargs(m: ModelConfig) -> dict:
    return asdict(m)
