"""``nnserve.model.v1.ModelInfo``: the model card's facts of every model a service serves.

Every server registers it (:class:`~services.core.server.GrpcServer` adds it to the service), so a
client of classify, restore or generate asks the same way what it is talking to: task, labels,
metrics, training provenance, checksum, version, parameter count and precision variant. The facts
come from the manifest of the version each slot serves now (the file serving verified), never from
MODEL_CARD.md prose. The same facts, as strings, fill the Open Inference Protocol's places for them:
Triton's ``ModelConfig.parameters`` (gRPC and REST) and a ``parameters`` object in the REST model
metadata (see :func:`card_parameters`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from google.protobuf import struct_pb2
from grpc import aio

from services.core.dataplane import DataPlane
from services.core.deployment import Deployment, ModelSlot
from services.core.errors import InvalidInput, shorten
from services.core.manifest import TensorSpec
from services.core.repository import ModelRepository
from services.proto.nnserve.model.v1 import model_info_pb2 as pb
from services.proto.nnserve.model.v1 import model_info_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelInfo"].full_name


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    # Through JSON: a manifest holds JSON values, and Struct takes nothing else (tuples become lists).
    message.update(json.loads(json.dumps(values)))
    return message


def _tensor(spec: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(name=spec.name, dtype=spec.dtype, shape=spec.shape, range=list(spec.range or ()))


def model_card(deployment: Deployment[Any], precisions: Iterable[str] = ()) -> pb.ModelCard:
    """The card of a loaded deployment, from its verified manifest."""
    manifest = deployment.manifest
    card = pb.ModelCard(
        name=deployment.name,
        version=str(deployment.version),
        task=manifest.task,
        labels=manifest.labels,
        metrics=_struct(manifest.metrics),
        sha256=manifest.sha256,
        parameters=manifest.parameters,
        precision=manifest.precision,
        precisions=list(precisions) or [manifest.precision],
        opset=manifest.opset,
        inputs=[_tensor(s) for s in manifest.inputs],
        outputs=[_tensor(s) for s in manifest.outputs],
        preprocessing=manifest.preprocessing.description,
        extra=_struct(manifest.extra),
        provider=deployment.runtime.provider,
    )
    training = manifest.training
    if training is not None:
        known = set(type(training).model_fields)
        card.training.CopyFrom(
            pb.Training(
                command=training.command,
                seed=training.seed,
                data=training.data,
                epochs=training.epochs,
                duration_s=training.duration_s,
                hardware=training.hardware,
                torch_version=training.torch_version,
                extra=_struct({k: v for k, v in training.model_dump(mode="json").items() if k not in known}),
            )
        )
    if manifest.ood is not None:
        ood = manifest.ood
        card.ood.CopyFrom(
            pb.OodCalibration(
                score=ood.score,
                threshold=ood.threshold,
                higher_is_more_ood=ood.higher_is_more_ood,
                calibration=ood.calibration,
            )
        )
    return card


def card_parameters(deployment: Deployment[Any]) -> dict[str, str]:
    """The card's facts as flat string parameters (Triton's ``ModelConfig.parameters`` take strings):
    scalars as text, lists and objects as compact JSON; ``training.*`` for the provenance."""
    manifest = deployment.manifest
    compact = {"separators": (",", ":")}
    facts: dict[str, str] = {
        "task": manifest.task,
        "version": str(deployment.version),
        "sha256": manifest.sha256,
        "precision": manifest.precision,
        "parameters": str(manifest.parameters),
        "opset": str(manifest.opset),
    }
    if manifest.labels:
        facts["labels"] = json.dumps(manifest.labels, **compact)  # type: ignore[arg-type]
    if manifest.metrics:
        facts["metrics"] = json.dumps(manifest.metrics, **compact)  # type: ignore[arg-type]
    if manifest.training is not None:
        for key, value in manifest.training.model_dump(mode="json").items():
            facts[f"training.{key}"] = value if isinstance(value, str) else json.dumps(value, **compact)  # type: ignore[arg-type]
    return facts


class ModelInfoServicer(pb_grpc.ModelInfoServicer):
    """ModelInfo over the slots of one service process (each serves one version at a time)."""

    def __init__(self, slots: Iterable[ModelSlot[Any]]) -> None:
        self.slots = list(slots)
        self.plane = DataPlane(self.slots)

    def _card(self, deployment: Deployment[Any]) -> pb.ModelCard:
        slot = self.plane.slots[deployment.name]
        try:
            precisions = ModelRepository(slot.settings.model_repository).precisions(deployment.name, deployment.version)
        except Exception:  # a repository that changed under us: the served variant is still true
            precisions = []
        return model_card(deployment, precisions)

    async def DescribeModel(self, request: pb.DescribeModelRequest, context: aio.ServicerContext) -> pb.ModelCard:
        name = request.name
        if not name:
            if len(self.plane.names) != 1:
                raise InvalidInput("name", f"this server serves several models; name one of {self.plane.names}")
            name = self.plane.names[0]
        version = request.version.strip()
        if version and not version.isdigit():
            raise InvalidInput("version", f"{shorten(request.version)} is not a version number")
        return self._card(self.plane.deployment(name, version))

    async def ListModels(self, request: pb.ListModelsRequest, context: aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self._card(self.plane.deployment(name)) for name in self.plane.names])


def add_to_server(servicer: ModelInfoServicer, server: Any) -> None:
    pb_grpc.add_ModelInfoServicer_to_server(servicer, server)
