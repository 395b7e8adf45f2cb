"""The model card `vamba-hf convert` writes, read from the converted folder: true to the folder (source, sizes,
license, what it loads), Hub metadata of a video model, and snippets that need nothing beyond the card's own install
line. The slow test builds a fresh virtual environment from that install line and runs the snippet in it (set
VAMBA_HF_SLOW=1; it downloads packages)."""

import ast
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
from math import prod
from pathlib import Path

import pytest
from convert_helpers import make_source
from huggingface_hub import ModelCard
from import_check import installed_closure, missing_imports, required_imports
from packaging.utils import canonicalize_name
from safetensors.torch import load_file

from vamba_hf import cli
from vamba_hf.card import REPO_ID_PLACEHOLDER, WIDGET_VIDEO_URL
from vamba_hf.convert import REMOTE_CODE_FILES

def convert(source: Path, destination: Path, *options) -> ModelCard:
    assert cli.main(["convert", str(source), str(destination), *options]) == 0
    return ModelCard.load(destination / "README.md")


@pytest.fixture(scope="module")
def converted(golden_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("card")
    source = make_source(golden_dir / "video_short", folder / "official")
    convert(source, folder / "hub")
    return folder / "hub"


@pytest.fixture(scope="module")
def card(converted):
    return ModelCard.load(converted / "README.md")


def code_blocks(text: str, language: str) -> list:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def install_line(card) -> str:
    lines = [line for block in code_blocks(card.text, "bash") for line in block.splitlines()
             if line.startswith("pip install")]
    assert len(lines) == 1, lines
    return lines[0]


# -- what the card says about the folder -----------------------------------------------------------------------


def test_metadata_is_a_video_model_with_a_video_widget(card):
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "video-text-to-text" and data["library_name"] == "transformers"
    (widget,) = data["widget"]
    assert widget["src"] == WIDGET_VIDEO_URL and widget["src"].endswith(".mp4")
    assert widget["text"].endswith("video?")
    assert "jpeg" not in json.dumps(data) and "picture" not in widget["text"]


def test_a_local_source_is_not_called_tiger_lab(card):
    assert "base_model" not in card.data.to_dict()
    assert "TIGER-Lab/Vamba-Qwen2-VL-7B" not in card.text.replace("github.com/TIGER-AI-Lab", "")
    assert "**Source:** weights from a local folder" in card.text


def test_sizes_are_the_folder_s(card, converted):
    config = json.loads((converted / "config.json").read_text())
    stored = sum(prod(tensor.shape) for tensor in load_file(str(converted / "model.safetensors")).values())
    assert f"({stored:,}): {config['num_hidden_layers']} decoder layers, hidden size {config['hidden_size']}, " \
           f"vocabulary {config['vocab_size']}" in card.text
    assert "7B" not in card.text and "3584" not in card.text


def test_unknown_license_is_said_to_be_unknown(card):
    assert card.data.license == "other"
    assert "**License:** unknown" in card.text


def test_license_and_repo_id_come_from_the_source(golden_dir, tmp_path):
    source = make_source(golden_dir / "video_short", tmp_path / "models--some-org--vamba-small" / "snapshots" / "abc")
    (source / "README.md").write_text("---\nlicense: mit\n---\n# The source's card\n")
    card = convert(source, tmp_path / "hub")
    assert card.data.license == "mit" and "**License:** `mit`" in card.text
    assert card.data.base_model == "some-org/vamba-small"
    assert "the weights of [`some-org/vamba-small`](https://huggingface.co/some-org/vamba-small)" in card.text


def test_options_override_what_the_source_says(golden_dir, tmp_path):
    source = make_source(golden_dir / "video_short", tmp_path / "official")
    (source / "README.md").write_text("---\nlicense: mit\n---\n")
    card = convert(source, tmp_path / "hub", "--license", "apache-2.0", "--base-model", "me/base", "--repo-id", "me/x")
    assert (card.data.license, card.data.base_model) == ("apache-2.0", "me/base")
    assert 'model_id = "me/x"' in card.text and REPO_ID_PLACEHOLDER not in card.text


def test_with_a_processor_the_card_shows_auto_processor_and_the_pipeline(card):
    python = "\n".join(code_blocks(card.text, "python"))
    assert "AutoProcessor.from_pretrained" in python and 'pipeline("image-text-to-text"' in python
    assert '{"type": "video", "path": "video.mp4"}' in python
    assert "**Loads with:** `AutoModelForImageTextToText`" in card.text and "`AutoProcessor`" in card.text


def test_a_weights_only_folder_shows_no_processor_snippet(golden_dir, tmp_path):
    source = make_source(golden_dir / "video_short", tmp_path / "official", with_processor=False)
    card = convert(source, tmp_path / "hub")
    python = "\n".join(code_blocks(card.text, "python"))
    assert "AutoModelForImageTextToText.from_pretrained" in python
    assert "AutoProcessor" not in python and "pipeline(" not in python and "apply_chat_template" not in python
    assert "no tokenizer or processor files" in card.text


# -- the snippets need nothing beyond the install line ---------------------------------------------------------


def test_every_import_of_the_snippets_and_the_remote_code_is_in_the_install_line(card, converted):
    words = shlex.split(install_line(card))
    assert words[:2] == ["pip", "install"]
    sources = {f"snippet {index}": block for index, block in enumerate(code_blocks(card.text, "python"))}
    sources.update({path.name: path.read_text() for path in converted.glob("*.py")})
    assert set(REMOTE_CODE_FILES) <= set(sources)
    missing = missing_imports(sources, words[2:])
    assert not missing, f"imported but not installed by `{install_line(card)}`: {missing}"


def test_every_module_the_remote_code_imports_is_in_the_folder(converted):
    """transformers' remote-code loader reads each relative import from the folder itself."""
    wanted = {}
    for path in converted.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                wanted.setdefault(f"{node.module}.py", []).append(path.name)
    missing = {name: importers for name, importers in wanted.items() if not (converted / name).is_file()}
    assert not missing, f"the converted folder lacks remote-code modules (module: imported by): {missing}"


def test_the_import_check_can_fail():
    guarded = "import PIL.Image\ntry:\n    import av\nexcept ImportError:\n    av = None\n"
    assert required_imports(guarded + "def f():\n    import requests\n") == {"PIL", "requests"}
    assert canonicalize_name("pillow") not in installed_closure(["torch"])
    assert missing_imports({"snippet": "import PIL"}, ["torch"]) == {"snippet": ["PIL"]}


def test_no_snippet_needs_accelerate(card):
    """`device_map="auto"` needs accelerate, which the install line does not list."""
    assert "accelerate" not in install_line(card)
    assert "device_map" not in card.text


# -- slow: a fresh environment from the card's install line runs the card's snippet ----------------------------


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VAMBA_HF_SLOW") != "1", reason="slow: builds a virtual environment from the "
                    "card's install line (downloads packages); set VAMBA_HF_SLOW=1 to run it")
def test_the_card_snippet_runs_in_a_venv_built_from_the_card_install_line(card, converted, tmp_path):
    from vamba_hf.demo import write_demo_video

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    # PyTorch's CPU wheel first (a bare `torch` resolves to GBs of CUDA wheels on Linux), then the card's line as is.
    subprocess.run([*pip, f"torch=={importlib.metadata.version('torch').split('+')[0]}"], check=True, timeout=1200)
    subprocess.run([*pip, *shlex.split(install_line(card))[2:]], check=True, timeout=1200)

    work = tmp_path / "work"
    work.mkdir()
    write_demo_video(work / "video.mp4", num_frames=128, width=64, height=48)
    snippet = code_blocks(card.text, "python")[0].replace(REPO_ID_PLACEHOLDER, str(converted))
    snippet = snippet.replace("max_new_tokens=256", "max_new_tokens=8")
    environment = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
                   "HF_HUB_OFFLINE": "1"}
    finished = subprocess.run([str(venv / "bin" / "python"), "-c", snippet], cwd=work, env=environment,
                              capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.strip()
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import vamba_hf"], env=environment,
                           capture_output=True, text=True)
    assert probe.returncode != 0, "the venv must not hold vamba-hf: the card claims it is not needed"
