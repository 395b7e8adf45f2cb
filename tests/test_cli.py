"""The `vamba-hf` command: convert, push (dry run, and a real upload against a stand-in HfApi), generate (on the
embedded demo model, from a video and from an image)."""

import json
from pathlib import Path

import pytest
from convert_helpers import make_source
from huggingface_hub import ModelCard
from PIL import Image

from vamba_hf import cli
from vamba_hf.card import REPO_ID_PLACEHOLDER
from vamba_hf.demo import DEMO_SEED, build_demo_model_dir, write_demo_video


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """A private cache for the demo model, so tests never write to the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("vamba-hf-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VAMBA_HF_CACHE", str(cache))
        build_demo_model_dir()
        yield cache


@pytest.fixture(scope="session")
def demo_video(tmp_path_factory):
    return write_demo_video(tmp_path_factory.mktemp("media") / "clip.mp4")


@pytest.fixture
def converted(golden_dir, tmp_path):
    source = make_source(golden_dir / "video_short", tmp_path / "official")
    assert cli.main(["convert", str(source), str(tmp_path / "hub")]) == 0
    return tmp_path / "hub"


# -- convert ---------------------------------------------------------------------------------------------------


def test_convert_writes_a_hub_folder(golden_dir, tmp_path, capsys):
    source = make_source(golden_dir / "video_short", tmp_path / "official")
    assert cli.main(["convert", str(source), str(tmp_path / "hub")]) == 0
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["model_type"] == "vamba"
    err = capsys.readouterr().err
    assert "Checked 121 tensors" in err and "with processor" in err


def test_convert_refuses_existing_destination_then_force(converted, capsys):
    source = converted.parent / "official"
    assert cli.main(["convert", str(source), str(converted)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert cli.main(["convert", str(source), str(converted), "--force", "--repo-id", "me/x"]) == 0
    assert 'model_id = "me/x"' in (converted / "README.md").read_text()


def test_convert_reports_a_bad_source(tmp_path, capsys):
    assert cli.main(["convert", str(tmp_path), str(tmp_path.parent / "out")]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_convert_downloads_a_repo_id(golden_dir, tmp_path, monkeypatch):
    """No local folder of that name: the Hub repo is downloaded, and the card names it as the source."""
    source = make_source(golden_dir / "image", tmp_path / "cache" / "snapshot")
    requested = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **options):
        requested.append((repo_id, options))
        return str(source)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    monkeypatch.setattr("vamba_hf.convert._hub_is_reachable", lambda repo_id: True)  # the Hub answers
    monkeypatch.chdir(tmp_path)
    assert cli.main(["convert", "TIGER-Lab/Vamba-Qwen2-VL-7B", str(tmp_path / "hub")]) == 0
    assert requested == [("TIGER-Lab/Vamba-Qwen2-VL-7B", {})] and (tmp_path / "hub" / "config.json").is_file()
    card = ModelCard.load(tmp_path / "hub" / "README.md")
    assert card.data.base_model == "TIGER-Lab/Vamba-Qwen2-VL-7B"
    assert "the weights of [`TIGER-Lab/Vamba-Qwen2-VL-7B`]" in card.text


# -- push ------------------------------------------------------------------------------------------------------


class RecordingHfApi:
    calls = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **options):
        self.calls.append(("create_repo", repo_id, options))

    def create_commit(self, **options):
        self.calls.append(("create_commit", options["repo_id"], options))
        return "https://huggingface.co/me/vamba/commit/0"


def test_push_dry_run_lists_files_and_uploads_nothing(converted, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.HfApi", None)  # any use of the API would fail
    assert cli.main(["push", str(converted), "me/vamba", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "Would upload" in err and "https://huggingface.co/me/vamba" in err
    for name in ("config.json", "model.safetensors", "modeling_vamba.py", "processing_vamba.py", "README.md",
                 "generation_config.json", "tokenizer.json"):
        assert f"  {name}  (" in err, name
    assert REPO_ID_PLACEHOLDER in (converted / "README.md").read_text()


def test_push_uploads_the_folder_with_the_repo_id_in_the_uploaded_card(converted, monkeypatch):
    RecordingHfApi.calls = []
    monkeypatch.setattr("huggingface_hub.HfApi", RecordingHfApi)
    assert cli.main(["push", str(converted), "me/vamba", "--private", "--token", "hf_test"]) == 0
    (create, repo_id, options), (commit, commit_repo, commit_options) = RecordingHfApi.calls
    assert (create, repo_id, options["private"], options["exist_ok"]) == ("create_repo", "me/vamba", True, True)
    assert (commit, commit_repo) == ("create_commit", "me/vamba")
    uploaded = {operation.path_in_repo: operation.path_or_fileobj for operation in commit_options["operations"]}
    card = uploaded["README.md"]
    card = card.decode() if isinstance(card, bytes) else Path(card).read_text()
    assert 'model_id = "me/vamba"' in card and REPO_ID_PLACEHOLDER not in card
    assert REPO_ID_PLACEHOLDER in (converted / "README.md").read_text()  # the local folder is left as it was


def test_push_reports_a_network_error_in_one_line(converted, monkeypatch, capsys):
    """huggingface_hub's HTTP client (httpx or requests) raises errors that are not OSError in every version."""
    connect_error = type("ConnectError", (Exception,), {"__module__": "httpx"})

    class UnreachableHub(RecordingHfApi):
        def create_repo(self, repo_id, **options):
            raise connect_error("[Errno 111] Connection refused")

    monkeypatch.setattr("huggingface_hub.HfApi", UnreachableHub)
    assert cli.main(["push", str(converted), "me/vamba", "--token", "hf_test"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vamba-hf:")]
    assert line.startswith("vamba-hf: error: Uploading to me/vamba failed: could not reach the Hub")
    assert "[Errno 111] Connection refused" in line


def test_a_network_error_outside_convert_and_push_is_one_line(monkeypatch, capsys):
    connect_error = type("ConnectError", (Exception,), {"__module__": "httpx"})

    def unreachable(name, option):
        raise connect_error("[Errno 111] Connection refused")

    monkeypatch.setattr("vamba_hf.sources.resolve_model_source", unreachable)
    assert cli.main(["generate", "--model", "me/vamba"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("vamba-hf: error: Talking to the Hugging Face Hub failed: could not reach the Hub")


def test_an_unexpected_error_is_one_line_and_called_a_bug(demo_cache, demo_video, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr("vamba_hf.inference.load_model_and_processor", broken)
    assert cli.main(["generate", "--video", str(demo_video)]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("vamba-hf: internal error: RuntimeError: something inside broke; this is "
                                            "a bug in vamba-hf, please report it (--debug or VAMBA_HF_DEBUG=1 shows "
                                            "the traceback)")
    assert "Traceback" not in err


def test_push_refuses_an_unconverted_folder(golden_dir, capsys):
    assert cli.main(["push", str(golden_dir / "image"), "me/vamba", "--dry-run"]) == 2
    assert "not a converted Vamba config" in capsys.readouterr().err


# -- generate --------------------------------------------------------------------------------------------------


def test_generate_video_on_the_demo_model(demo_cache, demo_video, capsys):
    assert cli.main(["generate", "--video", str(demo_video), "--prompt", "What moves?", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert f"DEMO model: a tiny Vamba with RANDOM weights (seed {DEMO_SEED})" in err
    assert "video: 16 frames" in err and "6 new tokens" in err
    assert out.strip()


def test_generate_is_deterministic_and_honours_frames(demo_cache, demo_video, capsys):
    answers = []
    for _ in range(2):
        assert cli.main(["generate", "--video", str(demo_video), "--frames", "8", "--max-new-tokens", "6"]) == 0
        out, err = capsys.readouterr()
        assert "video: 8 frames" in err
        answers.append(out)
    assert answers[0] == answers[1]


def test_generate_by_fps(demo_cache, demo_video, capsys):
    # 48 frames at 12 fps = 4 s; 2 frames per second -> 8 frames.
    assert cli.main(["generate", "--video", str(demo_video), "--fps", "2", "--max-new-tokens", "2"]) == 0
    assert "video: 8 frames" in capsys.readouterr().err


def test_generate_image(demo_cache, tmp_path, capsys):
    image = tmp_path / "picture.png"
    Image.new("RGB", (96, 64), (200, 40, 40)).save(image)
    assert cli.main(["generate", "--image", str(image), "--max-new-tokens", "3", "--dtype", "float32",
                     "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "image: " in err and "Prompt: Describe this image." in err


def test_generate_with_a_converted_model(converted, demo_video, capsys):
    assert cli.main(["generate", "--model", str(converted), "--video", str(demo_video), "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "DEMO" not in err and f"Model: {converted}" in err


def test_generate_reports_a_missing_video(demo_cache, tmp_path, capsys):
    assert cli.main(["generate", "--video", str(tmp_path / "absent.mp4")]) == 2
    assert "video file not found" in capsys.readouterr().err


def test_generate_reports_a_weights_only_model(golden_dir, tmp_path, capsys):
    source = make_source(golden_dir / "image", tmp_path / "official", with_processor=False)
    assert cli.main(["convert", str(source), str(tmp_path / "hub")]) == 0
    assert cli.main(["generate", "--model", str(tmp_path / "hub"), "--prompt", "hi"]) == 2
    assert "converted weights-only" in capsys.readouterr().err


def test_video_and_image_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--video", "a.mp4", "--image", "b.png"])
    assert "not allowed with argument" in capsys.readouterr().err


# -- chat --save-state / --state -------------------------------------------------------------------------------


def chat(args, monkeypatch, capsys):
    """`vamba-hf chat` in this process with no question typed: (exit code, the error lines)."""
    import io

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))  # a terminal's stdin has a binary buffer
    code = cli.main(["chat", "--frames", "4", *args])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("vamba-hf: ")]


def test_chat_save_state_replaces_a_file_only_with_force(demo_cache, demo_video, tmp_path, monkeypatch, capsys):
    from vamba_hf.inference import load_model_and_processor
    from vamba_hf.video_state_vamba import load_video_state

    path = tmp_path / "clip.state"
    path.write_text("a user's file")
    code, errors = chat(["--video", str(demo_video), "--save-state", str(path)], monkeypatch, capsys)
    assert code == 2 and errors == [f"vamba-hf: error: --save-state {path}: the file exists; pass --force to replace "
                                    f"it, or give another path."]
    assert path.read_text() == "a user's file"
    code, errors = chat(["--video", str(demo_video), "--save-state", str(path), "--force"], monkeypatch, capsys)
    assert code == 0 and errors == []
    load_video_state(path, load_model_and_processor(None).model)  # the state, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.state"]  # no temporary file left


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_chat_never_saves_a_state_over_the_files_it_reads(demo_cache, demo_video, tmp_path, monkeypatch, capsys,
                                                          force):
    video = tmp_path / "clip.mp4"
    video.write_bytes(demo_video.read_bytes())
    code, errors = chat(["--video", str(video), "--save-state", str(video), *force], monkeypatch, capsys)
    assert code == 2 and errors == [f"vamba-hf: error: --save-state {video}: is the file this chat reads ({video}); "
                                    f"give another path."]
    assert video.read_bytes() == demo_video.read_bytes()
    state = tmp_path / "clip.state"
    assert chat(["--video", str(video), "--save-state", str(state)], monkeypatch, capsys)[0] == 0
    saved = state.read_bytes()
    code, errors = chat(["--state", str(state), "--save-state", str(tmp_path / "." / "clip.state"), *force],
                        monkeypatch, capsys)
    assert code == 2 and "is the file this chat reads" in errors[0] and state.read_bytes() == saved


@pytest.mark.parametrize("device", ["/dev/full", "/dev/null"])
def test_chat_save_state_to_a_device_fails_in_one_line(demo_cache, demo_video, monkeypatch, capsys, device):
    code, errors = chat(["--video", str(demo_video), "--save-state", device, "--force"], monkeypatch, capsys)
    assert code == 2 and errors == [f"vamba-hf: error: --save-state {device}: is not a regular file (a device, a "
                                    f"FIFO or a socket); give a file path."]


def test_chat_refuses_a_state_of_another_file_of_the_same_name(demo_cache, demo_video, tmp_path, monkeypatch,
                                                                 capsys):
    video, state = tmp_path / "clip.mp4", tmp_path / "clip.state"
    write_demo_video(video, num_frames=24)
    assert chat(["--video", str(video), "--save-state", str(state)], monkeypatch, capsys)[0] == 0
    assert chat(["--video", str(video), "--state", str(state)], monkeypatch, capsys)[0] == 0  # the same file
    write_demo_video(video, num_frames=36)  # another video, the same name
    code, errors = chat(["--video", str(video), "--state", str(state)], monkeypatch, capsys)
    assert code == 2 and errors == [f"vamba-hf: error: --state {state} was encoded from {video}, whose contents "
                                    f"differ from --video {video}: drop --video, or encode {video} without --state."]


@pytest.mark.parametrize("content", [b"", b"not a state", b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}",
                                     b"\xff" * 64])
def test_chat_state_of_a_file_that_is_not_a_state_is_one_line(demo_cache, tmp_path, monkeypatch, capsys, content):
    path = tmp_path / "clip.state"
    path.write_bytes(content)
    code, errors = chat(["--state", str(path)], monkeypatch, capsys)
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"vamba-hf: error: {path} is not a Vamba video "
                                                                    f"state"), errors


def test_chat_state_of_a_folder_or_a_fifo_is_one_line(demo_cache, tmp_path, monkeypatch, capsys):
    import os

    os.mkfifo(tmp_path / "fifo.state")
    (tmp_path / "folder.state").mkdir()
    for path in (tmp_path / "fifo.state", tmp_path / "folder.state"):
        code, errors = chat(["--state", str(path)], monkeypatch, capsys)
        assert code == 2 and errors == [f"vamba-hf: error: {path} is not a Vamba video state (not a regular file); "
                                        f"save one with state.save(path) or `vamba-hf chat --save-state`."]


def test_chat_checks_save_state_before_the_model_loads(demo_video, tmp_path, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --save-state was checked")

    monkeypatch.setattr("vamba_hf.inference.load_model_and_processor", no_model)
    (tmp_path / "clip.state").write_text("a user's file")
    code, errors = chat(["--video", str(demo_video), "--save-state", str(tmp_path / "clip.state")], monkeypatch,
                        capsys)
    assert code == 2 and errors == [f"vamba-hf: error: --save-state {tmp_path / 'clip.state'}: the file exists; pass "
                                    f"--force to replace it, or give another path."]

# -- Ctrl-C: a streamer that raises KeyboardInterrupt as the given new token arrives (no timing involved) ----------


def interrupting_streamers(monkeypatch, at_token: int, answers: set):
    """Streamers that raise KeyboardInterrupt when the `at_token`-th new token of the answers numbered in `answers`
    (0 is the first generate call) arrives, as Ctrl-C would."""
    make = cli.printable_streamer
    calls = {"answer": -1, "token": 0}

    def interrupting(tokenizer):
        streamer = make(tokenizer)
        put = streamer.put

        def put_or_interrupt(value):
            if streamer.next_tokens_are_prompt:  # the prompt: a new answer starts
                calls["answer"], calls["token"] = calls["answer"] + 1, 0
            else:
                calls["token"] += 1
                if calls["answer"] in answers and calls["token"] == at_token:
                    raise KeyboardInterrupt
            put(value)

        streamer.put = put_or_interrupt
        return streamer

    monkeypatch.setattr(cli, "printable_streamer", interrupting)


def terminal(monkeypatch, typed=""):
    """stdout and stderr into one buffer, in the order a terminal shows them; stdin reads `typed`."""
    import io
    import sys

    shown = io.StringIO()
    monkeypatch.setattr(sys, "stdout", shown)
    monkeypatch.setattr(sys, "stderr", shown)
    monkeypatch.setattr(sys, "stdin", typed if not isinstance(typed, str) else io.TextIOWrapper(io.BytesIO(typed.encode())))
    return shown


def test_ctrl_c_in_generate_prints_interrupted_on_a_line_of_its_own(demo_cache, demo_video, monkeypatch):
    interrupting_streamers(monkeypatch, at_token=6, answers={0})
    shown = terminal(monkeypatch)
    assert cli.main(["generate", "--video", str(demo_video), "--max-new-tokens", "16"]) == 130
    before, interrupted, after = shown.getvalue().partition("vamba-hf: interrupted")
    assert interrupted and after == "\n", shown.getvalue()[-2000:]
    partial = before.split("Prompt: Describe this video.\n", 1)[1]
    assert partial.strip() and partial.endswith("\n") and not partial.endswith("\n\n"), repr(partial)


def test_ctrl_c_during_an_answer_stops_it_and_the_chat_goes_on(demo_cache, demo_video, monkeypatch):
    interrupting_streamers(monkeypatch, at_token=6, answers={0})
    shown = terminal(monkeypatch, "What happens?\nWhat happens?\n")
    assert cli.main(["chat", "--video", str(demo_video), "--max-new-tokens", "12"]) == 0
    text = shown.getvalue()
    stopped = "[answer stopped; ask another question, or end the chat with Ctrl-C or Ctrl-D at the prompt]"
    assert f"\n{stopped}\n" in text, text[-2000:]
    after = text.split(stopped, 1)[1]
    assert after.startswith("\n> ") and "new tokens in " in after, after  # the second question is answered in full
    assert "vamba-hf: interrupted" not in text


def test_ctrl_c_at_the_prompt_ends_the_chat(demo_cache, demo_video, monkeypatch):
    import io

    class CtrlCAfterOneQuestion(io.BytesIO):
        def readline(self, *args):
            line = super().readline(*args)
            if not line:
                raise KeyboardInterrupt
            return line

    shown = terminal(monkeypatch, io.TextIOWrapper(CtrlCAfterOneQuestion(b"What happens?\n")))
    assert cli.main(["chat", "--video", str(demo_video), "--max-new-tokens", "4"]) == 0
    text = shown.getvalue()
    assert text.count("new tokens in ") == 1 and "vamba-hf: interrupted" not in text
    assert text.rstrip().endswith("(demo model with random weights: the answers above are meaningless by design)")


@pytest.mark.parametrize("temporal, merge, frames, tokens", [(2, 2, 8, 96), (3, 1, 12, 384)])
def test_the_input_summary_counts_frames_and_tokens_from_the_vision_config(temporal, merge, frames, tokens):
    from types import SimpleNamespace

    import torch

    inputs = {"video_grid_thw": torch.tensor([[4, 8, 12]]), "input_ids": torch.zeros(1, 7)}
    vision = SimpleNamespace(temporal_patch_size=temporal, spatial_merge_size=merge)
    assert cli._describe_inputs(inputs, vision) == f"video: {frames} frames, {tokens} visual tokens; prompt: 7 tokens"


def test_an_error_message_is_printed_on_one_line():
    from vamba_hf.errors import one_line

    assert one_line(ValueError("bad  value\n\n   - first\n - second ")) == "bad value; - first; - second"
    assert one_line(KeyError()) == "KeyError" and one_line("  ") == ""
