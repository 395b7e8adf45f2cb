"""The parallel seeking decoder for Vamba: a local file's packet index, the groups of pictures (GOPs) that hold the
sampled frames, and worker threads or processes (each with its own container open on the file, on the CPU or on a
GPU's NVDEC) that seek to their keyframes and decode forward to the samples, writing them into one frame buffer as
they come (`SeekingDecoder.start`, whose writer `wait_rows`). Every decoded frame is checked against the index:
a file whose frames do not match it raises `IndexMismatch`, and is decoded in one pass instead.

Worker processes run this module's file (`serve_decoding`) and talk to the parent over their stdin and stdout
pipes. Served as Hub remote code; imports only numpy, PIL and the standard library at top level.
"""

import bisect
import collections
import functools
import json
import os
import struct
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None

from .video_container_vamba import StreamFacts, decoded_frames, import_av, open_container, set_codec_threads
from .video_frames_vamba import (
    FrameBuffer,
    FrameResize,
    conversion_workers,
    convert_into,
    display_image,
    display_size_of,
    source_frames_allowed,
)
from .video_sampling_vamba import TIME_TOLERANCE


class IndexMismatch(Exception):
    """A decoded frame is not the one the packet index announced: the video is decoded in one pass instead."""


@dataclass
class PacketIndex:
    """Every packet of a video stream in presentation order, read by a demux pass without decoding."""

    times: list  # seconds from the stream's start
    pts: list  # in the stream's time base
    keyframes: list  # positions in `times` of the keyframes, ascending

    def gop_of(self, position: int) -> int:
        return bisect.bisect_right(self.keyframes, position) - 1


def packet_index(container, stream, facts: StreamFacts) -> Optional[PacketIndex]:
    """The packet index, from the container's own index when that gives every frame's presentation time, else from
    a demux pass; None when it cannot be trusted to seek by."""
    return _index_from_entries(stream, facts) or _index_from_demuxing(container, stream, facts)


def _index_from_entries(stream, facts: StreamFacts) -> Optional[PacketIndex]:
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


def _index_of(packets: list, stream, facts: StreamFacts, presorted: bool = False) -> Optional[PacketIndex]:
    """The index of (pts, is keyframe) pairs; None for two packets at one time, or a first frame that is no
    keyframe. `presorted` pairs must already be in strictly increasing time."""
    pts = [value for value, _ in packets]
    if presorted and any(later <= earlier for earlier, later in zip(pts, pts[1:])):
        return None
    keyframes = [position for position, (_, keyframe) in enumerate(packets) if keyframe]
    if not keyframes or keyframes[0] != 0 or len(set(pts)) != len(pts):
        return None
    time_base = stream.time_base
    return PacketIndex([float(value * time_base) - facts.start for value in pts], pts, keyframes)


def _index_from_demuxing(container, stream, facts: StreamFacts) -> Optional[PacketIndex]:
    """The index from a demux pass, or None on a packet without a timestamp, an empty or corrupt packet, or a
    demuxing error. The container is rewound after."""
    av = import_av()
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


def planned_frames(plan, index: PacketIndex, start_time: float) -> list:
    """(position, time) of the frames `plan` keeps from a stream whose frames are the packets of `index`."""
    kept = []
    for position, time in enumerate(index.times):
        if time >= start_time - TIME_TOLERANCE:
            kept += plan.offer(position, time, None)
    return [(position, time) for position, time, _ in kept + plan.finish()]


def gop_samples(index: PacketIndex, positions: list) -> list:
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


class RowWriter:
    """Converts frames into given rows of one `FrameBuffer` in conversion threads, taking frames from several
    decoding threads (`write`), or takes rows that decoding processes filled (`buffer_for`, `mark_written`), and
    tells which rows are written (`wait_rows`). The buffer takes the size of the first frame written; a frame of
    another display size raises `IndexMismatch` (one pass resizes every frame to the size of the first sampled
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
        """The buffer, made for the first display size asked for; `IndexMismatch` for another one."""
        with self.lock:
            if self.buffer is None:
                self.display_size = display_size
                self.buffer = FrameBuffer(self.capacity, *self.resize.output_size(*display_size))
                self.free_slots = threading.BoundedSemaphore(source_frames_allowed(display_size, self.most_pending))
        if display_size != self.display_size:
            raise IndexMismatch()
        return self.buffer

    def write(self, row: int, time: float, frame) -> None:
        buffer = self.buffer_for(display_size_of(frame))
        self.times[row] = time
        self.free_slots.acquire()
        future = self.pool.submit(convert_into, buffer, self.resize, frame, row)
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
                raise IndexMismatch()  # decoding ended before reaching a sampled frame

    def wait_closed(self) -> None:
        with self.changed:
            while not self.closed:
                self.changed.wait()


class SeekingDecoder:
    """Decodes the sampled GOPs of a local file in worker threads, or in worker processes (`_DecodingProcess`, with
    `processes`), each with its own container open on the file, taking runs of GOPs in time order. With `device`,
    the first `device_workers` workers (None: all) decode on that GPU's NVDEC and the others on the CPU. Every
    decoded frame is checked against the packet index (its time is a packet's, frames follow each other without a
    gap from a keyframe, which decodes as one), so the frames are those one pass from the start gives, or
    `IndexMismatch` is raised."""

    def __init__(self, location: str, facts: StreamFacts, index: PacketIndex, resize: FrameResize, bar,
                 processes: bool = False, device: Optional[str] = None, device_workers: Optional[int] = None):
        self.location, self.facts, self.index, self.resize, self.bar = location, facts, index, resize, bar
        self.processes, self.device, self.device_workers = processes, device, device_workers
        # A decoded frame is the packet of its timestamp (the index holds distinct timestamps).
        self.position_of_pts = {pts: position for position, pts in enumerate(index.pts)}
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.running = []  # the `_DecodingProcess`es, with `processes`

    def start(self, gops: list, capacity: int, workers: int) -> RowWriter:
        """Starts decoding in the background: the returned writer's rows fill as the frames decode (`wait_rows`).
        `cancel` stops it."""
        writer = RowWriter(capacity, self.resize, workers=conversion_workers())
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

    def decode(self, gops: list, capacity: int, workers: int) -> RowWriter:
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

    def _close_after(self, threads: list, writer: RowWriter) -> None:
        for thread in threads:
            thread.join()
        if self.bar is not None:  # before the writer wakes its waiters, which may print next
            self.bar.close()
        writer.close()

    def _work(self, runs: collections.deque, writer: RowWriter, codec_threads: int, device: Optional[str]) -> None:
        try:
            with open_container(self.location, timeout=None, device=device) as container:
                stream = container.streams.video[0]
                set_codec_threads(stream, codec_threads, on_device=device is not None)
                while not self.stop.is_set():
                    try:
                        run = runs.popleft()
                    except IndexError:
                        return
                    self._decode_run(container, stream, run, writer, device)
        except import_av().error.FFmpegError:  # a device that fails raises a `device_error`, no FFmpegError
            self._failed(writer, IndexMismatch())
        except BaseException as error:  # handed to the thread waiting for the frames
            self._failed(writer, error)

    def _work_in_process(self, job: bytes, runs: collections.deque, writer: RowWriter, codec_threads: int,
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
            self._failed(writer, IndexMismatch() if self.stop.is_set() else error)
        finally:
            process.close()

    def _failed(self, writer: RowWriter, error: BaseException) -> None:
        self.stop.set()
        writer.fail(error)

    def _decode_run(self, container, stream, gops: list, writer: RowWriter, device: Optional[str]) -> None:
        frames, expected = None, None
        for gop in gops:
            if frames is None or gop.keyframe - expected > MAX_GAP_DECODED:
                container.seek(self.index.pts[gop.keyframe], stream=stream, backward=True)
                frames, expected = decoded_frames(container, stream, device), gop.keyframe
            expected = self._decode_gop(frames, expected, gop, writer)

    def _decode_gop(self, frames, expected: int, gop: _GopSamples, writer: RowWriter) -> int:
        """Decodes from position `expected` through the GOP's last sample; returns the next position. The work per
        frame is kept small: the decoding threads share the interpreter lock for it."""
        position_of_pts, rows = self.position_of_pts, gop.rows
        for frame in frames:
            if self.stop.is_set():
                raise IndexMismatch()
            position = position_of_pts.get(frame.pts)
            if position is None:
                raise IndexMismatch()
            if position < expected:  # decoded before the keyframe sought (an earlier keyframe, open-GOP frames)
                continue
            if position != expected or (position == gop.keyframe and not frame.key_frame):
                raise IndexMismatch()
            if self.bar is not None:
                self.bar.update(1)
            if position in rows:
                writer.write(rows[position], float(frame.time) - self.facts.start, frame)
            if position == gop.last:
                return position + 1
            expected += 1
        raise IndexMismatch()


# ----------------------------------------------------------------------------------------------
# Decoding in worker processes: the GIL is then not shared between the decoding and the caller's GPU work

# Messages from a decoding process: a one-byte kind, then a fixed part.
FRAME_MESSAGE = struct.Struct("<iqd")  # b"F": row, frames decoded since the last message, time; then the pixels
SIZE_MESSAGE = struct.Struct("<ii")  # b"S": display width and height of the first frame (the parent replies)
COUNT_MESSAGE = struct.Struct("<q")  # b"R": a run is done, frames decoded since the last message; b"E": text length
# b"M": a frame did not match the packet index.
PIPE_BYTES = 1 << 20  # Linux's largest unprivileged pipe; a frame then passes in one or two reads

# The frames go to the parent through the process's stdout, which is first set aside for them: anything printed
# after (by an import, say) goes to stderr. This module and the sibling modules it imports load as a package of
# their folder's files, so the process needs nothing importable by name.
DECODING_PROCESS_MAIN = """
import importlib, os, sys, types
replies = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
package = types.ModuleType("vamba_decoding_process")
package.__path__ = [os.path.dirname(sys.argv[1])]
sys.modules[package.__name__] = package
module = importlib.import_module(package.__name__ + "." + os.path.splitext(os.path.basename(sys.argv[1]))[0])
module.serve_decoding(replies)
"""


class _DecodingProcess:
    """A Python process that decodes runs of GOPs of one file (the same `SeekingDecoder` code, in
    `serve_decoding`) and sends back the sampled frames, converted and resized, through its stdout pipe straight
    into the `RowWriter`'s buffer. It runs this module's file with the interpreter and import path of this one,
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
    def job(location: str, facts: StreamFacts, index: PacketIndex, resize: FrameResize) -> bytes:
        """The first line every process of one decode is sent (the packet index can be long: encoded once)."""
        return json.dumps({"location": location, "start": facts.start, "pts": index.pts, "keyframes": index.keyframes,
                           "shortest_edge": resize.shortest_edge, "longest_edge": resize.longest_edge,
                           "final_resample": int(resize.final_resample)}).encode() + b"\n"

    def decode_run(self, gops: list, writer: RowWriter, bar) -> None:
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
                raise IndexMismatch()
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
    """A decoding process's end of its pipes, standing in for the `RowWriter` and the progress bar that its
    `SeekingDecoder` writes to."""

    def __init__(self, replies, commands, resize: FrameResize):
        self.replies, self.commands, self.resize = replies, commands, resize
        self.display_size, self.output_size = None, None
        self.decoded = 0

    def update(self, frames: int) -> None:
        self.decoded += frames

    def write(self, row: int, time: float, frame) -> None:
        display_size = display_size_of(frame)
        if self.output_size is None:
            self.send(b"S" + SIZE_MESSAGE.pack(*display_size))
            self.display_size, self.output_size = display_size, tuple(json.loads(self.commands.readline())["size"])
        elif display_size != self.display_size:
            raise IndexMismatch()
        pixels = self.resize.apply(display_image(frame), self.output_size)
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
    index = PacketIndex([], job["pts"], job["keyframes"])
    decoder = SeekingDecoder(job["location"], StreamFacts(None, 0, None, job["start"]), index, sender.resize,
                             bar=sender)
    av = None
    try:
        av = import_av()
        with open_container(job["location"], timeout=None, device=job["device"]) as container:
            stream = container.streams.video[0]
            set_codec_threads(stream, job["codec_threads"], on_device=job["device"] is not None)
            for line in iter(commands.readline, b""):
                gops = [_GopSamples(keyframe, dict(rows)) for keyframe, rows in json.loads(line)["run"]]
                decoder._decode_run(container, stream, gops, sender, job["device"])
                sender.end_run()
    except BaseException as error:
        if isinstance(error, IndexMismatch) or (av is not None and isinstance(error, av.error.FFmpegError)):
            sender.send(b"M")
        else:
            text = f"{type(error).__name__}: {error}".encode()
            sender.send(b"E" + COUNT_MESSAGE.pack(len(text)) + text)
