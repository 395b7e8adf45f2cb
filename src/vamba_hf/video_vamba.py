"""Video (and image file) input for Vamba: the sampling options, decoding with PyAV, frames users already have.

Served as Hub remote code beside `processing_vamba.py`, so it imports only numpy, PIL, torch, transformers and the
standard library at top level; PyAV and tqdm are imported where they are used.

A video file is opened once per decoding thread. Which frames are sampled is decided from the stream's packet index
(or, without one, frame by frame as the stream decodes). Local files with a sound keyframe index decode only the
groups of pictures (GOPs) that hold a sampled frame: each worker thread opens its own container on the file, seeks
to the keyframe at or before its samples and decodes forward to them; other sources decode in order from the start.
Both give the same frames, bit for bit. Only the sampled frames are converted to RGB, rotated as the display matrix
says and resized (PIL bicubic, the original release's resize), straight into one uint8 array of the output size.
"""

import bisect
import collections
import math
import mmap
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
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
DECODERS = ("auto", "sequential", "seek")
MAX_DEFAULT_DECODE_WORKERS = 8
# "auto" seeks when that decodes at most this share of the frames one pass from the start would.
SEEK_WORTH_IT = 0.8


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
    - `decode_workers`: threads (each with its own container open on the file) that decode GOPs in parallel when
      seeking; None uses min(8, CPU count).
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

    def worker_count(self) -> int:
        return self.decode_workers or min(MAX_DEFAULT_DECODE_WORKERS, os.cpu_count() or 1)

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

    def apply(self, image: PIL.Image.Image, output_size: tuple) -> np.ndarray:
        """The image, resized to its edges size and then to `output_size`, as an HxWx3 uint8 array."""
        size = edges_size(*image.size, self.shortest_edge, self.longest_edge)
        if size != image.size:
            image = image.resize(size, resample=PIL.Image.BICUBIC)
        if tuple(output_size) != image.size:
            image = image.resize(tuple(output_size), resample=self.final_resample)
        return np.asarray(image)


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
        self.capacity = len(self.indices)
        self.next = 0

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


def _quarter_turns(frame) -> int:
    """Counter-clockwise quarter turns the frame's display matrix asks for."""
    return round(getattr(frame, "rotation", 0) / 90) % 4


QUARTER_TURN_TRANSPOSES = {1: PIL.Image.Transpose.ROTATE_90, 2: PIL.Image.Transpose.ROTATE_180,
                           3: PIL.Image.Transpose.ROTATE_270}


def _display_image(frame) -> PIL.Image.Image:
    """The frame as an RGB PIL image, turned as its display matrix says."""
    image = frame.to_image()
    turns = _quarter_turns(frame)
    return image.transpose(QUARTER_TURN_TRANSPOSES[turns]) if turns else image


def _display_size(frame) -> tuple:
    return (frame.height, frame.width) if _quarter_turns(frame) % 2 else (frame.width, frame.height)


class FrameBuffer:
    """Frames of one size in one anonymous memory map, whose pages are handed back to the system as the frames
    are used, first to last (so that patching a long video moves memory from frames to patches)."""

    def __init__(self, capacity: int, width: int, height: int):
        self.frame_bytes = width * height * 3
        size = max(1, capacity * self.frame_bytes)
        if hasattr(mmap, "MAP_ANONYMOUS"):  # private: handed-back pages are freed (a shared mapping keeps them)
            self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        else:
            self.map = mmap.mmap(-1, size)
        self.array = np.frombuffer(self.map, dtype=np.uint8, count=capacity * self.frame_bytes).reshape(
            capacity, height, width, 3)
        self.released = 0  # bytes, a multiple of the page size

    def release(self, count: int) -> None:
        end = count * self.frame_bytes // mmap.PAGESIZE * mmap.PAGESIZE
        if end > self.released and hasattr(mmap, "MADV_DONTNEED"):
            self.map.madvise(mmap.MADV_DONTNEED, self.released, end - self.released)
            self.released = end


def _conversion_workers() -> int:
    return min(4, os.cpu_count() or 1)


def _convert_into(buffer: FrameBuffer, resize: FrameResize, frame, row: int) -> None:
    output = buffer.array[row]
    output[...] = resize.apply(_display_image(frame), output.shape[1::-1])


class _FrameWriter:
    """Converts kept frames (RGB, rotation, resize) in worker threads, all to the size of the first."""

    def __init__(self, capacity: int, resize: FrameResize, workers: int):
        self.capacity, self.resize = capacity, resize
        self.pool = ThreadPoolExecutor(max_workers=workers)
        # Decoded frames waiting for a worker hold source-size pixels: at most two per worker.
        self.max_pending = 2 * workers
        self.pending, self.times, self.indices = collections.deque(), [], []
        self.buffer = None

    def add(self, index: int, time: float, frame) -> None:
        if self.buffer is None:
            self.buffer = FrameBuffer(self.capacity, *self.resize.output_size(*_display_size(frame)))
        while len(self.pending) >= self.max_pending:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self._convert, frame, len(self.indices)))
        self.times.append(time)
        self.indices.append(index)

    def _convert(self, frame, row: int) -> None:
        _convert_into(self.buffer, self.resize, frame, row)

    def finish(self):
        """(the kept frames, the buffer holding them), or (None, None) when nothing was kept."""
        try:
            for future in self.pending:
                future.result()
        finally:
            self.pool.shutdown()
        if self.buffer is None:
            return None, None
        return list(self.buffer.array[: len(self.indices)]), self.buffer


def _decode_plan(container, stream, facts: _StreamFacts, plan, sampling: VideoSampling, resize: FrameResize,
                 description: str) -> tuple:
    """One pass over the stream: (frames kept by `plan`, their times and indices, frames decoded)."""
    writer = _FrameWriter(plan.capacity, resize, workers=_conversion_workers())
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
        frames, buffer = writer.finish()
        if bar is not None:
            bar.close()
    times = writer.times if all(time is not None for time in writer.times) else None
    return frames, times, writer.indices, decoded, buffer


def _index_at(packet_times: list, time: float) -> int:
    return bisect.bisect_left(packet_times, time - TIME_TOLERANCE)


# ----------------------------------------------------------------------------------------------
# Seeking: decoding only the GOPs that hold sampled frames, in parallel


class _IndexMismatch(Exception):
    """A decoded frame is not the one the packet index announced: the video is decoded in one pass instead."""


@dataclass
class _PacketIndex:
    """Every packet of a video stream in presentation order, read by a demux pass without decoding."""

    times: list  # seconds from the stream's start
    pts: list  # in the stream's time base
    keyframes: list  # positions in `times` of the keyframes, ascending

    def gop_of(self, position: int) -> int:
        return bisect.bisect_right(self.keyframes, position) - 1


def _packet_index(container, stream, facts: _StreamFacts) -> Optional[_PacketIndex]:
    """The packet index, from the container's own index when that gives every frame's presentation time, else from
    a demux pass; None when it cannot be trusted to seek by."""
    return _index_from_entries(stream, facts) or _index_from_demuxing(container, stream, facts)


def _index_from_entries(stream, facts: _StreamFacts) -> Optional[_PacketIndex]:
    """The container's index (e.g. an MP4's sample table), read without touching the packets. Its timestamps are
    decoding times, which are presentation times only without B-frames; None otherwise, or when the index does not
    list every frame (Matroska's cues list keyframes only)."""
    entries = getattr(stream, "index_entries", None)
    if entries is None or getattr(stream.codec_context, "has_b_frames", True) or not facts.declared_frames:
        return None
    if len(entries) != facts.declared_frames:
        return None
    entries = list(entries)
    if any(entry.is_discard for entry in entries):
        return None
    return _index_of([(entry.timestamp, entry.is_keyframe) for entry in entries], stream, facts, presorted=True)


def _index_of(packets: list, stream, facts: _StreamFacts, presorted: bool = False) -> Optional[_PacketIndex]:
    """The index of (pts, is keyframe) pairs; None for two packets at one time, or a first frame that is no
    keyframe. `presorted` pairs must already be in strictly increasing time."""
    pts = [value for value, _ in packets]
    if presorted and any(later <= earlier for earlier, later in zip(pts, pts[1:])):
        return None
    keyframes = [position for position, (_, keyframe) in enumerate(packets) if keyframe]
    if not keyframes or keyframes[0] != 0 or len(set(pts)) != len(pts):
        return None
    time_base = stream.time_base
    return _PacketIndex([float(value * time_base) - facts.start for value in pts], pts, keyframes)


def _index_from_demuxing(container, stream, facts: _StreamFacts) -> Optional[_PacketIndex]:
    """The index from a demux pass, or None on a packet without a timestamp, an empty or corrupt packet, or a
    demuxing error. The container is rewound after."""
    av = _import_av()
    packets = []
    try:
        for packet in container.demux(stream):
            if packet.pts is None and not packet.size:  # the demuxer's end-of-stream packet
                continue
            if packet.pts is None or not packet.size or packet.is_corrupt:
                return None
            packets.append((packet.pts, packet.is_keyframe))
    except av.error.FFmpegError:
        return None
    finally:
        if packets:
            container.seek(0)
    return _index_of(sorted(packets), stream, facts)


@dataclass
class _GopSamples:
    """The sampled frames of one GOP: decoding starts at its keyframe and stops at its last sample."""

    keyframe: int  # position of the keyframe
    rows: dict  # position of a sampled frame -> its row in the output

    @property
    def last(self) -> int:
        return max(self.rows)

    @property
    def cost(self) -> int:
        """Frames decoded for this GOP."""
        return self.last - self.keyframe + 1


def _planned_frames(plan, index: _PacketIndex, start_time: float) -> list:
    """(position, time) of the frames `plan` keeps from a stream whose frames are the packets of `index`."""
    kept = []
    for position, time in enumerate(index.times):
        if time >= start_time - TIME_TOLERANCE:
            kept += plan.offer(position, time, None)
    return [(position, time) for position, time, _ in kept + plan.finish()]


def _gop_samples(index: _PacketIndex, positions: list) -> list:
    gops = {}
    for row, position in enumerate(positions):
        keyframe = index.keyframes[index.gop_of(position)]
        gops.setdefault(keyframe, _GopSamples(keyframe, {})).rows[position] = row
    return [gops[keyframe] for keyframe in sorted(gops)]


def _split_for_workers(gops: list, workers: int) -> list:
    """Consecutive runs of GOPs, one per worker, of about equal decoding cost."""
    total = sum(gop.cost for gop in gops)
    runs, current, done = [], [], 0
    for gop in gops:
        current.append(gop)
        done += gop.cost
        if done * workers >= total * (len(runs) + 1) and len(runs) < workers - 1:
            runs.append(current)
            current = []
    return runs + [current] if current else runs


# A worker decodes on through a gap of at most this many unsampled frames rather than seek over it.
MAX_GAP_DECODED = 16


class _RowWriter:
    """Converts frames into given rows of one `FrameBuffer` in conversion threads, taking frames from several
    decoding threads. The buffer takes the size of the first frame written; a frame of another display size raises
    `_IndexMismatch` (one pass resizes every frame to the size of the first sampled one, which a worker cannot
    know)."""

    def __init__(self, capacity: int, resize: FrameResize, workers: int):
        self.capacity, self.resize = capacity, resize
        self.lock = threading.Lock()
        self.buffer, self.display_size = None, None
        self.times = [None] * capacity
        self.pool = ThreadPoolExecutor(max_workers=workers)
        # Decoded frames waiting for a conversion thread hold source-size pixels: at most two per thread.
        self.free_slots = threading.BoundedSemaphore(2 * workers)
        self.pending = []

    def write(self, row: int, time: float, frame) -> None:
        with self.lock:
            if self.buffer is None:
                self.display_size = _display_size(frame)
                self.buffer = FrameBuffer(self.capacity, *self.resize.output_size(*self.display_size))
        if _display_size(frame) != self.display_size:
            raise _IndexMismatch()
        self.times[row] = time
        self.free_slots.acquire()
        future = self.pool.submit(_convert_into, self.buffer, self.resize, frame, row)
        future.add_done_callback(lambda _: self.free_slots.release())
        with self.lock:
            self.pending.append(future)

    def finish(self) -> None:
        try:
            for future in self.pending:
                future.result()
        finally:
            self.pool.shutdown()


class _SeekingDecoder:
    """Decodes the sampled GOPs of a local file in worker threads, each with its own container open on the file.
    Every decoded frame is checked against the packet index (its time is a packet's, frames follow each other
    without a gap from a keyframe, which decodes as one), so the frames are those one pass from the start gives, or
    `_IndexMismatch` is raised."""

    def __init__(self, location: str, facts: _StreamFacts, index: _PacketIndex, resize: FrameResize, bar):
        self.location, self.facts, self.index, self.resize, self.bar = location, facts, index, resize, bar
        self.stop = threading.Event()

    def decode(self, gops: list, capacity: int, workers: int) -> _RowWriter:
        """The writer holding the decoded frames and their times."""
        writer = _RowWriter(capacity, self.resize, workers=_conversion_workers())
        runs = _split_for_workers(gops, workers)
        codec_threads = max(1, (os.cpu_count() or 1) // len(runs))
        try:
            with ThreadPoolExecutor(max_workers=len(runs)) as pool:
                futures = [pool.submit(self._decode_run, run, writer, codec_threads) for run in runs]
                try:
                    for future in futures:
                        future.result()
                finally:
                    self.stop.set()
        finally:
            writer.finish()
        return writer

    def _decode_run(self, gops: list, writer: _RowWriter, codec_threads: int) -> None:
        try:
            self._decode_gops(gops, writer, codec_threads)
        except _import_av().error.FFmpegError:
            raise _IndexMismatch() from None

    def _decode_gops(self, gops: list, writer: _RowWriter, codec_threads: int) -> None:
        with _open_container(self.location, timeout=None) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            stream.thread_count = codec_threads
            frames, expected = None, None
            for gop in gops:
                if frames is None or gop.keyframe - expected > MAX_GAP_DECODED:
                    container.seek(self.index.pts[gop.keyframe], stream=stream, backward=True)
                    frames, expected = _decoded_frames(container, stream), gop.keyframe
                expected = self._decode_gop(frames, expected, gop, writer)

    def _decode_gop(self, frames, expected: int, gop: _GopSamples, writer: _RowWriter) -> int:
        """Decodes from position `expected` through the GOP's last sample; returns the next position."""
        for frame in frames:
            if self.stop.is_set():
                raise _IndexMismatch()
            position, time = self._position_of(frame)
            if position < expected:  # decoded before the keyframe sought (an earlier keyframe, open-GOP frames)
                continue
            if position != expected or (position == gop.keyframe and not frame.key_frame):
                raise _IndexMismatch()
            if self.bar is not None:
                self.bar.update(1)
            if position in gop.rows:
                writer.write(gop.rows[position], time, frame)
            if position == gop.last:
                return position + 1
            expected += 1
        raise _IndexMismatch()

    def _position_of(self, frame) -> tuple:
        """(position in the index, time) of a decoded frame."""
        if frame.time is None:
            raise _IndexMismatch()
        time = float(frame.time) - self.facts.start
        position = _index_at(self.index.times, time)
        if position >= len(self.index.times) or abs(self.index.times[position] - time) > TIME_TOLERANCE:
            raise _IndexMismatch()
        return position, time


class _VideoSampler:
    """Plans and decodes the sampled frames of one open container."""

    def __init__(self, container, location: str, sampling: VideoSampling, resize: FrameResize):
        self.container, self.location, self.sampling, self.resize = container, location, sampling, resize
        self.stream = container.streams.video[0]
        self.stream.thread_type = "AUTO"
        self.facts = _stream_facts(self.stream)
        needs_packet_times = sampling.start_time > 0 or not self.facts.declared_frames or (
            sampling.fps is not None and self.facts.duration is None)
        self.index = None
        if sampling.decoder != "sequential" and not is_url(location):
            self.index = _packet_index(container, self.stream, self.facts)
        if needs_packet_times:
            self.facts.packet_times = self.index.times if self.index else _demux_packet_times(
                container, self.stream, self.facts)
        if self.index and self.facts.packet_times is None and self.facts.declared_frames != len(self.index.times):
            self.index = None  # one pass numbers frames as decoded, which the index cannot foresee here

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
        """Seconds: the stream's duration, or the end of its last packet when that is later."""
        end = self.facts.duration
        if self.facts.packet_times:
            end = max(end or 0.0, self.facts.packet_times[-1] + 1 / (self.facts.frame_rate or 1e9))
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
        kept = _planned_frames(plan, self.index, self.sampling.start_time)
        if not kept:
            return None
        gops = _gop_samples(self.index, [position for position, _ in kept])
        workers = min(self.sampling.worker_count(), len(gops))
        if self.sampling.decoder == "auto" and workers == 1 and not self._seeking_pays(gops):
            return None
        bar = _progress_bar(sum(gop.cost for gop in gops), self.sampling.progress, description)
        try:
            writer = _SeekingDecoder(self.location, self.facts, self.index, self.resize, bar).decode(
                gops, len(kept), workers)
        except _IndexMismatch:
            return None
        finally:
            if bar is not None:
                bar.close()
        frames = list(writer.buffer.array[: len(kept)])
        return frames, writer.times, [position for position, _ in kept], self.frames_after_start(), writer.buffer

    def _seeking_pays(self, gops: list) -> bool:
        one_pass = gops[-1].last + 1 - _index_at(self.index.times, self.sampling.start_time)
        return sum(gop.cost for gop in gops) <= SEEK_WORTH_IT * one_pass

    def sample(self) -> VideoFrames:
        available = self.frames_after_start()
        if available == 0:
            after = f" after start_time={self.sampling.start_time}" if self.sampling.start_time else ""
            raise ValueError(f"no frame of video {self.location!r} could be read{after}: its video stream is empty, "
                             "or the file is truncated or corrupt. Check that it plays, or re-encode it.")
        frames, times, indices, decoded, buffer = self._decode(self.plan(available))
        if decoded == 0:
            raise ValueError(f"no frame of {self.location!r} could be decoded: the video stream is empty or corrupt. "
                             "Re-encode the video.")
        if not self.sampling.start_time and decoded != available:
            warnings.warn(f"{self.location!r} declares {available} frames but {decoded} could be decoded (a truncated "
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
    with _open_container(location, sampling.video_timeout) as container:
        try:
            return _VideoSampler(container, location, sampling, resize).sample()
        except _import_av().error.FFmpegError as error:
            if is_url(location) and _is_timeout(_import_av(), error):
                raise TimeoutError(f"{location!r}: timed out after {sampling.video_timeout} s reading the video. "
                                   "Check the connection, or raise video_timeout.") from None
            raise
