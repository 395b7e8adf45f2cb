"""`convert_checkpoint`: official-format folders (the golden fixtures) -> Hub-ready folders that the Auto classes
load with trust_remote_code and that reproduce the original implementation's greedy generations."""

import filecmp
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import golden_cases
from convert_helpers import (IM_END_ID, OFFICIAL_7B_CONFIG, auto_model_class, edit_json, generate_golden,
                             golden_generated_ids, make_source, rewrite_weights, shard_weights, tree_snapshot,
                             write_json, write_sparse_shards)
from huggingface_hub import ModelCard, ModelCardData
from transformers import AutoProcessor

import vamba_hf
from vamba_hf import convert as convert_module
from vamba_hf import source_files
from vamba_hf.card import REPO_ID_PLACEHOLDER
from vamba_hf.configuration_vamba import AUTO_MAP
from vamba_hf.convert import REMOTE_CODE_FILES, ConversionError, convert_checkpoint, read_safetensors_header
from vamba_hf.errors import VambaUserError

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


def test_the_converted_processor_decodes_in_processes_from_its_remote_code(video_short_source, tmp_path):
    from media_helpers import write_x264

    convert_quietly(video_short_source, tmp_path / "hub")
    video = write_x264(tmp_path / "gops.mp4")
    # A fresh interpreter, where vamba_hf is not imported: the processor is the folder's remote code.
    script = f"""
import sys
import torch
from transformers import AutoProcessor
processor = AutoProcessor.from_pretrained({str(tmp_path / "hub")!r}, trust_remote_code=True)
assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
decoding = next(module for name, module in sys.modules.items()
                if name.startswith("transformers_modules") and name.endswith(".video_seek_vamba"))
started, start = [], decoding._DecodingProcess.__init__
decoding._DecodingProcess.__init__ = lambda self, *args: started.append(1) or start(self, *args)
inputs = [processor(text="<|vision_start|><|vision_end|>", videos={str(video)!r}, num_frames=8, decoder="seek",
                    decode_workers=2, decode_processes=processes, return_tensors="pt") for processes in (False, True)]
assert torch.equal(inputs[0]["pixel_values_videos"], inputs[1]["pixel_values_videos"])
assert started, "no decoding process was started"
print("same pixels")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "same pixels" in done.stdout, done.stderr[-3000:]


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
    assert any("holds official-format Vamba weights but no tokenizer files" in m and "without a processor" in m
               and "convert again" in m for m in messages)
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
    with pytest.raises(ConversionError, match=r"wrong shape \(1\): model\.layers\.1\.cross_attn\.q_proj\.weight: "
                                              r"checkpoint \[32, 64\], config expects \[64, 64\]\.$"):
        convert_quietly(video_short_source, tmp_path / "hub")
    assert not (tmp_path / "hub").exists()


def test_missing_and_unexpected_tensors_are_named(video_short_source, tmp_path):
    def edit(tensors):
        tensors.pop("model.layers.2.vision_mixer.mixer.A_log")
        tensors["model.layers.2.extra.weight"] = torch.zeros(2)

    rewrite_weights(video_short_source, edit)
    with pytest.raises(ConversionError) as error:
        convert_quietly(video_short_source, tmp_path / "hub")
    assert "missing tensors (1): model.layers.2.vision_mixer.mixer.A_log |" in str(error.value)
    assert "unexpected tensors (1): model.layers.2.extra.weight." in str(error.value)
    assert "\n" not in str(error.value)


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
    with pytest.raises(FileExistsError, match="--force"):
        convert_quietly(video_short_source, destination)

    convert_quietly(video_short_source, destination, force=True)  # an empty folder
    assert (destination / "config.json").is_file()
    convert_quietly(video_short_source, destination, force=True, repo_id="me/x")  # a previous convert output
    assert 'model_id = "me/x"' in (destination / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub", "official"]


@pytest.mark.parametrize("extra, reason", [
    ("keep.txt", "it holds keep.txt"),
    ("notes/", "it holds notes"),
    ("model.safetensors.index.json", r"it has no \.vamba-hf-convert\.json"),  # convert's file names, not its record
])
def test_force_never_replaces_a_folder_convert_did_not_write(video_short_source, tmp_path, extra, reason):
    destination = tmp_path / "hub"
    if extra == "model.safetensors.index.json":
        destination.mkdir()
        (destination / extra).write_text("{}")
    else:
        convert_quietly(video_short_source, destination)
        if extra.endswith("/"):
            (destination / extra).mkdir()
        else:
            (destination / extra).write_text("mine")
    before = tree_snapshot(tmp_path)
    with pytest.raises(ConversionError, match=r"^--force replaces only an empty folder or one written by vamba-hf "
                                              rf"convert .* is not one \({reason}"):
        convert_quietly(video_short_source, destination, force=True)
    assert tree_snapshot(tmp_path) == before


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
    assert "base_model" not in data  # a local source: the card claims no Hub base model
    assert "vamba" in data["tags"]
    assert data["widget"][0]["text"] and data["widget"][0]["src"].startswith("https://")
    assert ModelCardData(**data).to_dict() == data
    for usage in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", 'pipeline("image-text-to-text"',
                  "trust_remote_code=True", REPO_ID_PLACEHOLDER):
        assert usage in card.text, usage


def test_model_card_options(video_short_source, tmp_path):
    convert_quietly(video_short_source, tmp_path / "hub", base_model="me/tiny-vamba", repo_id="me/tiny-vamba-hf")
    card = ModelCard.load(tmp_path / "hub" / "README.md")
    assert card.data.base_model == "me/tiny-vamba" and card.data.license == "unknown"
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


# -- convert touches nothing but the destination ----------------------------------------------------------------


def assert_one_line(error):
    assert isinstance(error, VambaUserError) and "\n" not in str(error) and str(error).strip(), repr(error)


def test_failed_run_removes_the_parent_folders_it_created(video_short_source, tmp_path, monkeypatch):
    def broken_card(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert_module, "write_model_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_quietly(video_short_source, tmp_path / "new" / "deeper" / "hub")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["official"]


def test_a_full_disk_is_reported_as_the_destination_s_and_cleaned_up(video_short_source, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert_module.os, "link", disk_full)
    monkeypatch.setattr(convert_module.shutil, "copyfile", disk_full)
    with pytest.raises(ConversionError, match=r"^Could not write .*/new/hub: \[Errno 28\] No space left on device\.$"):
        convert_quietly(video_short_source, tmp_path / "new" / "hub")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["official"]


def test_force_refuses_a_destination_that_contains_the_source(golden_dir, tmp_path):
    """`convert SRC PARENT --force` where PARENT holds SRC once deleted the source and everything beside it."""
    parent = tmp_path / "models"
    source = make_source(golden_dir / "video_short", parent / "official")
    (parent / "other-model.txt").write_text("keep me")
    before = tree_snapshot(tmp_path)
    with pytest.raises(ConversionError, match="source folder .* is inside the destination") as error:
        convert_quietly(source, parent, force=True)
    assert_one_line(error.value)
    assert tree_snapshot(tmp_path) == before


@pytest.mark.parametrize("layout", ["same folder through a link", "destination inside the source through a link",
                                    "source inside the destination through a link", "relative path to the source"])
def test_overlap_is_refused_through_links_and_relative_paths(video_short_source, tmp_path, monkeypatch, layout):
    monkeypatch.chdir(tmp_path)
    if layout == "same folder through a link":
        (tmp_path / "link").symlink_to(video_short_source)
        destination, message = tmp_path / "link", "is the source folder"
    elif layout == "destination inside the source through a link":
        (tmp_path / "link").symlink_to(video_short_source)
        destination, message = tmp_path / "link" / "hub", "inside the source folder"
    elif layout == "source inside the destination through a link":
        (tmp_path / "link").symlink_to(tmp_path)
        destination, message = tmp_path / "link", "source folder .* is inside the destination"
    else:
        destination, message = Path("official/../official"), "is the source folder"
    before = tree_snapshot(tmp_path)
    with pytest.raises(ConversionError, match=message):
        convert_quietly(video_short_source, destination, force=True)
    assert tree_snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["link to a folder", "broken link", "file"])
def test_destination_must_be_a_real_folder_path(video_short_source, tmp_path, kind):
    destination = tmp_path / "hub"
    if kind == "link to a folder":
        (tmp_path / "elsewhere").mkdir()
        destination.symlink_to(tmp_path / "elsewhere")
        message = "is a symbolic link"
    elif kind == "broken link":
        destination.symlink_to(tmp_path / "nowhere")
        message = "is a symbolic link"
    else:
        destination.write_text("a file")
        message = "is a file, not a folder"
    before = tree_snapshot(tmp_path)
    with pytest.raises(ConversionError, match=message):
        convert_quietly(video_short_source, destination, force=True)
    assert tree_snapshot(tmp_path) == before


@pytest.mark.parametrize("shard_name", ["../outside.safetensors", "{tmp}/outside.safetensors", "sub/x.safetensors",
                                        "..\\\\outside.safetensors", ".hidden.safetensors", "weights.bin", 7])
def test_hostile_shard_names_are_refused(golden_dir, tmp_path, shard_name):
    """A shard named outside the folder once made convert hard-link the weights beside the destination."""
    source = make_source(golden_dir / "image", tmp_path / "official")
    shards = shard_weights(source)
    if isinstance(shard_name, str):
        shard_name = shard_name.format(tmp=tmp_path)
        target = (source / shard_name) if not os.path.isabs(shard_name) else Path(shard_name)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source / shards[1], target)  # the file exists where the hostile name points
    edit_json(source / "model.safetensors.index.json",
              lambda index: index["weight_map"].update({k: shard_name for k, v in index["weight_map"].items()
                                                        if v == shards[1]}))
    out = tmp_path / "out"
    out.mkdir()
    before = tree_snapshot(tmp_path)
    with pytest.raises(ConversionError, match="a shard must be a plain .safetensors file name") as error:
        convert_quietly(source, out / "hub")
    assert_one_line(error.value)
    assert tree_snapshot(tmp_path) == before


HOSTILE = "attacker/repo--modeling_evil.Evil"


def test_source_auto_map_and_custom_pipelines_never_reach_the_hub_folder(golden_dir, tmp_path):
    source = make_source(golden_dir / "video_short", tmp_path / "official")
    edit_json(source / "config.json", lambda c: c.update(
        auto_map={"AutoModel": HOSTILE, "AutoModelForCausalLM": HOSTILE, "AutoConfig": HOSTILE},
        custom_pipelines={"evil": {"impl": HOSTILE}}))
    edit_json(source / "tokenizer_config.json", lambda c: c.update(auto_map={"AutoTokenizer": [HOSTILE, None]}))
    processor_file = "processor_config.json" if (source / "processor_config.json").is_file() else \
        "preprocessor_config.json"
    edit_json(source / processor_file, lambda c: c.update(
        auto_map={"AutoProcessor": HOSTILE, "AutoImageProcessor": HOSTILE}))
    write_json(source / "generation_config.json",
               {**json.loads((golden_dir / "video_short" / "generation_config.json").read_text()),
                "auto_map": {"AutoModel": HOSTILE}})

    convert_quietly(source, tmp_path / "hub")
    hub = tmp_path / "hub"
    for path in hub.iterdir():
        assert b"attacker" not in path.read_bytes(), path.name
    assert json.loads((hub / "config.json").read_text())["auto_map"] == AUTO_MAP
    for path in hub.glob("*.json"):
        auto_map = json.loads(path.read_text()).get("auto_map")
        assert auto_map in (None, AUTO_MAP, {"AutoProcessor": AUTO_MAP["AutoProcessor"]}), path.name
    processor = AutoProcessor.from_pretrained(hub, trust_remote_code=True)
    assert type(processor).__name__ == "VambaProcessor"


def test_only_hub_files_are_copied(golden_dir, tmp_path):
    source = make_source(golden_dir / "video_short", tmp_path / "official")
    (source / "modeling_vamba.py").write_text("import os; os.system('echo pwned')\n")
    (source / "evil.py").write_text("raise SystemExit\n")
    (source / "notes.txt").write_text("private notes")
    (source / "pytorch_model.bin").write_bytes(b"not for the hub")
    (source / "sub").mkdir()
    (source / "sub" / "model.safetensors").write_bytes(b"nested")
    convert_quietly(source, tmp_path / "hub")
    hub = tmp_path / "hub"
    assert {p.name for p in hub.iterdir()} <= convert_module.HUB_FILES | {convert_module.CONVERT_RECORD}
    assert {"config.json", "generation_config.json", "README.md", "model.safetensors", *REMOTE_CODE_FILES} <= {
        p.name for p in hub.iterdir()}
    for name in REMOTE_CODE_FILES:
        assert filecmp.cmp(hub / name, (PACKAGE_DIR / name).resolve(), shallow=False), name


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o027])
def test_created_folders_and_files_follow_the_umask(video_short_source, tmp_path, umask):
    previous = os.umask(umask)
    try:
        convert_quietly(video_short_source, tmp_path / "new" / "hub")
    finally:
        os.umask(previous)
    for folder in (tmp_path / "new", tmp_path / "new" / "hub"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask, folder
    for path in (tmp_path / "new" / "hub").iterdir():
        if path.name != "model.safetensors":  # hard-linked: the source file's own mode
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name


# A convert run in a child process that stops for good once its folder is complete in the partial folder, so that
# the test can kill it there; the product code has no hook for this: the driver wraps the writer it calls last. The
# child prints the partial folder's path on stdout once it is written: the test blocks on that line (no polling).
_STOPPING_CONVERT = """
import sys, time
import vamba_hf.convert as convert

real_record = convert.write_convert_record
def record_then_wait(folder, *args, **kwargs):
    real_record(folder, *args, **kwargs)
    print(folder, flush=True)
    time.sleep(600)

convert.write_convert_record = record_then_wait
convert.convert_checkpoint(sys.argv[1], sys.argv[2], log=lambda message: None)
"""


def _start_stopping_convert(source, destination, errors):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_DIR.parent),
                                                                      os.environ.get("PYTHONPATH")]))}
    with open(errors, "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-c", _STOPPING_CONVERT, str(source), str(destination)],
                                   env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    line = process.stdout.readline()  # the child's signal: the folder is written (an empty line: it ended early)
    assert line.endswith("\n"), f"the convert child ended before its folder was written: {errors.read_text()}"
    return process, Path(line[:-1])


def test_a_killed_convert_leaves_a_partial_folder_the_next_run_removes(video_short_source, tmp_path):
    import signal

    out = tmp_path / "out"
    out.mkdir()
    process, partial = _start_stopping_convert(video_short_source, out / "hub", tmp_path / "stderr")
    assert partial.parent == out and partial.name.startswith(f".hub.partial-{process.pid}-")
    assert (partial / "model.safetensors").is_file() and (partial / "config.json").is_file()
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    assert [p.name for p in out.iterdir()] == [partial.name]  # SIGKILL cannot be caught: the folder stays

    messages = []
    convert_checkpoint(video_short_source, out / "hub", log=messages.append)
    assert [p.name for p in out.iterdir()] == ["hub"]
    assert any(f"Removed {partial}" in m and "interrupted convert" in m for m in messages)


def test_a_terminated_convert_cleans_up(video_short_source, tmp_path):
    import signal

    out = tmp_path / "out"
    out.mkdir()
    process, _ = _start_stopping_convert(video_short_source, out / "hub", tmp_path / "stderr")
    process.send_signal(signal.SIGTERM)
    assert process.wait() != 0
    process.stdout.close()
    assert list(out.iterdir()) == []


def test_stale_folders_of_live_processes_and_of_other_destinations_are_kept(video_short_source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    live = out / f".hub.partial-{os.getppid()}-0123abcd"  # the parent process is alive
    other = out / ".other.partial-999999999-0123abcd"
    for folder in (live, other):
        folder.mkdir()
    convert_quietly(video_short_source, out / "hub")
    assert sorted(p.name for p in out.iterdir()) == sorted(["hub", live.name, other.name])


def test_a_previous_output_moved_aside_by_a_killed_run_is_restored(video_short_source, tmp_path):
    import subprocess

    out = tmp_path / "out"
    out.mkdir()
    convert_quietly(video_short_source, out / "hub")
    dead = subprocess.Popen(["true"])
    dead.wait()
    aside = out / f".hub.replaced-{dead.pid}-0123abcd"
    os.rename(out / "hub", aside)
    with pytest.raises(FileExistsError, match="already exists"):
        convert_quietly(video_short_source, out / "hub")
    assert [p.name for p in out.iterdir()] == ["hub"] and (out / "hub" / "config.json").is_file()


# -- where the source is ----------------------------------------------------------------------------------------


@pytest.fixture
def no_hub(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the Hub must not be asked")

    monkeypatch.setattr("huggingface_hub.snapshot_download", never)


@pytest.mark.parametrize("source, message", [
    ("./missing", r"^Source folder \./missing does not exist\.$"),
    ("{tmp}/missing", r"^Source folder .*/missing does not exist\.$"),
    ("missing", r"does not exist \(a Hub repo id has the form namespace/name"),
    ("a/b/c", r"^Source folder a/b/c does not exist\.$"),
    ("~/vamba-hf-surely-missing-folder", r"does not exist"),
])
def test_a_missing_source_folder_is_never_looked_up_on_the_hub(tmp_path, monkeypatch, no_hub, source, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConversionError, match=message) as error:
        convert_quietly(source.format(tmp=tmp_path), tmp_path / "hub")
    assert_one_line(error.value)
    assert list(tmp_path.iterdir()) == []


def test_a_source_that_is_a_file_is_called_a_file(tmp_path, no_hub):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    for source in (tmp_path / "model.safetensors", str(tmp_path / "model.safetensors")):
        with pytest.raises(ConversionError, match="is a file, not a folder"):
            convert_quietly(source, tmp_path / "hub")


def test_an_existing_local_path_is_never_taken_for_a_repo_id(golden_dir, tmp_path, monkeypatch, no_hub):
    make_source(golden_dir / "image", tmp_path / "TIGER-Lab" / "Vamba-Qwen2-VL-7B")
    monkeypatch.chdir(tmp_path)
    result = convert_quietly("TIGER-Lab/Vamba-Qwen2-VL-7B", tmp_path / "hub")
    assert result.num_tensors == 121


@pytest.mark.parametrize("reachable", [True, False])
def test_a_repo_id_is_downloaded_or_taken_from_the_cache(golden_dir, tmp_path, monkeypatch, reachable):
    snapshot = make_source(golden_dir / "image", tmp_path / "cache" / "snapshot")
    requests = []

    def model_info(self, repo_id, timeout=None):
        requests.append(("model_info", repo_id, timeout))
        if not reachable:
            raise ConnectionError("[Errno -2] Name or service not known")

    def snapshot_download(repo_id, allow_patterns, **options):
        requests.append(("snapshot_download", repo_id, options))
        return str(snapshot)

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", model_info)
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    result = convert_quietly("TIGER-Lab/Vamba-Qwen2-VL-7B", tmp_path / "hub")
    assert result.num_tensors == 121
    (_, info_repo, timeout), (_, download_repo, options) = requests
    assert info_repo == download_repo == "TIGER-Lab/Vamba-Qwen2-VL-7B" and 0 < timeout <= 10
    assert options == ({} if reachable else {"local_files_only": True})


def test_a_missing_repo_is_named_in_one_line(tmp_path, monkeypatch, local_hub):
    local_hub(404, error_code="RepoNotFound")
    monkeypatch.setattr("huggingface_hub.snapshot_download", None)  # never reached
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConversionError, match=r"^Downloading me/nothing-here from the Hugging Face Hub failed: "
                                              r"repository not found, or this token has no access") as error:
        convert_quietly("me/nothing-here", tmp_path / "hub")
    assert_one_line(error.value)
    assert not (tmp_path / "hub").exists()


def _run_python(code, env_updates, timeout=120):
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(env_updates, PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_DIR.parent),
                                                                     os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


_CONVERT_FROM_THE_HUB = """
import sys, time
from vamba_hf.convert import convert_checkpoint
from vamba_hf.errors import VambaUserError
started = time.monotonic()
try:
    convert_checkpoint("someone/some-vamba", sys.argv[1] if len(sys.argv) > 1 else "hub", log=lambda m: None)
except VambaUserError as error:
    print(f"{time.monotonic() - started:.1f}")
    print(error)
"""


@pytest.mark.parametrize("network", ["refused", "unanswering", "offline"])
def test_a_repo_id_without_network_fails_fast_in_one_line(tmp_path, network):
    import socket

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}" if network == "unanswering" else "http://127.0.0.1:9"
        env = {"HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": endpoint}  # nothing leaves the machine
        if network == "offline":
            env["HF_HUB_OFFLINE"] = "1"
        if network == "unanswering":
            env["HF_HUB_ETAG_TIMEOUT"] = "1"
        result = _run_python(_CONVERT_FROM_THE_HUB.replace('"hub"', repr(str(tmp_path / "hub"))), env)
    lines = result.stdout.splitlines()
    assert len(lines) == 2, (result.stdout, result.stderr)
    seconds, message = float(lines[0]), lines[1]
    assert seconds < 8
    assert message.startswith("Downloading someone/some-vamba from the Hugging Face Hub failed: ")
    if network == "offline":
        assert "HF_HUB_OFFLINE is set" in message
    else:
        assert f"the Hub ({endpoint}) could not be reached and the files are not in the local cache" in message
    assert not (tmp_path / "hub").exists()


# -- bad files in the source ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("{not json", r"config\.json is not valid JSON"),
    ("[1, 2]", r"config\.json holds a JSON list, not an object"),
    ('"a string"', r"config\.json holds a JSON str, not an object"),
])
def test_unreadable_config_json_names_the_file(video_short_source, tmp_path, text, message):
    (video_short_source / "config.json").write_text(text)
    with pytest.raises(ConversionError, match=message) as error:
        convert_quietly(video_short_source, tmp_path / "hub")
    assert_one_line(error.value)
    assert str(video_short_source / "config.json") in str(error.value)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(num_attention_heads=0), r"num_attention_heads=0 is invalid: set it to an integer >= 1"),
    (lambda c: c.update(hidden_size="64"), r"hidden_size='64' is invalid"),
    (lambda c: c.update(rope_theta="abc"), r"rope_theta='abc' is invalid: set it to a finite number > 0"),
    (lambda c: c["vision_mamba_mixer_config"].update(chunk_size=0), r"vision_mamba_mixer_config\.chunk_size=0"),
    (lambda c: c.update(vision_config=[1, 2]), r"vision_config=\[1, 2\] is invalid"),
    (lambda c: c.update(torch_dtype="int99"), r"torch_dtype='int99' is invalid"),
    (lambda c: c.update(quantization_config={"quant_method": "bitsandbytes"}), r"quantized checkpoint"),
])
def test_bad_config_values_are_reported_with_the_file(video_short_source, tmp_path, edit, message):
    edit_json(video_short_source / "config.json", edit)
    with pytest.raises(ConversionError, match=message) as error:
        convert_quietly(video_short_source, tmp_path / "hub")
    assert_one_line(error.value)
    assert str(video_short_source / "config.json") in str(error.value)
    assert not (tmp_path / "hub").exists()


def _write_raw_safetensors(path, header, data=b"", header_bytes=None):
    encoded = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)


_F32_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header, data, header_bytes, message", [
    ([1, 2], b"", None, "the header is not a JSON object"),
    ({"w": {"dtype": "F32", "shape": [2]}}, bytes(8), None, "lacks dtype, shape or data_offsets"),
    ({"w": "a string"}, b"", None, "lacks dtype, shape or data_offsets"),
    ({"w": {**_F32_ENTRY, "dtype": "X9"}}, bytes(8), None, "unknown dtype 'X9'"),
    ({"w": {**_F32_ENTRY, "shape": "abc"}}, bytes(8), None, "has the shape 'abc'"),
    ({"w": {**_F32_ENTRY, "shape": [-2]}}, bytes(8), None, "has the shape"),
    ({"w": {**_F32_ENTRY, "data_offsets": [0]}}, bytes(8), None, "data_offsets"),
    ({"w": {**_F32_ENTRY, "data_offsets": [8, 0]}}, bytes(8), None, "data_offsets"),
    ({"w": {**_F32_ENTRY, "data_offsets": [0, 4]}}, bytes(4), None, "does not fill data_offsets"),
    ({"w": _F32_ENTRY, "v": _F32_ENTRY}, bytes(16), None, "gap or an overlap"),
    ({"w": _F32_ENTRY}, bytes(12), None, "4 bytes follow the tensor data"),
    ({"__metadata__": [1], "w": _F32_ENTRY}, bytes(8), None, "__metadata__ is not an object of strings"),
    (None, b"", b"\xff\xfe{}", "unreadable header"),
])
def test_malformed_safetensors_headers_are_reported(video_short_source, tmp_path, header, data, header_bytes,
                                                    message):
    weights = video_short_source / "model.safetensors"
    _write_raw_safetensors(weights, header, data, header_bytes)
    with pytest.raises(ConversionError, match=re.escape(message)) as error:
        convert_quietly(video_short_source, tmp_path / "hub")
    assert_one_line(error.value)
    assert str(error.value).startswith(f"{weights} is not a valid safetensors file")


def test_integer_weights_are_refused(video_short_source, tmp_path):
    def int8_head(tensors):
        tensors["lm_head.weight"] = tensors["lm_head.weight"].to(torch.int8)

    rewrite_weights(video_short_source, int8_head)
    with pytest.raises(ConversionError, match=r"tensors not stored as floating point F16, BF16, F32, F64 \(1\): "
                                              r"lm_head\.weight: I8\.$") as error:
        convert_quietly(video_short_source, tmp_path / "hub")
    assert_one_line(error.value)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.mkdir, (Path(self.marker),))


def test_pickled_weights_are_refused_and_never_unpickled(video_short_source, tmp_path):
    import pickle

    (video_short_source / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (video_short_source / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(ConversionError, match=r"pickled PyTorch weights \(pytorch_model\.bin\), which convert never "
                                              r"opens") as error:
        convert_quietly(video_short_source, tmp_path / "hub")
    assert_one_line(error.value)
    assert not marker.exists()


# -- push: everything checked first, the folder never written, failures in one line ----------------------------


@pytest.fixture
def converted(video_short_source, tmp_path):
    convert_quietly(video_short_source, tmp_path / "hub")
    return tmp_path / "hub"


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records the calls, uploads nothing."""

    calls = []

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, **options):
        self.calls.append(("create_repo", repo_id, options))

    def create_branch(self, repo_id, **options):
        self.calls.append(("create_branch", repo_id, options))

    def create_commit(self, repo_id, operations, **options):
        self.calls.append(("create_commit", repo_id, operations, options))
        return "https://huggingface.co/me/vamba/commit/0"


@pytest.fixture
def recording_api(monkeypatch):
    RecordingApi.calls = []
    monkeypatch.setattr("huggingface_hub.HfApi", RecordingApi)
    return RecordingApi.calls


def _operation_bytes(operation):
    source = operation.path_or_fileobj
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def test_push_uploads_one_commit_with_the_card_from_memory(converted, recording_api):
    from vamba_hf.hub import push_folder

    before = tree_snapshot(converted)
    files = push_folder(converted, "me/vamba", private=True, revision="v1", token="hf_test", log=lambda m: None)
    assert tree_snapshot(converted) == before
    (_, token), (_, repo, create), (_, _, branch), (_, commit_repo, operations, commit) = recording_api
    assert (token, repo, create["private"], create["exist_ok"], branch["branch"]) == ("hf_test", "me/vamba", True,
                                                                                   True, "v1")
    assert (commit_repo, commit["revision"]) == ("me/vamba", "v1")
    uploaded = {operation.path_in_repo: _operation_bytes(operation) for operation in operations}
    assert sorted(uploaded) == sorted(name for name, _ in files) == sorted(
        p.name for p in converted.iterdir() if p.name != convert_module.CONVERT_RECORD)
    card = uploaded.pop("README.md").decode()
    assert 'model_id = "me/vamba"' in card and REPO_ID_PLACEHOLDER not in card
    assert REPO_ID_PLACEHOLDER in (converted / "README.md").read_text()
    for name, data in uploaded.items():
        assert data == (converted / name).read_bytes(), name


@pytest.mark.parametrize("repo_id", ["not a repo id", "a/b/c", "../x", "me/", "/vamba", "me/x--y", "me/.x", 5])
def test_push_refuses_a_bad_repo_id_before_anything(converted, recording_api, repo_id):
    from vamba_hf.hub import push_folder

    with pytest.raises(VambaUserError, match="is not a Hub repo id: use namespace/name") as error:
        push_folder(converted, repo_id, token="hf_test", log=lambda m: None)
    assert_one_line(error.value)
    assert recording_api == []


@pytest.mark.parametrize("revision", ["", "a b", "../x", "-x", "x/", "x.lock", "a..b", "x~1", "a\nb", 3])
def test_push_refuses_a_bad_revision_before_anything(converted, recording_api, revision):
    from vamba_hf.hub import push_folder

    with pytest.raises(VambaUserError, match="is not a branch name") as error:
        push_folder(converted, "me/vamba", revision=revision, token="hf_test", log=lambda m: None)
    assert_one_line(error.value)
    assert recording_api == []


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "model.safetensors").unlink(), "has neither model.safetensors"),
    (lambda f: (f / "modeling_vamba.py").unlink(), "lacks the remote-code file"),
    (lambda f: edit_json(f / "config.json", lambda c: c["auto_map"].update(AutoModel=HOSTILE)),
     r"config\.json points the Auto classes at code that is not vamba-hf's \(AutoModel: attacker/repo--"),
    (lambda f: edit_json(f / "tokenizer_config.json", lambda c: c.update(auto_map={"AutoTokenizer": [HOSTILE, None]})),
     r"tokenizer_config\.json points the Auto classes at code that is not vamba-hf's"),
    (lambda f: edit_json(f / "config.json", lambda c: c.update(custom_pipelines={"x": {"impl": HOSTILE}})),
     r"config\.json points the Auto classes at code that is not vamba-hf's \(custom_pipelines"),
    (lambda f: edit_json(f / "config.json", lambda c: c.update(num_hidden_layers=2)), "missing tensors|unexpected"),
    (lambda f: edit_json(f / "config.json", lambda c: c.update(vocab_size=0)), "vocab_size=0 is invalid"),
    (lambda f: (f / "config.json").write_text("[]"), "holds a JSON list"),
    (lambda f: edit_json(f / "config.json", lambda c: c.update(model_type="qwen2_vl")), "not a converted Vamba"),
])
def test_push_checks_the_folder_before_anything(converted, recording_api, damage, message):
    from vamba_hf.hub import push_folder

    damage(converted)
    before = tree_snapshot(converted)
    for dry_run in (True, False):
        with pytest.raises(VambaUserError, match=message) as error:
            push_folder(converted, "me/vamba", token="hf_test", dry_run=dry_run, log=lambda m: None)
        assert_one_line(error.value)
    assert recording_api == [] and tree_snapshot(converted) == before


def test_push_without_a_token_or_offline_says_so_before_any_request(converted, recording_api, monkeypatch):
    from huggingface_hub import constants

    from vamba_hf.hub import push_folder

    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(VambaUserError, match=r"No Hugging Face token: log in with `hf auth login`"):
        push_folder(converted, "me/vamba", log=lambda m: None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(VambaUserError, match="HF_HUB_OFFLINE is set"):
        push_folder(converted, "me/vamba", token="hf_test", log=lambda m: None)
    assert recording_api == []


def test_push_to_an_unreachable_hub_fails_in_one_line_and_leaves_the_folder(converted, monkeypatch):
    import time

    from huggingface_hub import constants

    from vamba_hf.hub import push_folder

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing leaves the machine
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    before = tree_snapshot(converted)
    started = time.monotonic()
    with pytest.raises(VambaUserError) as error:
        push_folder(converted, "me/vamba", token="hf_test", log=lambda m: None)
    assert time.monotonic() - started < 30
    assert_one_line(error.value)
    assert str(error.value).startswith("Uploading to me/vamba failed: could not reach the Hub at http://127.0.0.1:9")
    assert tree_snapshot(converted) == before


@pytest.fixture
def local_hub(monkeypatch):
    """Starts a local HTTP server that answers every request with one status (and X-Error-Code), as the Hub does
    for a bad token or a missing repo, and points huggingface_hub at it. Returns its address."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from huggingface_hub import constants

    servers = []

    def start(status, error_code=None):
        class Answer(BaseHTTPRequestHandler):
            def _answer(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b'{"error": "refused by the test server"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if error_code:
                    self.send_header("X-Error-Code", error_code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_HEAD = _answer

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        return endpoint

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status, error_code, message", [
    (401, None, "the Hub refused the token (HTTP 401); log in again (`hf auth login`)"),
    (403, None, "this token may not write there (HTTP 403); use a token with write access."),
    (404, "RepoNotFound", "repository not found, or this token has no access to it"),
])
def test_push_refused_by_the_hub_fails_in_one_line(converted, local_hub, status, error_code, message):
    from vamba_hf.hub import push_folder

    local_hub(status, error_code)
    before = tree_snapshot(converted)
    with pytest.raises(VambaUserError) as error:
        push_folder(converted, "me/vamba", token="hf_bad", log=lambda m: None)
    assert_one_line(error.value)
    assert str(error.value).startswith(f"Uploading to me/vamba failed: {message}")
    assert tree_snapshot(converted) == before


# -- only convert's own output is ever replaced or removed ---------------------------------------------------------


def _fine_tune_into(folder):
    """A model loaded from the converted `folder`, its weights changed, saved back into it (as a fine-tuning script
    does)."""
    from vamba_hf.modeling_vamba import VambaForConditionalGeneration

    model = VambaForConditionalGeneration.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    model.save_pretrained(folder)


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.unlink()  # the weights are hard-linked to the source's: a new file
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("change, reason", [
    (_fine_tune_into, "model.safetensors changed since convert wrote it"),
    (lambda folder: _flip_a_byte(folder / "model.safetensors"), "model.safetensors changed since convert wrote it"),
    (lambda folder: _flip_a_byte(folder / "README.md"), "README.md changed since convert wrote it"),
    (lambda folder: (folder / "generation_config.json").unlink(), "generation_config.json of its record is missing"),
    (lambda folder: (folder / convert_module.CONVERT_RECORD).unlink(), "it has no .vamba-hf-convert.json"),
])
def test_force_never_replaces_a_model_saved_or_changed_in_a_converted_folder(video_short_source, tmp_path, change,
                                                                              reason):
    destination = tmp_path / "hub"
    convert_quietly(video_short_source, destination)
    change(destination)
    before = tree_snapshot(tmp_path)
    with pytest.raises(ConversionError, match=rf"^--force replaces only .* is not one \({re.escape(reason)}") as error:
        convert_quietly(video_short_source, destination, force=True)
    assert "remove it yourself or choose another destination" in str(error.value) and "\n" not in str(error.value)
    assert tree_snapshot(tmp_path) == before


def _dead_pid():
    dead = subprocess.Popen(["true"])
    dead.wait()
    return dead.pid


def test_folders_named_like_convert_work_folders_are_kept_unless_they_are_convert_s_own(video_short_source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pid = _dead_pid()
    user_partial = out / f".hub.partial-{pid}-0123abcd"
    user_partial.mkdir()
    (user_partial / "mine.txt").write_text("a user's file")
    user_replaced = out / f".hub.replaced-{pid}-4567abcd"
    user_replaced.mkdir()
    (user_replaced / "config.json").write_text('{"model_type": "vamba"}')
    changed = out / f".hub.partial-{pid}-89abcdef"  # convert's output, but a file of it changed since
    convert_quietly(video_short_source, tmp_path / "made")
    os.rename(tmp_path / "made", changed)
    _flip_a_byte(changed / "README.md")
    kept = {folder: tree_snapshot(folder) for folder in (user_partial, user_replaced, changed)}

    messages = []
    convert_checkpoint(video_short_source, out / "hub", log=messages.append)
    assert {folder: tree_snapshot(folder) for folder in kept} == kept
    assert sorted(p.name for p in out.iterdir()) == sorted(["hub", *(folder.name for folder in kept)])
    assert (out / "hub" / "model.safetensors").is_file()
    for folder, reason in ((user_partial, "it has no .vamba-hf-convert.json"),
                           (user_replaced, "it has no .vamba-hf-convert.json"),
                           (changed, "README.md changed since convert wrote it")):
        assert any(message.startswith(f"Left {folder} as it is") and reason in message for message in messages), \
            messages


def test_a_stale_folder_is_removed_only_while_it_holds_exactly_convert_s_files(video_short_source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".hub.partial-{_dead_pid()}-0123abcd"
    convert_quietly(video_short_source, tmp_path / "made")
    os.rename(tmp_path / "made", stale)
    (stale / "notes.txt").write_text("a user's file")
    convert_quietly(video_short_source, out / "hub")
    assert (stale / "notes.txt").read_text() == "a user's file"
    (stale / "notes.txt").unlink()
    convert_quietly(video_short_source, out / "hub", force=True)
    assert [p.name for p in out.iterdir()] == ["hub"]


# -- what convert reads from the source ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json", "README.md",
                                  "generation_config.json", "tokenizer_config.json"])
def test_links_in_the_source_are_refused_never_carried(video_short_source, tmp_path, name):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if not (video_short_source / name).exists():
        (video_short_source / name).write_text("---\nlicense: mit\n---\n")
    os.rename(video_short_source / name, elsewhere / name)
    os.symlink(elsewhere / name, video_short_source / name)
    with pytest.raises(ConversionError, match=rf"{re.escape(name)} is a symbolic link .* replace the link with the "
                                              rf"file itself") as error:
        convert_quietly(video_short_source, tmp_path / "hub")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "hub").exists()


def _fifo(path):
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _huge(path):
    with open(path, "r+b" if path.exists() else "wb") as file:
        file.truncate(source_files.MAX_TEXT_FILE_BYTES + 1)  # sparse: nothing is written


def _dev_zero(path):
    path.unlink(missing_ok=True)
    os.symlink("/dev/zero", path)


_UNREADABLE = {_fifo: "is a FIFO, not a regular file", _huge: "is [0-9,]+ bytes, more than such a file can be",
               _dev_zero: "is a symbolic link \\(to /dev/zero\\)"}


@pytest.mark.parametrize("make, name", [
    (make, name) for make in _UNREADABLE
    for name in ("config.json", "README.md", "tokenizer.json", "model.safetensors.index.json", "model.safetensors")
    if not (make is _huge and name == "model.safetensors")  # weights are as large as their header says
])
def test_every_source_file_read_is_a_regular_file_of_bounded_size(video_short_source, tmp_path, capsys, make, name):
    from vamba_hf.cli import main

    make(video_short_source / name)
    # Through the CLI, which reads the card facts (README.md, config.json) before converting: a FIFO is never
    # waited on and /dev/zero never read.
    assert main(["convert", str(video_short_source), str(tmp_path / "hub")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and re.search(rf"{re.escape(name)} {_UNREADABLE[make]}", errors[0]), errors
    assert not (tmp_path / "hub").exists()


def test_push_uploads_only_the_model_s_files_and_says_what_it_leaves_out(converted, recording_api):
    from vamba_hf.hub import push_folder

    expected = sorted(p.name for p in converted.iterdir() if p.name != convert_module.CONVERT_RECORD)
    (converted / "notes.txt").write_text("private notes")
    (converted / "sub").mkdir()
    (converted / "sub" / "data.csv").write_text("a,b\n")
    (converted / ".env").write_text("HF_TOKEN=secret\n")
    messages = []
    files = push_folder(converted, "me/vamba", dry_run=True, log=messages.append)
    assert [name for name, _ in files] == expected
    assert "Not uploaded (not files of a converted model): .env, notes.txt, sub/" in messages
    assert recording_api == []
    push_folder(converted, "me/vamba", token="hf_test", log=lambda m: None)
    operations = recording_api[-1][2]
    assert sorted(operation.path_in_repo for operation in operations) == expected


@pytest.mark.parametrize("name", ["README.md", "tokenizer.json", "model.safetensors"])
def test_push_never_uploads_a_link_s_target(converted, recording_api, tmp_path, name):
    from vamba_hf.hub import NotConvertedError, push_folder

    secret = tmp_path / "secret"
    secret.write_bytes((converted / name).read_bytes())
    (converted / name).unlink()
    os.symlink(secret, converted / name)
    for dry_run in (True, False):
        with pytest.raises(NotConvertedError, match=rf"{re.escape(name)} is a symbolic link .* never a link's target"):
            push_folder(converted, "me/vamba", dry_run=dry_run, token="hf_test", log=lambda m: None)
    assert recording_api == []


def _as_hub_cache(folder, cache):
    """`folder`'s files laid out as huggingface_hub caches a repo: each a link of snapshots/<revision>/ to its blob."""
    snapshot = cache / "models--TIGER-Lab--Vamba-Qwen2-VL-7B" / "snapshots" / "0123abcd"
    blobs = snapshot.parent.parent / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for path in sorted(folder.iterdir()):
        blob = blobs / convert_module._sha256_of(path)
        os.rename(path, blob)
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snapshot / path.name)
    return snapshot


def test_a_hub_cache_snapshot_s_links_to_its_blobs_are_followed_and_no_other(video_short_source, tmp_path):
    snapshot = _as_hub_cache(video_short_source, tmp_path / "hub-cache")
    convert_quietly(snapshot, tmp_path / "hub")
    for path in (tmp_path / "hub").iterdir():
        assert path.is_file() and not path.is_symlink(), path
    assert filecmp.cmp(tmp_path / "hub" / "model.safetensors", snapshot / "model.safetensors", shallow=False)

    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes((snapshot / "config.json").read_bytes())
    (snapshot / "config.json").unlink()
    os.symlink(elsewhere, snapshot / "config.json")
    with pytest.raises(ConversionError, match="config.json is a symbolic link"):
        convert_quietly(snapshot, tmp_path / "hub2")
