"""``nnserve promote``: publish a model version under a new version number, without hand-editing.

A manifest's ``version`` must equal its directory's number (the repository refuses a mismatch, so
metrics, replies and logs never name a version the files do not claim). Copying ``classifier/1`` to
``classifier/2`` by hand therefore serves nothing; this command copies the directory, rewrites the
``version`` of every manifest in it (fp32 and precision variants), verifies the copy like serving
does, and only then renames it into place, so a service polling the repository never sees half a
version.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from services.core.errors import ModelLoadError, ModelNotFound
from services.core.manifest import Manifest
from services.core.repository import ModelRepository

__all__ = ["PromoteError", "promote"]


class PromoteError(Exception):
    """The promotion cannot be done (no such source, target taken, a source file fails its checks)."""


def promote(root: Path | str, name: str, source: int, target: int | None = None) -> tuple[int, list[str]]:
    """Copy ``name``/``source`` to ``name``/``target`` (default: one above the highest version)
    with each manifest's ``version`` rewritten; return the new version and its precisions."""
    repository = ModelRepository(root)
    try:
        precisions = repository.precisions(name, source)
        for precision in precisions or ["fp32"]:
            repository.resolve(name, source, precision)  # checksums and names, as serving checks them
    except (ModelNotFound, ModelLoadError) as exc:
        raise PromoteError(f"cannot promote {name}/{source}: {exc}") from None
    versions = repository.versions(name)
    target = versions[-1] + 1 if target is None else target
    if target < 1:
        raise PromoteError(f"target version {target}: versions are positive integers")
    model_dir = repository.root / name
    final = model_dir / str(target)
    if final.exists():
        raise PromoteError(
            f"{final} already exists; a version is never overwritten (next free version: {versions[-1] + 1})"
        )
    # A name that is not a number: the repository (and a polling service) ignores it until the rename.
    staging = model_dir / f".promote-{target}-{os.getpid()}"
    try:
        shutil.copytree(model_dir / str(source), staging)
        for path in sorted(staging.glob("manifest*.json")):
            data = json.loads(path.read_text())
            Manifest.model_validate(data)
            data["version"] = target
            path.write_text(json.dumps(data, indent=2) + "\n")
        os.rename(staging, final)  # atomic; fails if another promotion took the number meanwhile
    except OSError as exc:
        raise PromoteError(f"cannot write {final}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for precision in precisions:
        repository.resolve(name, target, precision)
    return target, precisions
