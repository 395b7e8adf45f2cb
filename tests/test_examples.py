"""Every script in examples/ runs with no arguments at all, as the README says: a subprocess on the CPU, the embedded
demo model and the script's own sample input, in a scratch folder, with a private demo-model cache."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

EXAMPLES = sorted(path.name for path in (REPO / "examples").glob("*.py"))
TIMEOUT_S = 240
# What each script's output must show, beyond running to exit status 0.
EXPECTED_OUTPUT = {
    "video_qa.py": ["Q: What happens in this video?", "A: ", "embedded demo model with random weights"],
    "image_qa.py": ["Q: ", "A: ", "embedded demo model with random weights"],
    "batch_videos.py": ["sample_0.mp4: ", "sample_1.mp4: ", "sample_2.mp4: ", "embedded demo model"],
    "streaming.py": ["first text after", "embedded demo model with random weights"],
    "streaming_video.py": ["[+8 frames in ", "48 frames, 576 visual tokens so far", "Q: What is happening now?",
                           "embedded demo model with random weights"],
    "long_video.py": ["Encoded 64 frames while decoding them", "(2 chunks, ", "Q: What is shown at the end?",
                      "embedded demo model with random weights"],
    "make_sample_video.py": ["sample.mp4"],
    "finetune.py": ["No --model: fine-tuning the embedded demo model", "trained 3 steps on one process, no distributed "
                    "training", "saved the model and processor to"],
    "multi_gpu_generate.py": ['"equal": true'],
}


@pytest.fixture(scope="module")
def environment(tmp_path_factory):
    python_path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    cache = tmp_path_factory.mktemp("vamba-hf-examples-cache")
    return dict(os.environ, PYTHONPATH=python_path, VAMBA_HF_CACHE=str(cache), CUDA_VISIBLE_DEVICES="",
                HF_HUB_OFFLINE="1")


def run_example(name, environment, cwd):
    return subprocess.run([sys.executable, str(REPO / "examples" / name)], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def ran_without_arguments(environment, tmp_path_factory):
    """`ran_without_arguments(name)`: (the finished run, its scratch folder) of the script with no arguments, run
    once for every test that reads it."""
    runs = {}

    def ran(name):
        if name not in runs:
            folder = tmp_path_factory.mktemp(name.removesuffix(".py"))
            runs[name] = run_example(name, environment, folder), folder
        return runs[name]

    return ran


def test_every_example_is_listed():
    assert sorted(EXPECTED_OUTPUT) == EXAMPLES


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_with_no_arguments(name, ran_without_arguments):
    finished, folder = ran_without_arguments(name)
    assert finished.returncode == 0, finished.stderr[-3000:]
    for expected in EXPECTED_OUTPUT[name]:
        assert expected in finished.stdout, (expected, finished.stdout[-3000:])
    assert "Traceback" not in finished.stderr
    written = {path.name for path in folder.iterdir()}
    assert written == ({"sample.mp4"} if name == "make_sample_video.py" else set()), written


def test_finetune_explains_how_it_ran(ran_without_arguments):
    """accelerate's DistributedType is "NO" on one process: the script says what that means instead."""
    finished, _ = ran_without_arguments("finetune.py")
    lines = finished.stdout.splitlines()
    assert not any(" NO" in line or line.strip() == "NO" for line in lines), finished.stdout


def test_multi_gpu_example_says_it_cannot_split_on_cpu(ran_without_arguments):
    finished, _ = ran_without_arguments("multi_gpu_generate.py")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "--gpus 2: this machine has no GPU, only the CPU" in finished.stderr
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    assert result["equal"] and result["devices"] == ["cpu"] and 1 <= len(result["one_device_tokens"]) <= 32


def test_batch_example_answers_every_video_in_order(ran_without_arguments):
    finished, _ = ran_without_arguments("batch_videos.py")  # three videos in batches of 2
    assert re.findall(r"^(sample_\d\.mp4): ", finished.stdout, re.M) == ["sample_0.mp4", "sample_1.mp4", "sample_2.mp4"]


def test_answers_are_printable(ran_without_arguments):
    finished, _ = ran_without_arguments("video_qa.py")
    assert all(character.isprintable() or character in "\n\t" for character in finished.stdout), finished.stdout


def test_the_sample_video_is_h264_in_mp4_which_every_browser_plays(ran_without_arguments):
    """The quick start's sample.mp4 (and every clip the examples write, through `write_demo_video`): H.264 with 4:2:0
    chroma in an MP4 container, the one combination every browser plays (MPEG-4 Part 2 none does)."""
    import av

    finished, folder = ran_without_arguments("make_sample_video.py")
    assert finished.returncode == 0, finished.stderr[-3000:]
    with av.open(str(folder / "sample.mp4")) as container:
        stream = container.streams.video[0]
        assert "mp4" in container.format.name.split(",")
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert stream.frames == 48
