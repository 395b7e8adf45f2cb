"""Writes what tests/test_cross_version.py checks under other transformers lines.

    VAMBA_CROSS_VERSION_DIR=/some/dir python tests/cross_version_writer.py

Under `$VAMBA_CROSS_VERSION_DIR/<this transformers version>/`: the inputs (a video file and a 1920x1080 image), two
tiny Vamba folders made by this line (`saved`: `save_pretrained` of the model, processor and generation config;
`converted`: `vamba-hf convert` of an official-format source), and for each folder and input what this line reads
and computes (`expected/`). The processor's pixel budget and frame count are not transformers' defaults, so a line
that loses them computes other inputs.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import transformers
from safetensors.torch import save_file

ENV = "VAMBA_CROSS_VERSION_DIR"
FOLDERS = ("saved", "converted")
CASES = ("video", "image")
COMPLETE = "complete"  # written last: the line's folder is whole
MAX_NEW_TOKENS = 8
# Not Qwen2-VL's defaults (56*56 and 28*28*1280): the 1920x1080 image keeps its size (a 78x138 patch grid), and
# the 160x120 video frames are enlarged to at least 128 merged patches.
MIN_PIXELS = 128 * 28 * 28
MAX_PIXELS = 12_845_056
NUM_FRAMES = 8
QUESTION = {"video": "What happens in this video?", "image": "Describe this image in detail."}


def line_dir(root: Path) -> Path:
    return root / transformers.__version__


def write_inputs(folder: Path) -> None:
    from vamba_hf.demo import write_demo_video

    folder.mkdir(parents=True)
    write_demo_video(folder / "clip.mp4", num_frames=24)
    rows = np.linspace(0, 255, 1080, dtype=np.float64)[:, None]
    columns = np.linspace(0, 255, 1920, dtype=np.float64)[None, :]
    pixels = np.stack([rows + 0 * columns, 0 * rows + columns, (rows + columns) / 2], axis=-1)
    pixels += np.random.default_rng(0).integers(0, 40, pixels.shape)
    PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / "image.png")


def _processor():
    from vamba_hf.processing_vamba import VambaProcessor, default_image_processor
    from vamba_hf.tiny import build_tiny_tokenizer

    image_processor = default_image_processor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return VambaProcessor(image_processor=image_processor, tokenizer=build_tiny_tokenizer(), num_frames=NUM_FRAMES)


def _model():
    from vamba_hf import VambaForConditionalGeneration
    from vamba_hf.tiny import tiny_config

    torch.manual_seed(0)
    model = VambaForConditionalGeneration(tiny_config(architectures=["VambaForConditionalGeneration"]))
    with torch.no_grad():  # away from the initial values, so that logits are far apart and greedy ids are stable
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


def write_saved(folder: Path, model, processor) -> None:
    from transformers import GenerationConfig

    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    GenerationConfig(eos_token_id=model.config.eos_token_id, pad_token_id=model.config.pad_token_id,
                     max_new_tokens=MAX_NEW_TOKENS).save_pretrained(folder)


def _official_source(folder: Path, model, processor) -> Path:
    """The checkpoint as the official release stores it: `model_type: qwen2_vl`, no remote code, and Qwen2-VL's
    preprocessor_config.json with its pixel budget as min_pixels / max_pixels."""
    model.save_pretrained(folder)
    for name in os.listdir(folder):
        if name.endswith(".py"):
            os.remove(folder / name)
    config = json.loads((folder / "config.json").read_text())
    config.pop("auto_map")
    config.update(model_type="qwen2_vl", architectures=["Qwen2VLForConditionalGeneration"])
    for key in ("vision_config", "vision_mamba_mixer_config"):
        config[key]["model_type"] = "qwen2_vl"
    (folder / "config.json").write_text(json.dumps(config))
    processor.tokenizer.save_pretrained(folder)
    image_processor = processor.image_processor
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "patch_size": image_processor.patch_size,
        "temporal_patch_size": image_processor.temporal_patch_size, "merge_size": image_processor.merge_size,
        "image_mean": list(image_processor.image_mean), "image_std": list(image_processor.image_std),
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
    }))
    return folder


def write_converted(folder: Path, scratch: Path, model, processor) -> None:
    from vamba_hf.convert import convert_checkpoint

    convert_checkpoint(_official_source(scratch, model, processor), folder, log=lambda message: None)
    shutil.rmtree(scratch)


def _messages(case: str, inputs_dir: Path) -> list:
    path = str(inputs_dir / ("clip.mp4" if case == "video" else "image.png"))
    return [{"role": "user", "content": [{"type": case, "path": path}, {"type": "text", "text": QUESTION[case]}]}]


def load_folder(folder: Path) -> tuple:
    """(processor, model) as a user loads them: the Auto classes and the folder's remote code."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    return processor, model.eval()


def compute(processor, model, case: str, inputs_dir: Path) -> dict:
    """The processor's inputs for the case's conversation, the model's logits and its greedy ids."""
    inputs = processor.apply_chat_template(_messages(case, inputs_dir), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    return {**{key: torch.as_tensor(value) for key, value in inputs.items()}, "logits": logits,
            "generated_ids": generated}


def settings(processor, model) -> dict:
    """What a folder's files set, as this line reads them."""
    size = processor.image_processor.size
    config = model.config.to_dict()
    sub_configs = {key: {name: config[key][name] for name in sub_class._fields}
                   for key, sub_class in model.config.sub_configs.items()}
    return {
        "image_pixels": [size["shortest_edge"], size["longest_edge"]],
        "video_sampling": processor.video_sampling.to_dict(),
        "chat_template": processor.chat_template,
        "config": {**{key: config[key] for key in type(model.config)._text_fields}, **sub_configs},
        # do_sample: transformers 5 leaves it None where 4.x writes False; both sample nothing.
        "generation": {**{key: getattr(model.generation_config, key)
                          for key in ("eos_token_id", "pad_token_id", "bos_token_id", "max_new_tokens")},
                       "do_sample": bool(model.generation_config.do_sample)},
        "dtype": str(model.dtype),
    }


def write_expected(folder: Path, expected: Path, inputs_dir: Path) -> None:
    processor, model = load_folder(folder)
    expected.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        outputs = compute(processor, model, case, inputs_dir)
        save_file({key: value.contiguous() for key, value in outputs.items()},
                  expected / f"{folder.name}-{case}.safetensors")
    (expected / f"{folder.name}-settings.json").write_text(json.dumps(settings(processor, model), indent=1))


def main() -> int:
    if not os.environ.get(ENV):
        print(f"set {ENV} to the folder to write into", file=sys.stderr)
        return 2
    out = line_dir(Path(os.environ[ENV]))
    if out.exists():
        print(f"{out} exists: give {ENV} a folder this transformers line has not written into", file=sys.stderr)
        return 2
    write_inputs(out / "inputs")
    model, processor = _model(), _processor()
    write_saved(out / "saved", model, processor)
    write_converted(out / "converted", out / "source", model, processor)
    for name in FOLDERS:
        write_expected(out / name, out / "expected", out / "inputs")
    (out / COMPLETE).write_text(transformers.__version__ + "\n")
    print(f"transformers {transformers.__version__}: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
