"""Video (and image file) input for Vamba: the sampling options, frames users already have, and `load_video`, which
samples a file's frames through `video_decode_vamba` (PyAV).

Served as Hub remote code beside `processing_vamba.py`, so it imports only numpy, PIL, torch, transformers and the
standard library at top level; PyAV and tqdm are imported where they are used.

A video file is opened once per decoding worker. Which frames are sampled is decided from the stream's packet index
(or, without one, frame by frame as the stream decodes). Local files with a sound keyframe index decode only the
groups of pictures (GOPs) that hold a sampled frame: each worker (a thread, or a process for long decodes) opens its
own container on the file, seeks to the keyframe at or before its samples and decodes forward to them; other
sources decode in order from the start. Either decodes on the CPU, or on a GPU's NVDEC (`decode_device`).
Both give the same frames, bit for bit. Only the sampled frames are converted to RGB, rotated as the display matrix
says and resized (PIL bicubic, the original release's resize), straight into one uint8 array of the output size.
"""

import math
import os
import re
import sys
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable, Optional

import numpy as np
import PIL.Image
import torch
from transformers.image_utils import ChannelDimension, infer_channel_dimension_format

from .video_decode_vamba import (
    TIME_TOLERANCE,
    FrameResize,
    _check_frame_size,
    _decode_plan,
    _demux_packet_times,
    _gop_samples,
    _import_av,
    _index_at,
    _IndexMismatch,
    _IndexPlan,
    _is_timeout,
    _local_path,
    _open_container,
    _packet_index,
    _planned_frames,
    _progress_bar,
    _SeekingDecoder,
    _set_codec_threads,
    _stream_facts,
    _TimePlan,
    check_readable_file,
    damage_warning,
    is_url,
    load_image,
    sample_frame_indices,
    sample_times,
    source_frames_allowed,
)

DECODERS = ("auto", "sequential", "seek")
# Decoding threads by default. Each also runs Python per decoded frame under the interpreter lock, which the thread
# launching the GPU work needs too: on the 16-core H200 host 4 threads decoded the hour-long file in 9.3 s against
# 10.5 s for 8 and 8.7 s for 16, and streamed it to the first token faster than 8 (BENCHMARKS.md). Processes share
# no lock: by default there is one per CPU (16 decoded that file's 1024 samples in 5.8 s, and streamed it to the
# first token in 6.8 s).
MAX_DEFAULT_DECODE_WORKERS = 4
# Seeking decodes in worker processes by default with at least this many workers decoding at least this many
# frames: then the threads' shared interpreter lock costs more than starting processes and piping the frames back.
# Measured (BENCHMARKS.md): 16 workers on 16 CPUs, an hour-long file: processes 1.46x faster than threads; 2 workers
# on 2 CPUs, a 10-minute file: threads 4.5 s, processes 5.4 s.
MIN_WORKERS_FOR_PROCESSES = 4
MIN_FRAMES_FOR_PROCESSES = 2000
# "auto" seeks when that decodes at most this share of the frames one pass from the start would.
SEEK_WORTH_IT = 0.8


def _can_start_interpreters() -> bool:
    """Whether `sys.executable` runs Python code given with -c (not in an embedded or frozen application)."""
    return bool(sys.executable) and not getattr(sys, "frozen", False)


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
      raises (there is no fallback to the CPU). It pays where the GPU has few CPU cores beside it: on the H200
      host NVDEC decodes 1024 samples of an hour-long 640x360 H.264 file in 10-11.8 s (threads or processes, it
      tops out at ~7k frames/s) against 18.5 s on 4 of its cores, but 16 CPU processes take 4.7-5.8 s.
    - `decode_device_workers`: with `decode_device`, how many of the workers decode on it (at most all of them);
      the others decode on the CPU, all taking runs of GOPs from one queue. None: all of them. On 4 cores of the
      H200 host 4 NVDEC and 4 CPU processes decode that file in 10.3 s (NVDEC alone 11.5 s); on its 16 cores any
      mix is slower than the CPU processes alone (BENCHMARKS.md).

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


# ----------------------------------------------------------------------------------------------
# Frames users already have


@dataclass
class VideoFrames:
    """Frames of one video, a list of HxWx3 uint8 arrays of one size (given as such, as a 4-D array or tensor, or as
    a list of PIL images or arrays), and where they came from."""

    frames: list
    timestamps: Optional[list] = None  # seconds from the start of the stream, one per frame, when known
    frame_indices: Optional[list] = None  # indices of the frames in the decoded stream, when known
    source_fps: Optional[float] = None
    source_frame_count: Optional[int] = None
    # The part of the stream sampled, in seconds: a growing file's next call starts at `end_time`.
    start_time: float = 0.0
    end_time: Optional[float] = None
    # For frames decoded into a `FrameBuffer`: `release(n)` hands back the memory of the first n frames.
    release: Optional[Callable] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.frames = frames_list(self.frames)

    def metadata(self) -> dict:
        return {
            "timestamps": self.timestamps,
            "frame_indices": self.frame_indices,
            "source_fps": self.source_fps,
            "source_frame_count": self.source_frame_count,
            "num_frames": len(self.frames),
            "start_time": self.start_time,
            "end_time": self.end_time,
        }

    def first(self, count: int) -> "VideoFrames":
        if count == len(self.frames):
            return self
        cut = (lambda values: None if values is None else values[:count])
        return VideoFrames(self.frames[:count], cut(self.timestamps), cut(self.frame_indices), self.source_fps,
                           self.source_frame_count, self.start_time, self.end_time, self.release)


def _to_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        return (array.float() if array.dtype == torch.bfloat16 else array).numpy()
    return np.asarray(array)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 as is; floats in [0, 1] are scaled to 0..255; other values are rounded and clipped."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating) and array.size and float(array.max()) <= 1.0:
        array = array * 255.0
    return np.clip(np.round(array), 0, 255).astype(np.uint8)


def _rgb_channels_last(array: np.ndarray, what: str) -> np.ndarray:
    """(..., H, W, 3) from 2-D/3-D frames or 4-D videos, channels (1, 3 or 4) first or last."""
    try:
        layout = infer_channel_dimension_format(array, num_channels=(1, 3, 4))
    except ValueError:
        raise ValueError(f"{what} of shape {tuple(array.shape)}: expected channels (1, 3 or 4) first or last") from None
    if layout == ChannelDimension.FIRST:
        array = np.moveaxis(array, -3, -1)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array[..., :3]


def frame_array(frame, what: str = "frame") -> np.ndarray:
    """An HxWx3 uint8 array from a PIL image, a 2-D/3-D array or tensor, or an image path or URL."""
    if isinstance(frame, (str, os.PathLike)):
        frame = load_image(frame)
    if isinstance(frame, PIL.Image.Image):
        _check_frame_size(*frame.size, what)
        return np.asarray(frame.convert("RGB"))
    if not isinstance(frame, (np.ndarray, torch.Tensor)):
        raise TypeError(f"cannot use a {type(frame).__name__} as a {what}: give a PIL image, array, tensor or path")
    array = _to_numpy(frame)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"{what} must be a 2-D or 3-D array (H, W[, C]) or (C, H, W), got shape {tuple(array.shape)}")
    array = _rgb_channels_last(array, what)
    _check_frame_size(array.shape[1], array.shape[0], what)
    return np.ascontiguousarray(_to_uint8(array))


def _is_frame_array(frame) -> bool:
    return isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3 \
        and frame.flags.c_contiguous


def frames_list(frames) -> list:
    """HxWx3 uint8 arrays of one size from a 4-D array/tensor (channels first or last) or a list of frames."""
    if isinstance(frames, (np.ndarray, torch.Tensor)):
        array = _to_numpy(frames)
        if array.ndim != 4:
            raise ValueError(f"a video array must have 4 dimensions (T, H, W, C) or (T, C, H, W), "
                             f"got shape {tuple(array.shape)}")
        array = _rgb_channels_last(array, "video")
        _check_frame_size(array.shape[2], array.shape[1], "video frame")
        return list(np.ascontiguousarray(_to_uint8(array)))
    if not isinstance(frames, (list, tuple)):
        raise TypeError(f"cannot use a {type(frames).__name__} as video frames: give an array, tensor or list")
    if not frames:
        raise ValueError("a video has no frames: give at least 2 frames.")
    arrays = [frame if _is_frame_array(frame) else frame_array(frame, f"frame {index} of the video")
              for index, frame in enumerate(frames)]
    if any(array.shape != arrays[0].shape for array in arrays):
        raise ValueError("all frames of a video must have the same size; resize them to one size first")
    return arrays


def is_single_frame(item) -> bool:
    return isinstance(item, PIL.Image.Image) or (isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim in (2, 3))


def _frames_from_qwen_vl_utils(video, metadata: dict) -> VideoFrames:
    """qwen_vl_utils' `(video_tensor, {"fps": ..., "frames_indices": ...})`."""
    frames = frames_list(video)
    indices, fps = metadata.get("frames_indices"), metadata.get("fps")
    if indices is None or not fps or len(indices) != len(frames):
        return VideoFrames(frames, source_fps=fps)
    indices = [int(index) for index in _to_numpy(indices).reshape(-1)]
    return VideoFrames(frames, [index / float(fps) for index in indices], indices, float(fps))


def to_video_frames(video, sampling: "VideoSampling" = None, resize: FrameResize = None) -> VideoFrames:
    """A `VideoFrames` from a path/URL (decoded with `load_video`), a `VideoFrames`, a (T,H,W,C)/(T,C,H,W) array
    or tensor, a list of frames (PIL images, arrays, or image paths), or a `qwen_vl_utils` `(video, metadata)`."""
    if isinstance(video, VideoFrames):
        return video
    if isinstance(video, (str, os.PathLike)):
        return load_video(video, sampling, resize=resize)
    if isinstance(video, tuple) and len(video) == 2 and isinstance(video[1], dict):
        return _frames_from_qwen_vl_utils(*video)
    if isinstance(video, (np.ndarray, torch.Tensor, list, tuple)):
        return VideoFrames(frames_list(video))
    raise TypeError(f"cannot use a {type(video).__name__} as a video: give a path, frames array/tensor, list of "
                    "frames or VideoFrames")


class _VideoSampler:
    """Plans and decodes the sampled frames of one open container."""

    def __init__(self, container, location: str, sampling: VideoSampling, resize: FrameResize):
        self.container, self.location, self.sampling, self.resize = container, location, sampling, resize
        self.stream = container.streams.video[0]
        _set_codec_threads(self.stream, on_device=sampling.decode_device is not None)
        self.facts = _stream_facts(self.stream)
        # A local file's frames are numbered by their times, from a list of its packets: a damaged stretch then
        # shifts no frame's number, and sampling by time reaches the last frame, wherever the declared duration
        # ends (B-frames' edit lists, variable frame rates). A URL is read once: its frames are counted as decoded.
        local = not is_url(location)
        needs_packet_times = local or sampling.start_time > 0 or not self.facts.declared_frames or (
            sampling.fps is not None and self.facts.duration is None)
        self.index = None
        if sampling.decoder != "sequential" and local:
            self.index = _packet_index(container, self.stream, self.facts)
        if needs_packet_times:
            self.facts.packet_times = self.index.times if self.index else _demux_packet_times(
                container, self.stream, self.facts)

    def frames_after_start(self) -> int:
        if self.facts.packet_times is None:
            return self.facts.declared_frames
        return len(self.facts.packet_times) - _index_at(self.facts.packet_times, self.sampling.start_time)

    def plan(self, available: int):
        first = 0 if self.facts.packet_times is None else _index_at(self.facts.packet_times, self.sampling.start_time)
        if self.sampling.fps is None:
            indices = sample_frame_indices(available, self.sampling.frame_count(self.sampling.num_frames))
            return _IndexPlan([first + index for index in indices])
        end = self.end_time()
        if end is None or end <= self.sampling.start_time:
            return _IndexPlan([])
        wanted = max(1, math.ceil((end - self.sampling.start_time) * self.sampling.fps))
        return _TimePlan(sample_times(self.sampling.start_time, end, self.sampling.frame_count(wanted)))

    def end_time(self) -> Optional[float]:
        """Seconds: the stream's duration, or, when its last packet starts at or after that, the end of that
        packet (one frame at the average rate)."""
        end = self.facts.duration
        if self.facts.packet_times and (end is None or self.facts.packet_times[-1] >= end - TIME_TOLERANCE):
            end = self.facts.packet_times[-1] + 1 / (self.facts.frame_rate or 1e9)
        return end

    def _decode(self, plan) -> tuple:
        description = f"decoding {os.path.basename(self.location)}"
        if self.index is not None:
            decoded = self._decode_by_seeking(plan, description)
            if decoded is not None:
                return decoded
            plan = self.plan(self.frames_after_start())
        return _decode_plan(self.container, self.stream, self.facts, plan, self.sampling, self.resize, description)

    def _decode_by_seeking(self, plan, description: str) -> Optional[tuple]:
        """As `_decode_plan`, decoding only the GOPs with sampled frames; None when seeking does not pay (decoder
        "auto") or a decoded frame does not match the packet index."""
        seeking = self._seeking(plan, description)
        if seeking is None:
            return None
        decoder, gops, kept, workers = seeking
        try:
            writer = decoder.decode(gops, len(kept), workers)
        except _IndexMismatch:
            return None
        frames = list(writer.buffer.array[: len(kept)])
        return frames, writer.times, [position for position, _ in kept], self.frames_after_start(), writer.buffer

    def _seeking(self, plan, description: str) -> Optional[tuple]:
        """(decoder, GOPs, kept (position, time) pairs, worker count) to decode `plan` by seeking, or None when the
        file has no usable index, nothing is kept, or seeking does not pay (decoder "auto")."""
        if self.index is None:
            return None
        kept = _planned_frames(plan, self.index, self.sampling.start_time)
        if not kept:
            return None
        gops = _gop_samples(self.index, [position for position, _ in kept])
        workers = self._workers_for_frame_size(min(self.sampling.worker_count(), len(gops)))
        if self.sampling.decoder == "auto" and workers == 1 and not self._seeking_pays(gops):
            return None
        bar = _progress_bar(sum(gop.cost for gop in gops), self.sampling.progress, description)
        processes = self._in_processes(workers, gops)
        if processes:
            workers = self._workers_for_frame_size(min(self.sampling.worker_count(processes=True), len(gops)))
        decoder = _SeekingDecoder(self.location, self.facts, self.index, self.resize, bar, processes=processes,
                                  device=self.sampling.decode_device,
                                  device_workers=self.sampling.decode_device_workers)
        return decoder, gops, kept, workers

    def _workers_for_frame_size(self, workers: int) -> int:
        """`workers`, fewer for frames so large that each worker's decoder would hold gigabytes of them."""
        codec = self.stream.codec_context
        return source_frames_allowed((codec.width, codec.height), workers)

    def _in_processes(self, workers: int, gops: list) -> bool:
        """`decode_processes`, or by default processes where they pay, except when every worker decodes on NVDEC
        (as fast in threads, which need no CUDA context each)."""
        if self.sampling.decode_processes is not None:
            return self.sampling.decode_processes
        all_on_device = self.sampling.decode_device is not None and self.sampling.decode_device_workers is None
        return not all_on_device and workers >= MIN_WORKERS_FOR_PROCESSES and _can_start_interpreters() and \
            sum(gop.cost for gop in gops) >= MIN_FRAMES_FOR_PROCESSES

    def frame_stream(self) -> "FrameStream":
        """The sampled frames as they decode, when the file can be decoded by seeking; else decoded here first."""
        available = self.frames_after_start()
        seeking = self._seeking(self.plan(available), f"decoding {os.path.basename(self.location)}") \
            if available else None
        if seeking is None:
            return FrameStream.of(self.sample())
        decoder, gops, kept, workers = seeking
        total = self.facts.declared_frames if self.facts.packet_times is None else len(self.facts.packet_times)
        facts = dict(frame_indices=[position for position, _ in kept], source_fps=self.facts.frame_rate,
                     source_frame_count=total, start_time=self.sampling.start_time, end_time=self.end_time())
        return FrameStream(None, len(kept), facts, decoder.start(gops, len(kept), workers), decoder,
                           lambda: load_video(self.location, self.sampling, self.resize, decoder="sequential"))

    def _seeking_pays(self, gops: list) -> bool:
        one_pass = gops[-1].last + 1 - _index_at(self.index.times, self.sampling.start_time)
        return sum(gop.cost for gop in gops) <= SEEK_WORTH_IT * one_pass

    def sample(self) -> VideoFrames:
        available = self.frames_after_start()
        if available == 0:
            end, times = self.end_time(), self.facts.packet_times
            if self.sampling.start_time and times:
                raise ValueError(f"start_time={self.sampling.start_time} s is past the end of video "
                                 f"{self.location!r}: its last frame starts at {times[-1]:.3f} s and it ends at "
                                 f"{end:.3f} s; give an earlier start_time.")
            raise ValueError(f"no frame of video {self.location!r} could be read: its video stream is empty, or the "
                             "file is truncated or corrupt. Check that it plays, or re-encode it.")
        plan = self.plan(available)
        frames, times, indices, decoded, buffer = self._decode(plan)
        if decoded == 0:
            raise ValueError(f"no frame of {self.location!r} could be decoded: the video stream is empty or corrupt. "
                             "Re-encode the video.")
        # Frames decoded after a damaged stretch, numbered by their times (counted ones are sampled again below).
        if self.facts.packet_times is not None and any(end is not None for _, end in self.facts.damaged):
            warnings.warn(damage_warning(self.location, self.facts.damaged, plan.capacity - len(indices)),
                          stacklevel=3)
        elif not self.sampling.start_time and decoded != available:
            declared = self.facts.declared_frames or available
            warnings.warn(f"{self.location!r} declares {declared} frames but {decoded} could be decoded (a truncated "
                          f"or damaged file?): sampling from the {decoded} that exist.", stacklevel=3)
            if self.sampling.fps is None:
                self.facts.declared_frames, self.facts.packet_times = decoded, None
                self.container.seek(0)
                frames, times, indices, _, buffer = self._decode(self.plan(decoded))
        if frames is None:
            raise ValueError(f"no frame of {self.location!r} lies in the sampled range (start_time="
                             f"{self.sampling.start_time} s); give an earlier start_time.")
        total = self.facts.declared_frames if self.facts.packet_times is None else len(self.facts.packet_times)
        return VideoFrames(frames, times, indices, self.facts.frame_rate, total, self.sampling.start_time,
                           self.end_time(), buffer.release)


def load_video(source, sampling: VideoSampling = None, resize: FrameResize = None, **options) -> VideoFrames:
    """Decode a video file or URL with PyAV and sample frames from it (see `VideoSampling` for how; `options` set
    `VideoSampling` options for this call, None included). The container is opened once.

    Frames are resized as they are decoded: by `resize` when given, else to the sampling's edges.
    Returns a `VideoFrames` with HxWx3 uint8 frames, their timestamps (seconds) and frame indices.
    """
    sampling = (sampling or VideoSampling()).with_options(**options)
    if resize is None:
        resize = FrameResize(sampling.video_shortest_edge, sampling.video_longest_edge)
    location = os.fspath(source)
    if not is_url(location):
        location = _local_path(location)
        check_readable_file(location, "video")
    with _open_container(location, sampling.video_timeout, sampling.decode_device) as container:
        try:
            return _VideoSampler(container, location, sampling, resize).sample()
        except _import_av().error.FFmpegError as error:
            if is_url(location) and _is_timeout(_import_av(), error):
                raise TimeoutError(f"{location!r}: timed out after {sampling.video_timeout} s reading the video. "
                                   "Check the connection, or raise video_timeout.") from None
            raise


class FrameStream:
    """The sampled frames of one video as its decoding workers write them, first to last: `frames(n)` waits for
    the first n. Made by `stream_video`; `video()` waits for all and gives the `VideoFrames`. A file whose frames
    turn out not to match its packet index is decoded again in one pass (as `load_video` does); frames already
    handed out must then be the same ones, else the stream raises."""

    def __init__(self, video: Optional[VideoFrames], count: int, facts: dict = None, writer=None, decoder=None,
                 one_pass: Callable = None):
        # Decoded here (`video`), or decoding: `facts` are the VideoFrames fields known before the frames.
        self._video, self.count, self._facts = video, count, facts
        self._writer, self._decoder, self._one_pass = writer, decoder, one_pass
        self._handed_out = 0

    @classmethod
    def of(cls, video: VideoFrames) -> "FrameStream":
        """A stream of frames that are all there already."""
        return cls(video, len(video.frames))

    def frames(self, count: int) -> list:
        """The first `count` frames (at most `count`), once they are decoded."""
        count = min(count, self.count)
        if self._writer is not None:
            try:
                self._writer.wait_rows(count)
            except _IndexMismatch:
                self._decode_in_one_pass()
        if self._writer is not None:
            frames = list(self._writer.buffer.array[:count]) if count else []
        else:
            frames = self._video.frames[:count]
        self._handed_out = max(self._handed_out, count)
        return frames

    def metadata(self, start: int, end: int) -> dict:
        """The processor's `video_metadata` of frames [start, end) (decoded already: call `frames(end)` first)."""
        if self._writer is None:
            video = self._video
            times, indices = video.timestamps, video.frame_indices
            facts = dict(source_fps=video.source_fps, source_frame_count=video.source_frame_count,
                         start_time=video.start_time, end_time=video.end_time)
        else:
            times, indices = self._writer.times, self._facts["frame_indices"]
            facts = {name: value for name, value in self._facts.items() if name != "frame_indices"}
        return {"timestamps": None if times is None else list(times[start:end]),
                "frame_indices": None if indices is None else list(indices[start:end]), **facts,
                "num_frames": end - start}

    def _decode_in_one_pass(self) -> None:
        self._decoder.cancel()
        self._writer.wait_closed()
        video = self._one_pass()
        if video.frame_indices[: self._handed_out] != self._facts["frame_indices"][: self._handed_out]:
            raise ValueError(f"{self._handed_out} frames of this video were handed out before its packet index "
                             "turned out wrong, and decoding it in one pass samples other frames: load it with "
                             "decoder='sequential'.")
        self._video, self.count, self._writer, self._decoder = video, len(video.frames), None, None

    def release(self, count: int) -> None:
        """Hand back the memory of the first `count` frames (for frames decoded into a `FrameBuffer`)."""
        if self._writer is not None:
            self._writer.buffer.release(count)
        elif self._video.release is not None:
            self._video.release(count)

    def video(self) -> VideoFrames:
        """All the frames, with their timestamps and indices (waits for the decoding workers)."""
        frames = self.frames(self.count)
        if self._writer is None:
            return self._video
        self._writer.wait_closed()
        return VideoFrames(frames, list(self._writer.times[: self.count]), release=self._writer.buffer.release,
                           **self._facts)

    def close(self) -> None:
        """Stop decoding (frames already handed out stay valid)."""
        if self._decoder is not None:
            self._decoder.cancel()
            self._writer.wait_closed()

    def __enter__(self) -> "FrameStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def stream_video(source, sampling: VideoSampling = None, resize: FrameResize = None, **options) -> FrameStream:
    """`load_video`, returning as soon as the frames to sample are planned: the frames decode in background workers
    (seeking, for local files with a usable packet index) while the caller uses the first ones. Other sources are
    decoded before this returns. The frames are those `load_video` gives, bit for bit."""
    sampling = (sampling or VideoSampling()).with_options(**options)
    if resize is None:
        resize = FrameResize(sampling.video_shortest_edge, sampling.video_longest_edge)
    location = os.fspath(source)
    if is_url(location):
        return FrameStream.of(load_video(location, sampling, resize))
    location = _local_path(location)
    check_readable_file(location, "video")
    with _open_container(location, sampling.video_timeout, sampling.decode_device) as container:
        return _VideoSampler(container, location, sampling, resize).frame_stream()
