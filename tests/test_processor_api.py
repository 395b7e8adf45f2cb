"""VambaProcessor against transformers' processor API: the image settings a saved folder carries for every line,
message objects in chat templates, the typed `__call__`, images nested per prompt, and
`_get_num_multimodal_tokens`."""

import dataclasses
import inspect
import json
import typing

import numpy as np
import pytest
import torch

from vamba_hf.processing_vamba import VISION_PLACEHOLDER, VambaProcessor, default_image_processor
from vamba_hf.tiny import build_tiny_tokenizer

MIN_PIXELS, MAX_PIXELS = 128 * 28 * 28, 12_845_056


@pytest.fixture(scope="module")
def processor():
    image_processor = default_image_processor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return VambaProcessor(image_processor=image_processor, tokenizer=build_tiny_tokenizer())


def random_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# -- the saved image settings ----------------------------------------------------------------------------------


def test_a_saved_processor_writes_its_image_settings_where_every_line_reads_them(processor, tmp_path):
    """transformers 5 nests the image processor's settings in processor_config.json, which 4.x does not read; 4.x's
    Qwen2-VL image processor takes its pixel budget from min_pixels / max_pixels only."""
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert (saved["min_pixels"], saved["max_pixels"]) == (MIN_PIXELS, MAX_PIXELS)
    assert (saved["size"]["shortest_edge"], saved["size"]["longest_edge"]) == (MIN_PIXELS, MAX_PIXELS)
    assert saved["image_processor_type"].startswith("Qwen2VLImageProcessor")
    nested = json.loads((tmp_path / "processor_config.json").read_text()).get("image_processor")
    if nested is not None:  # transformers 5: the same settings in both files
        assert saved == {**nested, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
    loaded = VambaProcessor.from_pretrained(tmp_path)
    assert (loaded.image_processor.size["shortest_edge"], loaded.image_processor.size["longest_edge"]) == \
        (MIN_PIXELS, MAX_PIXELS)


# -- chat templates --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Message:
    role: str
    content: typing.Any
    tool_calls: typing.Optional[list] = None


@dataclasses.dataclass
class TextBlock:
    text: str
    type: str = "text"


@dataclasses.dataclass
class ImageURLBlock:
    image_url: dict
    type: str = "image_url"


class PydanticLikeMessage:
    """An object with `model_dump()`, as the OpenAI SDK's messages are."""

    def __init__(self, role, content):
        self.role, self.content = role, content

    def model_dump(self):
        return {"role": self.role, "content": self.content}


def test_message_objects_render_like_the_equivalent_dicts(processor):
    image = random_image(56, 56)
    as_dicts = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What is this?"}]}]
    as_objects = [Message("user", [{"type": "image", "image": image}, TextBlock("What is this?")])]
    assert processor.apply_chat_template(as_objects) == processor.apply_chat_template(as_dicts)
    assert processor.apply_chat_template([PydanticLikeMessage("user", "Hi")]) == \
        processor.apply_chat_template([{"role": "user", "content": "Hi"}])
    expected = processor.apply_chat_template(as_dicts, tokenize=True, return_dict=True, return_tensors="pt")
    got = processor.apply_chat_template(as_objects, tokenize=True, return_dict=True, return_tensors="pt")
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    batch = processor.apply_chat_template([as_objects, [PydanticLikeMessage("user", "Hi")]])
    assert batch == [processor.apply_chat_template(as_dicts), processor.apply_chat_template([{"role": "user",
                                                                                               "content": "Hi"}])]


def test_message_objects_with_a_custom_template_and_an_openai_image_url_block(processor):
    template = ("{% for message in messages %}{{ message.role }}{% if message.tool_calls is defined %} (tool calls)"
                "{% endif %}:{% for block in message.content %} {{ block.type }}={{ block.url or block.text }}"
                "{% endfor %}{% endfor %}")
    messages = [Message("user", [ImageURLBlock({"url": "https://example.com/cat.png"}),
                                 {"type": "text", "text": "What is this?"}])]
    assert processor.apply_chat_template(messages, chat_template=template) == \
        "user: image=https://example.com/cat.png text=What is this?"
    assert isinstance(messages[0].content[0], ImageURLBlock)  # the caller's objects are left as they are


# -- the call ----------------------------------------------------------------------------------------------------


def test_call_parameters_are_typed_and_name_no_audio(processor):
    """transformers' tests and pipelines give a processor the modalities its typed `__call__` names."""
    parameters = inspect.signature(VambaProcessor.__call__).parameters
    assert list(parameters) == ["self", "images", "text", "videos", "kwargs"]
    for name in ("images", "text", "videos", "kwargs"):
        assert parameters[name].annotation is not inspect.Parameter.empty, name
    with pytest.raises(ValueError, match=r"^Vamba reads no audio: leave `audio` out\.$"):
        processor(text="Hi", audio=np.zeros(16000))


def test_a_loaded_processor_has_the_saved_one_s_dict(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert VambaProcessor.from_pretrained(tmp_path).to_dict() == processor.to_dict()


def test_images_nested_per_prompt_give_the_flat_call(processor):
    images = [random_image(56, 84, seed) for seed in range(2)]
    texts = [f"{VISION_PLACEHOLDER}one", "no image here", f"{VISION_PLACEHOLDER}two"]
    flat = processor(text=texts, images=images, return_tensors="pt")
    nested = processor(text=texts, images=[[images[0]], [], [images[1]]], return_tensors="pt")
    assert set(nested) == set(flat)
    for key in flat:
        torch.testing.assert_close(nested[key], flat[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^images is nested per prompt but has 2 lists for 3 prompts"):
        processor(text=texts, images=[[images[0]], [images[1]]])
    with pytest.raises(ValueError, match=r"^prompt 1 has 0 vision placeholder\(s\) .* but its list holds 1 image"):
        processor(text=texts, images=[[images[0]], [images[1]], []])


# -- token counts ----------------------------------------------------------------------------------------------


SIZES = [(100, 100), (300, 100), (500, 30), (213, 167), (1080, 1920)]


@pytest.mark.parametrize("kwargs", [{}, {"max_pixels": 200_000}, {"images_kwargs": {"min_pixels": 56 * 56}}])
def test_num_multimodal_tokens_match_the_call(processor, kwargs):
    counts = processor._get_num_multimodal_tokens(image_sizes=SIZES, video_sizes=[(8, 120, 160)], **kwargs)
    for (height, width), tokens, patches in zip(SIZES, counts["num_image_tokens"], counts["num_image_patches"]):
        text = f"Look: {VISION_PLACEHOLDER}"
        inputs = processor(text=text, images=[random_image(height, width)], return_tensors="pt", **kwargs)
        without = processor(text="Look: ", return_tensors="pt")
        assert tokens == inputs["input_ids"].shape[1] - without["input_ids"].shape[1]
        assert patches == inputs["pixel_values"].shape[0] == int(inputs["image_grid_thw"].prod())
    assert counts["num_video_tokens"] == [counts["num_image_tokens"][0]]
