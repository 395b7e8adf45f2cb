"""The `frame_resize` video option: "pil" (PIL on the CPU) and "torch" (PIL's fixed-point resize written in torch, on
the processor's device) give PIL's bytes, bit for bit; the default picks "torch" on CUDA GPUs; a resize torch does
not reproduce is never used silently. tests/test_processor_gpu.py checks the same bytes on a CUDA GPU."""

import re

import numpy as np
import PIL.Image
import pytest
import torch
from helpers import tiny_model
from media_helpers import moving_frames, write_video

import vamba_hf.resize_vamba as resize
import vamba_hf.video_processing_vamba as video_processing
from vamba_hf.processing_vamba import VambaProcessor, default_image_processor
from vamba_hf.resize_vamba import resized_as_pil
from vamba_hf.video_processing_vamba import PatchLayout
from vamba_hf.tiny import build_tiny_processor, build_tiny_tokenizer, special_token_ids

PROMPT = "<|vision_start|><|vision_end|>"
FILTERS = [PIL.Image.BICUBIC, PIL.Image.BILINEAR, PIL.Image.LANCZOS, PIL.Image.HAMMING, PIL.Image.BOX]
FILTER_IDS = [PIL.Image.Resampling(resample).name for resample in FILTERS]

# (source width, height), the call's min_pixels (None: the image processor's), which axis PIL resizes first
SIZES = [((64, 48), None, "hv"), ((64, 48), 320 * 240, "hv"), ((320, 180), None, "hv"), ((333, 201), None, "vh"),
         ((640, 360), None, "hv")]
SIZE_IDS = ["64x48-to-56x56", "64x48-up-to-336x252", "320x180-to-308x168", "333x201-to-336x196",
            "640x360-to-644x364"]
# (source, target) (width, height): down by large factors, up, one axis only, sizes of one or two pixels, windows
# wider than the source
RESIZES = [((1920, 1080), (644, 364)), ((1280, 720), (1288, 728)), ((97, 61), (112, 56)), ((51, 122), (51, 182)),
           ((247, 111), (367, 4)), ((3, 5), (28, 28)), ((2, 2), (1, 1)), ((1, 1), (5, 3)), ((28, 28), (3, 1)),
           ((358, 61), (18, 193)), ((9, 300), (26, 113))]


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


def pil_resized(frames, size, resample=PIL.Image.BICUBIC) -> np.ndarray:
    return np.stack([np.asarray(PIL.Image.fromarray(frame).resize(size, resample=resample)) for frame in frames])


def torch_resized(frames, size, resample=PIL.Image.BICUBIC) -> np.ndarray:
    return resized_as_pil(torch.from_numpy(np.stack(frames)), size, resample).to(torch.uint8).numpy()


def noise_frames(count, width, height, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def grid_size(processor, width, height, min_pixels=None) -> tuple:
    return PatchLayout.of(processor.image_processor, min_pixels).frame_size(width, height)


def pixels(processor, frames, **kwargs) -> torch.Tensor:
    return processor(text=PROMPT, videos=frames, return_tensors="pt", **kwargs)["pixel_values_videos"]


# -- PIL's bytes, both ways -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", [(640, 360), (97, 61)], ids=["640x360", "odd-97x61"])
def test_the_default_on_the_cpu_is_pil(processor, source):
    frames = np.stack(moving_frames(4, *source))
    size = grid_size(processor, *source)
    assert size != source
    at_grid_size = pixels(processor, pil_resized(frames, size))  # given at the grid size: patched as they are
    default = pixels(processor, frames)
    assert torch.equal(default, pixels(processor, frames, frame_resize="pil"))
    assert torch.equal(default, at_grid_size)


@pytest.mark.parametrize("source, min_pixels, order", SIZES, ids=SIZE_IDS)
def test_torch_resize_gives_pils_bytes_in_pils_pass_order(processor, source, min_pixels, order):
    frames = np.stack(moving_frames(8, *source))
    size = grid_size(processor, *source, min_pixels)
    reference = pil_resized(frames, size)
    assert np.array_equal(torch_resized(frames, size), reference)
    assert resize.pil_pass_order(source, size, PIL.Image.BICUBIC) == order
    # the order matters: the other one rounds the intermediate image differently
    other = {"hv": "vh", "vh": "hv"}[order]
    passes = resize._pil_passes(torch.from_numpy(frames), size, PIL.Image.BICUBIC, other).to(torch.uint8)
    assert not np.array_equal(passes.numpy(), reference)


@pytest.mark.parametrize("resample", FILTERS, ids=FILTER_IDS)
@pytest.mark.parametrize("source, size", RESIZES, ids=[f"{s[0]}x{s[1]}-to-{t[0]}x{t[1]}" for s, t in RESIZES])
def test_torch_resize_gives_pils_bytes_for_every_filter_and_size(source, size, resample):
    frames = noise_frames(2, *source, seed=source[0] * 7 + size[1])
    assert np.array_equal(torch_resized(frames, size, resample), pil_resized(frames, size, resample))


def test_rounding_the_weights_another_way_is_caught(monkeypatch):
    """The byte equality is strict: PIL's weights rounded toward zero instead of half away give other bytes."""
    frames = torch.from_numpy(noise_frames(2, 640, 360)).to(torch.int32)
    reference = pil_resized(frames.to(torch.uint8).numpy(), (644, 360))
    exact = resize._pil_axis_pass(frames, 2, 644, PIL.Image.BICUBIC)
    first, weights = resize.pil_axis_weights(640, 644, PIL.Image.BICUBIC)
    monkeypatch.setattr(resize, "pil_axis_weights", lambda *args: (first, weights - (weights > 0)))
    resize._axis_taps_on.cache_clear()  # the weights on the device, made from pil_axis_weights once per sizes
    try:
        truncated = resize._pil_axis_pass(frames, 2, 644, PIL.Image.BICUBIC)
    finally:
        resize._axis_taps_on.cache_clear()
    assert np.array_equal(exact.to(torch.uint8).numpy(), reference)
    assert not np.array_equal(truncated.to(torch.uint8).numpy(), reference)


@pytest.mark.parametrize("source, min_pixels, order", SIZES, ids=SIZE_IDS)
def test_torch_pixels_are_pils(processor, source, min_pixels, order):
    frames = np.stack(moving_frames(4, *source))
    budget = {} if min_pixels is None else {"min_pixels": min_pixels}
    by_pil = pixels(processor, frames, **budget)
    assert torch.equal(pixels(processor, frames, frame_resize="torch", **budget), by_pil)
    chunks = list(processor.video_chunks(frames, chunk_frames=2, frame_resize="torch", **budget))
    assert torch.equal(torch.cat([chunk["pixel_values_videos"] for chunk in chunks]), by_pil)


def test_torch_resizes_in_the_processor_and_gives_the_same_logits(processor, monkeypatch):
    ids = special_token_ids(processor.tokenizer)
    ids.pop("im_start_token_id")
    model = tiny_model(**ids)
    calls = []
    resize = video_processing.resized_as_pil
    monkeypatch.setattr(video_processing, "resized_as_pil", lambda *args: calls.append(args[1]) or resize(*args))

    def logits(frames, **kwargs):
        messages = [{"role": "user", "content": [{"type": "video", "video": frames},
                                                 {"type": "text", "text": "What moves?"}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt", **kwargs)
        with torch.no_grad():
            return model(**inputs).logits

    frames = np.stack(moving_frames(8, 320, 180))
    by_pil = logits(frames)
    assert not calls
    assert torch.equal(logits(frames, frame_resize="torch"), by_pil)
    assert calls == [grid_size(processor, 320, 180)]


# -- the default, and what torch does not reproduce -----------------------------------------------------------------


@pytest.mark.parametrize("device, expected", [(None, "pil"), ("cpu", "pil"), (torch.device("cpu"), "pil"),
                                              ("cuda", "torch"), ("cuda:1", "torch"), ("mps", "pil"),
                                              (torch.device("cuda", 0), "torch")])
def test_the_default_is_torch_on_a_cuda_gpu(processor, device, expected):
    layout = PatchLayout.of(processor.image_processor, device=device)
    assert (layout.frame_resize, layout.frame_resize_given) == (expected, False)
    given = PatchLayout.of(processor.image_processor, frame_resize="pil", device=device)
    assert (given.frame_resize, given.frame_resize_given) == ("pil", True)


def test_the_default_torch_resize_is_used_and_gives_pils_pixels(processor, monkeypatch):
    frames = np.stack(moving_frames(4, 333, 201))
    by_pil = pixels(processor, frames)
    calls = []
    resize = video_processing.resized_as_pil
    monkeypatch.setattr(video_processing, "resized_as_pil", lambda *args: calls.append(args[1]) or resize(*args))
    monkeypatch.setattr(video_processing, "default_frame_resize", lambda device: "torch")  # as on a CUDA GPU
    assert torch.equal(pixels(processor, frames), by_pil)
    assert calls == [grid_size(processor, 333, 201)]


def test_a_resize_torch_does_not_reproduce_falls_back_to_pil_by_default_and_raises_when_asked(processor,
                                                                                              monkeypatch):
    frames = np.stack(moving_frames(4, 320, 180))
    by_pil = pixels(processor, frames)
    monkeypatch.setattr(resize, "pil_pass_order", lambda *args: None)  # as with a Pillow of other arithmetic
    monkeypatch.setattr(video_processing, "default_frame_resize", lambda device: "torch")
    assert torch.equal(pixels(processor, frames), by_pil)
    message = (rf"^this Pillow \({re.escape(PIL.__version__)}\) resizes 320x180 frames to 308x168 in a way "
               r"frame_resize='torch' does not reproduce: use frame_resize='pil'\.$")
    with pytest.raises(RuntimeError, match=message):
        pixels(processor, frames, frame_resize="torch")


def test_a_filter_torch_does_not_follow_is_refused_when_asked_and_left_to_pil_by_default(monkeypatch):
    image_processor = default_image_processor(resample=PIL.Image.NEAREST)
    processor = VambaProcessor(image_processor=image_processor, tokenizer=build_tiny_tokenizer())
    frames = np.stack(moving_frames(2, 64, 48))
    with pytest.raises(ValueError, match=r"^frame_resize='torch' follows PIL's BOX, BILINEAR, HAMMING, BICUBIC, "
                                         r"LANCZOS filters, and this image processor resamples with NEAREST: "
                                         r"use frame_resize='pil'\.$"):
        pixels(processor, frames, frame_resize="torch")
    by_pil = pixels(processor, frames)
    monkeypatch.setattr(video_processing, "default_frame_resize", lambda device: "torch")
    assert torch.equal(pixels(processor, frames), by_pil)


# -- the option's forms and errors ----------------------------------------------------------------------------------


def test_the_option_is_a_video_kwarg_in_every_form(processor, monkeypatch):
    frames = np.stack(moving_frames(4, 320, 180))
    calls = []
    resize = video_processing.resized_as_pil
    monkeypatch.setattr(video_processing, "resized_as_pil", lambda *args: calls.append(args[1]) or resize(*args))
    flat = pixels(processor, frames, frame_resize="torch")
    assert torch.equal(flat, pixels(processor, frames, videos_kwargs={"frame_resize": "torch"}))
    assert torch.equal(flat, pixels(processor, frames, frame_resize="torch", device="cpu"))
    assert len(calls) == 3
    assert torch.equal(pixels(processor, frames), pixels(processor, frames, frame_resize=None))
    assert len(calls) == 3


@pytest.mark.parametrize("value", ["cuda", "PIL", "bicubic", 1, True])
def test_a_bad_value_gets_one_line_naming_the_valid_ones(processor, value):
    frames = np.stack(moving_frames(2, 64, 48))
    message = f"^{re.escape(f'frame_resize={value!r} is not valid: give one of ')}'pil', 'torch'\\.$"
    with pytest.raises(ValueError, match=message):
        pixels(processor, frames, frame_resize=value)
    with pytest.raises(ValueError, match="frame_resize"):
        next(processor.video_chunks(frames, chunk_frames=2, frame_resize=value))


def test_torch_resizes_in_chunks_that_stay_within_step_bytes(processor, monkeypatch):
    frames = np.stack(moving_frames(12, 320, 180))
    whole = pixels(processor, frames, frame_resize="torch")
    size = grid_size(processor, 320, 180)
    group_bytes = 2 * 3 * 4 * max(size[0], 320) * max(size[1], 180)  # two frames in int32, at the larger edges
    chunk_frames = []
    resize = video_processing.resized_as_pil

    def recording_resize(chunk, *args):
        chunk_frames.append(chunk.shape[0])
        return resize(chunk, *args)

    monkeypatch.setattr(video_processing, "resized_as_pil", recording_resize)
    for step_bytes, most_frames in ((1, 2), (2 * group_bytes, 4)):
        chunk_frames.clear()
        monkeypatch.setattr(video_processing, "STEP_BYTES", step_bytes)
        assert torch.equal(pixels(processor, frames, frame_resize="torch"), whole)
        assert max(chunk_frames) == most_frames and sum(chunk_frames) == len(frames)


def test_frames_decoded_from_a_file_are_at_the_grid_size_either_way(processor, tmp_path):
    path = write_video(tmp_path / "clip.mp4", num_frames=8, width=64, height=48)
    by_pil = pixels(processor, str(path), num_frames=4, progress=False)
    assert torch.equal(pixels(processor, str(path), num_frames=4, progress=False, frame_resize="torch"), by_pil)
