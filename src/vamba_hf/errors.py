"""The errors `vamba-hf convert` and `push` raise for input a user can fix: one line that names the thing, the
value and what to do."""

import re
import socket
from typing import Optional

# HTTP client libraries (of huggingface_hub 0.x to 2.x, which may use a versioned copy such as `httpx2`) whose
# exceptions mean the Hub could not be reached.
_NETWORK_MODULES = ("httpx", "httpcore", "requests", "urllib3")


def one_line(message) -> str:
    """`message` (a text or an exception) on one line: the lines' whitespace collapsed, the lines joined with "; "
    (an exception without a message gives its type's name)."""
    text = "; ".join(" ".join(line.split()) for line in str(message).splitlines() if line.strip())
    return text or (type(message).__name__ if isinstance(message, BaseException) else "")


class VambaUserError(ValueError):
    """Bad input to convert or push (a path, a checkpoint file, a repo id, the network, a login); its message is
    one line that says what is wrong and how to fix it."""

    def __init__(self, message):
        super().__init__(one_line(message))


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(error).__name__


def _network_reason(error: BaseException) -> str:
    """The socket-level reason ("[Errno 111] Connection refused") buried in a client library's message, or its
    first line."""
    found = re.search(r"\[Errno -?\d+\] [^'\")\]]+", str(error))
    return found.group(0).strip() if found else f"{type(error).__name__}: {_first_line(error)[:200]}"


def is_network_error(error: BaseException) -> bool:
    """Whether `error` means the Hub could not be reached (no route, refused, timed out), not that it refused."""
    if isinstance(error, (ConnectionError, TimeoutError, socket.gaierror)):
        return True
    return type(error).__module__.split(".")[0].rstrip("0123456789") in _NETWORK_MODULES


def hub_error_message(error: BaseException, action: str) -> Optional[str]:
    """One line for an error of the Hugging Face Hub client (not found, gated, auth, HTTP status, offline mode,
    network), starting with `action` ("Uploading to me/x failed"); None when `error` is something else."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hub_errors

    if isinstance(error, hub_errors.OfflineModeIsEnabled) or (
        isinstance(error, hub_errors.LocalEntryNotFoundError) and constants.HF_HUB_OFFLINE
    ):
        return f"{action}: HF_HUB_OFFLINE is set and the files are not in the local cache; unset HF_HUB_OFFLINE."
    if isinstance(error, hub_errors.LocalEntryNotFoundError):
        return (f"{action}: the Hub ({constants.ENDPOINT}) could not be reached and the files are not in the local "
                f"cache; check the network connection (or the proxy / HF_ENDPOINT settings).")
    if isinstance(error, hub_errors.GatedRepoError):
        return f"{action}: the repository is gated; accept its terms on the Hub, then log in (`hf auth login`)."
    if isinstance(error, hub_errors.RepositoryNotFoundError):
        return (f"{action}: repository not found, or this token has no access to it; check the repo id, and log in "
                f"(`hf auth login`) or pass a token.")
    if isinstance(error, hub_errors.RevisionNotFoundError):
        return f"{action}: revision not found; check the branch name."
    if isinstance(error, hub_errors.HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status == 401:
            return (f"{action}: the Hub refused the token (HTTP 401); log in again (`hf auth login`), or pass a valid "
                    f"token with --token / HF_TOKEN.")
        if status == 403:
            return f"{action}: this token may not write there (HTTP 403); use a token with write access."
        return f"{action}: the Hub answered HTTP {status}: {_first_line(error)}"
    if is_network_error(error):
        return (f"{action}: could not reach the Hub at {constants.ENDPOINT} ({_network_reason(error)}); check the "
                f"network connection (or the proxy / HF_ENDPOINT settings).")
    if type(error).__module__.split(".")[0] == "huggingface_hub":
        return f"{action}: {type(error).__name__}: {_first_line(error)}"
    return None
