"""RestoreService: protobuf -> numpy -> batcher -> protobuf."""

from __future__ import annotations

from grpc import aio

from services.core.convert import deadline_of, tensor_input, tensor_message
from services.core.deployment import ModelSlot
from services.core.errors import ModelNotFound
from services.core.images import encode_png
from services.proto.nnserve.v1 import restore_pb2, restore_pb2_grpc
from services.restore.model import RestorerModel


class RestoreServicer(restore_pb2_grpc.RestoreServiceServicer):
    def __init__(self, slot: ModelSlot[RestorerModel]) -> None:
        self.slot = slot

    async def Restore(
        self, request: restore_pb2.RestoreRequest, context: aio.ServicerContext
    ) -> restore_pb2.RestoreResponse:
        deployment = self.slot.current  # one version for the whole request, even across a reload
        model, version = deployment.view, deployment.number
        if request.model_version and request.model_version != version:
            raise ModelNotFound(
                f"model_version: {request.model_version} is not served here (serving version {version})"
            )
        tensor = tensor_input(request.tensor) if request.HasField("tensor") else None
        mask_tensor = tensor_input(request.mask_tensor) if request.HasField("mask_tensor") else None
        inputs = model.batch(list(request.images), tensor, list(request.masks), mask_tensor)
        outputs = await deployment.batcher.submit(inputs, deadline_of(context))
        result = model.postprocess(inputs[model.image_input], outputs[model.output_name])
        response = restore_pb2.RestoreResponse(model_name=model.manifest.name, model_version=version)
        as_tensor = request.output == restore_pb2.RESTORE_OUTPUT_TENSOR
        if as_tensor:
            response.tensor.CopyFrom(tensor_message(result.images))
        for i, (score, flag) in enumerate(zip(result.anomaly_scores.tolist(), result.anomalous.tolist(), strict=True)):
            png = b"" if as_tensor else encode_png(result.images[i])
            response.restorations.add(png=png, anomaly_score=score, anomalous=flag)
        return response
