"""The transport floor: a bare grpc.aio server that answers Classify and OIP ModelInfer with replies
of the same shape as nnserve's, without a model, batching, metrics or interceptors.

    python benchmarks/echo_server.py --port 50151
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import numpy as np
from grpc import aio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.proto.inference import grpc_service_pb2 as pb  # noqa: E402
from services.proto.inference import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from services.proto.nnserve.v1 import classify_pb2, classify_pb2_grpc  # noqa: E402


class Echo(classify_pb2_grpc.ClassifyServiceServicer):
    async def Classify(
        self, request: classify_pb2.ClassifyRequest, context: aio.ServicerContext
    ) -> classify_pb2.ClassifyResponse:
        n = len(request.images) + (
            request.tensor.shape[0] if len(request.tensor.shape) > 2 else 1 if request.tensor.data else 0
        )
        k = request.top_k or 5
        reply = classify_pb2.ClassifyResponse(model_name="classifier", model_version=1)
        for _ in range(n):
            reply.classifications.add(
                predictions=[
                    classify_pb2.ClassPrediction(class_id=i, label="label", probability=0.1) for i in range(k)
                ],
                ood_score=-5.0,
            )
        return reply


class EchoInference(pb_grpc.GRPCInferenceServiceServicer):
    async def ModelInfer(self, request: pb.ModelInferRequest, context: aio.ServicerContext) -> pb.ModelInferResponse:
        rows = request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 1
        reply = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        reply.outputs.add(name="logits", datatype="FP32", shape=[rows, 10])
        reply.raw_output_contents.append(np.zeros((rows, 10), np.float32).tobytes())
        return reply


async def serve(port: int) -> None:
    server = aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 << 20)])
    classify_pb2_grpc.add_ClassifyServiceServicer_to_server(Echo(), server)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(EchoInference(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"echo server on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=50151)
    asyncio.run(serve(parser.parse_args().port))
