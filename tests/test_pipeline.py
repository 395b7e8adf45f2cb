"""`pipeline("image-text-to-text", model=converted_folder, trust_remote_code=True)`: the reference's greedy ids
through the pipeline's generation step, and chat messages with an image or a video giving what the model and
processor give when called directly."""

import pytest
import torch
from convert_helpers import generate_golden, golden_generated_ids, golden_generation_inputs, make_source
from PIL import Image
from transformers import pipeline

from vamba_hf.convert import convert_checkpoint
from vamba_hf.demo import write_demo_video

MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def converted(golden_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    source = make_source(golden_dir / "video_short", folder / "official")
    convert_checkpoint(source, folder / "hub", log=lambda message: None)
    return folder / "hub"


@pytest.fixture(scope="module")
def pipe(converted):
    return pipeline("image-text-to-text", model=str(converted), trust_remote_code=True, dtype=torch.float32)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return str(write_demo_video(tmp_path_factory.mktemp("media") / "clip.mp4", num_frames=12))


@pytest.fixture(scope="module")
def image():
    return Image.new("RGB", (84, 56), (30, 160, 90))


def direct_answer(pipe, messages):
    """The answer from `processor.apply_chat_template` + `model.generate` + decode, without the pipeline."""
    inputs = pipe.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True, return_tensors="pt")
    output = pipe.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return pipe.processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def chat(kind, value, question):
    return [{"role": "user", "content": [{"type": kind, kind: value}, {"type": "text", "text": question}]}]


def test_pipeline_loads_vamba(pipe):
    assert type(pipe.model).__name__ == "VambaForConditionalGeneration"
    assert type(pipe.processor).__name__ == "VambaProcessor"


def test_pipeline_generation_reproduces_the_reference(pipe, golden_dir):
    case = golden_dir / "video_short"
    model_inputs = {**golden_generation_inputs(case), "text": "golden prompt"}
    outputs = pipe.forward(model_inputs, generate_kwargs={"max_new_tokens": 12, "do_sample": False})
    assert torch.equal(outputs["generated_sequence"].reshape(1, -1), golden_generated_ids(case))
    assert torch.equal(generate_golden(pipe.model, case), golden_generated_ids(case))


def test_pipeline_with_an_image_message(pipe, image):
    messages = chat("image", image, "What colour is it?")
    result = pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    answer = direct_answer(pipe, messages)
    assert answer and result[0]["generated_text"] == answer


def test_pipeline_with_a_video_message(pipe, video):
    messages = chat("video", video, "What moves?")
    result = pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    answer = direct_answer(pipe, messages)
    assert answer and result[0]["generated_text"] == answer


def test_pipeline_with_a_video_path_item_and_full_text(pipe, video):
    messages = [{"role": "user", "content": [{"type": "video", "path": video}, {"type": "text", "text": "Why?"}]}]
    result = pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS)
    conversation = result[0]["generated_text"]
    assert conversation[-1]["role"] == "assistant"
    assert conversation[-1]["content"] == direct_answer(pipe, messages)


def test_pipeline_with_several_conversations(pipe, image, video):
    conversations = [chat("image", image, "What is it?"), chat("video", video, "What happens?")]
    results = pipe(text=conversations, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    assert [r[0]["generated_text"] for r in results] == [direct_answer(pipe, c) for c in conversations]


def test_pipeline_with_image_and_prompt_text(pipe, image):
    prompt = "<|vision_start|><|vision_end|>Describe it."
    result = pipe(images=image, text=prompt, max_new_tokens=MAX_NEW_TOKENS)
    assert result[0]["generated_text"].startswith(prompt)
