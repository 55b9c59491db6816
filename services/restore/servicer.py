"""RestoreService: protobuf -> numpy -> batcher -> protobuf."""

from __future__ import annotations

from grpc import aio

from services.core.convert import deadline_of, tensor_input, tensor_message
from services.core.dataplane import DataPlane
from services.core.errors import InvalidInput
from services.core.images import encode_png, off_loop
from services.proto.nnserve.v1 import restore_pb2, restore_pb2_grpc
from services.restore.model import Restored, RestorerModel


class RestoreServicer(restore_pb2_grpc.RestoreServiceServicer):
    def __init__(self, plane: DataPlane, model_name: str) -> None:
        self.plane = plane
        self.model_name = model_name

    async def Restore(
        self, request: restore_pb2.RestoreRequest, context: aio.ServicerContext
    ) -> restore_pb2.RestoreResponse:
        # One version for the whole request, even across a reload.
        deployment = self.plane.deployment(self.model_name, request.model_version)
        model: RestorerModel = deployment.view
        version = deployment.version
        if request.output not in restore_pb2.RestoreOutput.values():
            known = ", ".join(restore_pb2.RestoreOutput.keys())
            raise InvalidInput("output", f"unknown value {request.output} (known: {known})")
        tensor = tensor_input(request.tensor) if request.HasField("tensor") else None
        mask_tensor = tensor_input(request.mask_tensor) if request.HasField("mask_tensor") else None
        if request.images or request.masks:
            inputs = await off_loop(model.batch, list(request.images), tensor, list(request.masks), mask_tensor)
        else:  # raw tensors cost microseconds: a thread hop would cost more than it saves
            inputs = model.batch([], tensor, [], mask_tensor)
        outputs = await self.plane.infer(deployment, inputs, deadline_of(context))
        result = model.postprocess(inputs[model.image_input], outputs[model.output_name])
        as_tensor = request.output == restore_pb2.RESTORE_OUTPUT_TENSOR
        if as_tensor:
            return _response(model.manifest.name, version, result, as_tensor)
        # PNG encoding costs ~0.1 ms an image: off the event loop, like decoding.
        return await off_loop(_response, model.manifest.name, version, result, as_tensor)


def _response(name: str, version: int, result: Restored, as_tensor: bool) -> restore_pb2.RestoreResponse:
    response = restore_pb2.RestoreResponse(model_name=name, model_version=version)
    if as_tensor:
        response.tensor.CopyFrom(tensor_message(result.images))
    for i, (score, flag) in enumerate(zip(result.anomaly_scores.tolist(), result.anomalous.tolist(), strict=True)):
        png = b"" if as_tensor else encode_png(result.images[i])
        response.restorations.add(png=png, anomaly_score=score, anomalous=flag)
    return response
