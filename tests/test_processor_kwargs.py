"""VambaProcessor's call keywords follow transformers' typed processing kwargs; metadata comes back with the output."""

import tempfile
import threading

import numpy as np
import pytest
import torch
import transformers
from media_helpers import write_video

from vamba_hf.processing_vamba import VambaProcessor, default_image_processor
from vamba_hf.tiny import build_tiny_processor, build_tiny_tokenizer

PLACEHOLDER = "<|vision_start|><|vision_end|>"
QUESTION = "Describe the video in detail please."


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


def frames(count=4, size=56, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def tokenizer_with(**init_kwargs):
    """The tiny tokenizer loaded with extra init kwargs, as `from_pretrained(..., **init_kwargs)` gives them."""
    with tempfile.TemporaryDirectory() as folder:
        build_tiny_tokenizer().save_pretrained(folder)
        return transformers.AutoTokenizer.from_pretrained(folder, **init_kwargs)


def conversation(video, answer=None, **item_options):
    messages = [{"role": "user", "content": [{"type": "video", "video": video, **item_options},
                                             {"type": "text", "text": "What is it?"}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def test_max_length_and_truncation(processor):
    full = processor(text=QUESTION)["input_ids"][0]
    truncated = processor(text=QUESTION, max_length=5, truncation=True)["input_ids"][0]
    assert len(full) > 5 and truncated == full[:5]


def test_truncation_that_cuts_the_placeholder_is_refused(processor):
    with pytest.raises(ValueError, match="lost its .* to truncation"):
        processor(text=QUESTION + PLACEHOLDER, videos=frames(), max_length=4, truncation=True)


def test_per_modality_dicts(processor):
    inputs = processor(text=[PLACEHOLDER + QUESTION, PLACEHOLDER], videos=[frames(), frames(6, seed=1)],
                       text_kwargs={"padding": "max_length", "max_length": 30},
                       videos_kwargs={"return_metadata": True}, common_kwargs={"return_tensors": "pt"})
    assert inputs["input_ids"].shape == (2, 30) and isinstance(inputs["pixel_values_videos"], torch.Tensor)
    assert [entry["num_frames"] for entry in inputs["video_metadata"]] == [4, 6]


def test_a_key_given_flat_and_in_its_dict_is_refused(processor):
    with pytest.raises(ValueError, match="max_length was passed two times"):
        processor(text=QUESTION, max_length=4, truncation=True, text_kwargs={"max_length": 5})


def test_tokenizer_init_defaults_are_honoured():
    processor = VambaProcessor(default_image_processor(), tokenizer_with(padding="max_length", max_length=24))
    assert [len(row) for row in processor(text=["hi", QUESTION])["input_ids"]] == [24, 24]
    assert len(processor(text="hi", max_length=10)["input_ids"][0]) == 10  # the call still wins


def test_padding_follows_the_tokenizer_padding_side():
    tokenizer = build_tiny_tokenizer()
    tokenizer.padding_side = "right"
    processor = VambaProcessor(default_image_processor(), tokenizer)
    mask = processor(text=["hi", QUESTION], return_tensors="pt")["attention_mask"]
    assert mask[0, 0] == 1 and mask[0, -1] == 0
    mask = processor(text=["hi", QUESTION], padding_side="left", return_tensors="pt")["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1
    assert build_tiny_processor()(text=["hi", QUESTION])["attention_mask"][0][0] == 0  # the tiny tokenizer pads left


def test_processor_kwargs_of_apply_chat_template(processor, tmp_path):
    path = write_video(tmp_path / "clip.mp4", num_frames=20)
    inputs = processor.apply_chat_template(conversation(str(path)), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, processor_kwargs={"num_frames": 4, "return_metadata": True})
    assert inputs["video_metadata"][0]["frame_indices"] == [2, 7, 12, 17]
    legacy = processor.apply_chat_template(conversation(str(path)), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, num_frames=4)
    np.testing.assert_array_equal(legacy["pixel_values_videos"], inputs["pixel_values_videos"])


def test_item_options_win_over_call_options(processor, tmp_path):
    path = write_video(tmp_path / "clip.mp4", num_frames=20)
    inputs = processor.apply_chat_template(conversation(str(path), num_frames=6), tokenize=True, return_dict=True,
                                           num_frames=4, return_metadata=True)
    assert inputs["video_metadata"][0]["num_frames"] == 6


def test_return_assistant_tokens_mask(processor):
    batch = [conversation(frames(), "Hello there"), conversation(frames(2), "No")]
    inputs = processor.apply_chat_template(batch, tokenize=True, return_dict=True, return_tensors="pt",
                                           return_assistant_tokens_mask=True)
    assert "offset_mapping" not in inputs
    masks = inputs["assistant_masks"]
    assert masks.shape == inputs["input_ids"].shape
    answers = [processor.tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(inputs["input_ids"], masks)]
    assert answers == ["Hello there<|im_end|>", "No<|im_end|>"]
    assert (masks * (1 - inputs["attention_mask"])).sum() == 0


def test_unknown_keywords_are_refused_with_their_name(processor):
    with pytest.raises(TypeError, match="unknown keyword argument 'num_frame'"):
        processor(text=PLACEHOLDER, videos=frames(), num_frame=3)
    with pytest.raises(TypeError, match="videos_kwargs has unknown option.*do_resize"):
        processor(text=PLACEHOLDER, videos=frames(), videos_kwargs={"do_resize": False})
    with pytest.raises(TypeError, match="unknown keyword argument 'num_frame'"):
        processor.apply_chat_template(conversation(frames()), tokenize=True, num_frame=3)
    with pytest.raises(TypeError, match="text_kwargs must be a dict"):
        processor(text="hi", text_kwargs=["padding"])


def test_template_variables_reach_the_template(processor):
    template = "{{ greeting }}{% for message in messages %}{{ message['content'] }}{% endfor %}"
    rendered = processor.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template,
                                             greeting="hello ")
    assert rendered == "hello x"


@pytest.mark.parametrize("name, value", [
    ("num_frames", float("nan")), ("num_frames", 0), ("num_frames", -1), ("num_frames", 2.5), ("num_frames", True),
    ("fps", float("nan")), ("fps", float("inf")), ("fps", 0), ("fps", -1), ("max_frames", 0),
    ("video_timeout", 0), ("start_time", -1.0), ("video_longest_edge", 0),
])
def test_bad_sampling_values_get_one_line(processor, name, value):
    with pytest.raises(ValueError, match=f"^{name}={value!r} is not") as error:
        processor(text=PLACEHOLDER, videos=frames(), **{name: value})
    assert "\n" not in str(error.value)


def test_num_frames_above_max_frames_is_announced(processor, tmp_path):
    path = write_video(tmp_path / "clip.mp4", num_frames=40)
    with pytest.warns(UserWarning, match="num_frames=20, above max_frames=8: sampling 8 frames"):
        inputs = processor(text=PLACEHOLDER, videos=str(path), num_frames=20, max_frames=8, return_metadata=True)
    assert inputs["video_metadata"][0]["num_frames"] == 8


def test_metadata_belongs_to_each_call_across_threads(tmp_path):
    processor = build_tiny_processor(video_shortest_edge=None, video_longest_edge=None)
    path = str(write_video(tmp_path / "clip.mp4", num_frames=40, width=28, height=28))
    mismatches, errors = [], []

    def work(num_frames):
        try:
            for _ in range(10):
                inputs = processor(text=PLACEHOLDER, videos=path, num_frames=num_frames, return_metadata=True)
                if inputs["video_metadata"][0]["num_frames"] != num_frames:
                    mismatches.append(num_frames)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(count,)) for count in (4, 6, 8, 10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and mismatches == []
    assert not hasattr(processor, "last_video_metadata")


def test_metadata_only_when_asked(processor):
    assert "video_metadata" not in processor(text=PLACEHOLDER, videos=frames())
