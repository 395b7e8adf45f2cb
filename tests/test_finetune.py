"""examples/finetune.py: the collator's labels, and a few Trainer steps on a tiny model and synthetic videos."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vamba_hf import VambaForConditionalGeneration

av = pytest.importorskip("av")

REPO = Path(__file__).resolve().parents[1]
QA = [
    ("red.mp4", (220, 40, 40), "What color is the square?", "It is red."),
    ("blue.mp4", (40, 60, 220), "What color is the square?", "It is blue."),
    ("green.mp4", (40, 200, 60), "Where does the square move?", "To the left."),
]


def load_example():
    spec = importlib.util.spec_from_file_location("finetune_example", REPO / "examples" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_video(path: Path, color, frames: int = 8, size: int = 64) -> None:
    """A square of `color` moving across a dark background (MPEG-4, every FFmpeg build has the encoder)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = np.full((size, size, 3), 16, dtype=np.uint8)
            left = 4 + i * 5
            image[20:44, left : left + 16] = color
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videoqa")
    (folder / "videos").mkdir()
    with open(folder / "train.jsonl", "w", encoding="utf-8") as jsonl:
        for name, color, question, answer in QA:
            write_video(folder / "videos" / name, color)
            jsonl.write(json.dumps({"video": name, "question": question, "answer": answer}) + "\n")
    return folder


@pytest.fixture(scope="module")
def finetune():
    return load_example()


@pytest.mark.parametrize("pack", [False, True])
def test_collator_supervises_only_the_answers(finetune, dataset, pack):
    _, processor = finetune.tiny_model_and_processor()
    examples = finetune.read_examples(dataset / "train.jsonl", dataset / "videos")
    batch = finetune.VideoQACollator(processor, num_frames=4, pack=pack)(examples)
    tokenizer = processor.tokenizer
    vision_start = tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert int((batch["input_ids"] == vision_start).sum()) == len(examples)
    assert batch["video_grid_thw"].shape == (len(examples), 3)

    supervised = batch["labels"] != -100
    assert torch.equal(batch["input_ids"][supervised], batch["labels"][supervised])
    answers = tokenizer.decode(batch["labels"][supervised])
    assert answers == "".join(answer + "<|im_end|>" for *_, answer in QA)
    if pack:
        assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
        assert int((batch["position_ids"] == 0).sum()) == len(examples)
    else:
        assert batch["input_ids"].shape[0] == len(examples)
        assert torch.equal(batch["attention_mask"].bool(), batch["input_ids"] != tokenizer.pad_token_id)


def training_losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("options", [
    [],
    ["--pack", "--gradient-checkpointing", "--freeze-vision-tower"],
    ["--lora", "--lora-rank", "8", "--gradient-checkpointing"],
], ids=["padded", "packed-checkpointed", "lora"])
def test_a_few_trainer_steps_lower_the_loss(finetune, dataset, tmp_path, options):
    lora = "--lora" in options
    steps = 12 if lora else 8  # LoRA starts from the base model's function (B = 0) and moves slower
    trainer = finetune.main([
        "--tiny", "--data", str(dataset / "train.jsonl"), "--video-dir", str(dataset / "videos"),
        "--output-dir", str(tmp_path / "out"), "--num-frames", "4", "--batch-size", "3", "--max-steps", str(steps),
        "--learning-rate", "1e-2", *options,
    ])
    losses = training_losses(trainer)
    assert len(losses) == steps
    assert np.mean(losses[-2:]) < (0.9 if lora else 0.7) * np.mean(losses[:2]), losses
    saved = {path.name for path in (tmp_path / "out").iterdir()}
    assert ("adapter_model.safetensors" if lora else "model.safetensors") in saved
    assert "tokenizer_config.json" in saved
    if not lora:  # the saved folder is the trained model
        reloaded = VambaForConditionalGeneration.from_pretrained(tmp_path / "out")
        trained = trainer.model.state_dict()
        for name, tensor in reloaded.state_dict().items():
            assert torch.equal(tensor, trained[name]), name
