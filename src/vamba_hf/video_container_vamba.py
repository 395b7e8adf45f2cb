"""Video files for Vamba's decoders: opening files and URLs with PyAV (on the CPU, or on a GPU's NVDEC), what the
container says about the first video stream, its packets' times, its decoded frames with damaged stretches skipped,
codec threads and the progress bar. Image files are read here too.

Served as Hub remote code; imports only numpy, PIL and the standard library at top level (PyAV, tqdm and
transformers where they are used; decoding worker processes load it).
"""

import os
from dataclasses import dataclass, field
from typing import Optional

import PIL.Image

from .video_frames_vamba import DECODED_BYTES_PER_PIXEL, check_frame_size, source_frames_allowed
from .video_nvdec_vamba import device_error, open_on_device

# A progress bar is shown (when `progress` is left to None) for decodes at least this long.
PROGRESS_BAR_MIN_FRAMES = 1000


def is_url(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def local_path(source: str) -> str:
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
        path = local_path(location)
        check_readable_file(path, "image")
        try:
            with PIL.Image.open(path) as opened:
                image = opened.convert("RGB")
        except (PIL.UnidentifiedImageError, OSError) as error:
            raise ValueError(f"cannot read {path!r} as an image ({error}). Check that the file is a complete "
                             "PNG/JPEG/... image.") from None
    check_frame_size(*image.size, f"image {location!r}")
    return image.convert("RGB")


def import_av():
    try:
        import av
    except ImportError:
        raise ImportError("decoding video files needs PyAV: `pip install av` (or pass the frames yourself)") from None
    return av


def open_container(location: str, timeout: float, device: Optional[str] = None):
    """The container of a video; with `device` ("cuda" or "cuda:N"), its first video stream decodes on that GPU's
    NVDEC, with no fallback to the CPU."""
    av = import_av()
    try:
        container = _open(av, location, timeout, device)
    except av.error.FFmpegError as error:
        if is_url(location) and is_timeout(av, error):
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
        raise device_error(device, location, f"FFmpeg has no NVDEC decoder for its {codec} stream")
    return container


def metadata_options(av) -> dict:
    """Metadata that is not UTF-8 (a damaged header) must not stop the decoding: the frames do not need it. PyAV 19
    reads such bytes as surrogate escapes and has no option for it; earlier versions raise unless told to replace."""
    return {} if int(av.__version__.split(".")[0]) >= 19 else {"metadata_errors": "replace"}


def _open(av, location: str, timeout: float, device: Optional[str]):
    options = {**metadata_options(av), **({"timeout": (timeout, timeout)} if is_url(location) else {})}
    if device is None:
        return av.open(location, **options)
    try:
        return open_on_device(av, location, device, options)
    except (av.error.FFmpegError, RuntimeError, TypeError) as error:
        open_container(location, timeout).close()  # a file that cannot be read says so first
        raise device_error(device, location, error) from error


def is_timeout(av, error) -> bool:
    # PyAV's timeout interrupts FFmpeg, which reports it as an immediate exit (or ETIMEDOUT from the socket).
    return isinstance(error, (av.error.ExitError, av.error.TimeoutError)) or "timed out" in str(error).lower()


@dataclass
class StreamFacts:
    """What the container says about its first video stream, and, after a demux pass, every packet's time."""

    frame_rate: Optional[float]
    declared_frames: int
    duration: Optional[float]  # seconds
    start: float  # seconds: the stream's first timestamp, subtracted from every frame time
    packet_times: Optional[list] = None  # sorted presentation times (seconds from `start`) of every packet
    # The stretches of damaged data that one pass skipped: the times of the frames either side (None: the start or
    # the end of the stream).
    damaged: list = field(default_factory=list)


def stream_facts(stream) -> StreamFacts:
    time_base = stream.time_base
    start = float(stream.start_time * time_base) if stream.start_time is not None and time_base else 0.0
    duration = float(stream.duration * time_base) if stream.duration and time_base else None
    frame_rate = float(stream.average_rate) if stream.average_rate else None
    return StreamFacts(frame_rate, max(stream.frames, 0), duration, start)


def demux_packet_times(container, stream, facts: StreamFacts) -> list:
    """Presentation times of every packet, in order, read without decoding; the container is rewound after."""
    av = import_av()
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


def decoded_frames(container, stream, device: Optional[str] = None, damaged: Optional[list] = None,
                   start: float = 0.0):
    """Decoded frames of `stream`, in order. A packet that does not decode, or a frame the decoder marks corrupt,
    makes the frames after it suspect (they may refer to it): they are skipped up to a sound keyframe whose packet
    came after the damage (a keyframe decoded before it may be damaged without a word), and the stretch is added
    to `damaged` as the times (seconds from `start`) of the frames either side of it (None: the stream's start or
    end). A broken container ends the stream. When the stream decodes on `device` and no packet decodes (NVDEC set
    up, but not for this stream), raises."""
    av = import_av()
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
        if is_timeout(av, error):
            raise
    if after_damage is not None:
        _add_damage(damaged, last_time, None)
    if device is not None and last_error is not None and not any_decoded:
        raise device_error(device, container.name, last_error) from last_error


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


def set_codec_threads(stream, count: int = 0, on_device: bool = False) -> None:
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


def progress_bar(total: int, progress, description: str):
    if not (progress if progress is not None else total >= PROGRESS_BAR_MIN_FRAMES):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="frame", desc=description, leave=False)


