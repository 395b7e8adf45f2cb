"""Every script in examples/ runs on the embedded demo model with no arguments but a short answer length."""

import runpy
import sys

import pytest
from conftest import REPO

EXAMPLES = {
    "video_qa.py": ["--max-new-tokens", "4", "--frames", "8"],
    "image_qa.py": ["--max-new-tokens", "4"],
    "batch_videos.py": ["--max-new-tokens", "4", "--frames", "8", "--batch-size", "2"],
    "streaming.py": ["--max-new-tokens", "4"],
}


@pytest.fixture(autouse=True)
def demo_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VAMBA_HF_CACHE", str(tmp_path_factory.getbasetemp() / "vamba-hf-examples-cache"))


def run_example(name, args, monkeypatch):
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(REPO / "examples" / name), run_name="__main__")


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs_on_the_demo_model(name, monkeypatch, capsys):
    run_example(name, EXAMPLES[name], monkeypatch)
    out = capsys.readouterr().out
    assert "embedded demo model with random weights" in out


def test_batch_example_answers_every_video(monkeypatch, capsys):
    run_example("batch_videos.py", EXAMPLES["batch_videos.py"], monkeypatch)
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines()[:3]] == ["sample_0.mp4", "sample_1.mp4", "sample_2.mp4"]


def test_make_sample_video(tmp_path, monkeypatch, capsys):
    run_example("make_sample_video.py", [str(tmp_path / "clip.mp4"), "--frames", "10"], monkeypatch)
    assert (tmp_path / "clip.mp4").stat().st_size > 0


def test_multi_gpu_example_checks_the_split_on_cpu(monkeypatch, capsys):
    """On CPU there is one device, so the "split" is the whole model: the script's two runs must still agree."""
    import json

    run_example("multi_gpu_generate.py", ["--tiny", "--max-new-tokens", "4"], monkeypatch)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["equal"] and len(result["one_device_tokens"]) == 4
