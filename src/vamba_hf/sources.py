"""Where a model or checkpoint named on the command line lives: a local folder, the Hub cache, or the Hub.

An existing local path is never taken for a Hub id, a path-like name that does not exist is reported as a missing
folder, and a Hub id is looked up in the local cache first and then with one short request, so that an unknown
name or a machine without network fails in seconds with one line (transformers' own downloads retry for a minute).
Imports nothing heavy: the CLI uses it before torch is loaded.
"""

import re
from pathlib import Path
from typing import Optional

HUB_TIMEOUT_S = 10
HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def looks_like_a_path(name: str) -> bool:
    """Hub names have at most one "/" and never start with ".", "/" or "~"."""
    return name.startswith((".", "/", "~")) or not HUB_NAME.match(name)


def cached_snapshot(repo_id: str) -> Optional[str]:
    """The repo's folder in the local Hub cache, or None when it was never downloaded."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # huggingface_hub raises several types for "not in the cache"; each means: look online
        return None


def check_hub_repo(repo_id: str, option: str) -> None:
    """One request with a short timeout: the repo exists and can be read, or a one-line `ValueError` says why not.
    `option` names what the user typed it as (e.g. "--model")."""
    from huggingface_hub import HfApi, constants

    from .errors import hub_error_message

    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"{option} {repo_id}: no local folder of that name, and the Hub repo is not in the local "
                         f"cache while HF_HUB_OFFLINE is set. Download it first or unset HF_HUB_OFFLINE.")
    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except Exception as error:
        message = hub_error_message(error, f"{option} {repo_id}: not a local folder nor in the Hub cache, and "
                                           f"looking it up on the Hub failed")
        if message is None:
            raise
        raise ValueError(message) from error


def check_local_name(name: str, option: str, what: str) -> Optional[Path]:
    """The folder `name` names when it exists; None when `name` can only be a Hub id; a one-line `ValueError` for a
    file or a path-like name that does not exist. `what` says which folder is expected."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{option} {name}: this is a file, not a folder; give {what} or a Hub repo id.")
    if looks_like_a_path(name):
        raise ValueError(f"{option} {name}: no such local folder ({path.absolute()} does not exist); give {what} or "
                         f"a Hub repo id like namespace/name.")
    return None


def resolve_model_source(name: str, option: str = "--model") -> str:
    """A folder or Hub repo id that `from_pretrained(...)` can load without a long wait: the local folder, the
    repo's snapshot in the Hub cache, or the repo id once the Hub has answered that it exists."""
    folder = check_local_name(name, option, "a converted model folder (`vamba-hf convert` writes one)")
    if folder is not None:
        return str(folder)
    cached = cached_snapshot(name)
    if cached is not None:
        return cached
    check_hub_repo(name, option)
    return name
