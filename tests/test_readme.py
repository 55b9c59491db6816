"""The README's "Calling the services" examples run as written against the shipped models.

Every ``$ nnserve ...`` line of the section's shell blocks and its Python snippet run in a fresh
working directory holding only what a checkout ships (examples/), against classify, restore and
generate started on models/. The only change made to a command is the address: the services
listen on free ports here instead of 50051-50053. Output lines the README shows must match the
command's output, numbers aside (they move when a model is retrained); lines a terminal alone
shows (the progress bar) are left out.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import ROOT, ServiceProcess, start_service

pytestmark = pytest.mark.timeout(600)

DEFAULT_ADDRESSES = {"classify": "127.0.0.1:50051", "restore": "127.0.0.1:50052", "generate": "127.0.0.1:50053"}
TERMINAL_ONLY = re.compile(r"^\s+sampling \[")


@dataclass
class Example:
    command: str
    expected: list[str] = field(default_factory=list)


def section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def shell_examples() -> list[Example]:
    examples: list[Example] = []
    for block in re.findall(r"```sh\n(.*?)```", section("Calling the services"), flags=re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                examples.append(Example(line[2:]))
            elif examples and line.strip() and not line.lstrip().startswith("#"):
                examples[-1].expected.append(line)
    return examples


def python_snippet() -> str:
    (snippet,) = re.findall(r"```python\n(.*?)```", section("Calling the services"), flags=re.S)
    return snippet


def pattern(line: str) -> re.Pattern[str]:
    """The line with every number free: '95.9%' matches '96.1%', 'Bag' matches only 'Bag'."""
    parts = re.split(r"-?\d+(?:\.\d+)?", line.strip())
    return re.compile(r"-?\d+(?:\.\d+)?".join(re.escape(p) for p in parts))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProcess]]:
    """classify, restore and generate on the shipped models, with their default settings."""
    work = tmp_path_factory.mktemp("readme-services")
    servers: dict[str, ServiceProcess] = {}
    try:
        for name in DEFAULT_ADDRESSES:
            servers[name] = start_service(f"services.{name}", ROOT / "models", work, "--metrics-port", "none")
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture()
def checkout(tmp_path: Path) -> Path:
    """A fresh working directory with what a checkout ships for the examples, nothing made before."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("*.py"))
    return tmp_path


def on_free_ports(command: str, live: dict[str, ServiceProcess]) -> str:
    """The README command, pointed at the services started here instead of the default ports."""
    for name, address in DEFAULT_ADDRESSES.items():
        command = command.replace(address, live[name].address)
    words = command.split()
    if words[0] == "nnserve" and words[1] in DEFAULT_ADDRESSES and "--address" not in words:
        code = command.split("#")[0].rstrip()
        command = f"{code} --address {live[words[1]].address}"
    return command


def test_the_section_has_what_this_test_runs() -> None:
    commands = [e.command.split()[:2] for e in shell_examples()]
    assert ["nnserve", "classify"] in commands and ["nnserve", "health"] in commands
    assert ["nnserve", "restore"] in commands and ["nnserve", "generate"] in commands
    assert "ClassifyClient" in python_snippet()


@pytest.mark.parametrize("example", shell_examples(), ids=lambda e: e.command.split("#")[0].strip()[:60])
def test_shell_example(example: Example, live: dict[str, ServiceProcess], checkout: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNSERVE_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's nnserve
    command = on_free_ports(example.command, live)
    result = subprocess.run(["bash", "-c", command], cwd=checkout, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, f"$ {command}\n{result.stdout}{result.stderr}"
    shown = [line for line in example.expected if not TERMINAL_ONLY.match(line)]
    got = result.stdout.strip().splitlines()
    assert len(got) == len(shown), f"$ {command}\nREADME shows:\n{chr(10).join(shown)}\ngot:\n{result.stdout}"
    for want, line in zip(shown, got, strict=True):
        assert pattern(want).fullmatch(line.strip()), f"$ {command}\nREADME shows: {want}\ngot:          {line}"
    for word in command.split("#")[0].split():  # what the command says it writes, it writes
        if word.endswith(".png") and word.startswith(("restored/", "dresses", "gan")):
            assert (checkout / word).is_file(), word
    if " --out restored/" in command:
        assert list((checkout / "restored").glob("*.restored.png"))


def test_python_snippet(live: dict[str, ServiceProcess], checkout: Path) -> None:
    snippet = python_snippet().replace(DEFAULT_ADDRESSES["classify"], live["classify"].address)
    result = subprocess.run([sys.executable, "-c", snippet], cwd=checkout, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 8  # the second call: 8 blank images, one line each
    assert all(line.startswith("[('") and line.endswith(("True", "False")) for line in lines), lines
