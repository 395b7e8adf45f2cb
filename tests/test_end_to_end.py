"""From video files and questions, through VambaProcessor, to generated answers on a tiny random model."""

import torch
from helpers import tiny_model
from media_helpers import write_video

from vamba_hf.tiny import build_tiny_processor, special_token_ids


def conversation(video, question):
    return [{"role": "user", "content": [{"type": "video", "path": str(video)}, {"type": "text", "text": question}]}]


def model_for(processor):
    ids = special_token_ids(processor.tokenizer)
    ids.pop("im_start_token_id")
    model = tiny_model(**ids)
    assert model.config.vocab_size >= len(processor.tokenizer)
    return model


def test_video_files_to_answers_batched_equals_one_by_one(tmp_path):
    processor = build_tiny_processor(num_frames=4, video_longest_edge=112, video_shortest_edge=None)
    model = model_for(processor)
    clips = [write_video(tmp_path / "a.mp4", num_frames=10, width=96, height=64),
             write_video(tmp_path / "b.mp4", num_frames=7, width=64, height=112, fps=5)]
    questions = ["What is shown?", "Describe the colours of this clip in detail please."]
    conversations = [conversation(clip, q) for clip, q in zip(clips, questions)]
    options = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", progress=False)

    batch = processor.apply_chat_template(conversations, **options)
    assert batch["video_grid_thw"][0].tolist() != batch["video_grid_thw"][1].tolist()
    with torch.no_grad():
        answers = model.generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=None)
        for i, one in enumerate(conversations):
            alone = processor.apply_chat_template(one, **options)
            single = model.generate(**alone, max_new_tokens=6, do_sample=False, eos_token_id=None)
            prompt_length = alone["input_ids"].shape[1]
            assert torch.equal(answers[i, -6:], single[0, prompt_length:]), i
    text = processor.batch_decode(answers[:, -6:], skip_special_tokens=True)
    assert len(text) == 2 and all(isinstance(t, str) for t in text)


def test_image_question_to_answer():
    import PIL.Image

    processor = build_tiny_processor()
    model = model_for(processor)
    image = PIL.Image.new("RGB", (120, 80), (10, 200, 90))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, eos_token_id=None)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)
