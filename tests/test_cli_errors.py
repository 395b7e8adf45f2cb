"""What a user sees when the `vamba-hf` command is given something wrong, run as a user runs it (a subprocess):
one line on stderr, exit status 2, no traceback unless --debug or VAMBA_HF_DEBUG=1, within seconds and without the
network (HF_ENDPOINT points at a closed local port, so nothing leaves the machine). Also: the streamed answer is
printable, and `vamba-hf --help` does not load torch."""

import os
import subprocess
import sys
import time

import pytest
from conftest import REPO

from vamba_hf.inference import printable

CLOSED_ENDPOINT = "http://127.0.0.1:9"
TIME_LIMIT_S = 10


def run_cli(*args, cwd=None, timeout=120, **environment):
    inherited = {name: value for name, value in os.environ.items() if name not in ("VAMBA_HF_DEBUG", "HF_HUB_OFFLINE")}
    python_path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    env = dict(inherited, PYTHONPATH=python_path, HF_ENDPOINT=CLOSED_ENDPOINT, **environment)
    started = time.perf_counter()
    finished = subprocess.run([sys.executable, "-m", "vamba_hf", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)
    return finished, time.perf_counter() - started


@pytest.fixture
def hub_home(tmp_path):
    """An empty Hub cache: nothing is found locally, so a Hub id has to be looked up."""
    return {"HF_HOME": str(tmp_path / "hf-home"), "VAMBA_HF_CACHE": str(tmp_path / "vamba-cache")}


def assert_one_line_error(finished, *fragments):
    lines = finished.stderr.strip().splitlines()
    assert finished.returncode == 2, finished.stderr
    assert len(lines) == 1, finished.stderr
    assert "Traceback" not in finished.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("model", ["./missing", "/abs/missing", "../missing/folder", "~/missing-vamba"])
def test_a_missing_local_folder_is_named_as_such(model, tmp_path, hub_home):
    finished, elapsed = run_cli("generate", "--model", model, "--max-new-tokens", "2", cwd=tmp_path, **hub_home)
    line = assert_one_line_error(finished, f"--model {model}: no such local folder")
    assert "Repo id" not in line and "repo_id" not in line
    assert elapsed < TIME_LIMIT_S


def test_a_file_given_as_the_model_folder(tmp_path, hub_home):
    (tmp_path / "weights.safetensors").write_bytes(b"not a folder")
    finished, _ = run_cli("generate", "--model", "weights.safetensors", cwd=tmp_path, **hub_home)
    assert_one_line_error(finished, "this is a file, not a folder")


@pytest.mark.parametrize("model", ["missing", "some-namespace/missing-model"])
def test_a_hub_id_without_network_fails_fast_in_one_line(model, tmp_path, hub_home):
    finished, elapsed = run_cli("generate", "--model", model, "--max-new-tokens", "2", cwd=tmp_path, **hub_home)
    assert_one_line_error(finished, f"--model {model}: not a local folder nor in the Hub cache",
                          f"could not reach the Hub at {CLOSED_ENDPOINT} ([Errno 111] Connection refused)")
    assert elapsed < TIME_LIMIT_S, f"took {elapsed:.1f} s"


def test_a_hub_id_offline_says_so(tmp_path, hub_home):
    finished, elapsed = run_cli("generate", "--model", "some-namespace/missing-model", cwd=tmp_path,
                                HF_HUB_OFFLINE="1", **hub_home)
    assert_one_line_error(finished, "HF_HUB_OFFLINE is set")
    assert elapsed < TIME_LIMIT_S


def test_convert_of_a_missing_folder_a_file_or_a_hub_id_without_network(tmp_path, hub_home):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    for source, fragment in (("./missing", "Source folder ./missing does not exist"),
                             ("model.safetensors", "model.safetensors is a file, not a folder"),
                             ("some-namespace/missing", f"the Hub ({CLOSED_ENDPOINT}) could not be reached")):
        finished, elapsed = run_cli("convert", source, str(tmp_path / "out"), cwd=tmp_path, **hub_home)
        assert finished.returncode == 2 and "Traceback" not in finished.stderr, finished.stderr
        errors = [line for line in finished.stderr.splitlines() if line.startswith("vamba-hf: error: ")]
        assert len(errors) == 1 and errors[0] == finished.stderr.strip().splitlines()[-1], finished.stderr
        assert fragment in errors[0], errors[0]
        assert elapsed < TIME_LIMIT_S
    assert not (tmp_path / "out").exists()


def test_an_official_format_folder_is_not_loaded_as_a_converted_one(golden_dir, tmp_path, hub_home):
    finished, _ = run_cli("generate", "--model", str(golden_dir / "video_short"), cwd=tmp_path, **hub_home)
    assert_one_line_error(finished, "official-format checkpoint (model_type qwen2_vl); convert it first")


@pytest.mark.parametrize("flag, value, fragment", [
    ("--fps", "nan", "argument --fps: nan is not a usable rate"),
    ("--fps", "inf", "argument --fps: inf is not a usable rate"),
    ("--fps", "0", "argument --fps: 0 is not a usable rate"),
    ("--fps", "-1", "argument --fps: -1 is not a usable rate"),
    ("--fps", "fast", "argument --fps: 'fast' is not a number"),
    ("--frames", "-1", "argument --frames: -1 is not a count"),
    ("--frames", "0", "argument --frames: 0 is not a count"),
    ("--frames", "2.5", "argument --frames: '2.5' is not a whole number"),
    ("--max-new-tokens", "0", "argument --max-new-tokens: 0 is not a count"),
])
def test_video_flags_are_checked_in_one_line(flag, value, fragment, tmp_path, hub_home):
    finished, elapsed = run_cli("generate", flag, value, cwd=tmp_path, **hub_home)
    assert_one_line_error(finished, fragment, "see vamba-hf generate --help")
    assert elapsed < TIME_LIMIT_S


def test_debug_shows_the_traceback(tmp_path, hub_home):
    for finished, _ in (run_cli("--debug", "generate", "--model", "./missing", cwd=tmp_path, **hub_home),
                        run_cli("generate", "--model", "./missing", cwd=tmp_path, VAMBA_HF_DEBUG="1", **hub_home)):
        assert finished.returncode == 2
        assert "Traceback (most recent call last)" in finished.stderr
        assert finished.stderr.strip().splitlines()[-1].startswith("vamba-hf: error: --model ./missing")


def test_a_missing_video_is_one_line(tmp_path, hub_home):
    finished, _ = run_cli("generate", "--video", str(tmp_path / "absent.mp4"), "--max-new-tokens", "2",
                          cwd=tmp_path, **hub_home)
    assert finished.returncode == 2 and "Traceback" not in finished.stderr
    assert finished.stderr.strip().splitlines()[-1].startswith("vamba-hf: error: ")


def test_printable_escapes_control_characters_and_keeps_the_rest():
    assert printable("a\x1b[31mred\x07\r\x00b") == "a\\x1b[31mred\\x07\\r\\x00b"
    assert printable("line one\n\ttabbed, naïve, 日本, emoji 🙂") == "line one\n\ttabbed, naïve, 日本, emoji 🙂"
    assert printable("zero\u200bwidth\x85") == "zero\\u200bwidth\\x85"


def test_the_demo_answer_is_printed_printable(tmp_path, hub_home):
    from vamba_hf.demo import write_demo_video

    video = write_demo_video(tmp_path / "clip.mp4")
    finished, _ = run_cli("generate", "--video", str(video), "--max-new-tokens", "48", cwd=tmp_path, **hub_home)
    assert finished.returncode == 0, finished.stderr
    answer = finished.stdout
    assert answer.strip(), "no answer was streamed"
    assert all(character.isprintable() or character in "\n\t" for character in answer), repr(answer)


def test_help_does_not_import_torch(tmp_path):
    probe = ("import sys, runpy; sys.argv = ['vamba-hf', '--help']\n"
             "try:\n    runpy.run_module('vamba_hf', run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "heavy = sorted(name for name in ('torch', 'transformers', 'numpy', 'av') if name in sys.modules)\n"
             "print('HEAVY', heavy, file=sys.stderr)")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    finished = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert "usage: vamba-hf" in finished.stdout
    assert "HEAVY []" in finished.stderr, finished.stderr


def test_import_is_lazy_and_first_use_registers_the_auto_classes():
    probe = ("import sys, vamba_hf\n"
             "print('after import', 'torch' in sys.modules)\n"
             "vamba_hf.VambaConfig\n"
             "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
             "print('after use', 'vamba' in CONFIG_MAPPING)")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    finished = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert finished.stdout.split("\n")[:2] == ["after import False", "after use True"], finished.stderr



@pytest.mark.parametrize("hub_error, fragment", [
    ("RepositoryNotFoundError", "me/nothing-here: not a local folder nor in the Hub cache, and looking it up on the "
                                "Hub failed: repository not found"),
    ("GatedRepoError", "looking it up on the Hub failed: the repository is gated"),
])
def test_what_the_hub_answers_about_a_repo_is_one_line(hub_error, fragment, monkeypatch):
    import huggingface_hub.errors

    from vamba_hf import sources

    error_class = getattr(huggingface_hub.errors, hub_error)

    def answer(api, repo_id, timeout):
        assert timeout <= sources.HUB_TIMEOUT_S
        error = error_class.__new__(error_class)  # constructors differ across huggingface_hub versions
        Exception.__init__(error, "404 Client Error")
        raise error

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", answer)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(sources, "cached_snapshot", lambda repo_id: None)
    with pytest.raises(ValueError, match=fragment) as raised:
        sources.resolve_model_source("me/nothing-here")
    assert "\n" not in str(raised.value)


def bad_visual_inputs(folder):
    """(flag, path, what the one line must say) for inputs that can be refused before a model loads."""
    (folder / "notes.mp4").write_text("not a video\n")
    (folder / "notes.png").write_text("not an image\n")
    (folder / "a-folder.mp4").mkdir()
    (folder / "empty.mp4").touch()
    os.mkfifo(folder / "pipe.mp4")
    return [
        ("--video", folder / "absent.mp4", "video file not found"),
        ("--video", folder / "empty.mp4", "the file is empty"),
        ("--video", folder / "a-folder.mp4", "is a folder, not a video file"),
        ("--video", folder / "notes.mp4", "not a video file PyAV can read"),
        ("--video", folder / "pipe.mp4", "not a regular file"),
        ("--image", folder / "notes.png", "not an image PIL can read"),
    ]


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_a_bad_video_or_image_is_refused_before_the_model_loads(command, tmp_path, hub_home):
    """Nothing is loaded first: the demo model, which any load would build into the empty VAMBA_HF_CACHE, is never
    written."""
    for flag, path, fragment in bad_visual_inputs(tmp_path):
        if command == "chat" and flag == "--image":
            continue
        finished, _ = run_cli(command, flag, str(path), "--max-new-tokens", "2", cwd=tmp_path, **hub_home)
        assert_one_line_error(finished, f"{flag} {path}: ", fragment)
        assert not os.path.exists(hub_home["VAMBA_HF_CACHE"]), f"{flag} {path.name}: a model was loaded first"


def test_too_few_sampled_frames_names_the_file_s_frames_not_the_sample_s(tmp_path, hub_home):
    from vamba_hf.demo import write_demo_video

    video = write_demo_video(tmp_path / "clip.mp4", num_frames=48)
    finished, _ = run_cli("generate", "--video", str(video), "--frames", "1", cwd=tmp_path, **hub_home)
    line = finished.stderr.strip().splitlines()[-1]
    assert finished.returncode == 2 and "Traceback" not in finished.stderr, finished.stderr
    assert line.startswith("vamba-hf: error: ") and "1 of its 48 was sampled" in line and "--frames" in line, line
    assert "this one has" not in line
