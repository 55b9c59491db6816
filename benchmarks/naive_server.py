"""The server a user writes in sixty lines: a bare grpc.aio OIP servicer calling session.run inline.

No batching, no validation beyond what onnxruntime does, no metrics, no limits, no interceptors:
the bar nnserve must clear with all of those on.

    python benchmarks/naive_server.py --model models/classifier/1/model.onnx --port 50161
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from grpc import aio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.proto.inference import grpc_service_pb2 as pb  # noqa: E402
from services.proto.inference import grpc_service_pb2_grpc as pb_grpc  # noqa: E402


class Naive(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, path: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name, versions=["1"], inputs=[tm(name=self.input, datatype="FP32", shape=[-1, 1, 28, 28])]
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: aio.ServicerContext) -> pb.ModelInferResponse:
        shape = list(request.inputs[0].shape)
        x = np.frombuffer(request.raw_input_contents[0], dtype=np.float32).reshape(shape)
        (y,) = self.session.run([self.output], {self.input: x})
        reply = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        reply.outputs.add(name=self.output, datatype="FP32", shape=y.shape)
        reply.raw_output_contents.append(y.tobytes())
        return reply


async def serve(model: str, port: int) -> None:
    server = aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 << 20)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Naive(model), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=50161)
    args = parser.parse_args()
    asyncio.run(serve(args.model, args.port))
