"""Video (and image file) input for Vamba: the sampling options, decoding with PyAV, frames users already have.

Served as Hub remote code beside `processing_vamba.py`, so it imports only numpy, PIL, torch, transformers and the
standard library at top level; PyAV and tqdm are imported where they are used.

A video file is opened once. Frames are decoded in order; only the sampled ones are converted to RGB, rotated as
the display matrix says and resized (PIL bicubic, the original release's resize) in worker threads while decoding
goes on, straight into one uint8 array of the output size.
"""

import bisect
import collections
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Optional

import numpy as np
import PIL.Image
import torch
from transformers.image_utils import ChannelDimension, infer_channel_dimension_format

# A progress bar is shown (when `progress` is left to None) for decodes at least this long.
PROGRESS_BAR_MIN_FRAMES = 1000
# Consecutive undecodable packets after which a stream is treated as ended.
MAX_CONSECUTIVE_DECODE_ERRORS = 64
# Timestamps closer than this (seconds) count as equal: container time bases round.
TIME_TOLERANCE = 1e-6


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
    """

    num_frames: int = 128
    fps: Optional[float] = None
    max_frames: int = 512
    video_shortest_edge: Optional[int] = 256
    video_longest_edge: Optional[int] = 640
    video_timeout: float = 10.0
    start_time: float = 0.0
    progress: Optional[bool] = None

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
# Frame sizes


def edges_size(width: int, height: int, shortest_edge, longest_edge) -> tuple:
    """The original release's frame size: longest edge at most `longest_edge` (aspect kept), then each edge at least
    `shortest_edge`. A side never drops below 1 pixel."""
    aspect_ratio = width / height
    if longest_edge is not None:
        if width >= height and width > longest_edge:
            width, height = longest_edge, max(1, int(longest_edge / aspect_ratio))
        elif height > width and height > longest_edge:
            width, height = max(1, int(longest_edge * aspect_ratio)), longest_edge
    if shortest_edge is not None:
        width, height = max(width, shortest_edge), max(height, shortest_edge)
    return width, height


def resize_frame(frame: np.ndarray, size: tuple, resample=PIL.Image.BICUBIC) -> np.ndarray:
    """An HxWx3 uint8 frame resized to `size` (width, height) with PIL; unchanged when it already has that size."""
    if (frame.shape[1], frame.shape[0]) == tuple(size):
        return frame
    return np.asarray(PIL.Image.fromarray(frame).resize(tuple(size), resample=resample))


@dataclass(frozen=True)
class FrameResize:
    """The resizes each frame goes through: to `edges_size`, then to `final_size(width, height)` when given (the
    processor's patch grid), both with PIL."""

    shortest_edge: Optional[int] = None
    longest_edge: Optional[int] = None
    final_size: Optional[Callable] = None
    final_resample: int = PIL.Image.BICUBIC

    def output_size(self, width: int, height: int) -> tuple:
        size = edges_size(width, height, self.shortest_edge, self.longest_edge)
        return size if self.final_size is None else tuple(self.final_size(*size))

    def apply(self, frame: np.ndarray, output_size: tuple) -> np.ndarray:
        height, width = frame.shape[:2]
        frame = resize_frame(frame, edges_size(width, height, self.shortest_edge, self.longest_edge))
        return resize_frame(frame, output_size, self.final_resample)


# ----------------------------------------------------------------------------------------------
# Frames users already have


@dataclass
class VideoFrames:
    """Frames of one video as a (T, H, W, 3) uint8 array, and where they came from."""

    frames: np.ndarray
    timestamps: Optional[list] = None  # seconds from the start of the stream, one per frame, when known
    frame_indices: Optional[list] = None  # indices of the frames in the decoded stream, when known
    source_fps: Optional[float] = None
    source_frame_count: Optional[int] = None

    def __post_init__(self):
        self.frames = frames_array(self.frames)

    def metadata(self) -> dict:
        return {
            "timestamps": self.timestamps,
            "frame_indices": self.frame_indices,
            "source_fps": self.source_fps,
            "source_frame_count": self.source_frame_count,
            "num_frames": len(self.frames),
        }

    def first(self, count: int) -> "VideoFrames":
        if count == len(self.frames):
            return self
        cut = (lambda values: None if values is None else values[:count])
        return VideoFrames(self.frames[:count], cut(self.timestamps), cut(self.frame_indices), self.source_fps,
                           self.source_frame_count)


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


def _check_frame_size(width: int, height: int, what: str) -> None:
    if width == 0 or height == 0:
        raise ValueError(f"{what} has zero size ({width}x{height}); give a non-empty image.")


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


def frames_array(frames) -> np.ndarray:
    """A (T, H, W, 3) uint8 array from a 4-D array/tensor (channels first or last) or a list of frames."""
    if isinstance(frames, (np.ndarray, torch.Tensor)):
        array = _to_numpy(frames)
        if array.ndim != 4:
            raise ValueError(f"a video array must have 4 dimensions (T, H, W, C) or (T, C, H, W), "
                             f"got shape {tuple(array.shape)}")
        array = _rgb_channels_last(array, "video")
        _check_frame_size(array.shape[2], array.shape[1], "video frame")
        return np.ascontiguousarray(_to_uint8(array))
    if not isinstance(frames, (list, tuple)):
        raise TypeError(f"cannot use a {type(frames).__name__} as video frames: give an array, tensor or list")
    if not frames:
        raise ValueError("a video has no frames: give at least 2 frames.")
    arrays = [frame_array(frame, f"frame {index} of the video") for index, frame in enumerate(frames)]
    if any(array.shape != arrays[0].shape for array in arrays):
        raise ValueError("all frames of a video must have the same size; resize them to one size first")
    return np.stack(arrays)


def is_single_frame(item) -> bool:
    return isinstance(item, PIL.Image.Image) or (isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim in (2, 3))


def _frames_from_qwen_vl_utils(video, metadata: dict) -> VideoFrames:
    """qwen_vl_utils' `(video_tensor, {"fps": ..., "frames_indices": ...})`."""
    frames = frames_array(video)
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
        return VideoFrames(frames_array(video))
    raise TypeError(f"cannot use a {type(video).__name__} as a video: give a path, frames array/tensor, list of "
                    "frames or VideoFrames")


# ----------------------------------------------------------------------------------------------
# Files and URLs


def is_url(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def _local_path(source: str) -> str:
    return source[len("file://"):] if source.startswith("file://") else source


def check_readable_file(path: str, kind: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{kind} file not found: {path!r}. Check the path (relative paths start from "
                                f"{os.getcwd()!r}).")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a folder, not a {kind} file. Give the path of the {kind} file itself.")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{kind} file {path!r} is empty (0 bytes). Re-download or re-export it.")


def load_image(source, timeout: float = 10.0) -> PIL.Image.Image:
    """An RGB PIL image from a path, URL or data URI, with errors that name the file."""
    location = os.fspath(source)
    if is_url(location) or location.startswith("data:"):
        from transformers.image_utils import load_image as load_image_from_url

        image = load_image_from_url(location, timeout=timeout)
    else:
        path = _local_path(location)
        check_readable_file(path, "image")
        try:
            with PIL.Image.open(path) as opened:
                image = opened.convert("RGB")
        except (PIL.UnidentifiedImageError, OSError) as error:
            raise ValueError(f"cannot read {path!r} as an image ({error}). Check that the file is a complete "
                             "PNG/JPEG/... image.") from None
    _check_frame_size(*image.size, f"image {location!r}")
    return image.convert("RGB")


def _import_av():
    try:
        import av
    except ImportError:
        raise ImportError("decoding video files needs PyAV: `pip install av` (or pass the frames yourself)") from None
    return av


def _open_container(location: str, timeout: float):
    av = _import_av()
    try:
        container = av.open(location, timeout=(timeout, timeout)) if is_url(location) else av.open(location)
    except av.error.FFmpegError as error:
        if is_url(location) and _is_timeout(av, error):
            raise TimeoutError(f"{location!r}: timed out after {timeout} s waiting for the server. Check the "
                               "address, or raise video_timeout.") from None
        raise ValueError(f"cannot read {location!r} as a video ({error}). The file is not a video, or it is "
                         "truncated or corrupt; check that it plays, or re-encode it (e.g. `ffmpeg -i in -c:v "
                         "libx264 out.mp4`).") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"{location!r} has no video stream (an audio-only or data file?). Give a video file.")
    return container


def _is_timeout(av, error) -> bool:
    # PyAV's timeout interrupts FFmpeg, which reports it as an immediate exit (or ETIMEDOUT from the socket).
    return isinstance(error, (av.error.ExitError, av.error.TimeoutError)) or "timed out" in str(error).lower()


# ----------------------------------------------------------------------------------------------
# Sampling plans: which decoded frames to keep


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


class _IndexPlan:
    """Keeps the frames at the given stream indices."""

    def __init__(self, indices: list):
        self.indices = sorted(set(indices))
        self.next = 0

    @property
    def capacity(self) -> int:
        return len(self.indices)

    def offer(self, index: int, time: float, frame) -> list:
        if self.next < len(self.indices) and index == self.indices[self.next]:
            self.next += 1
            return [(index, time, frame)]
        return []

    def finish(self) -> list:
        return []


class _TimePlan:
    """Keeps, for each target time, the frame on screen then (the last one whose timestamp is not after it)."""

    def __init__(self, times: list):
        self.times = times
        self.next = 0
        self.previous = None
        self.last_kept_index = None

    @property
    def capacity(self) -> int:
        return len(self.times)

    def _keep(self, candidate) -> list:
        if candidate[0] == self.last_kept_index:
            return []
        self.last_kept_index = candidate[0]
        return [candidate]

    def offer(self, index: int, time: float, frame) -> list:
        kept = []
        while self.next < len(self.times) and time > self.times[self.next] + TIME_TOLERANCE:
            kept += self._keep(self.previous or (index, time, frame))
            self.next += 1
        self.previous = (index, time, frame)
        return kept

    def finish(self) -> list:
        remaining, self.next = self.next < len(self.times), len(self.times)
        return self._keep(self.previous) if remaining and self.previous is not None else []


# ----------------------------------------------------------------------------------------------
# Decoding


@dataclass
class _StreamFacts:
    """What the container says about its first video stream, and, after a demux pass, every packet's time."""

    frame_rate: Optional[float]
    declared_frames: int
    duration: Optional[float]  # seconds
    start: float  # seconds: the stream's first timestamp, subtracted from every frame time
    packet_times: Optional[list] = None  # sorted presentation times (seconds from `start`) of every packet


def _stream_facts(stream) -> _StreamFacts:
    time_base = stream.time_base
    start = float(stream.start_time * time_base) if stream.start_time is not None and time_base else 0.0
    duration = float(stream.duration * time_base) if stream.duration and time_base else None
    frame_rate = float(stream.average_rate) if stream.average_rate else None
    return _StreamFacts(frame_rate, max(stream.frames, 0), duration, start)


def _demux_packet_times(container, stream, facts: _StreamFacts) -> list:
    """Presentation times of every packet, in order, read without decoding; the container is rewound after."""
    av = _import_av()
    times = []
    try:
        for packet in container.demux(stream):
            if packet.size and packet.pts is not None:
                times.append(float(packet.pts * packet.time_base) - facts.start)
    except av.error.FFmpegError:
        pass
    if times:
        container.seek(0)
    return sorted(times)


def _decoded_frames(container, stream):
    """Decoded frames of `stream`, in order; undecodable packets are skipped, a broken container ends the stream."""
    av = _import_av()
    consecutive_errors = 0
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                consecutive_errors += 1
                if consecutive_errors > MAX_CONSECUTIVE_DECODE_ERRORS:
                    return
                continue
            consecutive_errors = 0
            yield from frames
    except av.error.FFmpegError as error:
        if _is_timeout(av, error):
            raise
        return


def _progress_bar(total: int, progress, description: str):
    if not (progress if progress is not None else total >= PROGRESS_BAR_MIN_FRAMES):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="frame", desc=description, leave=False)


def _rotated_rgb(frame) -> np.ndarray:
    """The frame as HxWx3 RGB, turned as its display matrix says (counter-clockwise degrees)."""
    rgb = frame.to_ndarray(format="rgb24")
    quarter_turns = round(getattr(frame, "rotation", 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, quarter_turns)) if quarter_turns else rgb


def _display_size(frame) -> tuple:
    quarter_turns = round(getattr(frame, "rotation", 0) / 90) % 4
    return (frame.height, frame.width) if quarter_turns % 2 else (frame.width, frame.height)


class _FrameWriter:
    """Converts kept frames (RGB, rotation, resize) in worker threads, each into its row of one uint8 array."""

    def __init__(self, capacity: int, resize: FrameResize, workers: int):
        self.capacity, self.resize = capacity, resize
        self.pool = ThreadPoolExecutor(max_workers=workers)
        # Decoded frames waiting for a worker hold source-size pixels: at most two per worker.
        self.max_pending = 2 * workers
        self.pending, self.times, self.indices = collections.deque(), [], []
        self.output = None

    def add(self, index: int, time: float, frame) -> None:
        if self.output is None:
            width, height = self.resize.output_size(*_display_size(frame))
            self.output = np.empty((self.capacity, height, width, 3), dtype=np.uint8)
        while len(self.pending) >= self.max_pending:
            self.pending.popleft().result()
        row = len(self.indices)
        self.pending.append(self.pool.submit(self._convert, frame, row))
        self.times.append(time)
        self.indices.append(index)

    def _convert(self, frame, row: int) -> None:
        self.output[row] = self.resize.apply(_rotated_rgb(frame), self.output.shape[2:0:-1])

    def finish(self):
        """The kept frames, or None when nothing was kept."""
        try:
            for future in self.pending:
                future.result()
        finally:
            self.pool.shutdown()
        return None if self.output is None else self.output[: len(self.indices)]


def _decode_plan(container, stream, facts: _StreamFacts, plan, sampling: VideoSampling, resize: FrameResize,
                 description: str) -> tuple:
    """One pass over the stream: (frames kept by `plan`, their times and indices, frames decoded)."""
    writer = _FrameWriter(plan.capacity, resize, workers=min(4, os.cpu_count() or 1))
    bar = _progress_bar(facts.declared_frames or len(facts.packet_times or []), sampling.progress, description)
    decoded = 0
    if sampling.start_time > 0:
        container.seek(int((sampling.start_time + facts.start) / stream.time_base), stream=stream, backward=True)
    try:
        for frame in _decoded_frames(container, stream):
            time = float(frame.time) - facts.start if frame.time is not None else None
            index = decoded if facts.packet_times is None or time is None else _index_at(facts.packet_times, time)
            decoded += 1
            if bar is not None:
                bar.update(1)
            if time is not None and time < sampling.start_time - TIME_TOLERANCE:
                continue
            for kept in plan.offer(index, time, frame):
                writer.add(*kept)
        for kept in plan.finish():
            writer.add(*kept)
    finally:
        frames = writer.finish()
        if bar is not None:
            bar.close()
    times = writer.times if all(time is not None for time in writer.times) else None
    return frames, times, writer.indices, decoded


def _index_at(packet_times: list, time: float) -> int:
    return bisect.bisect_left(packet_times, time - TIME_TOLERANCE)


class _VideoSampler:
    """Plans and decodes the sampled frames of one open container."""

    def __init__(self, container, location: str, sampling: VideoSampling, resize: FrameResize):
        self.container, self.location, self.sampling, self.resize = container, location, sampling, resize
        self.stream = container.streams.video[0]
        self.stream.thread_type = "AUTO"
        self.facts = _stream_facts(self.stream)
        needs_packet_times = sampling.start_time > 0 or not self.facts.declared_frames or (
            sampling.fps is not None and self.facts.duration is None)
        if needs_packet_times:
            self.facts.packet_times = _demux_packet_times(container, self.stream, self.facts)

    def frames_after_start(self) -> int:
        if self.facts.packet_times is None:
            return self.facts.declared_frames
        return len(self.facts.packet_times) - _index_at(self.facts.packet_times, self.sampling.start_time)

    def plan(self, available: int):
        first = self.facts.declared_frames - available if self.facts.packet_times is None else (
            _index_at(self.facts.packet_times, self.sampling.start_time))
        if self.sampling.fps is None:
            indices = sample_frame_indices(available, self.sampling.frame_count(self.sampling.num_frames))
            return _IndexPlan([first + index for index in indices])
        end = self.facts.duration
        if self.facts.packet_times:
            end = max(end or 0.0, self.facts.packet_times[-1] + 1 / (self.facts.frame_rate or 1e9))
        if end is None or end <= self.sampling.start_time:
            return _IndexPlan([])
        wanted = max(1, math.ceil((end - self.sampling.start_time) * self.sampling.fps))
        return _TimePlan(sample_times(self.sampling.start_time, end, self.sampling.frame_count(wanted)))

    def _decode(self, plan) -> tuple:
        return _decode_plan(self.container, self.stream, self.facts, plan, self.sampling, self.resize,
                            f"decoding {os.path.basename(self.location)}")

    def sample(self) -> VideoFrames:
        available = self.frames_after_start()
        if available == 0:
            after = f" after start_time={self.sampling.start_time}" if self.sampling.start_time else ""
            raise ValueError(f"no frame of video {self.location!r} could be read{after}: its video stream is empty, "
                             "or the file is truncated or corrupt. Check that it plays, or re-encode it.")
        frames, times, indices, decoded = self._decode(self.plan(available))
        if decoded == 0:
            raise ValueError(f"no frame of {self.location!r} could be decoded: the video stream is empty or corrupt. "
                             "Re-encode the video.")
        if not self.sampling.start_time and decoded != available:
            warnings.warn(f"{self.location!r} declares {available} frames but {decoded} could be decoded (a truncated "
                          f"or damaged file?): sampling from the {decoded} that exist.", stacklevel=3)
            if self.sampling.fps is None:
                self.facts.declared_frames, self.facts.packet_times = decoded, None
                self.container.seek(0)
                frames, times, indices, _ = self._decode(self.plan(decoded))
        if frames is None:
            raise ValueError(f"no frame of {self.location!r} lies in the sampled range (start_time="
                             f"{self.sampling.start_time} s); give an earlier start_time.")
        total = self.facts.declared_frames if self.facts.packet_times is None else len(self.facts.packet_times)
        return VideoFrames(frames, times, indices, self.facts.frame_rate, total)


def load_video(source, sampling: VideoSampling = None, resize: FrameResize = None, **options) -> VideoFrames:
    """Decode a video file or URL with PyAV and sample frames from it (see `VideoSampling` for how; `options` set
    `VideoSampling` options for this call, None included). The container is opened once.

    Frames are resized as they are decoded: by `resize` when given, else to the sampling's edges.
    Returns a `VideoFrames` with a (T, H, W, 3) uint8 array, timestamps (seconds) and frame indices.
    """
    sampling = (sampling or VideoSampling()).with_options(**options)
    if resize is None:
        resize = FrameResize(sampling.video_shortest_edge, sampling.video_longest_edge)
    location = os.fspath(source)
    if not is_url(location):
        location = _local_path(location)
        check_readable_file(location, "video")
    with _open_container(location, sampling.video_timeout) as container:
        try:
            return _VideoSampler(container, location, sampling, resize).sample()
        except _import_av().error.FFmpegError as error:
            if is_url(location) and _is_timeout(_import_av(), error):
                raise TimeoutError(f"{location!r}: timed out after {sampling.video_timeout} s reading the video. "
                                   "Check the connection, or raise video_timeout.") from None
            raise
