"""`llamaforge push`: upload a model folder to the Hugging Face Hub as it is, with huggingface_hub.

The token comes from $HF_TOKEN or the user's `hf auth login`. A missing token, an unreachable Hub
or a refused upload is one line naming which; nothing is reported done unless the commit landed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .errors import UserError


def push(model_dir: str | Path, repo: str, private: bool = False, revision: str | None = None,
         fmt: str = "llamaforge", token: str | None = None) -> str:
    """Upload; returns the URL of the commit. `fmt="llama"` uploads the stock Llama export instead."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise UserError(f"{model_dir} is not a model folder (no config.json); push the final/ folder of a run")
    if "/" not in repo or repo.count("/") != 1:
        raise UserError(f"--repo {repo!r} must be NAMESPACE/NAME, e.g. your-user/llama-150m")
    token = token or get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_dir
        if fmt == "llama":
            from .card import model_records, read_records
            from .models import export, load_any

            model, tok_dir = load_any(model_dir)
            previous = read_records(model_dir) or {}
            folder = Path(tmp) / "llama"
            export(model, str(tok_dir), str(folder), "llama",
                   model_records(model, previous.get("tokenizer", "see tokenizer files"), previous=previous))
        try:
            api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
            if revision:
                api.create_branch(repo, branch=revision, exist_ok=True)
            info = api.upload_folder(folder_path=str(folder), repo_id=repo, revision=revision,
                                     commit_message=f"Upload {model_dir.name} with llamaforge")
        except HfHubHTTPError as e:
            status = getattr(e.response, "status_code", "?")
            raise UserError(f"the Hub refused the upload (HTTP {status}: {str(e).splitlines()[0][:200]}); "
                            "check the token's write permission and the repo name") from None
        except (OSError, ConnectionError) as e:  # requests/httpx connection errors derive from these
            raise UserError(f"cannot reach the Hugging Face Hub ({type(e).__name__}); check the network, nothing "
                            "was uploaded") from None
        except Exception as e:
            if "connect" in type(e).__name__.lower() or "timeout" in type(e).__name__.lower():
                raise UserError(f"cannot reach the Hugging Face Hub ({type(e).__name__}); check the network, "
                                "nothing was uploaded") from None
            raise
    return str(getattr(info, "commit_url", info))
