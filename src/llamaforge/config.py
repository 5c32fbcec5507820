"""Configuration as dataclasses: model presets here, YAML files in configs/, `--key value` overrides.

OmegaConf merges a dataclass schema, a YAML file and dotted overrides with type checking, so no
hand-written parser lives here. A preset is the name of a YAML file in `configs/`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class ModelConfig:
    """Field names of transformers' LlamaConfig (see hf/configuration_llamaforge.py)."""

    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    # architecture switches: LLaMA by default; GPT-2 = gelu_new, layernorm, learned, biases on
    hidden_act: str = "silu"
    norm_type: str = "rmsnorm"
    position_embedding_type: str = "rope"
    attention_bias: bool = False
    mlp_bias: bool = False


@dataclass
class TrainConfig:
    seq_len: int = 256
    batch_tokens: int = 16384  # tokens per optimizer step (all ranks, all micro-batches)
    micro_batch: int = 8  # sequences per forward pass on one rank
    max_steps: int = 300
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of lr
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_tokens: int = 65536
    save_every: int = 100
    keep_last: int = 2
    seed: int = 1337
    compile: bool = False
    activation_checkpointing: bool = False
    fsdp: bool = False
    max_bad_steps: int = 5  # NaN/inf steps in a row before aborting
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
            if not Path(file).exists():
                raise UserError(f"config file {file} does not exist; pass an existing YAML file")
            layers.append(OmegaConf.load(file))
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
    except OmegaConfBaseException as e:
        raise UserError(f"bad configuration: {str(e).splitlines()[0]}; check the key names and types") from None
    cfg: RunConfig = OmegaConf.to_object(merged)
    validate_model(cfg.model)
    return cfg


def validate_model(m: ModelConfig) -> None:
    """The model config class itself checks consistency; its ValueError becomes a one-line UserError."""
    from .hf.configuration_llamaforge import LlamaForgeConfig

    try:
        LlamaForgeConfig(**model_kwargs(m))
    except ValueError as e:
        raise UserError(str(e)) from None


def save_config(cfg: RunConfig, path: Path) -> None:
    from .cache import atomic_write_bytes

    atomic_write_bytes(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)).encode())


def model_kwargs(m: ModelConfig) -> dict:
    return asdict(m)
