"""House style is checked by the test suite too: ruff everywhere, mypy on the services."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.skipif(shutil.which("ruff") is None and not (ROOT / ".venv/bin/ruff").exists(), reason="ruff missing")
def test_ruff() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "services", "training", "tests", "tools", "scripts", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


def test_mypy_on_the_services() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy", "services"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
