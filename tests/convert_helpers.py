"""Helpers for the conversion / CLI / pipeline tests: official-format source folders built from the golden
fixtures, the tiny processor, and the vision-to-text Auto class of the installed transformers."""

import functools
import json
import os
import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from vamba_hf.tiny import build_tiny_processor

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
IM_END_ID = 299
CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors")


def auto_model_class():
    """`AutoModelForImageTextToText` on transformers 5.x, `AutoModelForVision2Seq` on 4.x (as the model card says)."""
    return transformers.AutoModelForImageTextToText if TRANSFORMERS_5 else transformers.AutoModelForVision2Seq


@functools.lru_cache(maxsize=1)
def tiny_processor():
    return build_tiny_processor()


def make_source(case_dir: Path, folder: Path, with_processor: bool = True) -> Path:
    """An official-format checkpoint folder: the golden case's checkpoint, plus the tiny tokenizer and image
    processor when `with_processor`."""
    folder.mkdir(parents=True)
    for name in CHECKPOINT_FILES:
        shutil.copyfile(case_dir / name, folder / name)
    if with_processor:
        tiny_processor().save_pretrained(folder)
        (folder / "processing_vamba.py").unlink(missing_ok=True)  # the official release ships no remote code
    return folder


def shard_weights(folder: Path, num_shards: int = 2) -> list:
    """Split `folder/model.safetensors` into shards with an index, as the 7B release is stored."""
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    files, weight_map = [], {}
    for index in range(num_shards):
        file = f"model-{index + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[index::num_shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
        files.append(file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    return files


def rewrite_weights(folder: Path, edit) -> None:
    """Apply `edit(tensors)` (a dict, edited in place) to `folder/model.safetensors`."""
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def golden_generation_inputs(case_dir: Path) -> dict:
    return load_file(str(case_dir / "inputs.safetensors"))


def golden_generated_ids(case_dir: Path) -> torch.Tensor:
    return load_file(str(case_dir / "reference_outputs.safetensors"))["generated_ids"]


def generate_golden(model, case_dir: Path) -> torch.Tensor:
    """Greedy generation of 12 new tokens from the case's inputs (the reference's setting)."""
    inputs = golden_generation_inputs(case_dir)
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=12, do_sample=False)


# The official 7B config.json as §6 of the spec describes it: Qwen2-VL-7B text fields at the top level, nested
# configs saved as differences from their defaults.
OFFICIAL_7B_CONFIG = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    "torch_dtype": "bfloat16",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "sliding_window": 32768,
    "use_sliding_window": False,
    "max_window_layers": 28,
    "tie_word_embeddings": False,
    "use_alpha_balancing": True,
    "cross_attn_use_position_embeddings": False,
    "cross_attn_use_layer_norm": False,
    "distill_coeff": 0.0,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_config": {"model_type": "qwen2_vl"},
    "vision_mamba_mixer_config": {"enable": True, "model_type": "qwen2_vl"},
}


def write_sparse_shards(folder: Path, shapes: dict, num_shards: int, bytes_per_value: int = 2) -> int:
    """Safetensors shards with real headers and sparse (unwritten) data: full-size files that take no disk space.
    Returns the total data size in bytes."""
    names = sorted(shapes)
    weight_map, total = {}, 0
    for index in range(num_shards):
        file = f"model-{index + 1:05d}-of-{num_shards:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names[index::num_shards]:
            size = bytes_per_value
            for dim in shapes[name]:
                size *= dim
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[name] = file
        encoded = json.dumps(header).encode()
        with open(folder / file, "wb") as f:
            f.write(len(encoded).to_bytes(8, "little") + encoded)
        os.truncate(folder / file, 8 + len(encoded) + offset)
        total += offset
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json))
    return total


def tree_snapshot(root: Path) -> dict:
    """Relative path -> (kind, mode, mtime_ns, bytes) of everything under `root`, links not followed: equal
    snapshots mean nothing under `root` was created, removed, rewritten or re-moded."""
    snapshot = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            snapshot[path.relative_to(root).as_posix()] = ("link", os.readlink(path))
        elif path.is_dir():
            snapshot[path.relative_to(root).as_posix()] = ("dir", info.st_mode)
        else:
            snapshot[path.relative_to(root).as_posix()] = ("file", info.st_mode, info.st_mtime_ns, path.read_bytes())
    return snapshot


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value), encoding="utf-8")


def edit_json(path: Path, edit) -> None:
    """Apply `edit(value)` (in place) to the JSON file `path`."""
    value = json.loads(path.read_text(encoding="utf-8"))
    edit(value)
    write_json(path, value)
