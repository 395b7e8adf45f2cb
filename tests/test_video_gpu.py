"""Decoding on a GPU's NVDEC (`decode_device`): the frames and times are the CPU decoder's, bit for bit. Runs on a
machine with a CUDA GPU and a PyAV whose FFmpeg has the cuda device; tests/test_video.py checks the rest on the CPU."""

import os
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch
from media_helpers import assert_same_video, write_video, write_x264

import vamba_hf
from vamba_hf import video_frames_vamba
from vamba_hf.video_vamba import VideoSampling, load_video, stream_video

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in av.codec.hwaccel.hwdevices_available(),
    reason="decoding on NVDEC needs a CUDA GPU (torch.cuda.is_available()) and a PyAV whose FFmpeg has the cuda "
           "device (av.codec.hwaccel.hwdevices_available())")

NO_RESIZE = VideoSampling(video_shortest_edge=None, video_longest_edge=None)


@pytest.fixture
def hardware_frames(monkeypatch) -> list:
    """The list that every frame decoded on the GPU and converted (a sampled one) is appended to."""
    seen, in_system_memory = [], video_frames_vamba.in_system_memory

    def counted(frame):
        if frame.format.name == "cuda":
            seen.append(frame.pts)
        return in_system_memory(frame)

    monkeypatch.setattr(video_frames_vamba, "in_system_memory", counted)
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


@pytest.mark.parametrize("device_workers", [None, 1, 2])
def test_nvdec_in_processes_and_beside_cpu_workers_gives_the_frames_of_the_cpu(tmp_path, device_workers):
    path = write_x264(tmp_path / "gops.mp4")
    sampling = NO_RESIZE.with_options(num_frames=40, decoder="seek", decode_workers=3)
    expected = load_video(path, sampling)
    for processes in (True, False):
        video = load_video(path, sampling, decode_processes=processes, decode_device="cuda",
                           decode_device_workers=device_workers)
        assert_same_video(video, expected)
    with stream_video(path, sampling, decode_processes=True, decode_device="cuda",
                      decode_device_workers=device_workers) as stream:
        assert_same_video(stream.video(), expected)


def test_a_codec_without_nvdec_raises_rather_than_decode_on_the_cpu(tmp_path):
    path = write_video(tmp_path / "clip.mkv", codec="ffv1")
    with pytest.raises(RuntimeError, match=r"decode_device='cuda' cannot decode .*decode_device=None"):
        load_video(path, decode_device="cuda")


# Run in a fresh interpreter: which of torch and FFmpeg first makes the device's primary CUDA context decides the
# flags it has, and so whether FFmpeg can share it (decoder first) or opens a context of its own (torch first).
DECODE_AROUND_TORCH = """
import sys
import numpy as np
import torch
from vamba_hf.video_vamba import VideoSampling, load_video

path, torch_first = sys.argv[1], sys.argv[2] == "torch-first"
sampling = VideoSampling(video_shortest_edge=None, video_longest_edge=None, num_frames=7, decode_workers=2)
expected = load_video(path, sampling).frames
if torch_first:
    torch.zeros(1, device="cuda")
decoded = load_video(path, sampling, decode_device="cuda").frames
on_gpu = torch.zeros(1, device="cuda") + 1  # torch works beside the decoder's context either way
decoded_again = load_video(path, sampling, decode_device="cuda").frames
same = all(len(frames) == 7 and all(np.array_equal(a, b) for a, b in zip(frames, expected))
           for frames in (decoded, decoded_again))
print("same" if same and on_gpu.item() == 1 else "different")
"""


@pytest.mark.parametrize("order", ["torch-first", "decoder-first"])
def test_nvdec_decodes_whether_torch_or_the_decoder_makes_the_cuda_context_first(tmp_path, order):
    path = write_x264(tmp_path / "gops.mp4")
    source_root = str(Path(vamba_hf.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source_root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", DECODE_AROUND_TORCH, str(path), order], capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "same"
