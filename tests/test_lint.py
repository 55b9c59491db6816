"""House style is checked by the test suite too: ruff everywhere, mypy on the services."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT

PYTHON_DIRS = ("services", "training", "tests", "tools", "scripts", "benchmarks")


@pytest.mark.skipif(shutil.which("ruff") is None and not (ROOT / ".venv/bin/ruff").exists(), reason="ruff missing")
def test_ruff() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", *PYTHON_DIRS],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


@pytest.mark.skipif(shutil.which("ruff") is None and not (ROOT / ".venv/bin/ruff").exists(), reason="ruff missing")
def test_ruff_format() -> None:
    """The code is as ``ruff format`` writes it (a file that drifted once went unnoticed for weeks)."""
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", *PYTHON_DIRS],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_benchmarks_page_carries_the_hand_written_reading() -> None:
    """BENCHMARKS.md is generated; its prose comes from benchmarks/analysis.md, so an edit made to the
    page alone would be lost at the next run (it happened once)."""
    page = (ROOT / "BENCHMARKS.md").read_text()
    analysis = (ROOT / "benchmarks" / "analysis.md").read_text()
    assert analysis.strip() in page, "edit benchmarks/analysis.md, then regenerate BENCHMARKS.md"


def test_mypy_on_the_services() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy", "services"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
