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
    """The Hub's own identifier for an unknown license, the same word in the metadata and the text."""
    assert card.data.license == "unknown"
    assert "**License:** `unknown`: the source did not state one" in card.text


def test_every_size_the_card_states_is_the_config_s(card, converted):
    config = json.loads((converted / "config.json").read_text())
    vision, mamba = config["vision_config"], config["vision_mamba_mixer_config"]
    assert vision["embed_dim"] != vision["hidden_size"]  # the test tells the two apart
    (sizes,) = [line for line in card.text.split("\n- ") if line.startswith("**Size:**")]
    sizes = " ".join(sizes.split())
    assert f"vision tower depth {vision['depth']}, width (embed_dim) {vision['embed_dim']}, output (hidden_size, " \
           f"after merging patches) {vision['hidden_size']};" in sizes, sizes
    assert f"Mamba-2 d_state {mamba['d_state']}, head dim {mamba['headdim']}." in sizes, sizes


def test_the_transformers_versions_the_card_names_are_the_install_line_s(card):
    from packaging.requirements import Requirement

    (transformers,) = [Requirement(word) for word in shlex.split(install_line(card))[2:]
                       if Requirement(word).name == "transformers"]
    claim = re.search(r"Then, on the transformers that line installs \((.*?)\)", card.text).group(1)
    assert claim == "4.57, or 5.1 and later; not 5.0"
    assert all(transformers.specifier.contains(version) for version in ("4.57.0", "4.57.6", "5.1.0", "5.25.0", "6.0"))
    assert not any(transformers.specifier.contains(version) for version in ("4.56.2", "5.0.0", "5.0.1"))
    assert " 5.x" not in card.text, "5.0 is excluded by the install line"


def test_the_card_links_the_package_source_it_says_to_install_from(converted, monkeypatch):
    import importlib.metadata

    from transformers import AutoConfig

    from vamba_hf.card import render_model_card

    class Metadata(dict):
        def get_all(self, name):
            return ["Documentation, https://example.org/docs", "Source, https://example.org/vamba-hf"]

    monkeypatch.setattr(importlib.metadata, "metadata", lambda name: Metadata())
    text = render_model_card(AutoConfig.from_pretrained(converted, trust_remote_code=True)).text
    assert "From a clone of [its source](https://example.org/vamba-hf): `pip install -e '.[video]'`" in text


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


def oldest_line_promised(install: str) -> str:
    """The pip requirement for the oldest transformers minor the install line allows: `>=4.57` gives
    `transformers==4.57.*`."""
    from packaging.requirements import Requirement

    (transformers,) = [requirement for requirement in map(Requirement, shlex.split(install)[2:])
                       if requirement.name == "transformers"]
    (lowest,) = [spec.version for spec in transformers.specifier if spec.operator == ">="]
    return f"transformers=={lowest}.*"


def test_the_slow_test_covers_the_oldest_line_the_card_promises(card):
    assert oldest_line_promised(install_line(card)) == "transformers==4.57.*"


def test_ci_runs_the_slow_test_on_both_lines_and_fails_if_it_skips():
    from conftest import REPO

    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    (command,) = [line for line in ci.splitlines() if "VAMBA_HF_SLOW=1" in line]
    assert "pytest" in command and "tests/test_model_card.py -k card_install_line" in command
    assert '"2 passed, "' in ci and "exit 1" in ci.split("VAMBA_HF_SLOW=1", 1)[1].split("===", 1)[0]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VAMBA_HF_SLOW") != "1", reason="slow: builds a virtual environment from the "
                    "card's install line (downloads packages); set VAMBA_HF_SLOW=1 to run it")
@pytest.mark.parametrize("line", ["newest", "oldest"])
def test_the_card_snippet_runs_in_a_venv_built_from_the_card_install_line(line, card, converted, tmp_path):
    """The card's install line as is (the newest transformers it resolves to), and held to the oldest minor release
    it allows (a pip constraint, so nothing is installed beyond the line)."""
    from vamba_hf.demo import write_demo_video

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    isolated = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}  # pip sees the venv only
    # PyTorch's CPU wheel first (a bare `torch` resolves to GBs of CUDA wheels on Linux), then the card's line as is.
    subprocess.run([*pip, f"torch=={importlib.metadata.version('torch').split('+')[0]}"], check=True, timeout=1200,
                   env=isolated)
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(oldest_line_promised(install_line(card)) + "\n" if line == "oldest" else "")
    subprocess.run([*pip, "-c", str(constraints), *shlex.split(install_line(card))[2:]], check=True, timeout=1200,
                   env=isolated)
    installed = subprocess.run([str(venv / "bin" / "python"), "-c", "import transformers; print(transformers."
                                "__version__)"], capture_output=True, text=True, check=True).stdout.strip()
    print(f"the card's install line installed transformers {installed} ({line})")
    if line == "oldest":
        assert installed.startswith(oldest_line_promised(install_line(card)).split("==")[1].rstrip("*")), installed

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
