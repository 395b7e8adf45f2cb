"""The Space folder as the Hub runs it, checked without gradio or a browser: its front matter names a Gradio app
that exists, and its requirements.txt installs every module the app and the vamba_hf package (copied beside it)
import. tests/test_space.py drives the app itself in a browser."""

import pytest
from conftest import REPO
from huggingface_hub.repocard import metadata_load
from import_check import missing_imports
from packaging.requirements import Requirement

SPACE = REPO / "space"
# gradio comes with the Space's sdk_version; vamba_hf is the package folder copied beside app.py.
PROVIDED_BESIDE_THE_REQUIREMENTS = ["gradio", "vamba-hf"]


def space_requirements() -> list:
    lines = (SPACE / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_front_matter_names_a_gradio_app_that_exists():
    metadata = metadata_load(SPACE / "README.md")
    assert metadata["sdk"] == "gradio"
    assert (SPACE / metadata["app_file"]).is_file()
    assert metadata["sdk_version"].count(".") == 2
    assert metadata["title"] and metadata["short_description"]


def test_requirements_install_what_the_app_and_the_package_import():
    requirements = space_requirements()
    assert all(Requirement(line) for line in requirements)
    assert not any(Requirement(line).name == "gradio" for line in requirements), "gradio comes with sdk_version"
    sources = {"app.py": (SPACE / "app.py").read_text()}
    sources.update({f"vamba_hf/{path.name}": path.read_text() for path in (REPO / "src" / "vamba_hf").glob("*.py")})
    assert not missing_imports(sources, requirements, provided=PROVIDED_BESIDE_THE_REQUIREMENTS)
    without_av = [line for line in requirements if Requirement(line).name != "av"]
    assert "av" in missing_imports(sources, without_av, provided=PROVIDED_BESIDE_THE_REQUIREMENTS)["vamba_hf/demo.py"]


@pytest.mark.parametrize("name", ["app.py", "requirements.txt", "README.md"])
def test_the_space_folder_holds(name):
    assert (SPACE / name).is_file()


# -- the app's answers to bad input, with a stand-in for gradio -------------------------------------------------


class GradioError(Exception):
    """gradio's `gr.Error`: its message is what the page shows."""


@pytest.fixture
def app(monkeypatch):
    import importlib.util
    import sys
    import types

    monkeypatch.setitem(sys.modules, "gradio", types.SimpleNamespace(Error=GradioError, Blocks=object))
    spec = importlib.util.spec_from_file_location("vamba_space_app", SPACE / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ask(app, video=None, image=None, question="What happens?"):
    import types

    from vamba_hf.tiny import build_tiny_processor

    loaded = types.SimpleNamespace(processor=build_tiny_processor(), model=types.SimpleNamespace(device="cpu"))
    calls = []
    with pytest.raises(GradioError) as error:
        next(app.answer(loaded, video, image, question, 4, lambda *args, **kwargs: calls.append(args)))
    return str(error.value), calls


@pytest.mark.parametrize("content", [b"not a video at all" * 100, b""])
def test_the_apps_errors_name_the_uploaded_file_not_the_servers_paths(app, tmp_path, content):
    upload = tmp_path / "gradio" / "5f3a9c0d1e" / "my holiday.mp4"  # where Gradio keeps an upload
    upload.parent.mkdir(parents=True)
    upload.write_bytes(content)
    message, _ = ask(app, video=str(upload))
    assert "my holiday.mp4" in message
    assert str(tmp_path) not in message and "5f3a9c0d1e" not in message and "/" not in message, message


def test_the_apps_question_has_the_shared_maximum(app, tmp_path):
    from vamba_hf.chat import MAX_QUESTION_CHARS

    message, progress_calls = ask(app, image=str(tmp_path / "unread.png"), question="w" * (MAX_QUESTION_CHARS + 1))
    assert f"the most is {MAX_QUESTION_CHARS:,}" in message
    assert not progress_calls  # refused before anything is read or decoded
    assert "max_length=MAX_QUESTION_CHARS" in (SPACE / "app.py").read_text()  # the page's box says so too


@pytest.mark.parametrize("value", ["int7", "INT8", "fp8"])
def test_the_apps_quantize_variable_refuses_a_name_it_does_not_know(app, monkeypatch, value):
    from vamba_hf.quantization import QUANTIZATIONS

    monkeypatch.setenv("VAMBA_QUANTIZE", value)
    with pytest.raises(ValueError) as error:
        app.load(None)
    assert str(error.value) == (f"VAMBA_QUANTIZE={value!r}: give one of {', '.join(QUANTIZATIONS)}, or leave it "
                                f"unset.")


@pytest.mark.parametrize("value, expected", [("int8", "int8"), (" bnb-nf4 ", "bnb-nf4"), ("", None)])
def test_the_apps_quantize_variable_reaches_the_loader(app, monkeypatch, value, expected):
    import types

    calls = []
    loaded = types.SimpleNamespace(processor=types.SimpleNamespace(video_sampling=types.SimpleNamespace(num_frames=8)))
    monkeypatch.setattr(app, "load_model_and_processor", lambda name, **kwargs: calls.append((name, kwargs)) or loaded)
    monkeypatch.setenv("VAMBA_QUANTIZE", value)
    assert app.load("someone/model") == (loaded, 8)
    assert calls == [("someone/model", {"quantization": expected})]
