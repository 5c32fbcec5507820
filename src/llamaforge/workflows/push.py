"""`llamaforge push`: upload a model folder to the Hugging Face Hub (publish/push.py), as it is or
as its stock Llama export."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import UserError
from ..publish.push import check_target, upload
from ..model.usercode import BUILTIN, ModelCode
from .export import export_model


def push(model_dir: str | Path, repo: str, private: bool = False, revision: str | None = None,
         fmt: str = "llamaforge", token: str | None = None, code: ModelCode = BUILTIN) -> str:
    """Upload; returns the URL of the commit. `fmt="llama"` uploads the stock Llama export instead."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise UserError(f"{model_dir} is not a model folder (no config.json); push the final/ folder of a run")
    token = check_target(repo, token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_dir
        if fmt == "llama":
            folder = export_model(model_dir, Path(tmp) / "llama", "llama", code=code)
        return upload(folder, repo, token, private=private, revision=revision, name=model_dir.name)
