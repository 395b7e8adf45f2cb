"""The README's quick start runs exactly as written.

The set-up lines (virtual environment, pip installs) are what .ci/run does before the tests; this test runs every
other line of the quick-start block in a shell, in a scratch folder that sees the repository's examples/, with the
interpreter running the tests first on PATH. When the package is not installed (tests run with PYTHONPATH=src),
`vamba-hf` is run as `python -m vamba_hf`, the same entry point.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO

QUICKSTART_MARKER = "<!-- quickstart -->"
SETUP_PREFIXES = ("python -m venv", "pip install")
TIME_LIMIT_S = 60


def quickstart_lines() -> list:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    after_marker = readme.split(QUICKSTART_MARKER, 1)[1]
    block = re.search(r"```bash\n(.*?)```", after_marker, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def runnable_lines() -> list:
    return [line for line in quickstart_lines() if not line.startswith(SETUP_PREFIXES)]


def shell_environment(cache: Path) -> tuple:
    environment = dict(os.environ, VAMBA_HF_CACHE=str(cache))
    bin_dir = str(Path(sys.executable).parent)
    environment["PATH"] = bin_dir + os.pathsep + environment.get("PATH", "")
    if shutil.which("vamba-hf", path=bin_dir):
        return environment, None
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), environment.get("PYTHONPATH")]))
    return environment, f"{sys.executable} -m vamba_hf"


def test_quickstart_block_sets_up_then_runs_the_demo():
    lines = quickstart_lines()
    assert lines[0].startswith("python -m venv") and any("pip install -e '.[video,test]'" in l for l in lines)
    assert any(line.startswith("vamba-hf generate --video") for line in runnable_lines())
    assert "python -m pytest -q tests" in (REPO / "README.md").read_text(encoding="utf-8")


def test_quickstart_runs_as_written(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(REPO / "examples")
    environment, vamba_hf_command = shell_environment(tmp_path / "cache")
    script = "\n".join(runnable_lines())
    if vamba_hf_command:
        script = re.sub(r"^vamba-hf ", vamba_hf_command + " ", script, flags=re.M)

    started = time.perf_counter()
    finished = subprocess.run(["bash", "-e", "-c", script], cwd=work, env=environment, capture_output=True,
                              text=True, timeout=300)
    elapsed = time.perf_counter() - started
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "DEMO model" in finished.stderr and "RANDOM weights" in finished.stderr
    assert "video: 16 frames" in finished.stderr
    assert finished.stdout.strip(), "no answer was streamed"
    assert elapsed < TIME_LIMIT_S, f"the quick start took {elapsed:.0f} s on this machine"
