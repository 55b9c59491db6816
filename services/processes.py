"""Starting service processes and waiting until they serve: one implementation for every caller.

``nnserve up``, the tests' helpers and the benchmarks all start services the same way: run
``python -m services.<name>`` with a ``--port-file``, and wait until the service writes it, which
it does once every model is loaded, warm and SERVING (with the ports it bound). A process that
exits first, or a deadline that passes, is an error naming the service.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


class LaunchError(RuntimeError):
    """A service exited, or did not report SERVING in time."""


@dataclass
class Launched:
    """A service process started by :func:`launch`; ``info`` is its port file once it serves."""

    name: str
    proc: subprocess.Popen[bytes]
    port_file: Path
    info: dict[str, Any] = field(default_factory=dict)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (drain) and wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def launch(
    module: str,
    args: Sequence[str],
    port_file: Path,
    *,
    name: str | None = None,
    prefix: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    output: IO[bytes] | None = None,
) -> Launched:
    """Start ``python -m module args --port-file port_file`` (after ``prefix``, e.g. taskset)."""
    port_file.unlink(missing_ok=True)
    command = [*prefix, sys.executable, "-m", module, *args, "--port-file", str(port_file)]
    stderr = subprocess.STDOUT if output is not None else None
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=stderr)
    return Launched(name or module.rsplit(".", 1)[-1], proc, port_file)


def wait_until_serving(services: Sequence[Launched], timeout: float) -> None:
    """Wait until every service has written its port file (filling ``info``).

    Raises :class:`LaunchError` as soon as one exits, or when ``timeout`` passes; the caller
    decides what to do with the others.
    """
    deadline = time.monotonic() + timeout
    pending = list(services)
    while pending:
        for service in list(pending):
            if service.port_file.exists():
                service.info = json.loads(service.port_file.read_text())
                pending.remove(service)
            elif service.proc.poll() is not None:
                raise LaunchError(f"{service.name} exited with code {service.proc.returncode} before serving")
        if pending and time.monotonic() > deadline:
            raise LaunchError(f"{', '.join(s.name for s in pending)} not serving after {timeout:.0f} s")
        if pending:
            time.sleep(0.05)
