"""The ``nnserve`` console script: says what to install when the serving extras are missing.

``pip install nnserve`` installs no dependencies (the extras choose them: ``serve`` for the services
and their clients, ``train`` for training). Without them every command would end in an ImportError
traceback; this entry point imports only the standard library until it knows the rest is there.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

# Top-level module -> the distribution (in the `serve` extra) that provides it.
SERVE_MODULES = {
    "grpc": "grpcio",
    "grpc_health": "grpcio-health-checking",
    "grpc_reflection": "grpcio-reflection",
    "grpc_status": "grpcio-status",
    "google.rpc": "googleapis-common-protos",
    "google.protobuf": "protobuf",
    "onnxruntime": "onnxruntime",
    "prometheus_client": "prometheus-client",
    "numpy": "numpy",
    "PIL": "pillow",
    "pydantic": "pydantic",
    "pydantic_settings": "pydantic-settings",
    "pydantic_core": "pydantic",
    "aiohttp": "aiohttp",
}
INSTALL = "pip install 'nnserve[serve]'"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``nnserve`` command, or explain in one line which extras to install."""
    try:
        from services.cli import main as cli_main

        return cli_main(argv)
    except ModuleNotFoundError as exc:
        name = exc.name or ""
        ours = [d for m, d in SERVE_MODULES.items() if f"{m}.".startswith(f"{name}.") or name.startswith(f"{m}.")]
        if not ours:
            raise
        names = ", ".join(_missing()) or ours[0]
        print(f"nnserve: the serving extras are not installed (missing: {names}); {INSTALL}", file=sys.stderr)
        return 2


def _missing() -> list[str]:
    """Every serving distribution whose module cannot be found, so one install fixes them all."""
    from importlib.util import find_spec

    missing: list[str] = []
    for module, distribution in SERVE_MODULES.items():
        try:
            found = find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found and distribution not in missing:
            missing.append(distribution)
    return missing


if __name__ == "__main__":
    raise SystemExit(main())
