"""Video decoding and frame sampling: real small videos written with PyAV, corrupt files, properties."""

import contextlib
import errno
import os
import re
import socket
import subprocess
import sys
import threading
import time
import types
import warnings
from dataclasses import replace

import av
import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from media_helpers import (
    assert_same_video,
    counted_decoding_processes,
    frame_index_of,
    moving_frames,
    write_audio_only,
    write_empty_video,
    write_frames,
    write_video,
    write_x264,
)
from transformers.video_utils import VideoMetadata

from vamba_hf import video_container_vamba, video_decode_vamba, video_frames_vamba, video_nvdec_vamba, video_seek_vamba
from vamba_hf.video_decode_vamba import BackgroundDecode, decode, start_decode
from vamba_hf.video_frames_vamba import FrameBuffer, edges_size
from vamba_hf.video_vamba import (
    VideoFrames,
    VideoSampling,
    load_video,
    sample_frame_indices,
    stream_video,
    to_video_frames,
)

NO_RESIZE = VideoSampling(video_shortest_edge=None, video_longest_edge=None)
REAL_CPU_COUNT = os.cpu_count


@pytest.fixture(autouse=True)
def eight_cpus_at_least(monkeypatch):
    """The tests ask for up to 5 decoding workers, which are capped at the CPU count."""
    monkeypatch.setattr(os, "cpu_count", lambda: max(8, REAL_CPU_COUNT() or 1))


def original_middle_indices(num_frames, vlen):
    """The original release's `get_frame_indices(sample="middle")`, without its last-frame padding."""
    intervals = np.linspace(start=0, stop=vlen, num=min(num_frames, vlen) + 1).astype(int)
    return [(start + next_start - 1) // 2 for start, next_start in zip(intervals[:-1], intervals[1:])]


# -- sampling -------------------------------------------------------------------------------------


def test_sample_frame_indices_known_values():
    assert sample_frame_indices(10, 4) == [0, 3, 5, 8]
    assert sample_frame_indices(30, 8) == [1, 4, 8, 12, 16, 19, 23, 27]
    assert sample_frame_indices(3, 128) == [0, 1, 2]
    assert sample_frame_indices(0, 8) == []


@settings(max_examples=60, deadline=None)
@given(total=st.integers(1, 5000), wanted=st.integers(1, 600))
def test_sample_frame_indices_properties(total, wanted):
    indices = sample_frame_indices(total, wanted)
    assert len(indices) == min(total, wanted)
    assert all(0 <= index < total for index in indices)
    assert all(a < b for a, b in zip(indices, indices[1:]))
    assert indices == original_middle_indices(wanted, total)


# -- resizing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, expected",
    [
        ((1280, 720), (640, 360)),
        ((720, 1280), (360, 640)),
        ((640, 480), (640, 480)),
        ((300, 200), (300, 256)),
        ((200, 100), (256, 256)),
        ((2000, 100), (640, 256)),
    ],
)
def test_edges_size(size, expected):
    assert edges_size(*size, 256, 640) == expected


def test_edges_size_disabled_keeps_the_size():
    assert edges_size(1280, 720, None, None) == (1280, 720)


# -- decoding real files ----------------------------------------------------------------------------

CODECS = [
    ("mpeg4", "mp4"),
    ("libx264", "mp4"),
    ("h264", "mkv"),
    ("mjpeg", "avi"),
    ("libvpx-vp9", "webm"),
    ("ffv1", "mkv"),
    ("mpeg2video", "ts"),
]


@pytest.mark.parametrize("codec, extension", CODECS)
def test_load_video_samples_the_middle_frames(tmp_path, codec, extension):
    path = write_video(tmp_path / f"clip.{extension}", num_frames=30, width=96, height=64, fps=15, codec=codec)
    video = load_video(path, NO_RESIZE, num_frames=8)
    expected = sample_frame_indices(30, 8)
    assert [frame_index_of(frame) for frame in video.frames] == expected
    assert video.frame_indices == expected
    assert video.timestamps == pytest.approx([index / 15 for index in expected], abs=1e-3)
    assert video.source_frame_count == 30
    assert video.source_fps == pytest.approx(15)
    assert np.stack(video.frames).shape == (8, 64, 96, 3) and video.frames[0].dtype == np.uint8


def test_load_video_shorter_than_num_frames_gives_every_frame(tmp_path):
    path = write_video(tmp_path / "short.mp4", num_frames=6)
    video = load_video(path, NO_RESIZE, num_frames=128)
    assert [frame_index_of(frame) for frame in video.frames] == list(range(6))


def test_load_video_by_fps_takes_the_frame_on_screen_mid_interval(tmp_path):
    path = write_video(tmp_path / "two_seconds.mp4", num_frames=50, fps=25)
    video = load_video(path, NO_RESIZE, fps=2.0)  # intervals of 0.5 s, middles at 0.25, 0.75, 1.25, 1.75 s
    assert video.frame_indices == [6, 18, 31, 43]
    assert video.timestamps == pytest.approx([0.24, 0.72, 1.24, 1.72], abs=1e-3)
    assert [frame_index_of(frame) for frame in video.frames] == video.frame_indices
    with pytest.warns(UserWarning, match="gives 20 frames, above max_frames=6: sampling 6"):
        capped = load_video(path, NO_RESIZE, fps=10.0, max_frames=6)  # middles of six intervals of 1/3 s
    assert capped.frame_indices == [4, 12, 20, 29, 37, 45]


def test_load_video_resizes_frames_as_decoded(tmp_path):
    path = write_video(tmp_path / "wide.mp4", num_frames=4, width=1280, height=720)
    video = load_video(path, num_frames=4)
    assert np.stack(video.frames).shape == (4, 360, 640, 3)
    path = write_video(tmp_path / "tiny.mp4", num_frames=4, width=64, height=48)
    assert np.stack(load_video(path, num_frames=2).frames).shape == (2, 256, 256, 3)


def test_load_video_accepts_path_objects_and_file_urls(tmp_path):
    path = write_video(tmp_path / "clip.mp4", num_frames=8)
    assert len(load_video(path, num_frames=4).frames) == 4
    assert len(load_video(f"file://{path}", num_frames=4).frames) == 4


def test_progress_bar_only_when_asked(tmp_path, capsys):
    path = write_video(tmp_path / "clip.mp4", num_frames=8)
    load_video(path, num_frames=4, progress=False)
    assert "frame" not in capsys.readouterr().err
    load_video(path, num_frames=4, progress=True)
    assert "decoding clip.mp4" in capsys.readouterr().err


@settings(max_examples=6, deadline=None)
@given(
    num_frames=st.integers(2, 40),
    width=st.integers(8, 80).map(lambda n: 2 * n),
    height=st.integers(8, 60).map(lambda n: 2 * n),
    fps=st.sampled_from([5, 12, 24, 29.97, 30]),
    wanted=st.integers(1, 50),
)
def test_load_video_property(tmp_path_factory, num_frames, width, height, fps, wanted):
    path = write_video(tmp_path_factory.mktemp("prop") / "clip.mp4", num_frames, width, height, fps)
    video = load_video(path, NO_RESIZE, num_frames=wanted)
    expected = sample_frame_indices(num_frames, wanted)
    assert [frame_index_of(frame) for frame in video.frames] == expected
    assert all(frame.shape == (height, width, 3) for frame in video.frames)
    assert video.timestamps == pytest.approx([index / fps for index in expected], abs=2e-3)


# -- broken inputs: clear errors, no hangs ------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        load_video(tmp_path / "missing.mp4")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_video(path)


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(ValueError, match="folder"):
        load_video(tmp_path)


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="noise.mp4.*not a video"):
        load_video(path)


def test_text_file_renamed_mp4(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 50)
    with pytest.raises(ValueError, match="notes.mp4"):
        load_video(path)


def test_truncated_file_without_index(tmp_path):
    data = write_video(tmp_path / "full.mp4", num_frames=40).read_bytes()
    path = tmp_path / "truncated.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_video(path)


def test_truncated_file_with_index_samples_what_is_there(tmp_path):
    full = write_video(tmp_path / "full.mp4", num_frames=40, container_options={"movflags": "faststart"})
    data = full.read_bytes()
    path = tmp_path / "truncated.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="declares 40 frames but .* could be decoded"):
        video = load_video(path, NO_RESIZE, num_frames=8)
    assert 0 < video.source_frame_count < 40
    assert video.frame_indices == sample_frame_indices(video.source_frame_count, 8)
    assert [frame_index_of(frame) for frame in video.frames] == video.frame_indices


def test_corrupt_bytes_in_the_middle(tmp_path):
    data = bytearray(write_video(tmp_path / "full.mkv", num_frames=40, codec="libx264").read_bytes())
    data[len(data) // 3: len(data) // 3 + 400] = b"\xff" * 400
    path = tmp_path / "damaged.mkv"
    path.write_bytes(bytes(data))
    video = load_video(path, NO_RESIZE, num_frames=8)
    assert 0 < len(video.frames) <= 8


@pytest.fixture(scope="module")
def damaged_in_the_middle(tmp_path_factory):
    """A 40 s clip (libx264, a keyframe every 2 s) and a copy with a quarter of its bytes, in the middle, random:
    more than a hundred packets in a row do not decode."""
    folder = tmp_path_factory.mktemp("damaged")
    clean = write_frames(folder / "clean.mp4", moving_frames(400), codec="libx264",
                         codec_options={"g": "20", "keyint_min": "20", "bf": "2"})
    data = bytearray(clean.read_bytes())
    middle, length = len(data) // 2, len(data) // 4
    data[middle: middle + length] = np.random.default_rng(1).integers(0, 256, length, dtype=np.uint8).tobytes()
    damaged = folder / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    return clean, damaged


DAMAGE_WARNING = (r"damaged.mp4' holds damaged data: no frame could be decoded between (\d+\.\d+) s and "
                  r"(\d+\.\d+) s \(decoding skipped to the next keyframe and went on after it\); (\d+) sampled "
                  r"frame\(s\) there are left out")


@pytest.mark.parametrize("options", [dict(num_frames=40), dict(num_frames=40, decoder="sequential"),
                                     dict(num_frames=40, decoder="seek", decode_workers=2), dict(fps=1.0)])
@pytest.mark.parametrize("streamed", [False, True])
def test_damage_in_the_middle_skips_its_gops_and_samples_on_after_it(damaged_in_the_middle, options, streamed):
    clean, damaged = damaged_in_the_middle
    expected = load_video(clean, NO_RESIZE, **options)
    with pytest.warns(UserWarning, match=DAMAGE_WARNING) as warned:
        if streamed:
            with stream_video(damaged, NO_RESIZE, **options) as stream:
                video = stream.video()
        else:
            video = load_video(damaged, NO_RESIZE, **options)
    before, after, missed = re.search(DAMAGE_WARNING, str(warned[0].message)).groups()
    expected_frames = dict(zip(expected.frame_indices, expected.frames))
    expected_times = dict(zip(expected.frame_indices, expected.timestamps))
    assert set(video.frame_indices) <= set(expected_frames)
    for index, time, frame in zip(video.frame_indices, video.timestamps, video.frames):
        assert time == expected_times[index] and np.array_equal(frame, expected_frames[index])
    left_out = [expected_times[index] for index in set(expected_frames) - set(video.frame_indices)]
    assert left_out and all(float(before) < time < float(after) for time in left_out)
    assert (options.get("fps") is not None or len(left_out) == int(missed)) and float(after) - float(before) < 20
    assert video.frame_indices[-1] == expected.frame_indices[-1]  # sampled to the end, after the damage
    assert len(video.frame_indices) >= len(expected.frame_indices) // 2
    assert (video.source_frame_count, video.end_time) == (expected.source_frame_count, expected.end_time)


def test_chunks_of_a_video_with_damage_in_the_middle_are_the_frames_of_one_call(damaged_in_the_middle):
    """The chunks are planned before the damage is found (seeking, then one pass when it is): fewer come, the
    same frames as one processor call's."""
    from vamba_hf.tiny import build_tiny_processor

    processor = build_tiny_processor(video_shortest_edge=None, video_longest_edge=None)
    options = dict(num_frames=40, decoder="seek", decode_workers=2, return_tensors="pt")
    with pytest.warns(UserWarning, match=DAMAGE_WARNING):
        chunks = list(processor.video_chunks(str(damaged_in_the_middle[1]), chunk_frames=8, **options))
    with pytest.warns(UserWarning, match=DAMAGE_WARNING):
        whole = processor(text="<|vision_start|><|vision_end|>", videos=str(damaged_in_the_middle[1]),
                          return_metadata=True, **options)
    assert sum(chunk["video_grid_thw"][0, 0].item() for chunk in chunks) == whole["video_grid_thw"][0, 0].item() < 20
    assert torch.equal(torch.cat([chunk["pixel_values_videos"] for chunk in chunks]), whole["pixel_values_videos"])
    assert sum((chunk["video_metadata"][0]["frame_indices"] for chunk in chunks), []) == \
        whole["video_metadata"][0]["frame_indices"]
    assert chunks[-1]["remaining_frames"] == 0


@pytest.fixture(scope="module")
def short_clip_frames(tmp_path_factory):
    """A 20 s libx264 MP4 (B-frames, a keyframe every second) and its frames by timestamp, decoded whole."""
    path = write_frames(tmp_path_factory.mktemp("clip") / "clip.mp4", moving_frames(200), codec="libx264",
                        codec_options={"g": "10", "keyint_min": "10", "bf": "2"})
    whole = load_video(path, NO_RESIZE, num_frames=200, decoder="sequential")
    return path, {round(time, 4): frame for time, frame in zip(whole.timestamps, whole.frames)}


@pytest.mark.parametrize("seed", range(12))
def test_random_damage_gives_sound_frames_or_a_clear_error(short_clip_frames, tmp_path, seed):
    """Random bytes anywhere, of any length: every frame given is the undamaged file's frame of its timestamp."""
    path, expected = short_clip_frames
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    start, length = int(rng.integers(0, len(data))), int(rng.integers(1, len(data) // 3))
    data[start: start + length] = rng.integers(0, 256, len(data[start: start + length]), dtype=np.uint8).tobytes()
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    options = [dict(num_frames=16), dict(fps=2.0), dict(num_frames=16, decoder="sequential"),
               dict(num_frames=16, decoder="seek", decode_workers=2)][seed % 4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # damage is announced; which warning depends on where it lies
        try:
            video = load_video(damaged, NO_RESIZE, **options)
        except ValueError as error:
            assert "damaged.mp4" in str(error) and "\n" not in str(error)
            return
    for time, frame in zip(video.timestamps, video.frames):
        assert np.array_equal(frame, expected[round(time, 4)]), time


def test_zero_frame_container(tmp_path):
    path = write_empty_video(tmp_path / "zero.avi")
    with pytest.raises(ValueError, match="no frame"):
        load_video(path)


def test_audio_only_file(tmp_path):
    path = write_audio_only(tmp_path / "sound.wav")
    with pytest.raises(ValueError, match="no video stream"):
        load_video(path)


# -- frames users already have ----------------------------------------------------------------------


def test_to_video_frames_from_arrays_and_lists():
    frames_thwc = np.random.default_rng(0).integers(0, 256, (4, 20, 30, 3), dtype=np.uint8)
    as_tchw_float = np.transpose(frames_thwc, (0, 3, 1, 2)).astype(np.float32)
    as_unit_float = frames_thwc.astype(np.float64) / 255.0
    for video in (
        frames_thwc,
        as_tchw_float,
        as_unit_float,
        list(frames_thwc),
        [PIL.Image.fromarray(frame) for frame in frames_thwc],
        (as_tchw_float, {"fps": 2.0, "frames_indices": [0, 2, 4, 6]}),
    ):
        np.testing.assert_array_equal(np.stack(to_video_frames(video).frames), frames_thwc)


def test_to_video_frames_keeps_qwen_vl_utils_metadata():
    video = np.zeros((4, 3, 28, 28), dtype=np.float32)
    result = to_video_frames((video, {"fps": 2.0, "frames_indices": [0, 2, 4, 6]}))
    assert result.timestamps == [0.0, 1.0, 2.0, 3.0]
    assert result.frame_indices == [0, 2, 4, 6]


def test_to_video_frames_passes_video_frames_through():
    video = VideoFrames(frames=[PIL.Image.new("RGB", (28, 28))] * 2, timestamps=[0.0, 1.0])
    assert to_video_frames(video) is video


def test_to_video_frames_rejects_bad_shapes():
    with pytest.raises(ValueError, match="4 dimensions"):
        to_video_frames(np.zeros((28, 28, 3, 2, 1), dtype=np.uint8))
    with pytest.raises(ValueError, match="channels"):
        to_video_frames(np.zeros((4, 28, 28, 7), dtype=np.uint8))
    with pytest.raises(ValueError, match="zero size"):
        to_video_frames(np.zeros((4, 0, 28, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="as a video"):
        to_video_frames(42)


# -- URLs that do not answer -------------------------------------------------------------------------


class SilentServer:
    """A local TCP server that accepts connections and, after sending `prefix` (if any), never answers."""

    def __init__(self, prefix: bytes = b""):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(8)
        self.prefix, self.connections = prefix, []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.connections.append(connection)
            if self.prefix:
                connection.sendall(self.prefix)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.socket.getsockname()[1]}/clip.mp4"

    def close(self):
        for connection in self.connections:
            connection.close()
        self.socket.close()


@pytest.mark.parametrize("stage", ["connect", "read"])
def test_a_url_that_never_answers_times_out(tmp_path, stage):
    prefix = b""
    if stage == "read":  # headers and the first half of a real file, then silence
        data = write_video(tmp_path / "clip.mp4", num_frames=40, container_options={"movflags": "faststart"}).read_bytes()
        prefix = (f"HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                  + data[: len(data) // 2])
    server = SilentServer(prefix)
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match="timed out after 1.0 s"):
            load_video(server.url, video_timeout=1.0)
    finally:
        server.close()
    assert time.monotonic() - started < 8


def test_default_timeout_is_at_most_ten_seconds():
    assert 0 < VideoSampling().video_timeout <= 10


# -- rotation, variable frame rate, caps ---------------------------------------------------------------


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotation_of_the_display_matrix_is_applied(tmp_path, rotation):
    source = np.zeros((32, 64, 3), dtype=np.uint8)
    source[:16, :32] = 255  # top-left quarter white
    path = write_frames(tmp_path / "rotated.mp4", [source] * 4, codec="libx264", rotation=rotation)
    video = load_video(path, NO_RESIZE, num_frames=2)
    expected = np.rot90(source, rotation // 90)  # counter-clockwise quarter turns
    assert video.frames[0].shape == expected.shape
    np.testing.assert_allclose(video.frames[0].astype(float), expected.astype(float), atol=3)


def test_fps_sampling_of_a_variable_frame_rate_file_goes_by_time(tmp_path):
    times = [0.0, 0.1, 0.15, 0.2, 1.0, 1.05, 1.9, 2.0, 2.5, 3.9]  # 4 s, frames bunched unevenly
    path = write_video(tmp_path / "vfr.mp4", num_frames=10, frame_times=times)
    video = load_video(path, NO_RESIZE, fps=1.0)  # middles at 0.5, 1.5, 2.5, 3.5 s
    # on screen then: the frame shown at 0.2 s, at 1.05 s, at 2.5 s (and again at 3.5 s: not repeated)
    assert video.frame_indices == [3, 5, 8]
    assert video.timestamps == pytest.approx([0.2, 1.05, 2.5], abs=1e-3)
    assert [frame_index_of(frame) for frame in video.frames] == [3, 5, 8]
    by_index = sample_frame_indices(10, 4)
    assert by_index != video.frame_indices  # counting frames would have sampled the bunched start twice



@pytest.mark.parametrize("decoder", ["seek", "sequential"])
def test_decode_gives_the_frames_and_transformers_video_metadata(tmp_path, decoder):
    """One interface over both backends: the frames `load_video` gives, with a `VideoMetadata` whose timestamps are
    the frames' own (a variable frame rate: not index / fps)."""
    times = [0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 12.0]
    path = write_x264(tmp_path / "vfr.mp4", num_frames=12, gop=4, frame_times=times)
    sampling = NO_RESIZE.with_options(num_frames=4, decoder=decoder, decode_workers=2)
    frames, metadata = decode(path, sampling)
    video = one_pass(path, sampling)
    assert isinstance(metadata, VideoMetadata) and metadata.video_backend == "pyav"
    assert len(frames) == 4 and all(np.array_equal(a, b) for a, b in zip(frames, video.frames))
    assert metadata.frames_indices == video.frame_indices and metadata.timestamps == video.timestamps
    assert metadata.timestamps != pytest.approx([index / metadata.fps for index in metadata.frames_indices])
    assert (metadata.fps, metadata.total_num_frames, metadata.start_time, metadata.end_time) == \
        (video.source_fps, video.source_frame_count, video.start_time, video.end_time)
    assert (metadata.width, metadata.height, metadata.duration) == (64, 48, video.end_time)
    assert dict(metadata)["frames_indices"] == video.frame_indices


def test_start_decode_decodes_in_the_background_only_by_seeking(tmp_path):
    path = write_x264(tmp_path / "gops.mp4")
    sampling = NO_RESIZE.with_options(num_frames=5, decode_workers=2)
    expected = one_pass(path, sampling)
    started = start_decode(path, sampling.with_options(decoder="seek"))
    assert isinstance(started, BackgroundDecode) and started.metadata.timestamps is None
    started.writer.wait_rows(started.count)
    started.writer.wait_closed()
    assert list(started.writer.times) == expected.timestamps
    assert all(np.array_equal(a, b) for a, b in zip(started.writer.buffer.array, expected.frames))
    frames, metadata = start_decode(path, sampling.with_options(decoder="sequential"))
    assert metadata.frames_indices == started.metadata.frames_indices == expected.frame_indices
    assert all(np.array_equal(a, b) for a, b in zip(frames, expected.frames))

@pytest.mark.parametrize("decoder", ["auto", "seek", "sequential"])
def test_fps_sampling_goes_on_to_the_last_frame_past_the_declared_duration(tmp_path, decoder):
    times = [0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 12.0]
    path = write_x264(tmp_path / "vfr.mp4", num_frames=12, gop=4, frame_times=times)
    with av.open(str(path)) as container:  # B-frames: the MP4 declares less than the frames' 12 s
        stream = container.streams.video[0]
        assert float(stream.duration * stream.time_base) < 10.0
    video = load_video(path, NO_RESIZE, fps=1.0, decoder=decoder)
    assert video.timestamps == pytest.approx(times[:1] + times[2:], abs=1e-3)
    assert video.frame_indices == [0] + list(range(2, 12)) and video.end_time > 12.0
    whole = load_video(path, NO_RESIZE, num_frames=12, decoder="sequential")
    for frame, index in zip(video.frames, video.frame_indices):
        assert np.array_equal(frame, whole.frames[index])
    with stream_video(path, NO_RESIZE, fps=1.0, decoder=decoder) as stream:
        assert_same_video(stream.video(), video)


def test_num_frames_above_max_frames_is_capped_with_a_warning(tmp_path):
    path = write_video(tmp_path / "clip.mp4", num_frames=30)
    with pytest.warns(UserWarning, match="num_frames=20, above max_frames=5"):
        video = load_video(path, NO_RESIZE, num_frames=20, max_frames=5)
    assert video.frame_indices == sample_frame_indices(30, 5)


@pytest.mark.parametrize("options", [{"num_frames": -1}, {"num_frames": 0}, {"fps": float("nan")},
                                     {"fps": float("inf")}, {"fps": 0}, {"fps": -1}, {"video_timeout": float("nan")},
                                     {"decoder": "fast"}, {"decode_workers": 0}, {"decode_workers": 1.5},
                                     {"decode_processes": "yes"}, {"decode_processes": 1},
                                     {"decode_device": "gpu"}, {"decode_device": "cuda:"}, {"decode_device": "cuda:-1"},
                                     {"decode_device": "CUDA"}, {"decode_device": 0},
                                     {"decode_device_workers": 0, "decode_device": "cuda"},
                                     {"decode_device_workers": 2}])
def test_bad_sampling_values_are_refused_in_one_line(tmp_path, options):
    path = write_video(tmp_path / "clip.mp4", num_frames=4)
    with pytest.raises(ValueError, match="is not (a )?valid") as error:
        load_video(path, **options)
    assert "\n" not in str(error.value) and next(iter(options)) in str(error.value)


# -- sizes ---------------------------------------------------------------------------------------------


def test_extreme_aspect_ratio_never_gives_a_zero_side():
    assert edges_size(4000, 1, None, 640) == (640, 1)
    assert edges_size(1, 4000, None, 640) == (1, 640)
    assert edges_size(4000, 16, 256, 640) == (640, 256)


def test_extreme_aspect_ratio_video_gets_a_clear_error(tmp_path):
    from vamba_hf.tiny import build_tiny_processor

    path = write_video(tmp_path / "wide.mkv", num_frames=4, width=4000, height=16, codec="ffv1")
    processor = build_tiny_processor(video_shortest_edge=None)
    with pytest.raises(ValueError, match=r"640x2 image or frame has an aspect ratio of 320.*at most 200"):
        processor(text="<|vision_start|><|vision_end|>", videos=str(path), num_frames=2)
    inputs = build_tiny_processor()(text="<|vision_start|><|vision_end|>", videos=str(path), num_frames=2)
    assert inputs["video_grid_thw"].tolist() == [[1, 18, 46]]  # 640x256 (the original's edges) -> 644x252


def test_memory_follows_the_output_size(tmp_path):
    """40 frames of 1920x1920 sampled down to 64 px: the peak stays near a few source frames, not forty."""
    path = write_video(tmp_path / "big.mkv", num_frames=40, width=1920, height=1920, codec="ffv1")
    script = (
        "import resource, sys\n"
        "from vamba_hf.video_vamba import VideoSampling, load_video\n"
        "import numpy, av\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"video = load_video({str(path)!r}, VideoSampling(num_frames=40, video_longest_edge=64, video_shortest_edge=None))\n"
        "assert numpy.stack(video.frames).shape == (40, 64, 64, 3)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    grown_mb = float(result.stdout.strip().splitlines()[-1])
    source_frame_mb = 1920 * 1920 * 3 / 2 ** 20  # 10.5 MB of RGB
    assert grown_mb < 16 * source_frame_mb, grown_mb  # all forty at source size would be 420 MB


class LazyPool:
    """A ThreadPoolExecutor whose work runs only when its result is asked for: how many decoded frames wait for
    their conversion at once is then decided by the writer alone, not by the threads' timing."""

    most_waiting = 0

    def __init__(self, max_workers):
        self.waiting = []

    def submit(self, function, *args):
        pool = self

        class Lazy:
            done = False

            def result(self):
                if not self.done:
                    pool.waiting.remove(self)
                    self.done, self.value = True, function(*args)
                return self.value

        future = Lazy()
        self.waiting.append(future)
        LazyPool.most_waiting = max(LazyPool.most_waiting, len(self.waiting))
        return future

    def shutdown(self):
        for future in list(self.waiting):
            future.result()


def test_frames_waiting_for_conversion_are_bounded_by_their_source_size(tmp_path, monkeypatch):
    """Large source frames wait for their conversion one or two at a time, not two per conversion thread: what a
    decode holds follows the output size (a 16000x16000 frame is 768 MB in RGB). The frames here are small, and the
    budget shrunk to two of them."""
    assert video_frames_vamba.source_frames_allowed((16000, 16000), 8) == 1
    assert video_frames_vamba.source_frames_allowed((3840, 2160), 8) == 8
    path = write_video(tmp_path / "large.mkv", num_frames=12, width=320, height=320, codec="ffv1")
    expected = load_video(path, num_frames=12, decoder="sequential")
    monkeypatch.setattr(video_decode_vamba, "ThreadPoolExecutor", LazyPool)
    LazyPool.most_waiting = 0
    assert_same_video(load_video(path, num_frames=12, decoder="sequential"), expected)
    assert LazyPool.most_waiting == 2 * video_frames_vamba.conversion_workers() == 8  # small enough: two per thread
    monkeypatch.setattr(video_frames_vamba, "SOURCE_FRAMES_BUDGET",
                        2 * 320 * 320 * video_frames_vamba.CONVERTED_BYTES_PER_PIXEL)
    LazyPool.most_waiting = 0
    assert_same_video(load_video(path, num_frames=12, decoder="sequential"), expected)
    assert LazyPool.most_waiting == 2


@pytest.mark.parametrize("size, count, on_device, expected", [((640, 360), 0, False, 0), ((640, 360), 3, False, 3),
                                                             ((16000, 16000), 0, False, 1), ((16000, 16000), 4, False, 1),
                                                             ((7680, 4320), 0, False, 10), ((7680, 4320), 2, False, 2),
                                                             ((16000, 16000), 0, True, 1)])
def test_frame_threads_of_a_decoder_of_large_frames_are_fewer(monkeypatch, size, count, on_device, expected):
    """Each of FFmpeg's frame threads holds a source-size frame: 16 of 16000x16000 would be 12 GB."""
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    stream = types.SimpleNamespace(codec_context=types.SimpleNamespace(width=size[0], height=size[1]))
    video_container_vamba.set_codec_threads(stream, count, on_device=on_device)
    assert (stream.thread_type, stream.thread_count) == ("AUTO", expected)


def test_seeking_holds_fewer_large_frames_in_conversion_and_in_decoders(tmp_path, monkeypatch):
    monkeypatch.setattr(video_frames_vamba, "SOURCE_FRAMES_BUDGET",
                        2 * 320 * 320 * video_frames_vamba.CONVERTED_BYTES_PER_PIXEL)
    writer = video_seek_vamba.RowWriter(4, video_frames_vamba.FrameResize(None, 64), workers=4)
    writer.buffer_for((320, 320))
    slots = 0
    while writer.free_slots.acquire(blocking=False):
        slots += 1
    assert slots == 2
    path = write_frames(tmp_path / "large.mp4", moving_frames(24, 320, 320), codec="libx264",
                        codec_options={"g": "4", "keyint_min": "4", "bf": "0"})
    expected = load_video(path, num_frames=6, decoder="sequential")
    workers, start = [], video_seek_vamba.SeekingDecoder.start
    monkeypatch.setattr(video_seek_vamba.SeekingDecoder, "start",
                        lambda decoder, gops, capacity, count: workers.append(count) or start(decoder, gops, capacity,
                                                                                               count))
    for processes in (False, True):
        assert_same_video(load_by_seeking(path, VideoSampling(), num_frames=6, decode_workers=4,
                                          decode_processes=processes), expected)
    assert workers == [2, 2]  # each worker's decoder holds frames of the source's size


def test_truncated_file_warns_that_frames_are_missing(tmp_path):
    full = write_video(tmp_path / "full.mp4", num_frames=40, container_options={"movflags": "faststart"})
    path = tmp_path / "cut.mp4"
    path.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    with pytest.warns(UserWarning, match=r"declares 40 frames but \d+ could be decoded"):
        load_video(path, NO_RESIZE, fps=5.0)


def test_frame_buffer_hands_back_used_frames():
    buffer = FrameBuffer(4, 64, 64)  # 12288 bytes a frame: three pages
    buffer.array[:] = 255
    buffer.release(2)
    assert buffer.array[:2].max() == 0  # the pages went back to the system and read as zeros
    assert buffer.array[2:].min() == 255
    buffer.release(1)  # never takes back what it gave
    assert buffer.released == 2 * 64 * 64 * 3


# -- a growing file: only the new part, timestamps that continue -------------------------------------


def test_a_growing_file_gives_only_its_new_frames(tmp_path):
    from vamba_hf.tiny import build_tiny_processor

    processor = build_tiny_processor(video_shortest_edge=None, video_longest_edge=None)
    placeholder = "<|vision_start|><|vision_end|>"
    early = write_video(tmp_path / "early.mp4", num_frames=20, width=56, height=56)  # the first 2 s
    grown = write_video(tmp_path / "grown.mp4", num_frames=40, width=56, height=56)  # the same 2 s, then 2 more
    first = processor(text=placeholder, videos=str(early), fps=2.0, return_metadata=True)
    start = first["video_metadata"][0]["end_time"]
    assert start == pytest.approx(2.0)
    new = processor(text=placeholder, videos=str(grown), fps=2.0, start_time=start, return_metadata=True)
    whole = processor(text=placeholder, videos=str(grown), fps=2.0, return_metadata=True)

    first_meta, new_meta, whole_meta = first["video_metadata"][0], new["video_metadata"][0], whole["video_metadata"][0]
    assert new_meta["timestamps"] == pytest.approx([2.2, 2.7, 3.2, 3.7], abs=1e-3)  # continuing, not from 0
    assert new_meta["frame_indices"] == [22, 27, 32, 37]
    assert first_meta["frame_indices"] + new_meta["frame_indices"] == whole_meta["frame_indices"]
    assert first["video_grid_thw"][0][0] + new["video_grid_thw"][0][0] == whole["video_grid_thw"][0][0]
    np.testing.assert_array_equal(np.concatenate([first["pixel_values_videos"], new["pixel_values_videos"]]),
                                  whole["pixel_values_videos"])


def test_start_time_with_sampling_by_count(tmp_path):
    path = write_video(tmp_path / "clip.mp4", num_frames=40)  # 10 fps
    video = load_video(path, NO_RESIZE, num_frames=4, start_time=2.0)
    assert video.frame_indices == [20 + index for index in sample_frame_indices(20, 4)]
    assert [frame_index_of(frame) for frame in video.frames] == video.frame_indices
    assert video.timestamps[0] >= 2.0 and (video.start_time, video.end_time) == (2.0, pytest.approx(4.0))
    for decoder in ("seek", "sequential"):
        for start_time in (5.0, 3.95):  # past the end, and past the last frame's start (3.9 s) only
            with pytest.raises(ValueError, match=rf"start_time={start_time} s is past the end of video '.*clip.mp4': "
                                                 r"its last frame starts at 3.900 s and it ends at 4.000 s; give an "
                                                 r"earlier start_time"):
                load_video(path, NO_RESIZE, num_frames=4, start_time=start_time, decoder=decoder)
            with pytest.raises(ValueError, match=rf"start_time={start_time} s is past the end"):
                stream_video(path, NO_RESIZE, fps=1.0, start_time=start_time, decoder=decoder)


# -- seeking and parallel decoding give the frames of one pass ---------------------------------------------


def packets_of(path):
    with av.open(str(path)) as container:
        return [(packet.pts, packet.is_keyframe) for packet in container.demux(container.streams.video[0])
                if packet.size]


def no_pass(*args, **kwargs):
    raise AssertionError("decoded in one pass, not by seeking")


def load_by_seeking(path, sampling, **options):
    """`load_video(decoder="seek")`, failing if the frames come from one pass instead."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(video_decode_vamba, "_decode_plan", no_pass)
        return load_video(path, sampling, decoder="seek", **options)


def one_pass(path, sampling):
    return load_video(path, sampling, decoder="sequential")


def test_test_file_has_b_frames_and_gops(tmp_path):
    packets = packets_of(write_x264(tmp_path / "gops.mp4"))
    pts = [value for value, _ in packets]
    assert pts != sorted(pts)  # B-frames: decode order differs from presentation order
    assert sum(keyframe for _, keyframe in packets) == 10


SAMPLINGS = [
    dict(num_frames=4),  # sparse: one sample in some GOPs, none in others
    dict(num_frames=60),  # every frame, the first GOP's and the last one included
    dict(num_frames=23),
    dict(fps=0.7),
    dict(fps=3.0),
    dict(num_frames=5, start_time=2.35),
    dict(fps=2.0, start_time=3.0),
]


@pytest.mark.parametrize("processes", [False, True])
@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("options", SAMPLINGS)
def test_seeking_gives_the_frames_of_one_pass(tmp_path, options, workers, processes):
    path = write_x264(tmp_path / "gops.mp4")
    sampling = NO_RESIZE.with_options(**options)
    expected = one_pass(path, sampling)
    assert_same_video(load_by_seeking(path, sampling, decode_workers=workers, decode_processes=processes), expected)


@pytest.mark.parametrize("processes", [False, True])
@pytest.mark.parametrize("workers", [1, 2])
def test_seeking_a_resized_rotated_file(tmp_path, workers, processes):
    path = write_x264(tmp_path / "rotated.mp4", rotation=90)
    sampling = VideoSampling(num_frames=7, video_shortest_edge=100, video_longest_edge=None)
    expected = one_pass(path, sampling)
    assert expected.frames[0].shape == (100, 100, 3) and not np.array_equal(expected.frames[0], expected.frames[1])
    assert_same_video(load_by_seeking(path, sampling, decode_workers=workers, decode_processes=processes), expected)


def test_processes_resize_to_the_processors_grid_as_threads_do(tmp_path):
    from vamba_hf.tiny import build_tiny_processor

    path = write_x264(tmp_path / "gops.mp4")
    processor = build_tiny_processor(num_frames=8, video_longest_edge=90)
    inputs = [processor(text="<|vision_start|><|vision_end|>", videos=str(path), decoder="seek", decode_workers=2,
                        decode_processes=processes, return_tensors="pt") for processes in (False, True)]
    assert torch.equal(inputs[0]["pixel_values_videos"], inputs[1]["pixel_values_videos"])
    assert torch.equal(inputs[0]["video_grid_thw"], inputs[1]["video_grid_thw"])


@pytest.mark.parametrize("extension", ["mp4", "mkv"])
@pytest.mark.parametrize("options", [dict(num_frames=9), dict(fps=1.0), dict(fps=4.0, start_time=3.1)])
def test_seeking_a_variable_frame_rate_file_not_starting_at_zero(tmp_path, extension, options):
    times = [2.0 + 0.37 * index + 0.2 * (index % 3 == 0) for index in range(40)]  # uneven steps, first at 2 s
    path = write_x264(tmp_path / f"vfr.{extension}", num_frames=40, frame_times=times)
    sampling = NO_RESIZE.with_options(**options)
    expected = one_pass(path, sampling)
    assert_same_video(load_by_seeking(path, sampling, decode_workers=2), expected)


def test_the_last_frame_and_the_first_gop(tmp_path):
    path = write_x264(tmp_path / "gops.mp4")
    video = load_by_seeking(path, NO_RESIZE, num_frames=60, decode_workers=4)
    assert video.frame_indices == list(range(60))
    assert_same_video(video, one_pass(path, NO_RESIZE.with_options(num_frames=60)))
    sparse = load_by_seeking(path, NO_RESIZE, fps=0.05)  # one sample, at 3 s of 6 s
    assert sparse.frame_indices == [30]


def test_auto_seeks_when_frames_are_sparse_and_decodes_dense_ones_in_one_pass(tmp_path, monkeypatch):
    path = write_x264(tmp_path / "gops.mp4")
    seeking = []
    decode = video_seek_vamba.SeekingDecoder.decode
    monkeypatch.setattr(video_seek_vamba.SeekingDecoder, "decode",
                        lambda self, *args: seeking.append(True) or decode(self, *args))
    load_video(path, NO_RESIZE, num_frames=30, decode_workers=1)  # every other frame: every GOP, one pass
    assert not seeking
    load_video(path, NO_RESIZE, num_frames=3, decode_workers=1)  # 3 GOPs of 10, only up to their samples
    assert len(seeking) == 1
    load_video(path, NO_RESIZE, num_frames=30, decode_workers=2)  # dense, but two threads
    assert len(seeking) == 2
    load_video(path, NO_RESIZE, num_frames=3, decode_workers=1, decoder="sequential")
    assert len(seeking) == 2


def test_a_file_without_a_packet_index_decodes_in_one_pass(tmp_path, monkeypatch):
    path = write_x264(tmp_path / "program_stream.mpg")  # MPEG-PS: most packets carry no timestamp
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert video_decode_vamba.packet_index(container, stream, video_container_vamba.stream_facts(stream)) is None
    expected = one_pass(path, NO_RESIZE.with_options(num_frames=5))
    monkeypatch.setattr(video_seek_vamba.SeekingDecoder, "decode", lambda *args: pytest.fail("seeked"))
    assert_same_video(load_video(path, NO_RESIZE, num_frames=5, decoder="seek"), expected)


@pytest.mark.parametrize("options", [dict(num_frames=5), dict(num_frames=2, decode_workers=1),
                                     dict(num_frames=5, decode_workers=2, decode_processes=True)])
def test_an_index_that_does_not_match_the_frames_falls_back_to_one_pass(tmp_path, monkeypatch, options):
    path = write_x264(tmp_path / "gops.mp4")
    expected = one_pass(path, NO_RESIZE.with_options(**options))
    packet_index = video_decode_vamba.packet_index

    def shifted(*args):  # every packet one tick later than the frame decoded from it
        index = packet_index(*args)
        return replace(index, pts=[value + 1 for value in index.pts])

    passes = []
    decode_plan = video_decode_vamba._decode_plan
    monkeypatch.setattr(video_decode_vamba, "packet_index", shifted)
    monkeypatch.setattr(video_decode_vamba, "_decode_plan", lambda *args: passes.append(True) or decode_plan(*args))
    assert_same_video(load_video(path, NO_RESIZE, decoder="seek", **options), expected)
    assert passes == [True]


@pytest.mark.parametrize("processes", [False, True])
def test_keyframe_flags_on_frames_that_are_no_keyframes_fall_back_to_one_pass(tmp_path, monkeypatch, processes):
    path = write_x264(tmp_path / "gops.mp4")
    expected = one_pass(path, NO_RESIZE.with_options(num_frames=7))
    packet_index = video_decode_vamba.packet_index

    def every_packet_a_keyframe(*args):
        index = packet_index(*args)
        return replace(index, keyframes=list(range(len(index.times))))

    passes = []
    decode_plan = video_decode_vamba._decode_plan
    monkeypatch.setattr(video_decode_vamba, "packet_index", every_packet_a_keyframe)
    monkeypatch.setattr(video_decode_vamba, "_decode_plan", lambda *args: passes.append(True) or decode_plan(*args))
    assert_same_video(load_video(path, NO_RESIZE, num_frames=7, decoder="seek", decode_workers=2,
                                 decode_processes=processes), expected)
    assert passes == [True]


def test_a_truncated_file_decodes_in_one_pass(tmp_path):
    full = write_x264(tmp_path / "full.mp4", container_options={"movflags": "faststart"})
    path = tmp_path / "truncated.mp4"
    path.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    with pytest.warns(UserWarning, match="declares 60 frames but"):
        expected = one_pass(path, NO_RESIZE.with_options(num_frames=6))
    with pytest.warns(UserWarning, match="declares 60 frames but"):
        video = load_video(path, NO_RESIZE, num_frames=6, decoder="seek", decode_workers=2)
    assert_same_video(video, expected)


def test_long_decodes_run_in_processes_by_default(tmp_path, monkeypatch):
    path = write_x264(tmp_path / "gops.mp4")
    started = counted_decoding_processes(monkeypatch)
    expected = one_pass(path, NO_RESIZE.with_options(num_frames=20))
    load_by_seeking(path, NO_RESIZE, num_frames=20, decode_workers=4)  # 60 frames decoded: threads
    assert not started
    monkeypatch.setattr(video_decode_vamba, "MIN_FRAMES_FOR_PROCESSES", 40)
    assert_same_video(load_by_seeking(path, NO_RESIZE, num_frames=20, decode_workers=4), expected)
    count = len(started)
    assert 1 <= count <= 4  # a worker that starts after the others decoded everything starts no process
    load_by_seeking(path, NO_RESIZE, num_frames=20, decode_workers=3)  # fewer workers: threads
    load_by_seeking(path, NO_RESIZE, num_frames=20, decode_workers=4, decode_processes=False)
    monkeypatch.setattr(sys, "frozen", True, raising=False)  # a frozen application runs no `python -c`
    assert_same_video(load_by_seeking(path, NO_RESIZE, num_frames=20, decode_workers=4), expected)
    assert len(started) == count


def test_a_decoding_process_that_fails_names_the_way_out(tmp_path, monkeypatch):
    path = write_x264(tmp_path / "gops.mp4")
    monkeypatch.setattr(video_seek_vamba, "DECODING_PROCESS_MAIN", "raise SystemExit(3)")
    with pytest.raises(RuntimeError, match=r"ended unexpectedly \(exit status 3.*decode_processes=False"):
        load_video(path, NO_RESIZE, num_frames=20, decoder="seek", decode_workers=2, decode_processes=True)
    monkeypatch.setattr(video_seek_vamba, "DECODING_PROCESS_MAIN", "import sys; sys.stdout.write('F'); sys.exit(4)")
    with pytest.raises(RuntimeError, match=r"ended in the middle of a frame \(exit status 4"):
        load_video(path, NO_RESIZE, num_frames=20, decoder="seek", decode_workers=2, decode_processes=True)
    # A process that prints and then waits is stopped, not waited for.
    monkeypatch.setattr(video_seek_vamba, "DECODING_PROCESS_MAIN",
                        "import sys, time; sys.stdout.write('hello'); sys.stdout.flush(); time.sleep(600)")
    with pytest.raises(RuntimeError, match=r"sent b'h', which is no message"):
        load_video(path, NO_RESIZE, num_frames=20, decoder="seek", decode_workers=2, decode_processes=True)


def test_a_job_longer_than_the_pipes_reaches_the_decoding_processes(tmp_path, monkeypatch):
    path = write_x264(tmp_path / "gops.mp4")  # an hour's packet index is ~1 MB of JSON: here 3 MB
    expected = one_pass(path, NO_RESIZE.with_options(num_frames=20))
    job = video_seek_vamba._DecodingProcess.job
    monkeypatch.setattr(video_seek_vamba._DecodingProcess, "job", staticmethod(
        lambda *args: job(*args)[:-2] + b', "padding": "' + b"x" * 3_000_000 + b'"}\n'))
    assert_same_video(load_by_seeking(path, NO_RESIZE, num_frames=20, decode_workers=2, decode_processes=True),
                      expected)


def test_what_a_decoding_process_prints_does_not_mix_with_its_frames(tmp_path, monkeypatch):
    path = write_x264(tmp_path / "gops.mp4")
    expected = one_pass(path, NO_RESIZE.with_options(num_frames=20))
    main = video_seek_vamba.DECODING_PROCESS_MAIN.replace("module.serve_decoding", "print('hello'); "
                                                                                    "module.serve_decoding")
    assert main != video_seek_vamba.DECODING_PROCESS_MAIN
    monkeypatch.setattr(video_seek_vamba, "DECODING_PROCESS_MAIN", main)
    assert_same_video(load_by_seeking(path, NO_RESIZE, num_frames=20, decode_workers=2, decode_processes=True),
                      expected)


def test_an_error_in_a_decoding_process_is_raised_with_its_text(tmp_path, monkeypatch):
    path = write_x264(tmp_path / "gops.mp4")
    monkeypatch.setattr(video_seek_vamba._DecodingProcess, "job", staticmethod(
        lambda *args: b'{"location": "/nonexistent/video.mp4", "start": 0, "pts": [], "keyframes": [], '
                      b'"shortest_edge": null, "longest_edge": null, "final_resample": 3}\n'))
    with pytest.raises(RuntimeError, match=r"worker process failed \(ValueError: cannot read '/nonexistent/video"):
        load_video(path, NO_RESIZE, num_frames=20, decoder="seek", decode_workers=2, decode_processes=True)


def test_default_decode_workers_follow_the_cpu_count(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert VideoSampling().worker_count() == 4
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert VideoSampling().worker_count() == 2
    assert VideoSampling(decode_workers=2).worker_count() == 2
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert VideoSampling().worker_count(processes=True) == 16
    assert VideoSampling(decode_workers=5).worker_count(processes=True) == 5


@pytest.mark.parametrize("device, cap", [(None, 3), ("cuda", 6)])
def test_decode_workers_are_capped_at_the_cpus_with_a_warning(monkeypatch, device, cap):
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    for processes in (False, True):
        with pytest.warns(UserWarning, match=rf"decode_workers=1000000000 is more than this machine's 3 CPUs.*"
                                             rf"decoding with {cap} workers"):
            assert VideoSampling(decode_workers=10**9, decode_device=device).worker_count(processes) == cap


def test_a_huge_decode_workers_starts_one_process_per_cpu(tmp_path, monkeypatch):
    path = write_x264(tmp_path / "gops.mp4")  # 10 GOPs
    expected = one_pass(path, NO_RESIZE.with_options(num_frames=20))
    started = counted_decoding_processes(monkeypatch)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.warns(UserWarning, match="decoding with 2 workers"):
        video = load_by_seeking(path, NO_RESIZE, num_frames=20, decode_workers=10**9, decode_processes=True)
    assert_same_video(video, expected)
    assert len(started) == 2


def test_decoding_processes_are_one_per_cpu_by_default(tmp_path, monkeypatch):
    path = write_x264(tmp_path / "gops.mp4")  # 10 GOPs
    expected = one_pass(path, NO_RESIZE.with_options(num_frames=20))
    workers, start = [], video_seek_vamba.SeekingDecoder.start

    def counted_start(decoder, gops, capacity, count):
        workers.append((decoder.processes, count))
        return start(decoder, gops, capacity, count)

    monkeypatch.setattr(video_seek_vamba.SeekingDecoder, "start", counted_start)
    monkeypatch.setattr(video_decode_vamba, "MIN_FRAMES_FOR_PROCESSES", 40)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert_same_video(load_by_seeking(path, NO_RESIZE, num_frames=20), expected)
    assert_same_video(load_by_seeking(path, NO_RESIZE, num_frames=20, decode_processes=True), expected)
    assert_same_video(load_by_seeking(path, NO_RESIZE, num_frames=20, decode_processes=False), expected)
    assert_same_video(load_by_seeking(path, NO_RESIZE, num_frames=20, decode_workers=5), expected)
    assert workers == [(True, 6), (True, 6), (False, 4), (True, 5)]


def test_the_index_of_an_mp4_without_b_frames_comes_from_its_sample_table(tmp_path, monkeypatch):
    path = write_frames(tmp_path / "no_b_frames.mp4", moving_frames(60), codec="libx264",
                        codec_options={"g": "6", "keyint_min": "6", "bf": "0"})
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        facts = video_container_vamba.stream_facts(stream)
        from_entries = video_seek_vamba._index_from_entries(stream, facts)
        assert from_entries is not None and len(from_entries.keyframes) == 10
        assert from_entries == video_seek_vamba._index_from_demuxing(container, stream, facts)
    with av.open(str(write_x264(tmp_path / "b_frames.mp4"))) as container:  # decoding times are not display times
        stream = container.streams.video[0]
        assert video_seek_vamba._index_from_entries(stream, video_container_vamba.stream_facts(stream)) is None
    expected = one_pass(path, NO_RESIZE.with_options(num_frames=7))
    monkeypatch.setattr(video_seek_vamba, "_index_from_demuxing", lambda *args: pytest.fail("demuxed"))
    assert_same_video(load_by_seeking(path, NO_RESIZE, num_frames=7, decode_workers=2), expected)


# -- decoding on a GPU's NVDEC (decode_device); tests/test_video_gpu.py decodes on one ---------------------------


def test_decode_device_values():
    assert VideoSampling().decode_device is None
    for device in ("cuda", "cuda:0", "cuda:12"):
        assert VideoSampling(decode_device=device, decode_processes=False).decode_device == device
    with pytest.raises(ValueError, match=r"decode_device='cuda:x' is not valid: give None \(the CPU\), \"cuda\" or "
                                         r"\"cuda:N\""):
        VideoSampling(decode_device="cuda:x")
    assert VideoSampling(decode_device="cuda:1", decode_processes=True, decode_device_workers=3).decode_processes
    with pytest.raises(ValueError, match=r"decode_device_workers=2 is not valid without decode_device.*give "
                                         r"decode_device \(\"cuda\" or \"cuda:N\"\) too\.$"):
        VideoSampling(decode_device_workers=2)


@pytest.mark.parametrize("device, device_workers, workers, expected",
                         [(None, None, 3, [None] * 3), ("cuda:1", None, 3, ["cuda:1"] * 3),
                          ("cuda", 2, 5, ["cuda", "cuda", None, None, None]), ("cuda", 9, 2, ["cuda", "cuda"])])
def test_which_workers_decode_on_the_device(device, device_workers, workers, expected):
    decoder = video_seek_vamba.SeekingDecoder("clip.mp4", None, video_seek_vamba.PacketIndex([], [], []),
                                                 None, None, device=device, device_workers=device_workers)
    assert decoder.worker_devices(workers) == expected


needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: "
                                   "tests/test_video_gpu.py decodes on it")


@needs_no_cuda
@pytest.mark.parametrize("decoder", ["sequential", "seek"])
def test_decode_device_without_cuda_raises_a_clear_error(tmp_path, monkeypatch, decoder):
    path = write_x264(tmp_path / "gops.mp4")
    monkeypatch.setattr(video_decode_vamba, "_decode_plan", lambda *args: pytest.fail("decoded on the CPU"))
    message = r"decode_device='cuda' cannot decode .*gops.mp4.*NVIDIA driver with NVDEC.*decode_device=None\.$"
    with pytest.raises(RuntimeError, match=message) as error:
        load_video(path, NO_RESIZE, num_frames=5, decoder=decoder, decode_workers=3, decode_device="cuda")
    assert "\n" not in str(error.value) and error.value.__cause__ is not None  # FFmpeg's own error, chained
    with pytest.raises(RuntimeError, match=message):
        stream_video(path, NO_RESIZE, num_frames=5, decoder=decoder, decode_device="cuda")


@needs_no_cuda
def test_the_processor_takes_decode_device_as_its_other_sampling_options(tmp_path):
    from vamba_hf.tiny import build_tiny_processor

    path = str(write_x264(tmp_path / "gops.mp4"))
    message = r"decode_device='cuda' cannot decode"
    with pytest.raises(RuntimeError, match=message):
        build_tiny_processor()(text="<|vision_start|><|vision_end|>", videos=path, decode_device="cuda")
    processor = build_tiny_processor(video_sampling={"decode_device": "cuda"})
    assert processor.video_sampling.decode_device == "cuda"
    with pytest.raises(RuntimeError, match=message):
        processor(text="<|vision_start|><|vision_end|>", videos=path)
    item = {"type": "video", "path": path, "decode_device": "cuda:0"}
    with pytest.raises(RuntimeError, match=r"decode_device='cuda:0' cannot decode"):
        build_tiny_processor().apply_chat_template([{"role": "user", "content": [item]}], tokenize=True)


def open_containers_on_the_cpu(monkeypatch, module) -> list:
    """`module`'s containers open on the CPU whatever device they are asked for; returns the list of the devices
    asked for, in order."""
    devices, open_container = [], video_container_vamba.open_container

    def open_on_the_cpu(location, timeout, device=None):
        devices.append(device)
        return open_container(location, timeout)

    monkeypatch.setattr(module, "open_container", open_on_the_cpu)
    return devices


@needs_no_cuda
def test_a_seeking_thread_that_cannot_open_the_device_raises_rather_than_decode_in_one_pass(tmp_path, monkeypatch):
    path = write_x264(tmp_path / "gops.mp4")
    open_containers_on_the_cpu(monkeypatch, video_decode_vamba)
    monkeypatch.setattr(video_decode_vamba, "_decode_plan", lambda *args: pytest.fail("decoded in one pass"))
    with pytest.raises(RuntimeError, match=r"decode_device='cuda:0' cannot decode .*decode_device=None"):
        load_video(path, NO_RESIZE, num_frames=5, decoder="seek", decode_workers=2, decode_device="cuda:0")


@pytest.mark.parametrize("torch_holds_cuda, refusal, opened",
                         [(True, None, ["current"]), (False, None, ["primary"]),
                          (False, errno.EOPNOTSUPP, ["primary", "own"]), (False, errno.EINVAL, ["primary"])],
                         ids=["torch-made-the-context", "no-context-yet", "primary-context-taken", "other-error"])
def test_the_cuda_context_a_container_decodes_in(tmp_path, monkeypatch, torch_holds_cuda, refusal, opened):
    """torch's context when torch made one (as current: FFmpeg will not take a primary context of other flags);
    else the primary one, or the container's own if another library made it with other flags (ENOTSUP); any
    other refusal is the device's error."""
    path = str(write_x264(tmp_path / "gops.mp4"))
    contexts, made_current = [], []

    def open_on_device(av_module, location, device, options, context):
        contexts.append(context)
        if refusal is not None and context != "own":
            raise av.error.OSError(refusal, os.strerror(refusal))
        return av_module.open(location)

    monkeypatch.setattr(video_nvdec_vamba, "_open_in_context", open_on_device)
    monkeypatch.setattr(video_nvdec_vamba, "_torch_holds_cuda", lambda: torch_holds_cuda)
    monkeypatch.setattr(video_nvdec_vamba, "_torch_context_current",
                        lambda device: made_current.append(device) or contextlib.nullcontext())
    if refusal in (None, errno.EOPNOTSUPP):
        with video_container_vamba._open(av, path, 10.0, "cuda:0") as container:
            assert container.streams.video
    else:
        with pytest.raises(RuntimeError, match=r"decode_device='cuda:0' cannot decode .*Invalid argument"):
            video_container_vamba._open(av, path, 10.0, "cuda:0")
    assert contexts == opened
    assert made_current == (["cuda:0"] if torch_holds_cuda else [])


def test_the_device_context_is_chosen_by_ffmpegs_cuda_options(monkeypatch):
    """PyAV passes a HWAccel's options on to FFmpeg (its `flags` it drops before PyAV 19), and keeps decoded frames
    on the device only with is_hw_owned."""
    made, opened = [], []
    monkeypatch.setattr(av.codec.hwaccel, "HWAccel", lambda *args, **kwargs: made.append((args, kwargs)) or "accel")
    monkeypatch.setattr(av, "open", lambda location, **kwargs: opened.append((location, kwargs)) or "container")
    for context, options in (("primary", {"primary_ctx": "1"}), ("current", {"primary_ctx": "0", "current_ctx": "1"}),
                             ("own", {"primary_ctx": "0"})):
        made.clear()
        assert video_nvdec_vamba._open_in_context(av, "clip.mp4", "cuda:1", {}, context) == "container"
        assert made == [(("cuda",), {"device": "1", "allow_software_fallback": False, "is_hw_owned": True,
                                     "options": options})]
    video_nvdec_vamba._open_in_context(av, "clip.mp4", "cuda", {}, "primary")
    assert made[-1][1]["device"] is None and opened[-1] == ("clip.mp4", {"hwaccel": "accel"})


def test_torch_holds_cuda_only_once_it_has_made_its_context(monkeypatch):
    """Read from the torch already imported (decoding does not import it), after torch's own CUDA start."""
    class Cuda:
        started = False

        def is_initialized(self):
            return self.started

    fake_torch = type("torch", (), {"cuda": Cuda()})()
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    assert not video_nvdec_vamba._torch_holds_cuda()
    fake_torch.cuda.started = True
    assert video_nvdec_vamba._torch_holds_cuda()
    monkeypatch.delitem(sys.modules, "torch")
    assert not video_nvdec_vamba._torch_holds_cuda()


def test_an_unreadable_file_says_so_before_the_device(tmp_path):
    path = tmp_path / "not_a_video.mp4"
    path.write_bytes(b"not a video" * 100)
    with pytest.raises(ValueError, match="cannot read .* as a video"):
        load_video(path, decode_device="cuda")
    with pytest.raises(ValueError, match="has no video stream"):
        load_video(write_audio_only(tmp_path / "sound.wav"), decode_device="cuda")


def test_every_container_opened_for_decoding_gets_the_device_and_the_workers_are_threads(tmp_path, monkeypatch):
    path = write_x264(tmp_path / "gops.mp4")
    expected = one_pass(path, NO_RESIZE.with_options(num_frames=20))
    opened_here = open_containers_on_the_cpu(monkeypatch, video_decode_vamba)
    devices = open_containers_on_the_cpu(monkeypatch, video_seek_vamba)
    monkeypatch.setattr(video_decode_vamba, "MIN_FRAMES_FOR_PROCESSES", 1)
    started = counted_decoding_processes(monkeypatch)
    assert_same_video(load_by_seeking(path, NO_RESIZE, num_frames=20, decode_workers=4, decode_device="cuda:1"),
                      expected)
    assert not started and opened_here == ["cuda:1"] and 1 <= len(devices) <= 4 and set(devices) == {"cuda:1"}
    opened_here.clear()
    devices.clear()
    assert_same_video(load_video(path, NO_RESIZE, num_frames=20, decoder="sequential", decode_device="cuda"), expected)
    assert opened_here + devices == ["cuda"]
    with stream_video(path, NO_RESIZE, num_frames=20, decode_workers=2, decode_device="cuda") as stream:
        assert_same_video(stream.video(), expected)
    assert set(opened_here + devices) == {"cuda"}


def test_with_decode_device_workers_the_other_workers_decode_on_the_cpu(tmp_path, monkeypatch):
    path = write_x264(tmp_path / "gops.mp4")
    expected = one_pass(path, NO_RESIZE.with_options(num_frames=20))
    open_containers_on_the_cpu(monkeypatch, video_decode_vamba)
    devices = open_containers_on_the_cpu(monkeypatch, video_seek_vamba)  # the workers' containers
    assert_same_video(load_by_seeking(path, NO_RESIZE, num_frames=20, decode_workers=4, decode_device="cuda:1",
                                      decode_device_workers=1, decode_processes=False), expected)
    assert sorted(map(str, devices)) == ["None", "None", "None", "cuda:1"]


@needs_no_cuda
def test_workers_beside_device_workers_are_processes_by_default(tmp_path, monkeypatch):
    """Processes where they pay, as without a device: CPU decoders in threads beside NVDEC's share the interpreter
    lock with them (slower on the H200 host, BENCHMARKS.md). Here the device worker's process cannot open the GPU."""
    path = write_x264(tmp_path / "gops.mp4")
    open_containers_on_the_cpu(monkeypatch, video_decode_vamba)
    monkeypatch.setattr(video_decode_vamba, "MIN_FRAMES_FOR_PROCESSES", 1)
    started = counted_decoding_processes(monkeypatch)
    with pytest.raises(RuntimeError, match=r"worker process failed \(RuntimeError: decode_device='cuda' cannot"):
        load_video(path, NO_RESIZE, num_frames=20, decoder="seek", decode_workers=4, decode_device="cuda",
                   decode_device_workers=1)
    assert started


@needs_no_cuda
def test_a_decoding_process_on_a_device_it_cannot_open_says_so(tmp_path, monkeypatch):
    path = write_x264(tmp_path / "gops.mp4")
    open_containers_on_the_cpu(monkeypatch, video_decode_vamba)  # this process opens the file on the CPU; its workers cannot
    with pytest.raises(RuntimeError, match=r"worker process failed \(RuntimeError: decode_device='cuda' cannot "
                                           r"decode .*gops.mp4.*NVIDIA driver with NVDEC"):
        load_video(path, NO_RESIZE, num_frames=20, decoder="seek", decode_workers=2, decode_processes=True,
                   decode_device="cuda", decode_device_workers=1)


class _FailingPacket:
    def decode(self):
        raise av.error.InvalidDataError(22, "Invalid data found when processing input")


class _Container:
    name = "clip.mp4"

    def __init__(self, packets):
        self.packets = packets

    def demux(self, stream):
        return iter(self.packets)


class _Decoding:
    """A packet that decodes to `frames`; a keyframe packet when the first one is a keyframe (of its timestamp)."""

    def __init__(self, *frames):
        self.frames = list(frames)
        self.is_keyframe = bool(frames) and frames[0].key_frame
        self.pts = self.dts = frames[0].pts if frames else None

    def decode(self):
        return self.frames


def _frame(time, key_frame=True, is_corrupt=False):
    return types.SimpleNamespace(time=time, pts=round(time * 1000), key_frame=key_frame, is_corrupt=is_corrupt)


def test_a_device_that_decodes_no_packet_raises():
    frame = _frame(0.0)
    failing = _Container([_FailingPacket()] * 3)
    assert list(video_container_vamba.decoded_frames(failing, None)) == []  # the CPU skips undecodable packets
    with pytest.raises(RuntimeError, match=r"decode_device='cuda' cannot decode 'clip.mp4' \(.*Invalid data"):
        list(video_container_vamba.decoded_frames(failing, None, "cuda"))
    some_decode = _Container([_FailingPacket(), _Decoding(frame), _FailingPacket()])
    assert list(video_container_vamba.decoded_frames(some_decode, None, "cuda")) == [frame]


def test_frames_after_an_undecodable_packet_are_skipped_up_to_the_next_keyframe():
    first, suspect, key, after, last_suspect = _frame(1.0), _frame(1.5, False), _frame(2.0), _frame(2.5, False), \
        _frame(4.0, False)
    packets = [_Decoding(first), _FailingPacket()] + [_FailingPacket()] * 200 + [_Decoding(suspect), _Decoding(),
               _Decoding(key, after), _FailingPacket(), _Decoding(last_suspect)]
    damaged = []
    frames = list(video_container_vamba.decoded_frames(_Container(packets), None, damaged=damaged, start=0.5))
    assert frames == [first, key, after]  # past 200 bad packets in a row, to the end of the stream
    assert damaged == [(0.5, 1.5), (2.0, None)]


def test_a_keyframe_read_before_the_damage_or_marked_corrupt_does_not_end_the_skipping():
    """A keyframe whose packet came before the packet that failed (its frame comes out later, after B-frames) may
    hold damage the decoder concealed; a frame marked corrupt starts a skip as a failing packet does."""
    early_key, late_key, corrupt_key = _frame(1.0), _frame(3.0), _frame(4.0, is_corrupt=True)
    early_packet, b_frame_packet = _Decoding(), _Decoding(early_key, _frame(1.5, False))
    early_packet.is_keyframe, early_packet.pts = True, early_key.pts
    b_frame_packet.is_keyframe, b_frame_packet.pts = False, 1250
    packets = [_Decoding(_frame(0.5)), early_packet, _FailingPacket(), b_frame_packet,
               _Decoding(late_key), _Decoding(_frame(3.5, False)), _Decoding(corrupt_key), _Decoding(_frame(4.5)),
               _Decoding(_frame(5.0))]
    damaged = []
    frames = list(video_container_vamba.decoded_frames(_Container(packets), None, damaged=damaged))
    assert [frame.time for frame in frames] == [0.5, 3.0, 3.5, 4.5, 5.0]
    assert damaged == [(0.5, 3.0), (3.5, 4.5)]


def test_software_frames_stay_as_they_are(tmp_path):
    frame = av.VideoFrame(16, 16, "yuv420p")
    assert video_frames_vamba.in_system_memory(frame) is frame
    with av.open(str(write_x264(tmp_path / "gops.mp4"))) as container:
        decoded = next(container.decode(video=0))
    assert video_frames_vamba.in_system_memory(decoded) is decoded


@pytest.mark.parametrize("version, options", [("18.1.0", {"metadata_errors": "replace"}), ("19.0.2", {})])
def test_containers_open_with_the_options_the_installed_pyav_takes(version, options):
    """PyAV 19 dropped `metadata_errors` (it reads non-UTF-8 metadata with surrogate escapes): passing it there made
    every video fail to open (seen on the GPU machine's Python 3.12, where pip picks PyAV 19)."""
    import types

    from vamba_hf.video_container_vamba import metadata_options

    assert metadata_options(types.SimpleNamespace(__version__=version)) == options
