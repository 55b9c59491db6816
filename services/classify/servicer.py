"""ClassifyService: protobuf -> numpy -> batcher -> protobuf. Logic lives in model.py and core."""

from __future__ import annotations

from grpc import aio

from services.classify.model import ClassifierModel
from services.core.batching import DynamicBatcher
from services.core.convert import deadline_of, tensor_input
from services.core.errors import ModelNotFound
from services.proto.nnserve.v1 import classify_pb2, classify_pb2_grpc


class ClassifyServicer(classify_pb2_grpc.ClassifyServiceServicer):
    def __init__(self, model: ClassifierModel, batcher: DynamicBatcher, version: int, default_top_k: int) -> None:
        self.model = model
        self.batcher = batcher
        self.version = version
        self.default_top_k = default_top_k

    async def Classify(
        self, request: classify_pb2.ClassifyRequest, context: aio.ServicerContext
    ) -> classify_pb2.ClassifyResponse:
        if request.model_version and request.model_version != self.version:
            raise ModelNotFound(
                f"model_version: {request.model_version} is not served here (serving version {self.version})"
            )
        k = self.model.top_k(request.top_k, self.default_top_k)
        tensor = tensor_input(request.tensor) if request.HasField("tensor") else None
        batch = self.model.batch(list(request.images), tensor)
        outputs = await self.batcher.submit({self.model.input_name: batch}, deadline_of(context))
        result = self.model.postprocess(outputs[self.model.output_name], k)
        labels = self.model.labels
        response = classify_pb2.ClassifyResponse(model_name=self.model.manifest.name, model_version=self.version)
        for ids, probs, score, flag in zip(
            result.class_ids.tolist(),
            result.probabilities.tolist(),
            result.ood_scores.tolist(),
            result.out_of_distribution.tolist(),
            strict=True,
        ):
            response.classifications.add(
                predictions=[
                    classify_pb2.ClassPrediction(class_id=i, label=labels[i], probability=p)
                    for i, p in zip(ids, probs, strict=True)
                ],
                ood_score=score,
                out_of_distribution=flag,
            )
        return response
