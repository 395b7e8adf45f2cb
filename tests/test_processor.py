"""VambaProcessor: prompts, outputs, pixel layout, batching, errors, save/load, and the tiny tokenizer."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from media_helpers import write_video

from vamba_hf.processing_vamba import VAMBA_CHAT_TEMPLATE, VambaProcessor, default_image_processor
from vamba_hf.video_vamba import VideoFrames, VideoSampling
from vamba_hf.tiny import TINY_SPECIAL_TOKENS, build_tiny_processor, build_tiny_tokenizer, special_token_ids

ORIGINAL_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
)
VIDEO_KEYS = {"input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw"}
IMAGE_KEYS = {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"}


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


@pytest.fixture(scope="module")
def ids():
    return special_token_ids(build_tiny_tokenizer())


def random_frames(num_frames, height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


def video_message(video, question="Describe the video.", **item_options):
    return [{"role": "user", "content": [{"type": "video", "video": video, **item_options}, {"type": "text", "text": question}]}]


def image_message(image, question="Describe this image."):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def as_inputs(processor, conversation, **kwargs):
    return processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **kwargs
    )


def expected_grid(height, width, min_pixels=56 * 56, max_pixels=28 * 28 * 1280):
    """Qwen2-VL's smart_resize, in 14-px patches."""
    h_bar, w_bar = round(height / 28) * 28, round(width / 28) * 28
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = max(28, math.floor(height / beta / 28) * 28), max(28, math.floor(width / beta / 28) * 28)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / 28) * 28, math.ceil(width * beta / 28) * 28
    return h_bar // 14, w_bar // 14


# -- prompts ---------------------------------------------------------------------------------------


def test_prompt_equals_the_original_release(processor):
    question = "What happens in this video?"
    assert processor.apply_chat_template(video_message("clip.mp4", question), add_generation_prompt=True) == (
        ORIGINAL_PROMPT.format(question=question)
    )
    assert processor.apply_chat_template(image_message("x.png", "Describe."), add_generation_prompt=True) == (
        ORIGINAL_PROMPT.format(question="Describe.")
    )


def test_prompt_with_system_message_and_batch(processor):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
    )
    assert processor.apply_chat_template(conversation) == expected
    assert processor.apply_chat_template([conversation, conversation]) == [expected, expected]


def test_template_is_on_processor_and_tokenizer(processor):
    assert processor.chat_template == VAMBA_CHAT_TEMPLATE
    assert processor.tokenizer.chat_template == VAMBA_CHAT_TEMPLATE


# -- outputs -----------------------------------------------------------------------------------------


def test_video_inputs_are_ready_for_generate(processor, ids):
    inputs = as_inputs(processor, video_message(random_frames(6, 90, 130)))
    assert set(inputs.keys()) == VIDEO_KEYS
    prompt = ORIGINAL_PROMPT.format(question="Describe the video.")
    assert inputs["input_ids"][0].tolist() == processor.tokenizer(prompt)["input_ids"]
    row = inputs["input_ids"][0].tolist()
    assert row.count(ids["vision_start_token_id"]) == 1
    assert row[row.index(ids["vision_start_token_id"]) + 1] == ids["vision_end_token_id"]
    assert ids["image_token_id"] not in row and ids["video_token_id"] not in row
    grid_h, grid_w = expected_grid(90, 130)
    assert inputs["video_grid_thw"].tolist() == [[3, grid_h, grid_w]]
    assert inputs["pixel_values_videos"].shape == (3 * grid_h * grid_w, 3 * 2 * 14 * 14)
    assert inputs["pixel_values_videos"].dtype == torch.float32
    assert inputs["input_ids"].dtype == torch.int64


def test_image_inputs_are_ready_for_generate(processor):
    inputs = as_inputs(processor, image_message(PIL.Image.new("RGB", (200, 100), (200, 30, 60))))
    assert set(inputs.keys()) == IMAGE_KEYS
    grid_h, grid_w = expected_grid(100, 200)
    assert inputs["image_grid_thw"].tolist() == [[1, grid_h, grid_w]]
    assert inputs["pixel_values"].shape == (grid_h * grid_w, 1176)


def test_text_only(processor):
    inputs = as_inputs(processor, [{"role": "user", "content": "Hello"}])
    assert set(inputs.keys()) == {"input_ids", "attention_mask"}


def test_tokenize_without_dict_gives_input_ids(processor):
    input_ids = processor.apply_chat_template(
        video_message(random_frames(2, 28, 28)), add_generation_prompt=True, tokenize=True, return_tensors="pt"
    )
    assert isinstance(input_ids, torch.Tensor) and input_ids.shape[0] == 1


def test_plain_call_matches_chat_template(processor):
    frames = random_frames(4, 56, 84)
    prompt = ORIGINAL_PROMPT.format(question="Q")
    direct = processor(text=prompt, videos=frames, return_tensors="pt")
    templated = as_inputs(processor, video_message(frames, "Q"))
    for key in VIDEO_KEYS:
        torch.testing.assert_close(direct[key], templated[key], rtol=0, atol=0)


# -- pixel layout --------------------------------------------------------------------------------------


def test_image_pixels_equal_the_image_processor(processor):
    image = PIL.Image.fromarray(random_frames(1, 70, 150)[0])
    reference = default_image_processor()(images=[image], return_tensors="np")
    inputs = processor(text="<|vision_start|><|vision_end|>", images=image)
    np.testing.assert_array_equal(inputs["pixel_values"], reference["pixel_values"])
    np.testing.assert_array_equal(inputs["image_grid_thw"], reference["image_grid_thw"])


def test_image_as_path_array_tensor_give_the_same_pixels(processor, tmp_path):
    pixels = random_frames(1, 60, 90)[0]
    path = tmp_path / "image.png"
    PIL.Image.fromarray(pixels).save(path)
    outputs = [
        processor(text="<|vision_start|><|vision_end|>", images=image)["pixel_values"]
        for image in (PIL.Image.fromarray(pixels), str(path), path, pixels, np.transpose(pixels, (2, 0, 1)), torch.from_numpy(pixels))
    ]
    for output in outputs[1:]:
        np.testing.assert_array_equal(output, outputs[0])


def reference_video_patches(frames, patch=14, merge=2, temporal=2, image_processor=None):
    """The Qwen2-VL video layout built from the spec: each frame normalized by the image processor,
    then grouped (t, h/m, w/m, m, m, C, temporal, patch, patch)."""
    image_processor = image_processor or default_image_processor()
    normalized = []
    for frame in frames:
        single = image_processor(images=[frame], return_tensors="np")
        _, grid_h, grid_w = single["image_grid_thw"][0]
        # undo the image patchify of one frame: rows (h/m, w/m, m, m), features (C, temporal, p, p)
        rows = single["pixel_values"].reshape(grid_h // merge, grid_w // merge, merge, merge, 3, temporal, patch, patch)
        normalized.append(rows[:, :, :, :, :, 0].transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, grid_h * patch, grid_w * patch))
    video = np.stack(normalized)  # (T, C, H, W)
    t = len(frames) // temporal
    grouped = video.reshape(t, temporal, 3, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    patches = grouped.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * grid_h * grid_w, 3 * temporal * patch * patch)
    return patches, [t, int(grid_h), int(grid_w)]


@pytest.mark.parametrize("count, height, width, seed", [(6, 90, 130, 3), (36, 28, 56, 5)],
                         ids=["one-chunk", "more-frames-than-one-chunk"])
def test_video_pixels_follow_the_qwen2_vl_layout(processor, count, height, width, seed):
    frames = random_frames(count, height, width, seed=seed)
    patches, grid = reference_video_patches(list(frames))
    inputs = processor(text="<|vision_start|><|vision_end|>", videos=frames)
    assert inputs["video_grid_thw"].tolist() == [grid]
    np.testing.assert_array_equal(inputs["pixel_values_videos"], patches)


@pytest.mark.skipif(not transformers.__version__.startswith("4."), reason="transformers 4.x image processor still takes videos")
def test_video_pixels_equal_transformers_4_video_path(processor):
    frames = random_frames(6, 90, 130, seed=4)
    reference = transformers.Qwen2VLImageProcessor()(images=None, videos=[list(frames)], return_tensors="np")
    inputs = processor(text="<|vision_start|><|vision_end|>", videos=frames)
    np.testing.assert_array_equal(inputs["video_grid_thw"], reference["video_grid_thw"])
    np.testing.assert_array_equal(inputs["pixel_values_videos"], reference["pixel_values_videos"])


@pytest.mark.parametrize("settings", [
    {"rescale_factor": 1 / 127.5, "image_mean": [0.5, 0.25, 0.125], "image_std": [0.3, 0.7, 1.9]},
    {"rescale_factor": 0.003, "do_normalize": False},
    {"do_rescale": False, "image_mean": [100.0, 50.0, 0.0], "image_std": [60.0, 60.0, 60.0]},
], ids=["other-rescale-and-norm", "no-normalize", "no-rescale"])
def test_video_pixels_follow_any_image_processor_settings_exactly(settings):
    image_processor = default_image_processor(**settings)
    processor = VambaProcessor(image_processor=image_processor, tokenizer=build_tiny_tokenizer())
    frames = random_frames(4, 60, 90, seed=9)
    patches, grid = reference_video_patches(list(frames), image_processor=image_processor)
    inputs = processor(text="<|vision_start|><|vision_end|>", videos=frames)
    assert inputs["video_grid_thw"].tolist() == [grid]
    np.testing.assert_array_equal(inputs["pixel_values_videos"], patches)


def test_video_forms_give_the_same_pixels(processor):
    frames = random_frames(4, 56, 56, seed=6)
    as_torch_float = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # qwen_vl_utils' video tensors
    forms = [
        frames,
        torch.from_numpy(frames).permute(0, 3, 1, 2),
        as_torch_float,
        (as_torch_float, {"fps": 2.0, "frames_indices": [0, 1, 2, 3]}),
        [PIL.Image.fromarray(frame) for frame in frames],
        list(frames),
        VideoFrames(frames=list(frames)),
    ]
    outputs = [processor(text="<|vision_start|><|vision_end|>", videos=form)["pixel_values_videos"] for form in forms]
    for output in outputs[1:]:
        np.testing.assert_array_equal(output, outputs[0])


def test_decoded_frames_are_handed_back_as_they_are_patched(processor, tmp_path, monkeypatch):
    import vamba_hf.video_processing_vamba as video_processing
    from vamba_hf.video_vamba import FrameResize, load_video

    path = write_video(tmp_path / "clip.mp4", num_frames=24, width=56, height=56)
    released = []
    patch_into = video_processing.video_patches_into
    monkeypatch.setattr(video_processing, "STEP_BYTES", 1)  # one temporal group per step

    def recording_patch_into(output, frames, layout, release):
        recorder = None if release is None else (lambda n: (released.append(n), release(n)))
        return patch_into(output, frames, layout, recorder)

    monkeypatch.setattr(video_processing, "video_patches_into", recording_patch_into)
    with_release = processor(text="<|vision_start|><|vision_end|>", videos=str(path), num_frames=8)
    assert released == [2, 4, 6, 8]
    frames = load_video(path, processor.video_sampling, num_frames=8,
                        resize=FrameResize(256, 640, video_processing.PatchLayout.of(
                            processor.image_processor).frame_size))
    given = processor(text="<|vision_start|><|vision_end|>", videos=frames)
    assert released == [2, 4, 6, 8]  # frames a caller gave are never released
    np.testing.assert_array_equal(given["pixel_values_videos"], with_release["pixel_values_videos"])


def test_device_option(processor):
    inputs = processor(text="<|vision_start|><|vision_end|>", videos=random_frames(4, 56, 56), device="cpu",
                       return_tensors="pt")
    reference = processor(text="<|vision_start|><|vision_end|>", videos=random_frames(4, 56, 56), return_tensors="pt")
    assert inputs["pixel_values_videos"].device.type == "cpu"
    torch.testing.assert_close(inputs["pixel_values_videos"], reference["pixel_values_videos"], rtol=0, atol=0)


def test_min_max_pixels_override(processor):
    frames = random_frames(2, 280, 280)
    inputs = processor(text="<|vision_start|><|vision_end|>", videos=frames, max_pixels=112 * 112)
    assert inputs["video_grid_thw"].tolist() == [[1, 8, 8]]
    inputs = processor(text="<|vision_start|><|vision_end|>", images=frames[0], min_pixels=560 * 560)
    assert inputs["image_grid_thw"].tolist() == [[1, 40, 40]]


@settings(max_examples=12, deadline=None)
@given(num_frames=st.integers(2, 9), height=st.integers(10, 300), width=st.integers(10, 300), seed=st.integers(0, 99))
def test_video_pixels_property(processor, num_frames, height, width, seed):
    """Any size and frame count: the grid of Qwen2-VL's smart resize, the odd last frame dropped, and pixels equal,
    bit for bit, to the image processor's on each frame laid out as Qwen2-VL's video patches."""
    frames = random_frames(num_frames, height, width, seed=seed)
    inputs = processor(text="<|vision_start|><|vision_end|>", videos=frames, return_metadata=True)
    kept = num_frames // 2 * 2
    patches, grid = reference_video_patches(list(frames[:kept]))
    assert grid == [num_frames // 2, *expected_grid(height, width)]
    assert inputs["video_grid_thw"].tolist() == [grid]
    np.testing.assert_array_equal(inputs["pixel_values_videos"], patches)
    assert inputs["video_metadata"][0]["num_frames"] == kept


# -- videos from files -------------------------------------------------------------------------------------


def test_video_file_message_and_timestamps(processor, tmp_path):
    path = write_video(tmp_path / "clip.mp4", num_frames=30, width=96, height=64, fps=15)
    inputs = as_inputs(processor, video_message(str(path), num_frames=5), return_metadata=True)
    metadata = inputs["video_metadata"]
    assert len(metadata) == 1 and metadata[0]["num_frames"] == 4  # 5 sampled, the odd last one dropped
    assert metadata[0]["frame_indices"] == [2, 8, 14, 20]
    assert metadata[0]["timestamps"] == pytest.approx([index / 15 for index in (2, 8, 14, 20)], abs=1e-3)
    # frames are resized to longest edge 640 / shortest edge 256 first: 96x64 -> 256x256 -> 252x252
    assert inputs["video_grid_thw"].tolist() == [[2, 18, 18]]


def test_video_file_by_path_and_url_keys(processor, tmp_path):
    path = write_video(tmp_path / "clip.mkv", num_frames=8, codec="libx264")
    for key, value in (("path", str(path)), ("url", f"file://{path}")):
        conversation = [{"role": "user", "content": [{"type": "video", key: value}, {"type": "text", "text": "Q"}]}]
        inputs = as_inputs(processor, conversation, num_frames=4)
        assert inputs["video_grid_thw"].tolist() == [[2, 18, 18]]


def test_processor_sampling_defaults_apply(tmp_path):
    processor = build_tiny_processor(num_frames=6, video_shortest_edge=None, video_longest_edge=None)
    path = write_video(tmp_path / "clip.mp4", num_frames=20, width=56, height=56)
    inputs = processor(text="<|vision_start|><|vision_end|>", videos=str(path), return_metadata=True)
    assert inputs["video_grid_thw"].tolist() == [[3, 4, 4]]
    assert inputs["video_metadata"][0]["frame_indices"] == [1, 4, 7, 11, 14, 17]


# -- batches ------------------------------------------------------------------------------------------------


def test_batch_is_left_padded(processor, ids):
    conversations = [
        video_message(random_frames(2, 56, 56, seed=1), "A long question about the first video?"),
        [{"role": "user", "content": "Hi"}],
        video_message(random_frames(4, 28, 56, seed=2), "Short?"),
    ]
    inputs = as_inputs(processor, conversations)
    assert set(inputs.keys()) == VIDEO_KEYS
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
    singles = [as_inputs(processor, conversation)["input_ids"][0] for conversation in conversations]
    for row, single in enumerate(singles):
        pad = input_ids.shape[1] - len(single)
        assert mask[row, :pad].sum() == 0 and mask[row, pad:].all()
        assert (input_ids[row, :pad] == ids["pad_token_id"]).all()
        assert input_ids[row, pad:].tolist() == single.tolist()
    assert inputs["video_grid_thw"].tolist() == [[1, 4, 4], [2, *expected_grid(28, 56)]] == [[1, 4, 4], [2, 4, 6]]
    assert inputs["pixel_values_videos"].shape[0] == 1 * 4 * 4 + 2 * 4 * 6


# -- errors ----------------------------------------------------------------------------------------------------


def test_video_without_placeholder(processor):
    with pytest.raises(ValueError, match="1 video.*0 vision placeholder"):
        processor(text="Describe the video.", videos=random_frames(2, 28, 28))


def test_placeholder_without_video(processor):
    with pytest.raises(ValueError, match="0 image.*1 vision placeholder"):
        processor(text="<|vision_start|><|vision_end|>Describe.")


def test_two_visuals_in_one_conversation(processor):
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "video", "video": "b.mp4"}]},
    ]
    with pytest.raises(ValueError, match="at most one"):
        as_inputs(processor, conversation)
    with pytest.raises(ValueError, match="at most one"):
        processor(text="<|vision_start|><|vision_end|><|vision_start|><|vision_end|>", videos=[random_frames(2, 28, 28)] * 2)


def test_qwen2_vl_pad_tokens_are_refused(processor):
    with pytest.raises(ValueError, match="video_pad"):
        processor(text="<|vision_start|><|video_pad|><|vision_end|>", videos=random_frames(2, 28, 28))


def test_mixed_image_and_video_batch(processor):
    with pytest.raises(ValueError, match="mixes images and videos"):
        as_inputs(processor, [image_message(random_frames(1, 28, 28)[0]), video_message(random_frames(2, 28, 28))])


def test_too_few_frames(processor, tmp_path):
    with pytest.raises(ValueError, match="at least 2 frames"):
        processor(text="<|vision_start|><|vision_end|>", videos=random_frames(1, 28, 28))
    image_path = tmp_path / "still.png"
    PIL.Image.new("RGB", (32, 32)).save(image_path)
    with pytest.raises(ValueError, match="as an image"):
        as_inputs(processor, video_message(str(image_path)))


def test_zero_size_images(processor):
    with pytest.raises(ValueError, match="zero size"):
        processor(text="<|vision_start|><|vision_end|>", images=np.zeros((0, 10, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="zero size"):
        processor(text="<|vision_start|><|vision_end|>", images=PIL.Image.new("RGB", (0, 5)))


def test_missing_and_unreadable_files(processor, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        as_inputs(processor, image_message(str(tmp_path / "nowhere.png")))
    with pytest.raises(FileNotFoundError, match="nowhere.mp4"):
        as_inputs(processor, video_message(str(tmp_path / "nowhere.mp4")))
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(ValueError, match="notes.png.*as an image"):
        as_inputs(processor, image_message(str(not_an_image)))
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("hello " * 100)
    with pytest.raises(ValueError, match="notes.mp4.*as a video"):
        as_inputs(processor, video_message(str(not_a_video)))


def test_frames_of_different_sizes(processor):
    frames = [np.zeros((28, 28, 3), dtype=np.uint8), np.zeros((56, 28, 3), dtype=np.uint8)]
    with pytest.raises(ValueError, match="same size"):
        processor(text="<|vision_start|><|vision_end|>", videos=frames)


# -- save / load -------------------------------------------------------------------------------------------------


def test_round_trip_through_auto_processor(tmp_path):
    processor = build_tiny_processor(num_frames=32)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "processing_vamba.py").exists()
    auto_map = {"AutoProcessor": "processing_vamba.VambaProcessor"}
    saved_configs = [name for name in ("processor_config.json", "tokenizer_config.json", "preprocessor_config.json") if (tmp_path / name).exists()]
    assert {"processor_config.json", "tokenizer_config.json"} <= set(saved_configs)
    for name in saved_configs:
        assert json.loads((tmp_path / name).read_text())["auto_map"] == auto_map, name

    loaded = transformers.AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "VambaProcessor"
    assert loaded.video_sampling.to_dict() == VideoSampling(num_frames=32).to_dict()  # the remote-code copy of the class
    assert loaded.chat_template == VAMBA_CHAT_TEMPLATE
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    conversation = video_message(random_frames(4, 56, 84))
    expected, got = as_inputs(processor, conversation), as_inputs(loaded, conversation)
    assert set(got.keys()) == VIDEO_KEYS
    for key in VIDEO_KEYS:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_from_pretrained_takes_sampling_options(tmp_path):
    build_tiny_processor(num_frames=32, max_frames=64).save_pretrained(tmp_path)
    loaded = VambaProcessor.from_pretrained(tmp_path, num_frames=8, video_longest_edge=None)
    assert loaded.video_sampling == VideoSampling(num_frames=8, max_frames=64, video_longest_edge=None)
    auto = transformers.AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True, fps=2.0)
    assert auto.video_sampling.to_dict() == VideoSampling(num_frames=32, max_frames=64, fps=2.0).to_dict()
    with pytest.raises(ValueError, match="num_frames=0 is not"):
        VambaProcessor.from_pretrained(tmp_path, num_frames=0)


def test_saved_processor_runs_as_remote_code_without_the_package(tmp_path):
    folder = tmp_path / "saved"
    build_tiny_processor(num_frames=4).save_pretrained(folder)
    assert {"processing_vamba.py", "video_vamba.py"} <= {path.name for path in folder.iterdir()}
    video = write_video(tmp_path / "clip.mp4", num_frames=12, width=56, height=56)
    script = (
        "import sys\n"
        "sys.modules['vamba_hf'] = None  # not importable: only the folder's remote code may run\n"
        "import transformers\n"
        f"processor = transformers.AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
        "assert type(processor).__module__.startswith('transformers_modules'), type(processor).__module__\n"
        f"inputs = processor(text='<|vision_start|><|vision_end|>', videos={str(video)!r}, return_metadata=True)\n"
        "print(inputs['video_grid_thw'].tolist(), inputs['video_metadata'][0]['frame_indices'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[[2, 18, 18]] [1, 4, 7, 10]"


def test_processor_from_parts():
    processor = VambaProcessor(image_processor=default_image_processor(), tokenizer=build_tiny_tokenizer())
    assert processor.video_sampling == VideoSampling()
    assert (processor.video_sampling.num_frames, processor.video_sampling.max_frames) == (128, 512)
    assert (processor.video_sampling.video_longest_edge, processor.video_sampling.video_shortest_edge) == (640, 256)
    assert processor.image_processor.size == {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}


# -- the tiny tokenizer -------------------------------------------------------------------------------------------


def test_tiny_tokenizer_is_small_and_deterministic():
    first, second = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    assert len(first) == 305 <= 512
    assert type(first).__name__ in ("Qwen2Tokenizer", "Qwen2TokenizerFast")
    assert [first.convert_tokens_to_ids(token) for token in TINY_SPECIAL_TOKENS] == list(range(298, 305))


def test_tiny_tokenizer_special_tokens(ids):
    assert ids == {
        "vision_start_token_id": 300,
        "vision_end_token_id": 301,
        "image_token_id": 302,
        "video_token_id": 303,
        "im_start_token_id": 298,
        "eos_token_id": 299,
        "pad_token_id": 304,
    }
    tokenizer = build_tiny_tokenizer()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    text = ORIGINAL_PROMPT.format(question="Ünïcode 日本 video?")
    encoded = tokenizer(text)["input_ids"]
    assert tokenizer.decode(encoded) == text
    assert encoded[:1] == [298] and max(encoded) < len(tokenizer)
