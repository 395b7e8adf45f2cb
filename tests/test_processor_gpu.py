"""The processor on a CUDA GPU (`device="cuda"`): the torch resize gives PIL's bytes there too, and the model inputs
are the CPU's bit for bit. tests/test_processor_resize.py checks the same on the CPU."""

import numpy as np
import pytest
import torch
from media_helpers import moving_frames
from test_processor_resize import FILTER_IDS, FILTERS, RESIZES, SIZE_IDS, SIZES, grid_size, noise_frames, pil_resized

import vamba_hf.video_processing_vamba as video_processing
from vamba_hf.resize_vamba import resized_as_pil
from vamba_hf.tiny import build_tiny_processor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available())")


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


@pytest.mark.parametrize("resample", FILTERS, ids=FILTER_IDS)
@pytest.mark.parametrize("source, size", RESIZES + [((640, 360), (644, 364))],
                         ids=[f"{s[0]}x{s[1]}-to-{t[0]}x{t[1]}" for s, t in RESIZES] + ["640x360-to-644x364"])
def test_the_torch_resize_on_the_gpu_gives_pils_bytes(source, size, resample):
    frames = noise_frames(3, *source, seed=source[1])
    ours = resized_as_pil(torch.from_numpy(frames).cuda(), size, resample)
    assert ours.device.type == "cuda"
    assert np.array_equal(ours.to(torch.uint8).cpu().numpy(), pil_resized(frames, size, resample))


@pytest.mark.parametrize("source, min_pixels, order", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_inputs_on_the_gpu_are_the_cpus_bit_for_bit(processor, monkeypatch, source, min_pixels, order, device):
    frames = np.stack(moving_frames(8, *source))
    budget = {} if min_pixels is None else {"min_pixels": min_pixels}
    on_cpu = processor(text="<|vision_start|><|vision_end|>", videos=frames, return_tensors="pt", **budget)
    resized_on = []
    resize = video_processing.resized_as_pil
    monkeypatch.setattr(video_processing, "resized_as_pil",
                        lambda chunk, *args: resized_on.append(chunk.device.type) or resize(chunk, *args))
    on_gpu = processor(text="<|vision_start|><|vision_end|>", videos=frames, return_tensors="pt", device=device,
                       **budget)
    assert on_gpu["pixel_values_videos"].device.type == "cuda"
    assert resized_on and set(resized_on) == {"cuda"}  # the default on the GPU: resized there
    assert torch.equal(on_gpu["pixel_values_videos"].cpu(), on_cpu["pixel_values_videos"])
    assert torch.equal(on_gpu["video_grid_thw"], on_cpu["video_grid_thw"])
    chunks = list(processor.video_chunks(frames, chunk_frames=2, device=device, **budget))
    assert torch.equal(torch.cat([chunk["pixel_values_videos"].cpu() for chunk in chunks]),
                       on_cpu["pixel_values_videos"])
    assert grid_size(processor, *source, min_pixels) != source


def test_pil_on_the_gpu_device_is_pils(processor):
    frames = np.stack(moving_frames(4, 640, 360))
    on_cpu = processor(text="<|vision_start|><|vision_end|>", videos=frames, return_tensors="pt")
    by_pil = processor(text="<|vision_start|><|vision_end|>", videos=frames, return_tensors="pt", device="cuda",
                       frame_resize="pil")
    assert torch.equal(by_pil["pixel_values_videos"].cpu(), on_cpu["pixel_values_videos"])
