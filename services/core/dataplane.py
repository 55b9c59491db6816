"""The data plane: one place that resolves a model and version and submits work to it.

Every transport (the typed gRPC APIs, the Open Inference Protocol, HTTP) only converts messages
and calls this, as MLServer's and KServe's data planes do, so model lookup, ``model_version``
checks, readiness and statistics cannot drift between them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from services.core import logs
from services.core.deployment import Deployment, ModelSlot
from services.core.errors import ModelNotFound, shorten


class DataPlane:
    """The models of one service process, by name; each name serves one version at a time."""

    def __init__(self, slots: Iterable[ModelSlot[Any]]) -> None:
        self.slots: dict[str, ModelSlot[Any]] = {slot.current.name: slot for slot in slots}

    @property
    def names(self) -> list[str]:
        return sorted(self.slots)

    def deployment(self, name: str, version: int | str | None = None) -> Deployment[Any]:
        """The deployment serving ``name`` now; ``version`` (0, '' or None: any) must be the one served."""
        slot = self.slots.get(name)
        if slot is None:
            raise ModelNotFound(f"model_name: unknown model {shorten(name)} (served here: {self.names})", model=name)
        deployment = slot.current
        if version not in (None, 0, "") and str(version) != str(deployment.version):
            raise ModelNotFound(
                f"model_version: model {shorten(name)} has no version {shorten(str(version))} here "
                f"(serving version {deployment.version})",
                model=name,
                version=str(version),
            )
        return deployment

    def ready(self, name: str | None = None, version: str = "") -> bool:
        """Whether ``name`` (default: every model) serves, and accepts work, at ``version`` ('' any)."""
        if name is None:
            return all(slot.current.batcher.accepting for slot in self.slots.values())
        slot = self.slots.get(name)
        if slot is None or version not in ("", str(slot.current.version)):
            return False
        return slot.current.batcher.accepting

    @staticmethod
    async def infer(
        deployment: Deployment[Any], inputs: Mapping[str, np.ndarray], deadline: float | None
    ) -> dict[str, np.ndarray]:
        """Run ``inputs`` (validated, batch-first) through the deployment's batcher."""
        logs.note_model(deployment.name, deployment.version)  # for the call's log lines and span
        return await deployment.batcher.submit(inputs, deadline)
