"""Small synthetic videos for the processor tests, written with PyAV.

Frame i is a solid gray of level `frame_level(i)`, so a decoded frame tells which source frame it is.
"""

from fractions import Fraction

import av
import numpy as np

from vamba_hf import video_seek_vamba

LEVEL_STEP = 4


def frame_level(index: int) -> int:
    return 16 + LEVEL_STEP * index


def frame_index_of(image) -> int:
    """The source index of a decoded frame (PIL image or HxWx3 array) written by `write_video`."""
    mean = float(np.asarray(image, dtype=np.float32).mean())
    return round((mean - 16) / LEVEL_STEP)


def gray_frames(num_frames, width, height):
    assert num_frames <= 55, "at most 55 frames, so every level stays distinct"
    return [np.full((height, width, 3), frame_level(index), dtype=np.uint8) for index in range(num_frames)]


def write_frames(path, frames, fps=10, codec="mpeg4", container_options=None, rotation=None, frame_times=None,
                 codec_options=None):
    """Encodes HxWx3 uint8 `frames`. `rotation`: degrees counter-clockwise in the display matrix. `frame_times`:
    seconds, one per frame, for a variable-frame-rate file (millisecond time base). `codec_options`: the
    encoder's options (e.g. libx264's {"g": "6"})."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec in ("mpeg4", "mjpeg", "mpeg2video"):
            stream.options = {"qscale": "2"}
            stream.codec_context.qmax = 2
        if codec_options is not None:
            stream.options = codec_options
        if rotation is not None:
            stream.set_display_rotation(rotation)
        if frame_times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
            stream.time_base = Fraction(1, 1000)
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            if frame_times is not None:
                frame.pts, frame.time_base = round(frame_times[index] * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_video(path, num_frames=12, width=64, height=48, fps=10, codec="mpeg4", container_options=None, **options):
    """Writes `num_frames` solid-gray frames (at most 55) and returns the path; `options` as for `write_frames`."""
    return write_frames(path, gray_frames(num_frames, width, height), fps, codec, container_options, **options)


def write_empty_video(path, codec="mpeg4"):
    """A container with a video stream and no frames."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height = 64, 48
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
    return path


def write_audio_only(path):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        samples = np.zeros((1, 800), dtype=np.int16)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def moving_frames(num_frames, width=64, height=48):
    """A moving gradient over fixed noise: libx264 codes it with B-frames, and every pixel matters."""
    rows, columns = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(0).integers(0, 24, (height, width, 3), dtype=np.uint8)
    return [np.stack([(3 * columns + 2 * index) % 256, (4 * rows + index) % 256, (columns + rows + 3 * index) % 256],
                     axis=-1).astype(np.uint8) // 2 + np.roll(noise, index, axis=1) for index in range(num_frames)]


def write_x264(path, num_frames=60, gop=6, frame_times=None, rotation=None, container_options=None):
    """libx264 at 10 fps with a keyframe every `gop` frames and B-frames."""
    return write_frames(path, moving_frames(num_frames), codec="libx264", container_options=container_options,
                        rotation=rotation, frame_times=frame_times,
                        codec_options={"g": str(gop), "keyint_min": str(gop), "bf": "2"})


def assert_same_video(seeking, sequential):
    assert seeking.frame_indices == sequential.frame_indices
    assert seeking.timestamps == sequential.timestamps
    assert (seeking.source_fps, seeking.source_frame_count, seeking.end_time) == \
        (sequential.source_fps, sequential.source_frame_count, sequential.end_time)
    assert len(seeking.frames) == len(sequential.frames)
    for seeking_frame, sequential_frame in zip(seeking.frames, sequential.frames):
        assert seeking_frame.shape == sequential_frame.shape
        assert np.array_equal(seeking_frame, sequential_frame)


def counted_decoding_processes(monkeypatch) -> list:
    """The list that every `_DecodingProcess` started from now on is appended to."""
    started = []

    class Counted(video_seek_vamba._DecodingProcess):
        def __init__(self, *args):
            super().__init__(*args)
            started.append(self)

    monkeypatch.setattr(video_seek_vamba, "_DecodingProcess", Counted)
    return started
