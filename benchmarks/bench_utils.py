"""What every benchmark script shares: the result file (one JSON line per measurement, flushed as it comes, named
`<script>-<YYYYMMDD>-<git short hash or "nogit">.jsonl`), the wall-clock budget, timing with the device
synchronised, peak GPU memory and peak host RSS, and the environment record."""

import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

GIB = 2**30
REPO = Path(__file__).resolve().parents[1]


def git_short_hash() -> str:
    # A copy of the working tree on another machine can carry a stale .git: the caller then names the commit.
    if os.environ.get("VAMBA_BENCH_COMMIT"):
        return os.environ["VAMBA_BENCH_COMMIT"]
    try:
        result = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "nogit"
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "nogit"


def result_path(out_dir: Path, script: str) -> Path:
    stem = Path(script).stem
    return Path(out_dir) / f"{stem}-{datetime.date.today():%Y%m%d}-{git_short_hash()}.jsonl"


class ResultSink:
    """Prints each record as one JSON line and appends it to the script's result file at once."""

    def __init__(self, out_dir: Path, script: str):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.path = result_path(out_dir, script)
        self._file = self.path.open("a")

    def log(self, record: dict) -> dict:
        line = json.dumps(record, default=str)
        print(line, flush=True)
        self._file.write(line + "\n")
        self._file.flush()
        return record

    def close(self) -> None:
        self._file.close()


class Budget:
    """A wall-clock cap: `spent()` says when a script should stop starting new measurements."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.monotonic()

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - (time.monotonic() - self.start)

    def elapsed(self) -> float:
        return round(time.monotonic() - self.start, 1)

    def spent(self) -> bool:
        return self.left() <= 0


def synchronize(device) -> None:
    """Wait for `device`; "cuda" without an index waits for every GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    for index in [device.index] if device.index is not None else range(torch.cuda.device_count()):
        torch.cuda.synchronize(index)


def timed(fn, device="cpu"):
    """(result of fn(), seconds), with `device` synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def reset_gpu_peaks() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)


def gpu_peaks_gib() -> list[float]:
    """`max_memory_allocated` of each visible GPU since the last `reset_gpu_peaks` (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [round(torch.cuda.max_memory_allocated(index) / GIB, 3) for index in range(torch.cuda.device_count())]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss(contextlib.AbstractContextManager):
    """Peak resident memory of this process while the block runs, sampled every `interval` seconds by a thread
    (`ru_maxrss` cannot be reset between stages). `.peak_gib` and `.start_gib` after the block."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self._stop = threading.Event()

    def __enter__(self):
        self.start_bytes = self.peak_bytes = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, rss_bytes())
        self.start_gib = round(self.start_bytes / GIB, 3)
        self.peak_gib = round(self.peak_bytes / GIB, 3)
        return False


@contextlib.contextmanager
def attributes_set(obj, **values):
    """Set attributes of `obj` for the block and restore what they were after it, whatever happens."""
    saved = {name: getattr(obj, name) for name in values}
    try:
        for name, value in values.items():
            setattr(obj, name, value)
        yield obj
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def output_cache(outputs):
    """The cache a forward returned: `cache` on transformers >= 5.24, `past_key_values` before."""
    for name in ("cache", "past_key_values"):
        if getattr(outputs, name, None) is not None:
            return getattr(outputs, name)
    return None


def cross_kv_of(cache) -> dict:
    """{layer index: (key, value)} of the cross-attention K/V a Vamba cache holds, through the attribute the cache
    exposes for it today (`VambaCache.cross.kv`)."""
    return cache.cross.kv


def median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


def add_common_arguments(parser, frames: str) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder for the result file")
    parser.add_argument("--frames", default=frames, help="comma-separated frame counts")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new measurements after this many seconds of wall clock")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on CPU, for the test suite (seconds)")


def frame_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--frames {text!r}: give comma-separated whole numbers, e.g. 128,512") from None
    if not counts or any(n < 2 or n % 2 for n in counts):
        raise SystemExit(f"--frames {text!r}: each count must be even and at least 2 (frames go in pairs)")
    return counts


def failure(error: Exception) -> dict:
    """What a record says of a measurement that raised: `oom`, or the error's first line (its traceback goes to
    stderr), so that an unattended run reports it and goes on to what does not depend on it."""
    if isinstance(error, torch.OutOfMemoryError):
        return {"oom": True}
    traceback.print_exception(error)
    return {"error": f"{type(error).__name__}: {error}".splitlines()[0][:500]}


def environment() -> dict:
    import transformers

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
                "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                if torch.cuda.is_available() else []}
    for name in ("triton", "mamba_ssm", "causal_conv1d", "flash_attn", "accelerate", "av", "cv2", "torchvision"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            versions[name] = None
    return versions


def start_run(script: str, args, sink: ResultSink) -> None:
    sink.log({"environment": environment(), "argv": sys.argv, "commit": git_short_hash(),
              "result_file": str(sink.path)})


# --decode-in of the benchmarks -> VideoSampling.decode_processes
DECODE_IN = {"auto": None, "threads": False, "processes": True}
