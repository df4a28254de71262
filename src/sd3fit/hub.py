"""Where the base model comes from: a local diffusers folder or a Hugging Face Hub id, checked before training.

SD3 Medium is gated on the Hub: without an accepted licence and a token, SimpleTuner fails minutes into a run with
a long traceback. `check_model` asks the Hub first (one small request) and turns each failure into one line that
says what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from sd3fit.errors import UserError

_TRUE = ("1", "true", "yes", "on")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") != 1 or Path(name).expanduser().exists()


def check_local(path: Path) -> None:
    if not path.is_dir():
        raise UserError(f"model folder not found: {path}; give a Hub id (org/name) or a local diffusers folder")
    if not (path / "model_index.json").is_file():
        raise UserError(
            f"{path} is not a diffusers pipeline folder (no model_index.json); point pretrained_model_name_or_path "
            "at a folder written by save_pretrained or snapshot_download"
        )


def _gated_message(repo_id: str, has_token: bool) -> str:
    page = f"https://huggingface.co/{repo_id}"
    if has_token:
        return (
            f"model {repo_id} is gated and your Hugging Face token has no access yet: accept its licence at {page} "
            "with the account the token belongs to, then run again"
        )
    return (
        f"model {repo_id} is gated and no Hugging Face token is set: accept its licence at {page}, then log in "
        "with `hf auth login` (or set HF_TOKEN) and run again"
    )


def check_hub(repo_id: str) -> str:
    """Check that the Hub id can be downloaded with the current token; return 'cached' or 'hub'."""
    from huggingface_hub import auth_check, get_token, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    cached = isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)
    if _offline():
        if cached:
            return "cached"
        raise UserError(
            f"model {repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            "unset HF_HUB_OFFLINE to download it, or pass a local diffusers folder"
        )
    token = get_token()
    try:
        auth_check(repo_id, token=token)
    except GatedRepoError:
        raise UserError(_gated_message(repo_id, token is not None)) from None
    except RepositoryNotFoundError:
        hint = "check the id" if token else "check the id, or log in with `hf auth login` if it is private"
        raise UserError(f"model {repo_id} was not found on the Hugging Face Hub: {hint}") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        raise UserError(f"the Hugging Face Hub refused access to {repo_id} (HTTP {status}); check your token with `hf auth whoami`") from None
    except Exception as exc:  # network errors come from httpx or requests depending on the hub version
        if cached:
            return "cached"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"cannot reach the Hugging Face Hub to get {repo_id} ({reason}); check the network, "
            "or download the model where you can and pass its folder as pretrained_model_name_or_path"
        ) from None
    return "hub"


def check_model(name_or_path: str) -> str:
    """Return 'local', 'cached' or 'hub'; raise a one-line UserError when the model cannot be used."""
    if looks_like_path(name_or_path):
        check_local(Path(name_or_path).expanduser())
        return "local"
    return check_hub(name_or_path)
