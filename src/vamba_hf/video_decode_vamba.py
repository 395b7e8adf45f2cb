"""Decoding video and image files for Vamba with PyAV and PIL: opening files and URLs, the stream's packet index,
sampled frames decoded (on the CPU, or on a GPU's NVDEC) in one pass or by seeking to the keyframes before them (in
worker threads or processes, one container each), converted to RGB, rotated as the display matrix says and resized
(PIL bicubic) into one uint8 array.

Served as Hub remote code beside `video_vamba.py`, which holds the sampling options and the public `load_video`;
PyAV and tqdm are imported where they are used.
"""

import bisect
import collections
import contextlib
import errno
import functools
import json
import mmap
import os
import struct
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import PIL.Image

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None

if TYPE_CHECKING:
    from .video_vamba import VideoSampling

# A progress bar is shown (when `progress` is left to None) for decodes at least this long.
PROGRESS_BAR_MIN_FRAMES = 1000
# Timestamps closer than this (seconds) count as equal: container time bases round.
TIME_TOLERANCE = 1e-6


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


def _check_frame_size(width: int, height: int, what: str) -> None:
    if width == 0 or height == 0:
        raise ValueError(f"{what} has zero size ({width}x{height}); give a non-empty image.")



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


def _open_container(location: str, timeout: float, device: Optional[str] = None):
    """The container of a video; with `device` ("cuda" or "cuda:N"), its first video stream decodes on that GPU's
    NVDEC, with no fallback to the CPU."""
    av = _import_av()
    try:
        container = _open(av, location, timeout, device)
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
    if container.streams.video[0].codec_context is None:
        container.close()
        raise ValueError(f"cannot read {location!r} as a video: FFmpeg has no decoder for its video stream (an "
                         "unknown codec, or a damaged header). Check that it plays, or re-encode it (e.g. `ffmpeg -i "
                         "in -c:v libx264 out.mp4`).")
    if device is not None and not container.streams.video[0].codec_context.is_hwaccel:
        codec = container.streams.video[0].codec_context.name
        container.close()
        raise _device_error(device, location, f"FFmpeg has no NVDEC decoder for its {codec} stream")
    return container


def _open(av, location: str, timeout: float, device: Optional[str]):
    # Metadata that is not UTF-8 (a damaged header) is read with replacement characters: the frames do not need it.
    options = {"metadata_errors": "replace", **({"timeout": (timeout, timeout)} if is_url(location) else {})}
    if device is None:
        return av.open(location, **options)
    try:
        if not hasattr(av.VideoFrame, "sw_format"):  # a hardware frame's layout, which `_in_system_memory` reads
            raise RuntimeError(f"PyAV {av.__version__} is too old for it; `pip install -U av`")
        # FFmpeg takes the device's primary CUDA context only if it is inactive or was made with blocking sync.
        # torch makes it with other flags (a model on the GPU): FFmpeg then uses it as this thread's current one.
        if _torch_holds_cuda():
            with _torch_context_current(device):
                return _open_on_device(av, location, device, options, "current")
        try:
            return _open_on_device(av, location, device, options, "primary")
        except av.error.OSError as error:
            if error.errno != errno.EOPNOTSUPP:
                raise
            # Another library made the primary context with other flags: the container gets one of its own.
            return _open_on_device(av, location, device, options, "own")
    except (av.error.FFmpegError, RuntimeError, TypeError) as error:
        _open_container(location, timeout).close()  # a file that cannot be read says so first
        raise _device_error(device, location, error) from error


# FFmpeg's cuda device options for each CUDA context a container can decode in (PyAV passes a HWAccel's options on;
# its `flags` it drops before PyAV 19, and it asks for the primary context itself unless told otherwise).
CUDA_CONTEXT_OPTIONS = {"primary": {"primary_ctx": "1"}, "current": {"primary_ctx": "0", "current_ctx": "1"},
                        "own": {"primary_ctx": "0"}}


def _torch_holds_cuda() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_initialized()


@contextlib.contextmanager
def _torch_context_current(device: str):
    """The device's primary context current in this thread while FFmpeg takes it; the thread's torch device is
    restored after."""
    import torch

    with torch.cuda.device(int(device.partition(":")[2] or 0)):
        torch.cuda.mem_get_info()  # a runtime call, which makes the primary context current in this thread
        yield


def _open_on_device(av, location: str, device: str, options: dict, context: str):
    # Frames stay in GPU memory (is_hw_owned): only the sampled ones are copied out, by `_in_system_memory`.
    hwaccel = av.codec.hwaccel.HWAccel("cuda", device=device.partition(":")[2] or None, allow_software_fallback=False,
                                       is_hw_owned=True, options=dict(CUDA_CONTEXT_OPTIONS[context]))
    return av.open(location, hwaccel=hwaccel, **options)


def _device_error(device: str, location: str, reason) -> RuntimeError:
    return RuntimeError(f"decode_device={device!r} cannot decode {location!r} ({reason}): decoding on the GPU needs "
                        "an NVIDIA driver with NVDEC, a PyAV whose FFmpeg has the cuda device, and a codec NVDEC "
                        "decodes (H.264, HEVC, VP9, AV1). Decode on the CPU: decode_device=None.")


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

    def skip_to(self, time: Optional[float]) -> None:
        """The frames before `time` since the last one offered were lost (damaged): what was on screen at the times
        before it is unknown, and they are left out."""
        while self.next < len(self.times) and (time is None or time > self.times[self.next] + TIME_TOLERANCE):
            self.next += 1
        self.previous = None

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
    # The stretches of damaged data that one pass skipped: the times of the frames either side (None: the start or
    # the end of the stream).
    damaged: list = field(default_factory=list)


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


def _decoded_frames(container, stream, device: Optional[str] = None, damaged: Optional[list] = None,
                    start: float = 0.0):
    """Decoded frames of `stream`, in order. A packet that does not decode, or a frame the decoder marks corrupt,
    makes the frames after it suspect (they may refer to it): they are skipped up to a sound keyframe whose packet
    came after the damage (a keyframe decoded before it may be damaged without a word), and the stretch is added
    to `damaged` as the times (seconds from `start`) of the frames either side of it (None: the stream's start or
    end). A broken container ends the stream. When the stream decodes on `device` and no packet decodes (NVDEC set
    up, but not for this stream), raises."""
    av = _import_av()
    any_decoded, last_error, last_time = False, None, None
    after_damage = None  # while skipping: the timestamps of the keyframe packets read since the damage
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as error:
                last_error, after_damage = error, set()
                continue
            if after_damage is not None and packet.is_keyframe:
                after_damage.update((packet.pts, packet.dts))
            any_decoded = any_decoded or bool(frames)
            for frame in frames:
                time = None if frame.time is None else float(frame.time) - start
                if getattr(frame, "is_corrupt", False):  # PyAV 13+: a frame the decoder concealed damage in
                    after_damage = set()
                if after_damage is not None:
                    if not (frame.key_frame and (frame.pts in after_damage or (frame.pts is None and after_damage))):
                        continue
                    _add_damage(damaged, last_time, time)
                    after_damage = None
                last_time = time
                yield frame
    except av.error.FFmpegError as error:
        if _is_timeout(av, error):
            raise
    if after_damage is not None:
        _add_damage(damaged, last_time, None)
    if device is not None and last_error is not None and not any_decoded:
        raise _device_error(device, container.name, last_error) from last_error


def _add_damage(damaged: Optional[list], before: Optional[float], after: Optional[float]) -> None:
    if damaged is not None:
        damaged.append((before, after))


def damage_warning(location: str, damaged: list, missed: int) -> str:
    """The warning for the stretches of a video that decoding skipped, with the sampled frames they held."""
    def seconds(value, missing):
        return missing if value is None else f"{value:.2f} s"

    stretches = "; ".join(f"between {seconds(before, 'the start')} and {seconds(after, 'the end')}"
                          for before, after in damaged)
    return (f"{location!r} holds damaged data: no frame could be decoded {stretches} (decoding skipped to the next "
            f"keyframe and went on after it); {missed} sampled frame(s) there are left out. Re-encode or "
            f"re-download the file to sample them.")


def _set_codec_threads(stream, count: int = 0, on_device: bool = False) -> None:
    """Frame and slice threads, `count` of them (0: FFmpeg's choice); one for a decoder on a GPU's NVDEC. Each frame
    thread holds a frame of the source's size: frames too large for one each of the CPU's threads get fewer."""
    stream.thread_type = "AUTO"
    cpus = os.cpu_count() or 1
    most = source_frames_allowed((stream.codec_context.width, stream.codec_context.height), cpus,
                                 DECODED_BYTES_PER_PIXEL)
    if on_device:
        stream.thread_count = 1
    elif most < cpus:
        stream.thread_count = min(count or cpus, most)
    else:
        stream.thread_count = count


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


def _in_system_memory(frame):
    """A hardware (NVDEC) frame copied to system memory; other frames as they are. NVDEC's 8-bit 4:2:0 frames (all
    of its H.264) come as NV12, the software decoder's yuv420p samples interleaved: FFmpeg deinterleaves them, so
    their RGB is the CPU decoder's bit for bit. Other layouts are copied as NVDEC gives them."""
    if frame.format.name != "cuda":
        return frame
    layout = frame.sw_format.name
    return frame.reformat(format="yuv420p" if layout == "nv12" else layout)


def _display_image(frame) -> PIL.Image.Image:
    """The frame (in system memory or not) as an RGB PIL image, turned as its display matrix says."""
    image = _in_system_memory(frame).to_image()
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


# Bytes that source-size frames may take at once in decoded frames waiting for conversion, in conversions, in the
# decoders of seeking workers, and in a decoder's frame threads: frames up to 4K take as many as before (two per
# conversion thread, one decoder per worker, FFmpeg's thread count), larger ones fewer (a 16000x16000 frame one at
# a time), so that memory follows the output size rather than the source's.
SOURCE_FRAMES_BUDGET = 1 << 30
# A frame being converted: decoded (YUV 4:2:0, 1.5 bytes a pixel), in RGB (3) and as PIL's image (4 bytes a pixel).
CONVERTED_BYTES_PER_PIXEL = 9
# A decoded frame, as a frame thread holds it (4:2:0 at 16 bits or 4:4:4 at 8: 3 bytes a pixel).
DECODED_BYTES_PER_PIXEL = 3


def source_frames_allowed(display_size: tuple, most: int, bytes_per_pixel: int = CONVERTED_BYTES_PER_PIXEL) -> int:
    """How many source frames of `display_size` (width, height) may be held at once, from 1 to `most`."""
    frame_bytes = max(1, bytes_per_pixel * display_size[0] * display_size[1])
    return max(1, min(most, SOURCE_FRAMES_BUDGET // frame_bytes))


def _convert_into(buffer: FrameBuffer, resize: FrameResize, frame, row: int) -> None:
    output = buffer.array[row]
    output[...] = resize.apply(_display_image(frame), output.shape[1::-1])


class _FrameWriter:
    """Converts kept frames (RGB, rotation, resize) in worker threads, all to the size of the first."""

    def __init__(self, capacity: int, resize: FrameResize, workers: int):
        self.capacity, self.resize = capacity, resize
        self.pool = ThreadPoolExecutor(max_workers=workers)
        # Decoded frames waiting for a worker hold source-size pixels: at most two per worker, fewer large ones.
        self.max_pending = 2 * workers
        self.pending, self.times, self.indices = collections.deque(), [], []
        self.buffer = None

    def add(self, index: int, time: float, frame) -> None:
        if self.buffer is None:
            self.buffer = FrameBuffer(self.capacity, *self.resize.output_size(*_display_size(frame)))
            self.max_pending = source_frames_allowed(_display_size(frame), self.max_pending)
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


def _decode_plan(container, stream, facts: _StreamFacts, plan, sampling: "VideoSampling", resize: FrameResize,
                 description: str) -> tuple:
    """One pass over the stream: (frames kept by `plan`, their times and indices, frames decoded)."""
    writer = _FrameWriter(plan.capacity, resize, workers=_conversion_workers())
    bar = _progress_bar(facts.declared_frames or len(facts.packet_times or []), sampling.progress, description)
    decoded = 0
    if sampling.start_time > 0:
        container.seek(int((sampling.start_time + facts.start) / stream.time_base), stream=stream, backward=True)
    damage_seen = len(facts.damaged)
    try:
        for frame in _decoded_frames(container, stream, sampling.decode_device, facts.damaged, facts.start):
            time = float(frame.time) - facts.start if frame.time is not None else None
            if len(facts.damaged) != damage_seen:  # the first frame after a damaged stretch
                damage_seen = len(facts.damaged)
                plan.skip_to(time)
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


def _split_into_runs(gops: list, count: int) -> list:
    """At most `count` consecutive runs of GOPs, in time order, of about equal decoding cost."""
    total = sum(gop.cost for gop in gops)
    runs, current, done = [], [], 0
    for gop in gops:
        current.append(gop)
        done += gop.cost
        if done * count >= total * (len(runs) + 1) and len(runs) < count - 1:
            runs.append(current)
            current = []
    return runs + [current] if current else runs


# Runs of GOPs per decoding thread. Several, taken in time order: the sampled frames then complete roughly first to
# last (a stream of chunks can start on the first ones) and a slow run holds up no whole share of the video.
RUNS_PER_WORKER = 4
# A worker decodes on through a gap of at most this many unsampled frames rather than seek over it.
MAX_GAP_DECODED = 16


class _RowWriter:
    """Converts frames into given rows of one `FrameBuffer` in conversion threads, taking frames from several
    decoding threads (`write`), or takes rows that decoding processes filled (`buffer_for`, `mark_written`), and
    tells which rows are written (`wait_rows`). The buffer takes the size of the first frame written; a frame of
    another display size raises `_IndexMismatch` (one pass resizes every frame to the size of the first sampled
    one, which a worker cannot know)."""

    def __init__(self, capacity: int, resize: FrameResize, workers: int):
        self.capacity, self.resize = capacity, resize
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.buffer, self.display_size = None, None
        self.times = [None] * capacity
        self.written = [False] * capacity
        self.ready = 0  # rows [0, ready) are written
        self.error, self.closed = None, False
        self.pool = ThreadPoolExecutor(max_workers=workers)
        # Decoded frames waiting for a conversion thread hold source-size pixels: at most two per thread, fewer
        # large ones (set with the buffer).
        self.most_pending, self.free_slots = 2 * workers, None
        self.pending = []

    def buffer_for(self, display_size: tuple) -> FrameBuffer:
        """The buffer, made for the first display size asked for; `_IndexMismatch` for another one."""
        with self.lock:
            if self.buffer is None:
                self.display_size = display_size
                self.buffer = FrameBuffer(self.capacity, *self.resize.output_size(*display_size))
                self.free_slots = threading.BoundedSemaphore(source_frames_allowed(display_size, self.most_pending))
        if display_size != self.display_size:
            raise _IndexMismatch()
        return self.buffer

    def write(self, row: int, time: float, frame) -> None:
        buffer = self.buffer_for(_display_size(frame))
        self.times[row] = time
        self.free_slots.acquire()
        future = self.pool.submit(_convert_into, buffer, self.resize, frame, row)
        future.add_done_callback(lambda done: self._converted(row, done))
        with self.lock:
            self.pending.append(future)

    def _converted(self, row: int, future) -> None:
        self.free_slots.release()
        if future.exception() is not None:
            self.fail(future.exception())
        else:
            self.mark_written(row)

    def mark_written(self, row: int, time: Optional[float] = None) -> None:
        """Row `row` of the buffer holds its frame (shown at `time`, when given)."""
        with self.changed:
            if time is not None:
                self.times[row] = time
            self.written[row] = True
            while self.ready < self.capacity and self.written[self.ready]:
                self.ready += 1
            self.changed.notify_all()

    def fail(self, error: BaseException) -> None:
        with self.changed:
            self.error = self.error or error
            self.changed.notify_all()

    def close(self) -> None:
        """After the last write: waits for the conversions, then wakes every waiter."""
        for future in self.pending:
            future.exception()
        self.pool.shutdown()
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def wait_rows(self, count: int) -> None:
        """Blocks until rows [0, count) are written; raises the first error of a decoding or conversion thread."""
        with self.changed:
            while self.ready < count and self.error is None and not self.closed:
                self.changed.wait()
            if self.error is not None:
                raise self.error
            if self.ready < count:
                raise _IndexMismatch()  # decoding ended before reaching a sampled frame

    def wait_closed(self) -> None:
        with self.changed:
            while not self.closed:
                self.changed.wait()


class _SeekingDecoder:
    """Decodes the sampled GOPs of a local file in worker threads, or in worker processes (`_DecodingProcess`, with
    `processes`), each with its own container open on the file, taking runs of GOPs in time order. With `device`,
    the first `device_workers` workers (None: all) decode on that GPU's NVDEC and the others on the CPU. Every
    decoded frame is checked against the packet index (its time is a packet's, frames follow each other without a
    gap from a keyframe, which decodes as one), so the frames are those one pass from the start gives, or
    `_IndexMismatch` is raised."""

    def __init__(self, location: str, facts: _StreamFacts, index: _PacketIndex, resize: FrameResize, bar,
                 processes: bool = False, device: Optional[str] = None, device_workers: Optional[int] = None):
        self.location, self.facts, self.index, self.resize, self.bar = location, facts, index, resize, bar
        self.processes, self.device, self.device_workers = processes, device, device_workers
        # A decoded frame is the packet of its timestamp (the index holds distinct timestamps).
        self.position_of_pts = {pts: position for position, pts in enumerate(index.pts)}
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.running = []  # the `_DecodingProcess`es, with `processes`

    def start(self, gops: list, capacity: int, workers: int) -> _RowWriter:
        """Starts decoding in the background: the returned writer's rows fill as the frames decode (`wait_rows`).
        `cancel` stops it."""
        writer = _RowWriter(capacity, self.resize, workers=_conversion_workers())
        runs = collections.deque(_split_into_runs(gops, workers * RUNS_PER_WORKER))
        workers = min(workers, len(runs))
        devices = self.worker_devices(workers)
        codec_threads = max(1, (os.cpu_count() or 1) // workers)
        work = self._work
        if self.processes:
            job = _DecodingProcess.job(self.location, self.facts, self.index, self.resize)
            work = functools.partial(self._work_in_process, job)
        threads = [threading.Thread(target=work, args=(runs, writer, codec_threads, device), daemon=True)
                   for device in devices]
        for thread in threads:
            thread.start()
        threading.Thread(target=self._close_after, args=(threads, writer), daemon=True).start()
        return writer

    def worker_devices(self, workers: int) -> list:
        """Where each of `workers` workers decodes: `device` (NVDEC) or None (the CPU)."""
        if self.device is None:
            return [None] * workers
        on_device = workers if self.device_workers is None else min(self.device_workers, workers)
        return [self.device] * on_device + [None] * (workers - on_device)

    def decode(self, gops: list, capacity: int, workers: int) -> _RowWriter:
        """The writer holding all the decoded frames and their times, once every thread has ended."""
        writer = self.start(gops, capacity, workers)
        try:
            writer.wait_rows(capacity)
        finally:
            self.cancel()
            writer.wait_closed()
        return writer

    def cancel(self) -> None:
        self.stop.set()
        with self.lock:
            for process in self.running:
                process.kill()

    def _close_after(self, threads: list, writer: _RowWriter) -> None:
        for thread in threads:
            thread.join()
        if self.bar is not None:  # before the writer wakes its waiters, which may print next
            self.bar.close()
        writer.close()

    def _work(self, runs: collections.deque, writer: _RowWriter, codec_threads: int, device: Optional[str]) -> None:
        try:
            with _open_container(self.location, timeout=None, device=device) as container:
                stream = container.streams.video[0]
                _set_codec_threads(stream, codec_threads, on_device=device is not None)
                while not self.stop.is_set():
                    try:
                        run = runs.popleft()
                    except IndexError:
                        return
                    self._decode_run(container, stream, run, writer, device)
        except _import_av().error.FFmpegError:  # a device that fails raises a `_device_error`, no FFmpegError
            self._failed(writer, _IndexMismatch())
        except BaseException as error:  # handed to the thread waiting for the frames
            self._failed(writer, error)

    def _work_in_process(self, job: bytes, runs: collections.deque, writer: _RowWriter, codec_threads: int,
                         device: Optional[str]) -> None:
        try:
            with self.lock:
                if self.stop.is_set():
                    return
                process = _DecodingProcess(self.location)
                self.running.append(process)
        except BaseException as error:
            self._failed(writer, error)
            return
        try:
            process.send_job(job, codec_threads, device)
            while not self.stop.is_set():
                try:
                    run = runs.popleft()
                except IndexError:
                    return
                process.decode_run(run, writer, self.bar)
        except BaseException as error:
            self._failed(writer, _IndexMismatch() if self.stop.is_set() else error)
        finally:
            process.close()

    def _failed(self, writer: _RowWriter, error: BaseException) -> None:
        self.stop.set()
        writer.fail(error)

    def _decode_run(self, container, stream, gops: list, writer: _RowWriter, device: Optional[str]) -> None:
        frames, expected = None, None
        for gop in gops:
            if frames is None or gop.keyframe - expected > MAX_GAP_DECODED:
                container.seek(self.index.pts[gop.keyframe], stream=stream, backward=True)
                frames, expected = _decoded_frames(container, stream, device), gop.keyframe
            expected = self._decode_gop(frames, expected, gop, writer)

    def _decode_gop(self, frames, expected: int, gop: _GopSamples, writer: _RowWriter) -> int:
        """Decodes from position `expected` through the GOP's last sample; returns the next position. The work per
        frame is kept small: the decoding threads share the interpreter lock for it."""
        position_of_pts, rows = self.position_of_pts, gop.rows
        for frame in frames:
            if self.stop.is_set():
                raise _IndexMismatch()
            position = position_of_pts.get(frame.pts)
            if position is None:
                raise _IndexMismatch()
            if position < expected:  # decoded before the keyframe sought (an earlier keyframe, open-GOP frames)
                continue
            if position != expected or (position == gop.keyframe and not frame.key_frame):
                raise _IndexMismatch()
            if self.bar is not None:
                self.bar.update(1)
            if position in rows:
                writer.write(rows[position], float(frame.time) - self.facts.start, frame)
            if position == gop.last:
                return position + 1
            expected += 1
        raise _IndexMismatch()


# ----------------------------------------------------------------------------------------------
# Decoding in worker processes: the GIL is then not shared between the decoding and the caller's GPU work

# Messages from a decoding process: a one-byte kind, then a fixed part.
FRAME_MESSAGE = struct.Struct("<iqd")  # b"F": row, frames decoded since the last message, time; then the pixels
SIZE_MESSAGE = struct.Struct("<ii")  # b"S": display width and height of the first frame (the parent replies)
COUNT_MESSAGE = struct.Struct("<q")  # b"R": a run is done, frames decoded since the last message; b"E": text length
# b"M": a frame did not match the packet index.
PIPE_BYTES = 1 << 20  # Linux's largest unprivileged pipe; a frame then passes in one or two reads

# The frames go to the parent through the process's stdout, which is first set aside for them: anything printed
# after (by an import, say) goes to stderr.
DECODING_PROCESS_MAIN = """
import importlib.util, os, sys
replies = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
spec = importlib.util.spec_from_file_location("vamba_decoding_process", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
module.serve_decoding(replies)
"""


class _DecodingProcess:
    """A Python process that decodes runs of GOPs of one file (the same `_SeekingDecoder` code, in
    `serve_decoding`) and sends back the sampled frames, converted and resized, through its stdout pipe straight
    into the `_RowWriter`'s buffer. It runs this module's file with the interpreter and import path of this one,
    so it needs nothing importable by name (the module may be Hub remote code)."""

    def __init__(self, location: str):
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(path for path in sys.path if path))
        self.location = location
        self.process = subprocess.Popen([sys.executable, "-c", DECODING_PROCESS_MAIN, os.path.abspath(__file__)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environment, bufsize=0)
        for pipe in (self.process.stdin, self.process.stdout) if getattr(fcntl, "F_SETPIPE_SZ", None) else ():
            try:
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:
                pass  # a smaller pipe only means more reads and writes

    def send_job(self, job: bytes, codec_threads: int, device: Optional[str]) -> None:
        """Sends the decode's `job` line, then this process's own (it blocks until the process reads them)."""
        self._send(job + json.dumps({"codec_threads": codec_threads, "device": device}).encode() + b"\n")

    @staticmethod
    def job(location: str, facts: _StreamFacts, index: _PacketIndex, resize: FrameResize) -> bytes:
        """The first line every process of one decode is sent (the packet index can be long: encoded once)."""
        return json.dumps({"location": location, "start": facts.start, "pts": index.pts, "keyframes": index.keyframes,
                           "shortest_edge": resize.shortest_edge, "longest_edge": resize.longest_edge,
                           "final_resample": int(resize.final_resample)}).encode() + b"\n"

    def decode_run(self, gops: list, writer: _RowWriter, bar) -> None:
        self._send(json.dumps({"run": [[gop.keyframe, sorted(gop.rows.items())] for gop in gops]}).encode() + b"\n")
        while True:
            kind = self._read(1)
            if kind == b"F":
                row, decoded, time = FRAME_MESSAGE.unpack(self._read(FRAME_MESSAGE.size))
                self._read_into(memoryview(writer.buffer.array[row]).cast("B"))
                writer.mark_written(row, time)
                _count(bar, decoded)
            elif kind == b"S":
                height, width = writer.buffer_for(SIZE_MESSAGE.unpack(self._read(SIZE_MESSAGE.size))).array.shape[1:3]
                self._send(json.dumps({"size": [width, height]}).encode() + b"\n")
            elif kind == b"R":
                _count(bar, COUNT_MESSAGE.unpack(self._read(COUNT_MESSAGE.size))[0])
                return
            elif kind == b"M":
                raise _IndexMismatch()
            elif kind == b"E":
                text = self._read(COUNT_MESSAGE.unpack(self._read(COUNT_MESSAGE.size))[0]).decode(errors="replace")
                raise RuntimeError(f"decoding {self.location!r} in a worker process failed ({text}); "
                                   "decode_processes=False decodes in threads instead.")
            elif kind == b"":
                raise RuntimeError(f"a process decoding {self.location!r} ended unexpectedly (exit status "
                                   f"{self.process.wait()}; its error, if any, is on stderr above). "
                                   "decode_processes=False decodes in threads instead.")
            else:
                self.kill()
                raise RuntimeError(f"a process decoding {self.location!r} sent {kind!r}, which is no message of "
                                   "its protocol. decode_processes=False decodes in threads instead.")

    def _send(self, line: bytes) -> None:
        view = memoryview(line)
        try:
            while view:
                view = view[self.process.stdin.write(view):]
        except (BrokenPipeError, ValueError):
            pass  # the process ended: reading its pipe says how

    def _read(self, count: int) -> bytes:
        data = bytearray(count)
        return bytes(data[: self._read_into(memoryview(data))])

    def _read_into(self, view: memoryview) -> int:
        """Fills `view` from the pipe; returns how many bytes came (fewer at its end)."""
        done, pipe = 0, self.process.stdout
        while done < len(view):
            count = pipe.readinto(view[done:])
            if not count:
                break
            done += count
        if 0 < done < len(view) or (done == 0 and len(view) > 1):
            raise RuntimeError(f"a process decoding {self.location!r} ended in the middle of a frame (exit status "
                               f"{self.process.wait()}). decode_processes=False decodes in threads instead.")
        return done

    def kill(self) -> None:
        self.process.kill()

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


def _count(bar, frames: int) -> None:
    if bar is not None and frames:
        bar.update(frames)


class _FrameSender:
    """A decoding process's end of its pipes, standing in for the `_RowWriter` and the progress bar that its
    `_SeekingDecoder` writes to."""

    def __init__(self, replies, commands, resize: FrameResize):
        self.replies, self.commands, self.resize = replies, commands, resize
        self.display_size, self.output_size = None, None
        self.decoded = 0

    def update(self, frames: int) -> None:
        self.decoded += frames

    def write(self, row: int, time: float, frame) -> None:
        display_size = _display_size(frame)
        if self.output_size is None:
            self.send(b"S" + SIZE_MESSAGE.pack(*display_size))
            self.display_size, self.output_size = display_size, tuple(json.loads(self.commands.readline())["size"])
        elif display_size != self.display_size:
            raise _IndexMismatch()
        pixels = self.resize.apply(_display_image(frame), self.output_size)
        self.replies.write(b"F" + FRAME_MESSAGE.pack(row, self.decoded, time))
        self.send(np.ascontiguousarray(pixels).data)
        self.decoded = 0

    def end_run(self) -> None:
        self.send(b"R" + COUNT_MESSAGE.pack(self.decoded))
        self.decoded = 0

    def send(self, data) -> None:
        self.replies.write(data)
        self.replies.flush()


def serve_decoding(replies) -> None:
    """The main of a decoding process (`_DecodingProcess` is the other end): a job line, then runs of GOPs; the
    frames and other messages go to the binary file `replies`."""
    commands = sys.stdin.buffer
    job = {**json.loads(commands.readline()), **json.loads(commands.readline())}  # the decode's, this process's
    sender = _FrameSender(replies, commands, FrameResize(job["shortest_edge"], job["longest_edge"],
                                                         final_resample=job["final_resample"]))
    index = _PacketIndex([], job["pts"], job["keyframes"])
    decoder = _SeekingDecoder(job["location"], _StreamFacts(None, 0, None, job["start"]), index, sender.resize,
                              bar=sender)
    av = None
    try:
        av = _import_av()
        with _open_container(job["location"], timeout=None, device=job["device"]) as container:
            stream = container.streams.video[0]
            _set_codec_threads(stream, job["codec_threads"], on_device=job["device"] is not None)
            for line in iter(commands.readline, b""):
                gops = [_GopSamples(keyframe, dict(rows)) for keyframe, rows in json.loads(line)["run"]]
                decoder._decode_run(container, stream, gops, sender, job["device"])
                sender.end_run()
    except BaseException as error:
        if isinstance(error, _IndexMismatch) or (av is not None and isinstance(error, av.error.FFmpegError)):
            sender.send(b"M")
        else:
            text = f"{type(error).__name__}: {error}".encode()
            sender.send(b"E" + COUNT_MESSAGE.pack(len(text)) + text)
