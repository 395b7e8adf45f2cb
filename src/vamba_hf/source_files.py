"""The files a source folder or a converted folder is read from, checked before anything is read: regular files of
bounded size, no links but a Hub cache snapshot's, and the names convert writes. Shared by `convert`, `card` and
`hub`, which import it and never each other in a circle."""

import os
import re
import stat
from pathlib import Path
from typing import Optional

from .errors import VambaUserError

# The remote code: every `*_vamba.py` module of the package (each imports the others relatively), the same files
# the repository root links to.
REMOTE_CODE_FILES = tuple(sorted(path.name for path in Path(__file__).resolve().parent.glob("*_vamba.py")))
MAX_TEXT_FILE_BYTES = 64 * 2**20
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class ConversionError(VambaUserError):
    """The source folder cannot be converted (or the destination not written); the message says what is wrong,
    where, and what to do."""


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def read_regular_file(path: Path, max_bytes: int = MAX_TEXT_FILE_BYTES) -> bytes:
    """The bytes of `path`, refused (ConversionError) unless it is a regular file of at most `max_bytes`. Opened
    without blocking, so a FIFO is refused rather than waited on; a device (/dev/zero) is never read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConversionError(f"{path} is {_file_kind(info.st_mode)}, not a regular file: replace it with the "
                                  f"file itself.")
        if info.st_size > max_bytes:
            raise ConversionError(f"{path} is {info.st_size:,} bytes, more than such a file can be ({max_bytes:,}): "
                                  f"replace it with the right file.")
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ConversionError(f"{path} grew past {max_bytes:,} bytes while it was read: replace it with the right "
                              f"file.")
    return data


def _is_hub_cache_link(path: Path) -> bool:
    """A link of a Hub cache snapshot (`.../snapshots/<revision>/<name>`) to a blob of the same cache, as
    huggingface_hub writes them."""
    snapshot = path.parent
    if snapshot.parent.name != "snapshots":
        return False
    try:
        return path.resolve().parent == (snapshot.parent.parent / "blobs").resolve()
    except (OSError, RuntimeError):  # a loop of links
        return False


def check_source_file(path: Path, max_bytes: Optional[int] = MAX_TEXT_FILE_BYTES) -> None:
    """Refuse (ConversionError) a source file that convert would read or carry into DST unless it is a regular file
    (of at most `max_bytes`, when given) and no link, but a Hub cache snapshot's links to its blobs."""
    if path.is_symlink() and not _is_hub_cache_link(path):
        raise ConversionError(f"{path} is a symbolic link (to {os.readlink(path)}): convert does not follow links in "
                              f"a source folder, so that nothing from outside it is carried into the destination; "
                              f"replace the link with the file itself (cp --remove-destination "
                              f"\"$(readlink -f {path})\" {path}) and convert again.")
    try:
        info = path.stat()
    except OSError as error:
        raise ConversionError(f"{path} cannot be read ({error.strerror}): replace it with the file itself.") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConversionError(f"{path} is {_file_kind(info.st_mode)}, not a regular file: replace it with the file "
                              f"itself.")
    if max_bytes is not None and info.st_size > max_bytes:
        raise ConversionError(f"{path} is {info.st_size:,} bytes, more than such a file can be ({max_bytes:,}): "
                              f"replace it with the right file.")


def is_hub_repo_id(text) -> bool:
    """`namespace/name` as the Hub spells repo ids (no path syntax: no leading '.', '/', '~', no '..' or '--')."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not (isinstance(text, str) and _REPO_ID.match(text)):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def expected_shapes(config) -> dict:
    """Tensor name -> shape that `VambaForConditionalGeneration(config)` loads (built on the meta device)."""
    import torch

    from .modeling_vamba import VambaForConditionalGeneration

    with torch.device("meta"):
        model = VambaForConditionalGeneration(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
