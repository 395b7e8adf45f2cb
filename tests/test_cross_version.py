"""A folder saved or converted under one transformers line, loaded under another, reads the same settings and gives
the same inputs, logits and greedy ids, for a video and for a large image.

tests/cross_version_writer.py, run under each line CI tests, writes its folders and what it computed from them into
`$VAMBA_CROSS_VERSION_DIR/<transformers version>/`; `$VAMBA_CROSS_VERSION_LINES` names the versions that must be
there. Here, under each line, every other line's folders are loaded and compared. Without `$VAMBA_CROSS_VERSION_DIR`
(a local run) the tests skip, loudly; with it, a line's missing folder fails.
"""

import functools
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from cross_version_writer import CASES, COMPLETE, ENV, FOLDERS, compute, load_folder, settings
from safetensors.torch import load_file

LINES_ENV = "VAMBA_CROSS_VERSION_LINES"
ROOT = Path(os.environ[ENV]) if os.environ.get(ENV) else None
NO_OTHER_LINE = "no-other-line"


def other_lines() -> list:
    """The transformers versions whose folders this line loads: those written and those required."""
    if ROOT is None:
        return [NO_OTHER_LINE]
    written = {path.name for path in ROOT.iterdir() if path.is_dir()} if ROOT.is_dir() else set()
    required = set(os.environ.get(LINES_ENV, "").split())
    return sorted((written | required) - {transformers.__version__}) or [NO_OTHER_LINE]


def line_folder(line: str) -> Path:
    if ROOT is None:
        message = (f"CROSS-VERSION CHECK NOT RUN: {ENV} is not set, so no folder written under another transformers "
                   f"line was loaded. Run tests/cross_version_writer.py under each line with {ENV} set (as .ci/run "
                   f"does), then these tests.")
        warnings.warn(message)
        pytest.skip(message)
    if line == NO_OTHER_LINE:
        pytest.fail(f"{ENV}={ROOT} holds no folder written under a transformers line other than this one "
                    f"({transformers.__version__}).")
    folder = ROOT / line
    if not (folder / COMPLETE).is_file():
        pytest.fail(f"{folder} is missing or incomplete: tests/cross_version_writer.py did not finish under "
                    f"transformers {line}.")
    return folder


@functools.lru_cache(maxsize=2)
def loaded(folder: Path) -> tuple:
    return load_folder(folder)


@pytest.mark.parametrize("name", FOLDERS)
@pytest.mark.parametrize("line", other_lines())
def test_settings_read_the_same(line, name):
    folder = line_folder(line)
    expected = json.loads((folder / "expected" / f"{name}-settings.json").read_text())
    assert json.loads(json.dumps(settings(*loaded(folder / name)))) == expected


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", FOLDERS)
@pytest.mark.parametrize("line", other_lines())
def test_inputs_logits_and_greedy_ids_are_the_same(line, name, case):
    folder = line_folder(line)
    expected = load_file(str(folder / "expected" / f"{name}-{case}.safetensors"))
    actual = compute(*loaded(folder / name), case, folder / "inputs")
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=0, msg=lambda message: f"{key}: {message}")
