"""Which frames of a video Vamba samples: the sampling options (`VideoSampling`), the original release's frame
indices, times sampled by fps, and the plans that keep those frames as a decoder offers them (by index, or the
frame on screen at each time).

Served as Hub remote code; imports only numpy and the standard library (decoding worker processes load it).
"""

import bisect
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

import numpy as np

# Timestamps closer than this (seconds) count as equal: container time bases round.
TIME_TOLERANCE = 1e-6
DECODERS = ("auto", "sequential", "seek")
# Decoding threads by default. Each also runs Python per decoded frame under the interpreter lock, which the thread
# launching the GPU work needs too, so more threads than this stop paying (BENCHMARKS.md, "Streamed input"). Processes
# share no lock: by default there is one per CPU.
MAX_DEFAULT_DECODE_WORKERS = 4


def _check_count(name: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} is not a valid frame count: give a whole number of at least 1 (e.g. 16).")


def _check_seconds(name: str, value, allow_zero: bool, optional: bool = False) -> None:
    if value is None and optional:
        return
    valid = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    if not (valid and math.isfinite(value) and (value > 0 or (allow_zero and value == 0))):
        bound = "0 or more" if allow_zero else "above 0"
        raise ValueError(f"{name}={value!r} is not valid: give a finite number {bound} (e.g. {name}=2).")


@dataclass(frozen=True)
class VideoSampling:
    """How frames are taken from a video file.

    - `num_frames`: sample by count, the middle frame of each of `num_frames` equal intervals (the original release).
    - `fps`: when set, sample by time instead: the frame on screen at the middle of each of ceil(duration * fps)
      equal intervals of the video, by timestamp (so variable-frame-rate files are sampled evenly in time).
    - `max_frames`: the most frames one video gives; a larger count is capped with a warning.
    - `video_longest_edge` / `video_shortest_edge`: each frame is resized (PIL bicubic, aspect kept) so that its
      longest edge is at most the first, then each edge is at least the second; None skips either.
    - `video_timeout`: seconds to wait for a URL to connect and for each read.
    - `start_time`: seconds from the start of the stream; earlier frames are left out (the time a previous call on a
      growing file ended). Timestamps and frame indices stay those of the whole stream.
    - `progress`: a tqdm progress bar; None shows one for long videos only.
    - `decoder`: "auto" seeks to the GOPs that hold sampled frames when the file's keyframe index allows it and that
      decodes fewer frames (or uses more threads) than one pass from the start; "sequential" always decodes from the
      start in one pass; "seek" seeks whenever the index allows it. All give the same frames.
    - `decode_workers`: workers (each with its own container open on the file) that decode GOPs in parallel when
      seeking; None uses min(4, CPU count) threads or one process per CPU (each decodes with CPU count / workers
      codec threads). At most one per CPU (twice that with `decode_device`, whose workers mostly wait on NVDEC):
      more are capped to that with a warning, since each is a thread or a Python process with its own decoder.
    - `decode_processes`: the workers are Python processes (True), which share no interpreter lock with each other
      or with the caller, or threads (False); None: processes when at least `MIN_WORKERS_FOR_PROCESSES` workers
      decode at least `MIN_FRAMES_FOR_PROCESSES` frames, where they pay (threads when all the workers decode on
      `decode_device`). The frames are the same either way.
    - `decode_device`: None decodes on the CPU; "cuda" or "cuda:N" decodes on that GPU's NVDEC (FFmpeg's hwaccel
      through PyAV, in threads or in processes). The frames are the CPU decoder's bit for bit: H.264 decoding is
      exact, and only the sampled frames are copied to host memory and converted there by the same code. It needs a
      PyAV whose FFmpeg has the cuda device and an NVIDIA driver with NVDEC; a file or machine it cannot decode on
      raises (there is no fallback to the CPU). It pays where the GPU has few CPU cores beside it: NVDEC's
      throughput is fixed per GPU, so a host with many cores decodes faster in CPU processes (BENCHMARKS.md,
      "One process per CPU, NVDEC decoding").
    - `decode_device_workers`: with `decode_device`, how many of the workers decode on it (at most all of them);
      the others decode on the CPU, all taking runs of GOPs from one queue. None: all of them. A mix helps on a
      host with few cores and not on one with many (BENCHMARKS.md).

    A stretch of damaged data in a file is skipped to the next keyframe (the frames after a packet that does not
    decode may refer to it) with a warning that names its times; sampling goes on after it, and the sampled frames
    that lay in it are left out.
    """

    num_frames: int = 128
    fps: Optional[float] = None
    max_frames: int = 512
    video_shortest_edge: Optional[int] = 256
    video_longest_edge: Optional[int] = 640
    video_timeout: float = 10.0
    start_time: float = 0.0
    progress: Optional[bool] = None
    decoder: str = "auto"
    decode_workers: Optional[int] = None
    decode_processes: Optional[bool] = None
    decode_device: Optional[str] = None
    decode_device_workers: Optional[int] = None

    def __post_init__(self):
        _check_count("num_frames", self.num_frames)
        _check_count("max_frames", self.max_frames)
        _check_seconds("fps", self.fps, allow_zero=False, optional=True)
        _check_count("video_shortest_edge", self.video_shortest_edge, optional=True)
        _check_count("video_longest_edge", self.video_longest_edge, optional=True)
        _check_seconds("video_timeout", self.video_timeout, allow_zero=False)
        _check_seconds("start_time", self.start_time, allow_zero=True)
        if self.progress is not None and not isinstance(self.progress, bool):
            raise ValueError(f"progress={self.progress!r} is not valid: give True, False or None.")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder={self.decoder!r} is not valid: give one of {', '.join(DECODERS)}.")
        _check_count("decode_workers", self.decode_workers, optional=True)
        if self.decode_processes is not None and not isinstance(self.decode_processes, bool):
            raise ValueError(f"decode_processes={self.decode_processes!r} is not valid: give True, False or None.")
        if self.decode_device is not None and not (isinstance(self.decode_device, str) and
                                                   re.fullmatch(r"cuda(:[0-9]+)?", self.decode_device)):
            raise ValueError(f"decode_device={self.decode_device!r} is not valid: give None (the CPU), \"cuda\" or "
                             "\"cuda:N\" (GPU N's NVDEC).")
        _check_count("decode_device_workers", self.decode_device_workers, optional=True)
        if self.decode_device_workers is not None and self.decode_device is None:
            raise ValueError(f"decode_device_workers={self.decode_device_workers} is not valid without "
                             "decode_device: it says how many workers decode on that GPU; give decode_device "
                             "(\"cuda\" or \"cuda:N\") too.")

    def worker_count(self, processes: bool = False) -> int:
        """`decode_workers`, capped at `max_workers()` with a warning; by default min(4, CPUs) threads or one
        process per CPU."""
        cpus = os.cpu_count() or 1
        if self.decode_workers is None:
            return cpus if processes else min(MAX_DEFAULT_DECODE_WORKERS, cpus)
        cap = self.max_workers()
        if self.decode_workers > cap:
            device = f" (twice that with decode_device={self.decode_device!r})" if self.decode_device else ""
            warnings.warn(f"decode_workers={self.decode_workers} is more than this machine's {cpus} CPUs{device} "
                          f"can use: decoding with {cap} workers. Give decode_workers={cap} or fewer.", stacklevel=4)
        return min(self.decode_workers, cap)

    def max_workers(self) -> int:
        """The most decoding workers: one per CPU, twice that with `decode_device` (its workers mostly wait on the
        GPU's decoder, beside the CPU ones)."""
        cpus = os.cpu_count() or 1
        return 2 * cpus if self.decode_device is not None else cpus

    @classmethod
    def option_names(cls) -> tuple:
        return tuple(field.name for field in fields(cls))

    def with_options(self, **options) -> "VideoSampling":
        """A copy with the given options set (None included, e.g. `video_longest_edge=None` for no limit)."""
        unknown = sorted(set(options) - set(self.option_names()))
        if unknown:
            raise TypeError(f"unknown video sampling option(s) {', '.join(unknown)}; the options are: "
                            f"{', '.join(self.option_names())}.")
        return replace(self, **options) if options else self

    def with_changes(self, **changes) -> "VideoSampling":
        """A copy with the options of one call or item changed: None leaves an option as it is, and `num_frames`
        without `fps` samples by count."""
        changes = {name: value for name, value in changes.items() if value is not None}
        if "num_frames" in changes and "fps" not in changes:
            changes["fps"] = None
        return self.with_options(**changes)

    def to_dict(self) -> dict:
        return asdict(self)

    def frame_count(self, wanted: int) -> int:
        """`wanted` capped at `max_frames`, announcing the cap."""
        if wanted > self.max_frames:
            asked = f"fps={self.fps} gives {wanted} frames" if self.fps is not None else f"num_frames={wanted}"
            warnings.warn(f"{asked}, above max_frames={self.max_frames}: sampling {self.max_frames} frames. "
                          "Raise max_frames to sample more.", stacklevel=3)
        return min(wanted, self.max_frames)


def sample_frame_indices(total_frames: int, num_frames: int) -> list:
    """The middle frame of each of `num_frames` equal intervals of the video (the original release's sampling).

    A video shorter than `num_frames` gives each of its frames once (the original repeated the last one).
    """
    if total_frames < 1 or num_frames < 1:
        return []
    count = min(num_frames, total_frames)
    bounds = np.linspace(0, total_frames, count + 1).astype(int)
    return [int(start + end - 1) // 2 for start, end in zip(bounds[:-1], bounds[1:])]


def sample_times(start: float, end: float, count: int) -> list:
    """The middle of each of `count` equal intervals of [start, end)."""
    step = (end - start) / count
    return [start + (index + 0.5) * step for index in range(count)]


class IndexPlan:
    """Keeps the frames at the given stream indices."""

    def __init__(self, indices: list):
        self.indices = sorted(set(indices))
        self.capacity = len(self.indices)
        self.next = 0

    def offer(self, index: int, time: float, frame) -> list:
        while self.next < len(self.indices) and self.indices[self.next] < index:  # skipped (damaged): left out
            self.next += 1
        if self.next < len(self.indices) and index == self.indices[self.next]:
            self.next += 1
            return [(index, time, frame)]
        return []

    def skip_to(self, time: float) -> None:
        """The frames before `time` since the last one offered were lost: `offer` passes over their indices."""

    def finish(self) -> list:
        return []


class TimePlan:
    """Keeps, for each target time, the frame on screen then (the last one whose timestamp is not after it)."""

    def __init__(self, times: list):
        self.times = times
        self.capacity = len(times)
        self.next = 0
        self.previous = None
        self.last_kept_index = None

    def _keep(self, candidate) -> list:
        if candidate[0] == self.last_kept_index:
            return []
        self.last_kept_index = candidate[0]
        return [candidate]

    def offer(self, index: int, time: float, frame) -> list:
        if time is None:
            raise ValueError("sampling by fps needs frame timestamps, and this video's frames have none: sample by "
                             "num_frames instead.")
        kept = []
        while self.next < len(self.times) and time > self.times[self.next] + TIME_TOLERANCE:
            kept += self._keep(self.previous or (index, time, frame))
            self.next += 1
        self.previous = (index, time, frame)
        return kept

    def skip_to(self, time: Optional[float]) -> None:
        """The frames before `time` since the last one offered were lost (damaged): what was on screen at the times
        before it is unknown, and they are left out."""
        while self.next < len(self.times) and (time is None or time > self.times[self.next] + TIME_TOLERANCE):
            self.next += 1
        self.previous = None

    def finish(self) -> list:
        remaining, self.next = self.next < len(self.times), len(self.times)
        return self._keep(self.previous) if remaining and self.previous is not None else []


def index_at(packet_times: list, time: float) -> int:
    return bisect.bisect_left(packet_times, time - TIME_TOLERANCE)

