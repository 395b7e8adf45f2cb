"""Decoding on a GPU's NVDEC (`decode_device`): the frames and times are the CPU decoder's, bit for bit. Runs on a
machine with a CUDA GPU and a PyAV whose FFmpeg has the cuda device; tests/test_video.py checks the rest on the CPU."""

import av
import pytest
import torch
from media_helpers import assert_same_video, write_video, write_x264

from vamba_hf import video_decode_vamba
from vamba_hf.video_vamba import VideoSampling, load_video, stream_video

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in av.codec.hwaccel.hwdevices_available(),
    reason="decoding on NVDEC needs a CUDA GPU (torch.cuda.is_available()) and a PyAV whose FFmpeg has the cuda "
           "device (av.codec.hwaccel.hwdevices_available())")

NO_RESIZE = VideoSampling(video_shortest_edge=None, video_longest_edge=None)


@pytest.fixture
def hardware_frames(monkeypatch) -> list:
    """The list that every frame decoded on the GPU and converted (a sampled one) is appended to."""
    seen, in_system_memory = [], video_decode_vamba._in_system_memory

    def counted(frame):
        if frame.format.name == "cuda":
            seen.append(frame.pts)
        return in_system_memory(frame)

    monkeypatch.setattr(video_decode_vamba, "_in_system_memory", counted)
    return seen


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("decoder", ["sequential", "seek"])
@pytest.mark.parametrize("options", [dict(num_frames=7), dict(num_frames=60), dict(fps=3.0, start_time=1.5)])
def test_nvdec_gives_the_frames_of_the_cpu(tmp_path, hardware_frames, options, decoder, workers, device):
    path = write_x264(tmp_path / "gops.mp4")
    sampling = NO_RESIZE.with_options(decoder=decoder, decode_workers=workers, **options)
    expected = load_video(path, sampling)
    assert not hardware_frames
    video = load_video(path, sampling, decode_device=device)
    assert_same_video(video, expected)
    assert len(hardware_frames) == len(expected.frames)


@pytest.mark.parametrize("decoder", ["sequential", "seek"])
def test_nvdec_frames_rotated_and_resized_as_on_the_cpu(tmp_path, hardware_frames, decoder):
    path = write_x264(tmp_path / "rotated.mp4", rotation=90)
    sampling = VideoSampling(num_frames=9, video_shortest_edge=100, video_longest_edge=None, decoder=decoder,
                             decode_workers=2)
    expected = load_video(path, sampling)
    assert_same_video(load_video(path, sampling, decode_device="cuda"), expected)
    assert len(hardware_frames) == 9


def test_streamed_nvdec_frames_are_the_cpus(tmp_path, hardware_frames):
    path = write_x264(tmp_path / "gops.mp4")
    sampling = NO_RESIZE.with_options(num_frames=20, decode_workers=3)
    expected = load_video(path, sampling)
    with stream_video(path, sampling, decode_device="cuda") as stream:
        assert_same_video(stream.video(), expected)
    assert len(hardware_frames) == 20


def test_a_codec_without_nvdec_raises_rather_than_decode_on_the_cpu(tmp_path):
    path = write_video(tmp_path / "clip.mkv", codec="ffv1")
    with pytest.raises(RuntimeError, match=r"decode_device='cuda' cannot decode .*decode_device=None"):
        load_video(path, decode_device="cuda")
