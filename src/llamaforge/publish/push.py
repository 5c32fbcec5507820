"""Upload a model folder to the Hugging Face Hub as it is, with huggingface_hub.

The token comes from $HF_TOKEN or the user's `hf auth login`. A missing token, an unreachable Hub
or a refused upload is one line naming which; nothing is reported done unless the commit landed.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError

from ..errors import UserError


def check_target(repo: str, token: str | None = None) -> str:
    """Refuse a bad repo name or a missing token before any work; returns the token."""
    if "/" not in repo or repo.count("/") != 1:
        raise UserError(f"--repo {repo!r} must be NAMESPACE/NAME, e.g. your-user/llama-150m")
    token = token or get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again")
    return token


def upload(folder: str | Path, repo: str, token: str, private: bool = False, revision: str | None = None,
           name: str = "model") -> str:
    """Upload `folder` as it is; returns the URL of the commit."""
    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, revision=revision,
                                 commit_message=f"Upload {name} with llamaforge")
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
