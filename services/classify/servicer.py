"""ClassifyService: protobuf -> numpy -> batcher -> protobuf. Logic lives in model.py and core."""

from __future__ import annotations

from grpc import aio

from services.classify.model import ClassifierModel
from services.core.convert import deadline_of, tensor_input
from services.core.dataplane import DataPlane
from services.core.images import off_loop
from services.proto.nnserve.v1 import classify_pb2, classify_pb2_grpc


class ClassifyServicer(classify_pb2_grpc.ClassifyServiceServicer):
    def __init__(self, plane: DataPlane, model_name: str, default_top_k: int) -> None:
        self.plane = plane
        self.model_name = model_name
        self.default_top_k = default_top_k

    async def Classify(
        self, request: classify_pb2.ClassifyRequest, context: aio.ServicerContext
    ) -> classify_pb2.ClassifyResponse:
        # One version for the whole request, even across a reload.
        deployment = self.plane.deployment(request.model_name or self.model_name, request.model_version)
        model: ClassifierModel = deployment.view
        version = deployment.version
        k = model.top_k(request.top_k, self.default_top_k)
        tensor = tensor_input(request.tensor) if request.HasField("tensor") else None
        if request.images:
            batch = await off_loop(model.batch, list(request.images), tensor)
        else:  # raw tensors cost microseconds: a thread hop would cost more than it saves
            batch = model.batch([], tensor)
        outputs = await self.plane.infer(deployment, {model.input_name: batch}, deadline_of(context))
        result = model.postprocess(outputs, k)
        return model.replies.reply(model.manifest.name, version, result)
