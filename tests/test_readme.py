"""The README's quick start runs exactly as written.

The quick start is two commands: the first sets up (virtual environment, pip installs) and then runs the main job,
the second runs the tests. .ci/run executes both verbatim on a fresh machine; this test runs the main-job part of the
first command as written (its set-up steps are what the test's own environment already did), in a scratch folder that
sees the repository's examples/, with the interpreter running the tests first on PATH. When the package is not
installed (tests run with PYTHONPATH=src), `vamba-hf` is run as `python -m vamba_hf`, the same entry point.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

QUICKSTART_MARKER = "<!-- quickstart -->"
SETUP_PREFIXES = ("python -m venv", ". .venv/bin/activate", "pip install")


def quickstart_commands() -> list:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    after_marker = readme.split(QUICKSTART_MARKER, 1)[1]
    block = re.search(r"```bash\n(.*?)```", after_marker, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def main_job_steps() -> list:
    """The first command's steps after the set-up ones."""
    steps = [step.strip() for step in quickstart_commands()[0].split(" && ")]
    return [step for step in steps if not step.startswith(SETUP_PREFIXES)]


def shell_environment(cache: Path) -> tuple:
    environment = dict(os.environ, VAMBA_HF_CACHE=str(cache))
    bin_dir = str(Path(sys.executable).parent)
    environment["PATH"] = bin_dir + os.pathsep + environment.get("PATH", "")
    if shutil.which("vamba-hf", path=bin_dir):
        return environment, None
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), environment.get("PYTHONPATH")]))
    return environment, f"{sys.executable} -m vamba_hf"


def test_quickstart_is_two_commands_set_up_and_job_then_tests():
    commands = quickstart_commands()
    assert len(commands) == 2
    assert commands[0].startswith("python -m venv") and "pip install -e '.[video,test]'" in commands[0]
    assert any(step.startswith("vamba-hf generate --video") for step in main_job_steps())
    assert commands[1] == "python -m pytest -q tests"
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert QUICKSTART_MARKER in ci and 'bash -euo pipefail -c "$quickstart"' in ci  # CI runs both verbatim


def test_quickstart_runs_as_written(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(REPO / "examples")
    environment, vamba_hf_command = shell_environment(tmp_path / "cache")
    script = "\n".join(main_job_steps())
    if vamba_hf_command:
        script = re.sub(r"^vamba-hf ", vamba_hf_command + " ", script, flags=re.M)

    finished = subprocess.run(["bash", "-e", "-c", script], cwd=work, env=environment, capture_output=True,
                              text=True, timeout=300)  # a hang fails; speed is measured in benchmarks/, not here
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "DEMO model" in finished.stderr and "RANDOM weights" in finished.stderr
    assert "video: 16 frames" in finished.stderr
    assert finished.stdout.strip(), "no answer was streamed"


# -- the rest of the README: install commands that exist, snippets that run with what they say they need ------------


def code_blocks(language: str) -> list:
    return re.findall(rf"```{language}\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)


def test_install_commands_name_only_what_pip_can_find():
    """vamba-hf is not on PyPI: it is installed from the clone (-e .) or from a source URL, never by bare name."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for arguments in re.findall(r"pip install ((?:(?!&&|`|\n| #).)*)", readme):
        for requirement in re.findall(r"""'[^']*'|"[^"]*"|\S+""", arguments):
            if requirement.strip("'\"").startswith("vamba-hf"):
                assert "@ git+" in requirement, requirement
    assert "pip install -e '.[video]'" in readme


def test_snippets_do_not_need_accelerate():
    for block in code_blocks("python"):
        assert "device_map" not in block, block


def test_loading_snippets_run_with_remote_code_only(golden_dir, tmp_path):
    """The README's Python snippets (Auto classes, then the pipeline) on a converted folder, in a subprocess that
    cannot import vamba_hf from the source tree: only the folder's remote code runs."""
    from convert_helpers import make_source

    from vamba_hf.convert import convert_checkpoint
    from vamba_hf.demo import write_demo_video

    folder = tmp_path / "Vamba-Qwen2-VL-7B-hf"
    convert_checkpoint(make_source(golden_dir / "video_short", tmp_path / "official"), folder, log=lambda _: None)
    write_demo_video(tmp_path / "clip.mp4", num_frames=128, width=64, height=48)
    script = "\n".join(code_blocks("python")).replace("max_new_tokens=256", "max_new_tokens=4").replace(
        "max_new_tokens=128", "max_new_tokens=4")
    script += "\nimport sys\nassert 'vamba_hf' not in sys.modules\n"
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    environment["HF_HUB_OFFLINE"] = "1"
    environment["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    finished = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True,
                              text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert len(finished.stdout.strip().splitlines()) >= 1


# -- facts that change: each comes from one place (pyproject.toml, .ci/run, the Space's front matter) -------------


def readme_text() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10, where pytest itself depends on tomli
        import tomli as tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def requirements_by_name(lines) -> dict:
    from packaging.requirements import Requirement

    return {requirement.name.lower(): requirement for requirement in map(Requirement, lines)}


def gradio_pins() -> dict:
    space_readme = (REPO / "space" / "README.md").read_text(encoding="utf-8")
    return {
        "space/README.md sdk_version": re.search(r"^sdk_version: *(\S+)$", space_readme, re.M).group(1),
        ".ci/run": re.search(r'"gradio==([^"]+)"', (REPO / ".ci" / "run").read_text(encoding="utf-8")).group(1),
        **{f"README.md ({index})": pin for index, pin in enumerate(re.findall(r"gradio==(\S+?)[`\s]", readme_text()))},
        **{f"space/README.md ({index})": pin for index, pin in enumerate(re.findall(r"gradio==(\S+?)[`\s]",
                                                                                     space_readme))},
    }


def test_every_release_the_readme_names_is_one_pyproject_or_ci_pins():
    readme = readme_text()
    oldest_5x = re.search(r"^ *# ci-oldest-5x: *(\S+)$", (REPO / "pyproject.toml").read_text(), re.M).group(1)
    torch_pin = re.search(r"torch==(\S+)", quickstart_commands()[0]).group(1)
    gradio = set(gradio_pins().values())
    assert len(gradio) == 1, gradio_pins()
    named = set(re.findall(r"(?<![\w.])\d+\.\d+\.\d+(?![\w.])", readme))
    assert named <= {oldest_5x, torch_pin, *gradio}, f"releases the README names that nothing pins: " \
        f"{named - {oldest_5x, torch_pin, *gradio}} (name them by role, e.g. 'the newest release')"
    assert f"transformers 4.57.x and {oldest_5x} (the oldest 5.x the package claims)" in readme
    assert f"CI tests 4.57.x, {oldest_5x}, the newest release" in readme
    assert f"tested on {'.'.join(torch_pin.split('.')[:2])} |" in readme


def test_the_space_requires_what_the_package_requires():
    space = requirements_by_name(line for line in (REPO / "space" / "requirements.txt").read_text().splitlines()
                                 if line.strip() and not line.startswith("#"))
    package = pyproject()["project"]
    wanted = requirements_by_name([*package["dependencies"], *package["optional-dependencies"]["video"]])
    for name in set(space) & set(wanted) - {"pillow"}:
        assert space[name].specifier == wanted[name].specifier, (name, str(space[name]), str(wanted[name]))
    assert wanted["pillow"].specifier & space["pillow"].specifier == space["pillow"].specifier  # only narrower


def test_the_readme_lists_every_package_of_every_extra():
    described = dict(re.findall(r"`(\w+)` \(([^)]*)\)", " ".join(readme_text().split("Extras:", 1)[1]
                                                                 .split("\n\n", 1)[0].split())))
    for extra, requirements in pyproject()["project"]["optional-dependencies"].items():
        if extra == "bench":
            continue
        assert extra in described, f"the README's Extras sentence does not describe `{extra}`"
        for name in requirements_by_name(requirements):
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", described[extra]), \
                f"the `{extra}` extra installs {name}; the README does not say so: {described[extra]!r}"


def test_every_place_that_says_how_to_log_in_names_the_same_command(capsys):
    import pytest

    from vamba_hf import cli

    texts = {path.name: path.read_text(encoding="utf-8") for path in (REPO / "src" / "vamba_hf").glob("*.py")}
    texts["README.md"] = readme_text()
    with pytest.raises(SystemExit):
        cli.main(["push", "--help"])
    push_help = " ".join(capsys.readouterr().out.split())
    texts["vamba-hf push --help"] = push_help
    commands = {(name, command) for name, text in texts.items() for command in re.findall(r"`([^`]*login)`", text)}
    assert {command for _, command in commands} == {"hf auth login"}, commands
    assert "hf auth login" in push_help


def test_ci_runs_the_benchmark_smoke_tests_once():
    """The quick start's test line (verbatim: every test file) runs them; the other transformers lines skip them."""
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    body = ci.split("test_under() {", 1)[1].split("\n}\n", 1)[0]
    runs = [line.strip() for line in body.splitlines() if "pytest" in line]
    assert "python -m pytest -q tests --ignore=tests/test_benchmarks.py" in runs
    assert [run for run in runs if "test_benchmarks" not in run and " tests/" not in run] == []  # no other whole run
    assert quickstart_commands()[1] == "python -m pytest -q tests"
