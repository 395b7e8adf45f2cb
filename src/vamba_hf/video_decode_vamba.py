"""Vamba's one decoding interface: `decode(source, sampling)` gives a video's sampled frames and their
`SampledVideoMetadata` (transformers' `VideoMetadata`, with each frame's timestamp). Behind it, the sampled frames
are planned from the stream's packet index (or frame by frame as it decodes) and decoded by one of two backends:
one pass from the start with PyAV (here), or the parallel seeking engine (`video_seek_vamba`) for local files with
a sound keyframe index. Either decodes on the CPU or on a GPU's NVDEC (`video_nvdec_vamba`), and gives the same
frames, bit for bit. `start_decode` returns as soon as the frames are planned, while seeking workers decode them.

Only the sampled frames are converted to RGB, rotated as the display matrix says and resized (PIL bicubic, the
original release's resize), straight into one uint8 array of the output size. Served as Hub remote code; PyAV and
tqdm are imported where they are used.
"""

import collections
import math
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

from transformers.video_utils import VideoMetadata

from .video_container_vamba import (
    StreamFacts,
    check_readable_file,
    damage_warning,
    decoded_frames,
    demux_packet_times,
    import_av,
    is_timeout,
    is_url,
    local_path,
    open_container,
    progress_bar,
    set_codec_threads,
    stream_facts,
)
from .video_frames_vamba import (
    FrameBuffer,
    FrameResize,
    conversion_workers,
    convert_into,
    display_size_of,
    resize_frame,
    source_frames_allowed,
)
from .video_sampling_vamba import (
    TIME_TOLERANCE,
    IndexPlan,
    TimePlan,
    VideoSampling,
    index_at,
    sample_frame_indices,
    sample_times,
)
from .video_seek_vamba import IndexMismatch, SeekingDecoder, gop_samples, packet_index, planned_frames

__all__ = ["BackgroundDecode", "FrameResize", "SampledVideoMetadata", "VideoSampling", "decode", "resize_frame",
           "start_decode"]

# Seeking decodes in worker processes by default with at least this many workers decoding at least this many
# frames: then the threads' shared interpreter lock costs more than starting processes and piping the frames back;
# with fewer workers or frames, starting the processes costs more than the lock (BENCHMARKS.md, "Decoding in worker
# processes").
MIN_WORKERS_FOR_PROCESSES = 4
MIN_FRAMES_FOR_PROCESSES = 2000
# "auto" seeks when that decodes at most this share of the frames one pass from the start would.
SEEK_WORTH_IT = 0.8


def _can_start_interpreters() -> bool:
    """Whether `sys.executable` runs Python code given with -c (not in an embedded or frozen application)."""
    return bool(sys.executable) and not getattr(sys, "frozen", False)


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
            self.buffer = FrameBuffer(self.capacity, *self.resize.output_size(*display_size_of(frame)))
            self.max_pending = source_frames_allowed(display_size_of(frame), self.max_pending)
        while len(self.pending) >= self.max_pending:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self._convert, frame, len(self.indices)))
        self.times.append(time)
        self.indices.append(index)

    def _convert(self, frame, row: int) -> None:
        convert_into(self.buffer, self.resize, frame, row)

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


def _decode_plan(container, stream, facts: StreamFacts, plan, sampling: VideoSampling, resize: FrameResize,
                 description: str) -> tuple:
    """One pass over the stream: (frames kept by `plan`, their times and indices, frames decoded)."""
    writer = _FrameWriter(plan.capacity, resize, workers=conversion_workers())
    bar = progress_bar(facts.declared_frames or len(facts.packet_times or []), sampling.progress, description)
    decoded = 0
    if sampling.start_time > 0:
        container.seek(int((sampling.start_time + facts.start) / stream.time_base), stream=stream, backward=True)
    damage_seen = len(facts.damaged)
    try:
        for frame in decoded_frames(container, stream, sampling.decode_device, facts.damaged, facts.start):
            time = float(frame.time) - facts.start if frame.time is not None else None
            if len(facts.damaged) != damage_seen:  # the first frame after a damaged stretch
                damage_seen = len(facts.damaged)
                plan.skip_to(time)
            index = decoded if facts.packet_times is None or time is None else index_at(facts.packet_times, time)
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


class _VideoSampler:
    """Plans and decodes the sampled frames of one open container."""

    def __init__(self, container, location: str, sampling: VideoSampling, resize: FrameResize):
        self.container, self.location, self.sampling, self.resize = container, location, sampling, resize
        self.stream = container.streams.video[0]
        set_codec_threads(self.stream, on_device=sampling.decode_device is not None)
        self.facts = stream_facts(self.stream)
        # A local file's frames are numbered by their times, from a list of its packets: a damaged stretch then
        # shifts no frame's number, and sampling by time reaches the last frame, wherever the declared duration
        # ends (B-frames' edit lists, variable frame rates). A URL is read once: its frames are counted as decoded.
        local = not is_url(location)
        needs_packet_times = local or sampling.start_time > 0 or not self.facts.declared_frames or (
            sampling.fps is not None and self.facts.duration is None)
        self.index = None
        if sampling.decoder != "sequential" and local:
            self.index = packet_index(container, self.stream, self.facts)
        if needs_packet_times:
            self.facts.packet_times = self.index.times if self.index else demux_packet_times(
                container, self.stream, self.facts)

    def frames_after_start(self) -> int:
        if self.facts.packet_times is None:
            return self.facts.declared_frames
        return len(self.facts.packet_times) - index_at(self.facts.packet_times, self.sampling.start_time)

    def plan(self, available: int):
        first = 0 if self.facts.packet_times is None else index_at(self.facts.packet_times, self.sampling.start_time)
        if self.sampling.fps is None:
            indices = sample_frame_indices(available, self.sampling.frame_count(self.sampling.num_frames))
            return IndexPlan([first + index for index in indices])
        end = self.end_time()
        if end is None or end <= self.sampling.start_time:
            return IndexPlan([])
        wanted = max(1, math.ceil((end - self.sampling.start_time) * self.sampling.fps))
        return TimePlan(sample_times(self.sampling.start_time, end, self.sampling.frame_count(wanted)))

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
        except IndexMismatch:
            return None
        frames = list(writer.buffer.array[: len(kept)])
        return frames, writer.times, [position for position, _ in kept], self.frames_after_start(), writer.buffer

    def _seeking(self, plan, description: str) -> Optional[tuple]:
        """(decoder, GOPs, kept (position, time) pairs, worker count) to decode `plan` by seeking, or None when the
        file has no usable index, nothing is kept, or seeking does not pay (decoder "auto")."""
        if self.index is None:
            return None
        kept = planned_frames(plan, self.index, self.sampling.start_time)
        if not kept:
            return None
        gops = gop_samples(self.index, [position for position, _ in kept])
        workers = self._workers_for_frame_size(min(self.sampling.worker_count(), len(gops)))
        if self.sampling.decoder == "auto" and workers == 1 and not self._seeking_pays(gops):
            return None
        bar = progress_bar(sum(gop.cost for gop in gops), self.sampling.progress, description)
        processes = self._in_processes(workers, gops)
        if processes:
            workers = self._workers_for_frame_size(min(self.sampling.worker_count(processes=True), len(gops)))
        decoder = SeekingDecoder(self.location, self.facts, self.index, self.resize, bar, processes=processes,
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

    def start(self):
        """A `BackgroundDecode` of the sampled frames when the file can be decoded by seeking; else (frames,
        metadata) decoded here."""
        available = self.frames_after_start()
        seeking = self._seeking(self.plan(available), f"decoding {os.path.basename(self.location)}") \
            if available else None
        if seeking is None:
            return self.sample()
        decoder, gops, kept, workers = seeking
        metadata = self._metadata([position for position, _ in kept], None)
        return BackgroundDecode(len(kept), metadata, decoder.start(gops, len(kept), workers), decoder)

    def _seeking_pays(self, gops: list) -> bool:
        one_pass = gops[-1].last + 1 - index_at(self.index.times, self.sampling.start_time)
        return sum(gop.cost for gop in gops) <= SEEK_WORTH_IT * one_pass

    def sample(self) -> tuple:
        """(frames, metadata) of the sampled frames."""
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
                          stacklevel=4)
        elif not self.sampling.start_time and decoded != available:
            declared = self.facts.declared_frames or available
            warnings.warn(f"{self.location!r} declares {declared} frames but {decoded} could be decoded (a truncated "
                          f"or damaged file?): sampling from the {decoded} that exist.", stacklevel=4)
            if self.sampling.fps is None:
                self.facts.declared_frames, self.facts.packet_times = decoded, None
                self.container.seek(0)
                frames, times, indices, _, buffer = self._decode(self.plan(decoded))
        if frames is None:
            raise ValueError(f"no frame of {self.location!r} lies in the sampled range (start_time="
                             f"{self.sampling.start_time} s); give an earlier start_time.")
        return frames, self._metadata(indices, times, buffer.release)

    def _metadata(self, indices: list, times: Optional[list], release: Optional[Callable] = None):
        total = self.facts.declared_frames if self.facts.packet_times is None else len(self.facts.packet_times)
        codec = self.stream.codec_context
        return SampledVideoMetadata(total, self.facts.frame_rate, codec.width, codec.height, self.end_time(), "pyav",
                                    indices, times, self.sampling.start_time, self.end_time(), release)


@dataclass
class SampledVideoMetadata(VideoMetadata):
    """transformers' `VideoMetadata` of a video's sampled frames (`total_num_frames` and `fps` of the source stream,
    `frames_indices` of the sampled frames in it, `width` and `height` as coded, `duration` in seconds), with each
    frame's own `timestamps` (seconds from the stream's start, variable frame rates included, where transformers
    computes index / fps) and the part of the stream sampled: a growing file's next call starts at `end_time`.
    `release(n)` hands back the memory of the first n frames."""

    timestamps: Optional[list] = None
    start_time: float = 0.0
    end_time: Optional[float] = None
    release: Optional[Callable] = field(default=None, repr=False, compare=False)


@dataclass
class BackgroundDecode:
    """The sampled frames of a video as seeking workers decode them: `writer.wait_rows(n)` waits for the first n
    (raising `IndexMismatch` when the file must be decoded in one pass instead), which are then
    `writer.buffer.array[:n]`, shown at `writer.times[:n]`; `decoder.cancel()` stops the workers. `metadata` is
    that of all `count` frames but for their timestamps."""

    count: int
    metadata: SampledVideoMetadata
    writer: object
    decoder: SeekingDecoder


def _prepared(source, sampling: Optional[VideoSampling], resize: Optional[FrameResize]) -> tuple:
    """(location, sampling, resize): a local file checked, the sampling's edges when no resize is given."""
    sampling = sampling or VideoSampling()
    if resize is None:
        resize = FrameResize(sampling.video_shortest_edge, sampling.video_longest_edge)
    location = os.fspath(source)
    if not is_url(location):
        location = local_path(location)
        check_readable_file(location, "video")
    return location, sampling, resize


def decode(source, sampling: VideoSampling = None, resize: FrameResize = None) -> tuple:
    """(frames, metadata): the frames of a video file or URL sampled as `sampling` says (`VideoSampling()` when
    None), HxWx3 uint8 arrays resized as they are decoded (by `resize` when given, else to the sampling's edges),
    and their `SampledVideoMetadata`. The container is opened once."""
    location, sampling, resize = _prepared(source, sampling, resize)
    with open_container(location, sampling.video_timeout, sampling.decode_device) as container:
        try:
            return _VideoSampler(container, location, sampling, resize).sample()
        except import_av().error.FFmpegError as error:
            if is_url(location) and is_timeout(import_av(), error):
                raise TimeoutError(f"{location!r}: timed out after {sampling.video_timeout} s reading the video. "
                                   "Check the connection, or raise video_timeout.") from None
            raise


def start_decode(source, sampling: VideoSampling = None, resize: FrameResize = None):
    """`decode`, returning as soon as the frames to sample are planned: a `BackgroundDecode` for a local file with a
    usable packet index, whose frames decode by seeking in background workers; else (frames, metadata), decoded
    before this returns. The frames are those `decode` gives, bit for bit."""
    if is_url(os.fspath(source)):
        return decode(source, sampling, resize)
    location, sampling, resize = _prepared(source, sampling, resize)
    with open_container(location, sampling.video_timeout, sampling.decode_device) as container:
        return _VideoSampler(container, location, sampling, resize).start()
