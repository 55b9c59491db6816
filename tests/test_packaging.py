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
    """Install nnserve without dependencies into a bare venv and run its console script."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    if _setuptools_can_build():
        _install_wheel(tmp_path, venv)
    else:  # an older setuptools here (the build isolates a newer one, from the index): install by hand
        _install_by_copy(venv)
    for args in (["classify", "shirt.png"], ["--help"], ["serve", "classify"]):
        result = subprocess.run([venv / "bin" / "nnserve", *args], capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nnserve: the serving extras are not installed (missing: grpcio")
        assert lines[0].endswith("pip install 'nnserve[serve]'")


def _setuptools_can_build() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    return all(Requirement(r).specifier.contains(setuptools.__version__) for r in required if "setuptools" in r)


def _install_wheel(tmp_path: Path, venv: Path) -> None:
    """Build nnserve's wheel offline (no build isolation) and pip-install it with --no-deps."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "services", source / "services", ignore=shutil.ignore_patterns("__pycache__"))
    (source / "training").mkdir()
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*build, "-w", str(wheels), str(source)], check=True, capture_output=True, cwd=tmp_path)
    install = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps"]
    subprocess.run([*install, "--no-index", *map(str, wheels.glob("*.whl"))], check=True, capture_output=True)


def _install_by_copy(venv: Path) -> None:
    """What the wheel install does: the packages into site-packages, the console script into bin."""
    (site,) = venv.glob("lib/python3*/site-packages")
    shutil.copytree(ROOT / "services", site / "services", ignore=shutil.ignore_patterns("__pycache__"))
    module, function = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["nnserve"].split(":")
    script = venv / "bin" / "nnserve"
    script.write_text(
        f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n"
    )
    script.chmod(0o755)


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


@pytest.mark.skipif(not list((ROOT / "docker/wheels").glob("*.whl")), reason="docker/wheels is empty")
def test_offline_wheels_when_present_hold_the_pinned_versions() -> None:
    """docker/wheels (filled by scripts/docker-e2e.sh) has the pinned version of every pin it has a
    wheel for, so the offline image build (WHEELS=local) can satisfy the constraints."""
    pinned = pins()
    present: dict[str, set[str]] = {}
    for wheel in (ROOT / "docker/wheels").glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        present.setdefault(canonical(name), set()).add(version)
    for name, versions in present.items():
        if name in pinned:
            assert pinned[name] in versions, (
                f"docker/wheels has {name} {sorted(versions)}, constraints pin {pinned[name]}"
            )
