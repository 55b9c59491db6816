"""Packaging: a base install (no extras) says what to install instead of an ImportError traceback,
and constraints/serve.txt pins every serving dependency within pyproject's ranges."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.helpers import ROOT

CONSTRAINTS = ROOT / "constraints" / "serve.txt"


def pins() -> dict[str, str]:
    lines = [ln.strip() for ln in CONSTRAINTS.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return {canonical(name): version for name, version in (ln.split("==") for ln in lines)}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_a_base_install_says_which_extras_to_install(tmp_path: Path) -> None:
    """Build the wheel, install it without dependencies into a bare venv, run the console script."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "services", source / "services", ignore=shutil.ignore_patterns("__pycache__"))
    (source / "training").mkdir()
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*build, "-w", str(wheels), str(source)], check=True, capture_output=True, cwd=tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    install = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps"]
    subprocess.run([*install, "--no-index", *map(str, wheels.glob("*.whl"))], check=True, capture_output=True)
    for args in (["classify", "shirt.png"], ["--help"], ["serve", "classify"]):
        result = subprocess.run([venv / "bin" / "nnserve", *args], capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nnserve: the serving extras are not installed (missing: grpcio")
        assert lines[0].endswith("pip install 'nnserve[serve]'")


def test_the_console_script_is_the_launcher() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["nnserve"] == "services.launcher:main"
    # The launcher imports nothing outside the standard library before it has checked.
    source = (ROOT / "services" / "launcher.py").read_text()
    top_imports = re.findall(r"^(?:from|import) (\S+)", source, flags=re.M)
    assert set(top_imports) <= {"__future__", "sys", "collections.abc"}, top_imports


def test_constraints_pin_every_serving_dependency_within_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = pins()
    for text in project["optional-dependencies"]["serve"]:
        requirement = Requirement(text)
        name = canonical(requirement.name)
        assert name in pinned, f"{name} (serve extra) is not pinned in {CONSTRAINTS.name}"
        assert requirement.specifier.contains(pinned[name]), f"{name}=={pinned[name]} is outside {requirement}"
    assert "setuptools" in pinned  # the build backend, for offline image builds
    assert "torch" not in pinned and "nnserve" not in pinned
    # The closure: each pinned distribution's own requirements are pinned too (checked where the
    # pinned version is the one installed here, so its metadata is at hand).
    from importlib import metadata

    for name, version in pinned.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            assert canonical(requirement.name) in pinned, f"{name} needs {requirement.name}, which is not pinned"


def test_the_images_and_the_offline_wheels_use_the_constraints() -> None:
    dockerfile = (ROOT / "docker/serve.Dockerfile").read_text()
    assert "COPY constraints/serve.txt /constraints/serve.txt" in dockerfile
    assert "PIP_CONSTRAINT=/constraints/serve.txt" in dockerfile
    e2e = (ROOT / "scripts/docker-e2e.sh").read_text()
    download = next(ln for ln in e2e.splitlines() if "pip download" in ln)
    assert "-c constraints/serve.txt" in download  # the offline wheels match what the image pins


@pytest.mark.skipif(not (ROOT / "docker/wheels").is_dir(), reason="no docker/wheels")
def test_offline_wheels_when_present_match_the_pins() -> None:
    """docker/wheels (filled by scripts/docker-e2e.sh) holds the pinned version of each pin it has."""
    pinned = pins()
    for wheel in (ROOT / "docker/wheels").glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        if canonical(name) in pinned:
            assert pinned[canonical(name)] == version, f"{wheel.name}: constraints pin {pinned[canonical(name)]}"
