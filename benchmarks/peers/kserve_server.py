"""KServe's Python ModelServer serving an ONNX classifier with onnxruntime (one thread), gRPC v2.

.venv-kserve/bin/python benchmarks/peers/kserve_server.py --model models/classifier/1/model.onnx --grpc-port 50171
"""

import argparse

import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


class OnnxClassifier(Model):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.ready = True
        return True

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        x = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
        logits = self.session.run(None, {self.input_name: x})[0]
        output = InferOutput(name="logits", shape=list(logits.shape), datatype="FP32")
        output.set_data_from_numpy(logits, binary_data=True)
        return InferResponse(
            model_name=self.name, infer_outputs=[output], response_id=payload.id, use_binary_outputs=True
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--grpc-port", type=int, default=50171)
    parser.add_argument("--http-port", type=int, default=50172)
    args = parser.parse_args()
    ModelServer(
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        workers=1,
        enable_docs_url=False,
        enable_latency_logging=False,
    ).start([OnnxClassifier("classifier", args.model)])
