"""Shared fixtures. The golden fixtures (the original implementation's outputs) live in ../shared/golden beside
the checkout; VAMBA_GOLDEN_DIR points elsewhere. Without them the parity tests skip, loudly."""

import os
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("VAMBA_GOLDEN_DIR", REPO.parent / "shared" / "golden"))
GOLDEN_CASES = ("video_short", "video_long", "image")


def golden_cases():
    return list(GOLDEN_CASES)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN_DIR / GOLDEN_CASES[0] / "config.json").is_file():
        message = (f"GOLDEN FIXTURES MISSING at {GOLDEN_DIR}: parity with the original implementation was NOT "
                   f"checked. Put ../shared/golden beside the checkout or set VAMBA_GOLDEN_DIR.")
        warnings.warn(message)
        pytest.skip(message)
    return GOLDEN_DIR


def pytest_terminal_summary(terminalreporter):
    if not (GOLDEN_DIR / GOLDEN_CASES[0] / "config.json").is_file():
        terminalreporter.write_line(f"WARNING: golden fixtures missing at {GOLDEN_DIR}; parity tests were skipped.",
                                    red=True)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
