"""Uploading a converted folder to the Hugging Face Hub (`vamba-hf push`)."""

import json
from pathlib import Path
from typing import Callable, Optional

from .card import set_card_repo_id
from .convert import REMOTE_CODE_FILES, SINGLE_WEIGHTS, WEIGHTS_INDEX


class NotConvertedError(ValueError):
    """The folder is not the output of `vamba-hf convert`."""


def check_converted_folder(folder: Path) -> None:
    """Refuse folders the Hub could not serve: no Vamba config with `auto_map`, no remote code, or no weights."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise NotConvertedError(f"{folder} has no config.json; convert the checkpoint first: vamba-hf convert SRC "
                                f"{folder}")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("model_type") != "vamba" or "auto_map" not in config:
        raise NotConvertedError(f"{config_path} is not a converted Vamba config (model_type "
                                f"{config.get('model_type')!r}); run vamba-hf convert on it first.")
    missing = [name for name in REMOTE_CODE_FILES if not (folder / name).is_file()]
    if missing:
        raise NotConvertedError(f"{folder} lacks the remote-code file(s) {', '.join(missing)}; convert again.")
    if not ((folder / SINGLE_WEIGHTS).is_file() or (folder / WEIGHTS_INDEX).is_file()):
        raise NotConvertedError(f"{folder} has no {SINGLE_WEIGHTS} or {WEIGHTS_INDEX}.")


def files_to_upload(folder: Path) -> list:
    """(relative path, size in bytes) of every file that would be uploaded; hidden files and folders are left out."""
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files.append((relative.as_posix(), path.stat().st_size))
    return files


def push_folder(
    folder,
    repo_id: str,
    *,
    private: bool = False,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    token: Optional[str] = None,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
) -> list:
    """Upload a converted folder to the model repo `repo_id` (created if needed), first writing `repo_id` into the
    model card's usage snippets if they still hold the placeholder. Returns the uploaded files as (path, size);
    with `dry_run`, only lists them and touches neither the folder nor the network."""
    folder = Path(folder)
    check_converted_folder(folder)
    files = files_to_upload(folder)
    total = sum(size for _, size in files)
    verb = "Would upload" if dry_run else "Uploading"
    log(f"{verb} {len(files)} file(s), {total / 2**30:.2f} GiB, from {folder} to https://huggingface.co/{repo_id}:")
    for name, size in files:
        log(f"  {name}  ({size:,} bytes)")
    if dry_run:
        return files
    from huggingface_hub import HfApi

    if set_card_repo_id(folder, repo_id):
        log(f"README.md: usage snippets now name {repo_id}.")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type="model",
        revision=revision,
        commit_message=commit_message or "Upload Vamba (converted with vamba-hf)",
        ignore_patterns=[".*", "**/.*"],
    )
    log(f"Done: {getattr(commit, 'commit_url', commit)}")
    return files
