"""The `frame_resize` video option: "pil" (the default, the original release's pixels) and "torch" (the resize to the
patch grid on the processor's device), with the measured difference between them in bytes and in logits."""

import re

import numpy as np
import PIL.Image
import pytest
import torch
from helpers import relative_error, tiny_model
from media_helpers import moving_frames, write_video

import vamba_hf.processing_vamba as processing
from vamba_hf.processing_vamba import PatchLayout, VambaProcessor, default_image_processor, resized_as_pil
from vamba_hf.tiny import build_tiny_processor, build_tiny_tokenizer, special_token_ids

PROMPT = "<|vision_start|><|vision_end|>"

# Measured on moving_frames (torch 2.13, Pillow 13, CPU) for the sizes below, "torch" against PIL's bytes: at most 1
# apart everywhere, and differing bytes 7.5e-4 (64x48 -> 56x56), 2.9e-4 (64x48 -> 336x252), 9.9e-5 (320x180 ->
# 308x168), 8.6e-5 (333x201 -> 336x196), 1.4e-4 (640x360 -> 644x364). The same frames, resized instead in one
# bicubic pass rounded once: 0.19-0.22 of the bytes differ (up to 9 apart); torch's bicubic without antialiasing:
# 0.41-0.61 (up to 15 apart); antialiased bilinear: 0.70-0.72 (up to 18 apart).
MAX_BYTE_DIFFERENCE = 1
MAX_DIFFERING_FRACTION = 1e-3
# Measured with the tiny model, logits of "torch" pixels against "pil" pixels: 2.9e-7 (320x180 frames) and 2.5e-7
# (640x360); PIL's bilinear in place of its bicubic: 5.4e-5 and 4.6e-5.
MAX_LOGITS_RELATIVE_ERROR = 1e-6

# (source width, height), the call's min_pixels (None: the image processor's), which axis PIL resizes first
SIZES = [((64, 48), None, "hv"), ((64, 48), 320 * 240, "hv"), ((320, 180), None, "hv"), ((333, 201), None, "vh"),
         ((640, 360), None, "hv")]
SIZE_IDS = ["64x48-to-56x56", "64x48-up-to-336x252", "320x180-to-308x168", "333x201-to-336x196",
            "640x360-to-644x364"]


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


def pil_resized(frames, size, resample=PIL.Image.BICUBIC) -> np.ndarray:
    return np.stack([np.asarray(PIL.Image.fromarray(frame).resize(size, resample=resample)) for frame in frames])


def grid_size(processor, width, height, min_pixels=None) -> tuple:
    return PatchLayout.of(processor.image_processor, min_pixels).frame_size(width, height)


def byte_difference(ours: np.ndarray, reference: np.ndarray) -> tuple:
    """(largest absolute difference, fraction of bytes that differ)."""
    difference = np.abs(ours.astype(np.int16) - reference.astype(np.int16))
    return int(difference.max()), float(np.count_nonzero(difference)) / difference.size


def within_bounds(ours: np.ndarray, reference: np.ndarray) -> bool:
    largest, fraction = byte_difference(ours, reference)
    return largest <= MAX_BYTE_DIFFERENCE and fraction <= MAX_DIFFERING_FRACTION


def torch_one_pass(frames: np.ndarray, size: tuple, mode: str, antialias: bool) -> np.ndarray:
    """One torch resize of both axes, rounded to bytes once."""
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    resized = torch.nn.functional.interpolate(pixels, size=(size[1], size[0]), mode=mode, antialias=antialias,
                                              align_corners=False)
    return resized.add(0.5).floor().clamp(0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()


def pixels(processor, frames, **kwargs) -> torch.Tensor:
    return processor(text=PROMPT, videos=frames, return_tensors="pt", **kwargs)["pixel_values_videos"]


# -- the default: PIL, bit for bit ----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", [(640, 360), (97, 61)], ids=["640x360", "odd-97x61"])
def test_the_default_is_pil_bit_for_bit(processor, source):
    frames = np.stack(moving_frames(4, *source))
    size = grid_size(processor, *source)
    assert size != source
    at_grid_size = pixels(processor, pil_resized(frames, size))  # given at the grid size: patched as they are
    default = pixels(processor, frames)
    assert torch.equal(default, pixels(processor, frames, frame_resize="pil"))
    assert torch.equal(default, at_grid_size)


# -- "torch": the measured difference from PIL ---------------------------------------------------------------------


@pytest.mark.parametrize("source, min_pixels, order", SIZES, ids=SIZE_IDS)
def test_torch_resize_is_within_the_measured_difference_from_pil(processor, source, min_pixels, order):
    frames = np.stack(moving_frames(8, *source))
    size = grid_size(processor, *source, min_pixels)
    reference = pil_resized(frames, size)
    ours = resized_as_pil(torch.from_numpy(frames), size, PIL.Image.BICUBIC).to(torch.uint8).numpy()
    assert within_bounds(ours, reference), byte_difference(ours, reference)
    assert processing.pil_pass_order(source, size, PIL.Image.BICUBIC) == order
    # the bounds tell apart the resizes that are not PIL's
    for mode, antialias in (("bilinear", True), ("bicubic", False), ("bicubic", True)):
        other = torch_one_pass(frames, size, mode, antialias)
        assert not within_bounds(other, reference), (mode, antialias, byte_difference(other, reference))


@pytest.mark.parametrize("source, min_pixels, order", SIZES, ids=SIZE_IDS)
def test_torch_pixels_are_those_of_its_resized_frames(processor, source, min_pixels, order):
    frames = np.stack(moving_frames(4, *source))
    size = grid_size(processor, *source, min_pixels)
    resized = resized_as_pil(torch.from_numpy(frames), size, PIL.Image.BICUBIC).to(torch.uint8).numpy()
    budget = {} if min_pixels is None else {"min_pixels": min_pixels}
    ours = pixels(processor, frames, frame_resize="torch", **budget)
    assert torch.equal(ours, pixels(processor, resized, **budget))
    assert not torch.equal(ours, pixels(processor, frames, **budget))


def test_torch_resize_in_the_wrong_pass_order_is_out_of_bounds():
    frames = np.stack(moving_frames(4, 333, 201))
    size = (336, 196)
    reference = pil_resized(frames, size)
    width_first = pil_resized(pil_resized(frames, (size[0], 201)), size)
    assert not within_bounds(width_first, reference), byte_difference(width_first, reference)


def test_torch_logits_are_within_the_measured_difference(processor):
    ids = special_token_ids(processor.tokenizer)
    ids.pop("im_start_token_id")
    model = tiny_model(**ids)

    def logits(frames, **kwargs):
        messages = [{"role": "user", "content": [{"type": "video", "video": frames},
                                                 {"type": "text", "text": "What moves?"}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt", **kwargs)
        with torch.no_grad():
            return model(**inputs).logits

    frames = np.stack(moving_frames(8, 320, 180))
    by_pil, by_torch = logits(frames), logits(frames, frame_resize="torch")
    assert 0 < relative_error(by_torch, by_pil) <= MAX_LOGITS_RELATIVE_ERROR
    bilinear = logits(pil_resized(frames, grid_size(processor, 320, 180), PIL.Image.BILINEAR))
    assert relative_error(bilinear, by_pil) > 10 * MAX_LOGITS_RELATIVE_ERROR


# -- the option's forms and errors ----------------------------------------------------------------------------------


def test_the_option_is_a_video_kwarg_in_every_form(processor):
    frames = np.stack(moving_frames(4, 320, 180))
    flat = pixels(processor, frames, frame_resize="torch")
    assert torch.equal(flat, pixels(processor, frames, videos_kwargs={"frame_resize": "torch"}))
    assert torch.equal(flat, pixels(processor, frames, frame_resize="torch", device="cpu"))
    assert torch.equal(pixels(processor, frames), pixels(processor, frames, frame_resize=None))
    chunks = list(processor.video_chunks(frames, chunk_frames=2, frame_resize="torch"))
    assert torch.equal(torch.cat([chunk["pixel_values_videos"] for chunk in chunks]), flat)


@pytest.mark.parametrize("value", ["cuda", "PIL", "bicubic", 1, True])
def test_a_bad_value_gets_one_line_naming_the_valid_ones(processor, value):
    frames = np.stack(moving_frames(2, 64, 48))
    message = f"^{re.escape(f'frame_resize={value!r} is not valid: give one of ')}'pil', 'torch'\\.$"
    with pytest.raises(ValueError, match=message):
        pixels(processor, frames, frame_resize=value)
    with pytest.raises(ValueError, match="frame_resize"):
        next(processor.video_chunks(frames, chunk_frames=2, frame_resize=value))


def test_torch_refuses_a_filter_it_does_not_follow():
    image_processor = default_image_processor(resample=PIL.Image.LANCZOS)
    processor = VambaProcessor(image_processor=image_processor, tokenizer=build_tiny_tokenizer())
    frames = np.stack(moving_frames(2, 64, 48))
    with pytest.raises(ValueError, match=r"^frame_resize='torch' follows PIL's bicubic filter only, .* LANCZOS: "
                                         r"use frame_resize='pil'\.$"):
        pixels(processor, frames, frame_resize="torch")
    assert pixels(processor, frames).shape[0] > 0


def test_torch_resizes_in_chunks_that_stay_within_step_bytes(processor, monkeypatch):
    frames = np.stack(moving_frames(12, 320, 180))
    whole = pixels(processor, frames, frame_resize="torch")
    size = grid_size(processor, 320, 180)
    group_bytes = 2 * 3 * 4 * max(size[0], 320) * max(size[1], 180)  # two frames in float32, at the larger edges
    chunk_frames = []
    resize = processing.resized_as_pil

    def recording_resize(chunk, *args):
        chunk_frames.append(chunk.shape[0])
        return resize(chunk, *args)

    monkeypatch.setattr(processing, "resized_as_pil", recording_resize)
    for step_bytes, most_frames in ((1, 2), (2 * group_bytes, 4)):
        chunk_frames.clear()
        monkeypatch.setattr(processing, "STEP_BYTES", step_bytes)
        assert torch.equal(pixels(processor, frames, frame_resize="torch"), whole)
        assert max(chunk_frames) == most_frames and sum(chunk_frames) == len(frames)


def test_frames_decoded_from_a_file_are_at_the_grid_size_either_way(processor, tmp_path):
    path = write_video(tmp_path / "clip.mp4", num_frames=8, width=64, height=48)
    by_pil = pixels(processor, str(path), num_frames=4, progress=False)
    assert torch.equal(pixels(processor, str(path), num_frames=4, progress=False, frame_resize="torch"), by_pil)
