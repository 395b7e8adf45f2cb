"""Uploading a converted folder to the Hugging Face Hub (`vamba-hf push`).

Everything is checked before the first request: the folder (a Vamba config that maps only to our remote code,
the remote-code files, weights whose headers match the config), the repo id, the token and offline mode. The
local folder is never written: the model card, with the repo id put into its usage snippets, is uploaded from
memory. Hub and network failures raise `VambaUserError` with a one-line message.
"""

import os
import re
from pathlib import Path
from typing import Callable, Optional

from .card import REPO_ID_PLACEHOLDER
from .convert import (CONVERT_RECORD, HUB_FILES, PROCESSOR_FILES, REMOTE_CODE_FILES, ConversionError, check_tensors,
                      expected_shapes, find_weight_files, is_hub_repo_id, load_source_config, read_checkpoint_tensors,
                      read_json_object, read_regular_file)
from .errors import VambaUserError, hub_error_message

CARD_FILE = "README.md"


class NotConvertedError(VambaUserError):
    """The folder is not the output of `vamba-hf convert` (or no longer a complete one)."""


def _foreign_code_pointers(path: Path) -> list:
    """The entries of a JSON file's `auto_map` that point anywhere but our remote-code modules in this repo (an
    `other/repo--module.Class` prefix fetches another repository's code), and any `custom_pipelines`."""
    raw = read_json_object(path)
    ours = {name.removesuffix(".py") for name in REMOTE_CODE_FILES}
    foreign = [f"custom_pipelines: {raw['custom_pipelines']}"] if "custom_pipelines" in raw else []
    auto_map = raw.get("auto_map") or {}
    if not isinstance(auto_map, dict):
        return [f"auto_map: {auto_map!r}"]
    for auto_class, targets in auto_map.items():
        for target in targets if isinstance(targets, list) else [targets]:
            if target is not None and not (isinstance(target, str) and "--" not in target
                                           and target.split(".")[0] in ours):
                foreign.append(f"{auto_class}: {target}")
    return foreign


def _check_code_pointers(folder: Path) -> None:
    for name in ("config.json", "generation_config.json", *PROCESSOR_FILES):
        path = folder / name
        if name.endswith(".json") and path.is_file():
            foreign = _foreign_code_pointers(path)
            if foreign:
                raise NotConvertedError(f"{path} points the Auto classes at code that is not vamba-hf's "
                                        f"({'; '.join(foreign)[:300]}); convert the checkpoint again.")


def check_converted_folder(folder: Path) -> list:
    """Refuse folders the Hub could not serve: no Vamba config mapping to our remote code, no remote code, or
    weights that are missing or do not match the config. Returns the weight files."""
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise NotConvertedError(f"{folder} {what}: give the folder written by vamba-hf convert.")
    _refuse_links_and_special_files(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise NotConvertedError(f"{folder} has no config.json; convert the checkpoint first: vamba-hf convert SRC "
                                f"{folder}")
    raw = read_json_object(config_path)
    if raw.get("model_type") != "vamba" or "auto_map" not in raw:
        raise NotConvertedError(f"{config_path} is not a converted Vamba config (model_type "
                                f"{raw.get('model_type')!r}); run vamba-hf convert on it first.")
    _check_code_pointers(folder)
    missing = [name for name in REMOTE_CODE_FILES if not (folder / name).is_file()]
    if missing:
        raise NotConvertedError(f"{folder} lacks the remote-code file(s) {', '.join(missing)}; convert again.")
    config = load_source_config(folder)
    try:
        files, weight_map = find_weight_files(folder)
        check_tensors(read_checkpoint_tensors(folder, files, weight_map), expected_shapes(config))
    except ConversionError as error:
        raise NotConvertedError(f"{error} (in {folder}; convert again)") from None
    return files


def check_repo_id(repo_id) -> None:
    if not is_hub_repo_id(repo_id):
        raise VambaUserError(f"{repo_id!r} is not a Hub repo id: use namespace/name with letters, digits, '-', '_' "
                             f"and '.', e.g. your-name/Vamba-Qwen2-VL-7B-hf.")


# What git refuses in a branch name (the common rules of `git check-ref-format`).
_BAD_BRANCH = re.compile(r"[\s~^:?*\[\\\x00-\x1f\x7f]|\.\.|@\{|//|^[-/]|[/.]$|\.lock$")


def check_revision(revision) -> None:
    if not (isinstance(revision, str) and revision and not _BAD_BRANCH.search(revision)):
        raise VambaUserError(f"--revision {revision!r} is not a branch name; use e.g. main or v1.")


def _is_model_file_name(name: str) -> bool:
    return name in HUB_FILES or name.endswith(".safetensors")


def _refuse_links_and_special_files(folder: Path) -> None:
    """A model file of `folder` that is a link (its target is never read nor uploaded) or not a regular file is
    refused before anything is read."""
    for path in sorted(folder.iterdir()):
        if _is_model_file_name(path.name) and (path.is_symlink() or not path.is_file()):
            what = f"a symbolic link (to {os.readlink(path)})" if path.is_symlink() else "not a regular file"
            raise NotConvertedError(f"{path} is {what}: push uploads only the regular files of a converted folder, "
                                    f"never a link's target; put the file itself there (or convert again).")


def files_to_upload(folder: Path, weight_files: list) -> tuple[list, list]:
    """(relative path, size in bytes) of each file a converted (or saved) model folder holds - config, generation
    config, card, remote code, processor files, the weights and their index - and the names of everything else in
    `folder`, which is never uploaded."""
    allowed = HUB_FILES | set(weight_files)
    files, left_out = [], []
    for path in sorted(folder.iterdir()):
        if path.name in allowed:
            files.append((path.name, path.stat().st_size))
        elif path.name != CONVERT_RECORD:
            left_out.append(path.name + ("/" if path.is_dir() and not path.is_symlink() else ""))
    return files, left_out


def card_for_upload(folder: Path, repo_id: str) -> Optional[bytes]:
    """The model card with `repo_id` in its usage snippets (in memory; the file is left as it is), or None when
    the card does not hold the placeholder."""
    path = folder / CARD_FILE
    if not path.is_file():
        return None
    text = read_regular_file(path).decode("utf-8")
    if REPO_ID_PLACEHOLDER not in text:
        return None
    return text.replace(REPO_ID_PLACEHOLDER, repo_id).encode("utf-8")


def _token_or_fail(token: Optional[str]) -> str:
    import huggingface_hub

    token = token or huggingface_hub.get_token()
    if not token:
        raise VambaUserError("No Hugging Face token: log in with `hf auth login`, set HF_TOKEN, or pass --token.")
    return token


def _refuse_offline_mode() -> None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise VambaUserError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it and push again.")


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
    """Upload a converted folder to the model repo `repo_id` (created if needed) in one commit, with `repo_id`
    written into the uploaded model card's usage snippets if they hold the placeholder (the local card is left as
    it is). Returns the uploaded files as (path, size); with `dry_run`, only lists them and touches neither the
    folder nor the network. Raises `VambaUserError` (one line) for a bad folder, repo id, token or network."""
    folder = Path(folder)
    check_repo_id(repo_id)
    if revision is not None:
        check_revision(revision)
    files, left_out = files_to_upload(folder, check_converted_folder(folder))
    if not dry_run:
        _refuse_offline_mode()
        token = _token_or_fail(token)
    total = sum(size for _, size in files)
    verb = "Would upload" if dry_run else "Uploading"
    log(f"{verb} {len(files)} file(s), {total / 2**30:.2f} GiB, from {folder} to https://huggingface.co/{repo_id}:")
    for name, size in files:
        log(f"  {name}  ({size:,} bytes)")
    if left_out:
        log(f"Not uploaded (not files of a converted model): {', '.join(left_out)}")
    card = card_for_upload(folder, repo_id)
    if card is not None:
        log(f"{CARD_FILE}: the uploaded card's usage snippets name {repo_id} (the local file is unchanged).")
    if dry_run:
        return files
    commit = _upload(folder, files, card, repo_id, private=private, revision=revision, token=token,
                     commit_message=commit_message or "Upload Vamba (converted with vamba-hf)")
    log(f"Done: {getattr(commit, 'commit_url', commit)}")
    return files


def _upload(folder: Path, files: list, card: Optional[bytes], repo_id: str, *, private: bool,
            revision: Optional[str], token: str, commit_message: str):
    import huggingface_hub

    operations = [
        huggingface_hub.CommitOperationAdd(path_in_repo=name,
                                           path_or_fileobj=card if name == CARD_FILE and card else str(folder / name))
        for name, _ in files
    ]
    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        return api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message,
                                 revision=revision, repo_type="model")
    except Exception as error:
        message = hub_error_message(error, f"Uploading to {repo_id} failed")
        if message is None:
            raise
        raise VambaUserError(message) from None
