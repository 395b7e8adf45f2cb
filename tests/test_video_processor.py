"""The video processor split out of the processor: its pixels are the ones the processor gave before the split, bit
for bit (`DIGESTS`: sha256 of each case's pixel bytes and grid, recorded from main at 560026c, the last commit with
patching inside processing_vamba.py), it saves and loads with the Auto classes, and the package's modules import
each other without circles or private names."""

import hashlib
import importlib.util
import json

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from vamba_hf.tiny import build_tiny_processor

PROMPT = "<|vision_start|><|vision_end|>"


def noise(count, width, height, seed):
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


# name -> (inputs, call options); frames at the grid size, resized by PIL or by torch, up to a pixel budget, given as
# PIL images, two videos in a batch, an odd frame count, and images.
CASES = {
    "video-at-grid-size": ({"videos": noise(4, 56, 84, 1)}, {}),
    "video-resized-by-pil": ({"videos": noise(4, 320, 180, 2)}, {}),
    "video-resized-by-torch": ({"videos": noise(4, 333, 201, 3)}, {"frame_resize": "torch"}),
    "video-up-to-min-pixels": ({"videos": noise(2, 64, 48, 4)}, {"min_pixels": 320 * 240}),
    "video-down-to-max-pixels": ({"videos": noise(2, 640, 360, 5)}, {"max_pixels": 112 * 112}),
    "video-of-pil-frames": ({"videos": [PIL.Image.fromarray(frame) for frame in noise(3, 97, 61, 6)]}, {}),
    "two-videos": ({"videos": [noise(2, 56, 56, 7), noise(6, 120, 90, 8)]}, {}),
    "images": ({"images": [PIL.Image.fromarray(noise(1, 100, 70, 9)[0]), noise(1, 56, 56, 10)[0]]}, {}),
}
PIXEL_KEYS = {"videos": ("pixel_values_videos", "video_grid_thw"), "images": ("pixel_values", "image_grid_thw")}


def digest(processor, inputs: dict, options: dict) -> str:
    (kind, visuals), = inputs.items()
    count = len(visuals) if kind == "images" or isinstance(visuals, list) and isinstance(visuals[0], np.ndarray) \
        else 1
    output = processor(text=[PROMPT] * count, return_tensors="pt", **inputs, **options)
    pixels, grid = (output[key] for key in PIXEL_KEYS[kind])
    return hashlib.sha256(pixels.contiguous().numpy().tobytes() + grid.numpy().astype(np.int64).tobytes()).hexdigest()


DIGESTS = {
    "video-at-grid-size": "2d36ed6b05c22df10e530e4311baef706bc7b3804599795629c3722593aec215",
    "video-resized-by-pil": "fe60056d1712606585a80cdab570234de488ea4cefe5d172e78ffd2e2b817285",
    "video-resized-by-torch": "09a45d9969dcd6b69331840c1d572bb98c7982962db5cb755cdcff01c40be06b",
    "video-up-to-min-pixels": "72899e3583b1cdcb8b2367d313a7fc833ded5befabb1996b018e641632a68a61",
    "video-down-to-max-pixels": "75fb0cb6aca4af9e517e8acc07e3ae420298a1a4166a771b7e6b834ff61ba4b2",
    "video-of-pil-frames": "0e215b48d19d5fe198f313fc575ce887576271dd708a6b58ebca8df45a96f9a6",
    "two-videos": "b9a5a1a3b151767fc75fa63834ef9a036b4cafc55aa6b3f4b17427a1ee2600a7",
    "images": "0cedd2233cf1ca9a58e6ef9ea7742bbfd5db33264d6f3a42873a057b5084c02e",
}


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor(num_frames=4)


@pytest.mark.parametrize("name", list(CASES))
def test_the_pixels_are_the_ones_from_before_the_split(processor, name):
    assert digest(processor, *CASES[name]) == DIGESTS[name]


def check_same_video_inputs(processor, video_processor, frames, **options):
    expected = processor(text=PROMPT, videos=frames, return_tensors="pt", return_metadata=True, **options)
    got = video_processor(frames, return_tensors="pt", return_metadata=True, **options)
    assert set(got) == {"pixel_values_videos", "video_grid_thw", "video_metadata"}
    assert torch.equal(got["pixel_values_videos"], expected["pixel_values_videos"])
    assert torch.equal(got["video_grid_thw"], expected["video_grid_thw"])
    assert got["video_metadata"] == expected["video_metadata"]


def test_the_video_processor_alone_gives_the_processors_inputs(processor):
    video_processor = processor.vamba_video_processor
    assert type(video_processor).__name__ == "VambaVideoProcessor"
    check_same_video_inputs(processor, video_processor, noise(4, 320, 180, 11))
    check_same_video_inputs(processor, video_processor, noise(2, 64, 48, 12), frame_resize="torch",
                            min_pixels=320 * 240)
    as_numpy = video_processor(noise(2, 56, 56, 13))
    assert isinstance(as_numpy["pixel_values_videos"], np.ndarray) and "video_metadata" not in as_numpy


def test_the_video_processor_refuses_an_unknown_option_and_no_video(processor):
    with pytest.raises(TypeError, match=r"^VambaVideoProcessor got unknown option\(s\) num_frame; its options are "
                                        r"the video options: .*num_frames"):
        processor.vamba_video_processor(noise(2, 56, 56, 14), num_frame=8)
    with pytest.raises(ValueError, match=r"^videos is required: give a video"):
        processor.vamba_video_processor(None)
    with pytest.raises(ValueError, match=r"^a video has no frames"):
        processor.vamba_video_processor([])


def saved_video_processor(processor, folder):
    processor.vamba_video_processor.save_pretrained(folder)
    config = json.loads((folder / "video_preprocessor_config.json").read_text())
    assert config["auto_map"] == {"AutoVideoProcessor": "video_processing_vamba.VambaVideoProcessor"}
    assert {"video_processing_vamba.py", "resize_vamba.py", "video_vamba.py"} <= {path.name for path in
                                                                                  folder.iterdir()}
    return config


def test_a_saved_video_processor_loads_from_its_auto_map_as_remote_code(processor, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    config = saved_video_processor(processor, tmp_path / "saved")
    loader = get_class_from_dynamic_module(config["auto_map"]["AutoVideoProcessor"], tmp_path / "saved")
    loaded = loader.from_pretrained(tmp_path / "saved")
    assert type(loaded).__module__.startswith("transformers_modules")
    assert loaded.to_dict() == processor.vamba_video_processor.to_dict()
    check_same_video_inputs(processor, loaded, noise(4, 333, 201, 15), frame_resize="torch")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="transformers' AutoVideoProcessor needs torchvision (not a dependency of vamba-hf)")
def test_a_saved_video_processor_loads_with_auto_video_processor(processor, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    saved_video_processor(processor, tmp_path / "saved")
    loaded = transformers.AutoVideoProcessor.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    assert type(loaded).__name__ == "VambaVideoProcessor"
    check_same_video_inputs(processor, loaded, noise(4, 320, 180, 16))
