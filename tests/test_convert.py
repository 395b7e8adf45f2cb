"""`convert_checkpoint`: official-format folders (the golden fixtures) -> Hub-ready folders that the Auto classes
load with trust_remote_code and that reproduce the original implementation's greedy generations."""

import filecmp
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import golden_cases
from convert_helpers import (IM_END_ID, OFFICIAL_7B_CONFIG, auto_model_class, generate_golden, golden_generated_ids,
                             make_source, rewrite_weights, shard_weights, write_sparse_shards)
from huggingface_hub import ModelCard, ModelCardData
from transformers import AutoProcessor

import vamba_hf
from vamba_hf import convert as convert_module
from vamba_hf.card import REPO_ID_PLACEHOLDER
from vamba_hf.convert import REMOTE_CODE_FILES, ConversionError, convert_checkpoint, read_safetensors_header

PACKAGE_DIR = Path(vamba_hf.__file__).resolve().parent


def convert_quietly(source, destination, **options):
    return convert_checkpoint(source, destination, log=lambda message: None, **options)


@pytest.fixture
def video_short_source(golden_dir, tmp_path):
    return make_source(golden_dir / "video_short", tmp_path / "official")


@pytest.mark.parametrize("case", golden_cases())
def test_converted_golden_reproduces_reference_generation(golden_dir, tmp_path, case):
    source = make_source(golden_dir / case, tmp_path / "official")
    result = convert_quietly(source, tmp_path / "hub")
    assert result.has_processor and result.num_tensors == 121 and not result.warnings

    model = auto_model_class().from_pretrained(tmp_path / "hub", trust_remote_code=True, dtype=torch.float32)
    assert type(model).__name__ == "VambaForConditionalGeneration"
    assert torch.equal(generate_golden(model.eval(), golden_dir / case), golden_generated_ids(golden_dir / case))


def test_converted_folder_layout(video_short_source, tmp_path):
    destination = tmp_path / "hub"
    convert_quietly(video_short_source, destination)

    config = json.loads((destination / "config.json").read_text())
    assert config["model_type"] == "vamba"
    assert config["architectures"] == ["VambaForConditionalGeneration"]
    for auto_class in ("AutoConfig", "AutoModel", "AutoModelForVision2Seq", "AutoModelForImageTextToText",
                       "AutoProcessor"):
        assert auto_class in config["auto_map"]
    for name in REMOTE_CODE_FILES:
        assert filecmp.cmp(destination / name, (PACKAGE_DIR / name).resolve(), shallow=False), name
    assert json.loads((destination / "generation_config.json").read_text())["eos_token_id"] == IM_END_ID
    # The weights are the source's bytes; on one filesystem, the same file.
    assert os.path.samefile(destination / "model.safetensors", video_short_source / "model.safetensors")
    assert not [p for p in destination.parent.iterdir() if p.name.startswith(".hub.")]


def test_converted_processor_uses_the_vamba_template(video_short_source, tmp_path):
    convert_quietly(video_short_source, tmp_path / "hub")
    processor = AutoProcessor.from_pretrained(tmp_path / "hub", trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"},
                                             {"type": "text", "text": "What happens?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                      "<|vision_start|><|vision_end|>What happens?<|im_end|>\n<|im_start|>assistant\n")


def test_copies_weights_across_filesystems(video_short_source, tmp_path, monkeypatch):
    def no_hard_links(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(convert_module.os, "link", no_hard_links)
    result = convert_quietly(video_short_source, tmp_path / "hub")
    assert result.weights_placement == "copied"
    assert filecmp.cmp(tmp_path / "hub" / "model.safetensors", video_short_source / "model.safetensors", shallow=False)
    assert not os.path.samefile(tmp_path / "hub" / "model.safetensors", video_short_source / "model.safetensors")


def test_sharded_checkpoint(golden_dir, tmp_path):
    source = make_source(golden_dir / "image", tmp_path / "official")
    shards = shard_weights(source)
    result = convert_quietly(source, tmp_path / "hub")
    assert result.weight_files == shards
    assert (tmp_path / "hub" / "model.safetensors.index.json").is_file()
    model = auto_model_class().from_pretrained(tmp_path / "hub", trust_remote_code=True, dtype=torch.float32)
    assert torch.equal(generate_golden(model.eval(), golden_dir / "image"), golden_generated_ids(golden_dir / "image"))


def test_weights_only_source_converts_without_processor(golden_dir, tmp_path):
    source = make_source(golden_dir / "video_short", tmp_path / "official", with_processor=False)
    messages = []
    result = convert_checkpoint(source, tmp_path / "hub", log=messages.append)
    assert not result.has_processor
    assert any("without a processor" in m and "no tokenizer files" in m for m in messages)
    assert not (tmp_path / "hub" / "tokenizer.json").exists()
    # Without a tokenizer, the source's eos stays.
    assert json.loads((tmp_path / "hub" / "generation_config.json").read_text())["eos_token_id"] == 304
    model = auto_model_class().from_pretrained(tmp_path / "hub", trust_remote_code=True, dtype=torch.float32)
    case = golden_dir / "video_short"
    assert torch.equal(generate_golden(model.eval(), case), golden_generated_ids(case))


def test_missing_shard_is_named(golden_dir, tmp_path):
    source = make_source(golden_dir / "image", tmp_path / "official")
    shards = shard_weights(source)
    (source / shards[1]).unlink()
    with pytest.raises(ConversionError, match=f"missing.*{shards[1]}"):
        convert_quietly(source, tmp_path / "hub")
    assert not (tmp_path / "hub").exists()


def test_wrong_shape_is_named(video_short_source, tmp_path):
    name = "model.layers.1.cross_attn.q_proj.weight"
    rewrite_weights(video_short_source, lambda tensors: tensors.update({name: torch.zeros(32, 64)}))
    with pytest.raises(ConversionError, match=r"wrong shape.*\n.*cross_attn\.q_proj\.weight: checkpoint \[32, 64\], "
                                              r"config expects \[64, 64\]"):
        convert_quietly(video_short_source, tmp_path / "hub")
    assert not (tmp_path / "hub").exists()


def test_missing_and_unexpected_tensors_are_named(video_short_source, tmp_path):
    def edit(tensors):
        tensors.pop("model.layers.2.vision_mixer.mixer.A_log")
        tensors["model.layers.2.extra.weight"] = torch.zeros(2)

    rewrite_weights(video_short_source, edit)
    with pytest.raises(ConversionError) as error:
        convert_quietly(video_short_source, tmp_path / "hub")
    assert "missing tensors (1):\n  model.layers.2.vision_mixer.mixer.A_log" in str(error.value)
    assert "unexpected tensors (1):\n  model.layers.2.extra.weight" in str(error.value)


def _edit_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(model_type="llama"), "unknown architecture, model_type 'llama'"),
    (lambda c: c.pop("vision_mamba_mixer_config"), "without 'vision_mamba_mixer_config'.*plain Qwen2-VL"),
])
def test_unknown_architecture(video_short_source, tmp_path, edit, message):
    _edit_config(video_short_source, edit)
    with pytest.raises(ConversionError, match=message):
        convert_quietly(video_short_source, tmp_path / "hub")


def test_unknown_config_key_is_reported(video_short_source, tmp_path):
    _edit_config(video_short_source, lambda c: c.update(hiden_size=64))
    with pytest.raises(ConversionError, match="hiden_size"):
        convert_quietly(video_short_source, tmp_path / "hub")


def test_truncated_weights_are_reported(video_short_source, tmp_path):
    weights = video_short_source / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated"):
        convert_quietly(video_short_source, tmp_path / "hub")


def test_header_reader_matches_the_file(golden_dir):
    header = read_safetensors_header(golden_dir / "video_short" / "model.safetensors")
    assert header["lm_head.weight"]["shape"] == [320, 64]


def test_refuses_to_overwrite_without_force(video_short_source, tmp_path):
    destination = tmp_path / "hub"
    destination.mkdir()
    (destination / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        convert_quietly(video_short_source, destination)
    assert (destination / "keep.txt").read_text() == "mine"

    convert_quietly(video_short_source, destination, force=True)
    assert not (destination / "keep.txt").exists() and (destination / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub", "official"]


def test_failed_run_leaves_nothing_behind(video_short_source, tmp_path, monkeypatch):
    def broken_card(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert_module, "write_model_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_quietly(video_short_source, tmp_path / "hub")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["official"]


def test_refuses_destination_inside_source(video_short_source):
    with pytest.raises(ConversionError, match="outside the source"):
        convert_quietly(video_short_source, video_short_source / "hub")


def test_model_card_metadata_is_valid_for_the_hub(video_short_source, tmp_path):
    convert_quietly(video_short_source, tmp_path / "hub", license="apache-2.0")
    card = ModelCard.load(tmp_path / "hub" / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "video-text-to-text"
    assert data["license"] == "apache-2.0"
    assert data["base_model"] == "TIGER-Lab/Vamba-Qwen2-VL-7B"
    assert "vamba" in data["tags"]
    assert data["widget"][0]["text"] and data["widget"][0]["src"].startswith("https://")
    assert ModelCardData(**data).to_dict() == data
    for usage in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", 'pipeline("image-text-to-text"',
                  "trust_remote_code=True", REPO_ID_PLACEHOLDER):
        assert usage in card.text, usage


def test_model_card_options(video_short_source, tmp_path):
    convert_quietly(video_short_source, tmp_path / "hub", base_model="me/tiny-vamba", repo_id="me/tiny-vamba-hf")
    card = ModelCard.load(tmp_path / "hub" / "README.md")
    assert card.data.base_model == "me/tiny-vamba" and card.data.license == "other"
    assert 'model_id = "me/tiny-vamba-hf"' in card.text and REPO_ID_PLACEHOLDER not in card.text


def test_official_7b_layout_is_checked_from_headers_only(tmp_path, monkeypatch):
    """The 7B release's layout (config as §6 of the spec, five bf16 shards, 11.3B parameters) converts in seconds
    from shards whose data was never written: conversion reads only the headers and never loads a tensor."""
    source = tmp_path / "official"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(OFFICIAL_7B_CONFIG))
    config = convert_module.load_source_config(source)
    total = write_sparse_shards(source, convert_module.expected_shapes(config), num_shards=5)
    assert total == 2 * 11_309_837_020  # bf16 bytes of the 11.3B parameters

    def never(*args, **kwargs):
        raise AssertionError("conversion must not load tensors")

    monkeypatch.setattr("safetensors.torch.load_file", never)
    monkeypatch.setattr("safetensors.safe_open", never)
    result = convert_quietly(source, tmp_path / "hub", license="apache-2.0")
    assert result.num_tensors == 1206
    assert len(result.weight_files) == 5 and result.weights_placement == "hard-linked"
    saved = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert (saved["model_type"], saved["hidden_size"], saved["vision_mamba_mixer_config"]["d_state"]) == (
        "vamba", 3584, 128)
