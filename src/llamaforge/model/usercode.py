"""A model the user wrote: import the code they named with `--model-code`, find its classes, build it.

The contract (docs/own-model.md): a folder holding `configuration_*.py` and
`modeling_*.py` (or one `.py` file holding both) with a `PretrainedConfig` subclass that accepts the
standard Llama field names and a `PreTrainedModel` subclass whose forward(input_ids, attention_mask,
position_ids) returns logits. Code runs only when the user names it: a model folder's `.py` files are
never imported otherwise. The classes are registered for the Auto classes, so `save_pretrained`
writes `auto_map` and copies the code next to the weights (transformers' own custom-model path).

`ModelCode` is also how llamaforge's own model is described (`BUILTIN`), so building, loading and
checking go through one path whichever model it is.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel

from ..errors import UserError
from .hf import LlamaForgeConfig, LlamaForgeForCausalLM

# The config fields llamaforge sets on a user's model (the standard Llama names): the contract.
LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings")
TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class ModelCode:
    """The two classes of a model and, for a user's code, where it came from and its sha256."""

    config_class: type
    model_class: type
    path: Path | None = None  # None: llamaforge's own model
    sha256: str | None = None
    files: tuple[str, ...] = field(default=())

    @property
    def builtin(self) -> bool:
        return self.path is None

    def record(self) -> dict | None:
        """What a checkpoint and the model card keep of the code (None for llamaforge's own)."""
        if self.builtin:
            return None
        return {"path": str(self.path), "sha256": self.sha256, "files": list(self.files),
                "class": self.model_class.__name__}

    def make_config(self, fields: dict):
        """The code's config from the standard field names (unknown to the class: refused in one line)."""
        try:
            return self.config_class(**fields)
        except TypeError as e:
            raise UserError(f"{self.config_class.__name__}({', '.join(fields)}) failed ({e}); its __init__ must accept "
                            "the standard Llama field names and **kwargs (docs/own-model.md)") from None

    def config_from_dict(self, d: dict):
        """A config stored by `to_dict` (a checkpoint's state.json)."""
        return self.config_class.from_dict({k: v for k, v in d.items() if k not in ("auto_map", "architectures")})

    def build(self, config, seed: int = 0) -> PreTrainedModel:
        """A freshly initialized model of `config` (deterministic for a seed)."""
        torch.manual_seed(seed)
        return self.model_class(config)

    def load_folder(self, path: Path, dtype: torch.dtype = torch.float32):
        """(model, loading info) from a Hugging Face folder this code's model was saved to."""
        return self.model_class.from_pretrained(path, dtype=dtype, output_loading_info=True)


BUILTIN = ModelCode(LlamaForgeConfig, LlamaForgeForCausalLM)


def load_code(path: str | Path | None, class_name: str | None = None) -> ModelCode:
    """The user's code at `path` (a folder or one .py file), or llamaforge's own model when None."""
    if path is None:
        if class_name:
            raise UserError("--model-class names a class of your own code; give the code with --model-code PATH")
        return BUILTIN
    path = Path(path).resolve()
    files = _code_files(path)
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    sha = digest.hexdigest()
    modules = _import(files, path if path.is_dir() else path.parent, sha)
    config_class, model_class = _find_classes(modules, class_name, path)
    for cls, auto in ((config_class, "AutoConfig"), (model_class, "AutoModelForCausalLM")):
        cls.register_for_auto_class(auto)  # save_pretrained writes auto_map and copies the code
    return ModelCode(config_class, model_class, path, sha, tuple(f.name for f in files))


def _code_files(path: Path) -> list[Path]:
    if not path.exists():
        raise UserError(f"--model-code {path} does not exist; give your model's folder or .py file")
    if path.is_file():
        if path.suffix != ".py":
            raise UserError(f"--model-code {path} is not a .py file; give your model's folder or .py file")
        return [path]
    files = sorted(p for p in path.glob("*.py") if p.name.startswith(("configuration_", "modeling_")))
    if not files:
        raise UserError(f"--model-code {path} holds no configuration_*.py or modeling_*.py; "
                        "put your config and model there (docs/own-model.md)")
    return files


def _import(files: list[Path], folder: Path, sha: str) -> list:
    """Import the files as modules of a package of their own (relative imports between them work)."""
    package = f"llamaforge_user_{sha[:12]}"
    if package not in sys.modules:
        spec = importlib.machinery.ModuleSpec(package, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        sys.modules[package] = importlib.util.module_from_spec(spec)
    modules = []
    for f in files:
        try:
            modules.append(importlib.import_module(f"{package}.{f.stem}"))
        except SyntaxError as e:
            raise UserError(f"{e.filename}:{e.lineno}: syntax error in your model code ({e.msg}); fix it") from None
        except Exception as e:  # noqa: BLE001 - whatever the user's module raises while importing
            raise UserError(f"{_where(e, folder)}: importing your model code raised {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}; fix it") from None
    return modules


def _where(e: BaseException, folder: Path) -> str:
    """FILE:LINE of the last frame inside the user's folder (else of the last frame)."""
    frames = traceback.extract_tb(e.__traceback__)
    mine = [f for f in frames if Path(f.filename).resolve().is_relative_to(folder)]
    frame = (mine or frames)[-1]
    return f"{frame.filename}:{frame.lineno}"


def _defined(modules: list, base: type) -> list[type]:
    names = {m.__name__ for m in modules}
    found = {}
    for m in modules:
        for _, obj in inspect.getmembers(m, inspect.isclass):
            if issubclass(obj, base) and obj.__module__ in names:
                found[obj.__qualname__] = obj
    return list(found.values())


def _find_classes(modules: list, class_name: str | None, path: Path) -> tuple[type, type]:
    """The causal-LM class (by --model-class, else the one that generates or is named *ForCausalLM,
    else the only model no other builds on) and its config class."""
    models = _defined(modules, PreTrainedModel)
    if class_name:
        chosen = [m for m in models if m.__name__ == class_name]
        if not chosen:
            raise UserError(f"--model-class {class_name} is not a PreTrainedModel in {path}; "
                            f"choose one of: {', '.join(m.__name__ for m in models) or '(none defined)'}")
    else:
        chosen = [m for m in models if issubclass(m, GenerationMixin) or m.__name__.endswith("ForCausalLM")]
        if not chosen:
            chosen = [m for m in models if not any(o is not m and issubclass(o, m) for o in models)]
    if not chosen:
        raise UserError(f"{path} defines no PreTrainedModel subclass; write your model as one "
                        "(docs/own-model.md)")
    if len(chosen) > 1:
        raise UserError(f"{path} defines several models ({', '.join(m.__name__ for m in chosen)}); "
                        "name one with --model-class NAME")
    model_class = chosen[0]
    configs = _defined(modules, PretrainedConfig)
    config_class = getattr(model_class, "config_class", None)
    if config_class not in configs:
        if len(configs) != 1:
            raise UserError(f"cannot tell which config class {model_class.__name__} uses (found "
                            f"{', '.join(c.__name__ for c in configs) or 'none'}); set config_class = YourConfig "
                            "on the model class")
        config_class = configs[0]
    return config_class, model_class

