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
