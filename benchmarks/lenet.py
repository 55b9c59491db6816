"""A LeNet-5-size classifier (61,706 parameters, ~25 us an image on one core) with random weights.

The benchmark makes it itself: with a model this cheap the server's own per-request cost dominates,
which is what the serving-overhead comparison measures. Written as a model repository
(``classifier/1``) that nnserve, the naive server and the peers all load.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper, save

from services.core.manifest import Manifest, TensorSpec


def make_lenet(repository: Path, seed: int = 0) -> Path:
    """Write ``repository/classifier/1/{model.onnx,manifest.json}``; returns the ONNX path."""
    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int) -> TensorProto:
        fan_in = int(np.prod(shape[1:]))
        return numpy_helper.from_array(rng.normal(0, 1 / np.sqrt(fan_in), shape).astype(np.float32), name)

    def bias(name: str, n: int) -> TensorProto:
        return numpy_helper.from_array(np.zeros(n, np.float32), name)

    nodes = [
        helper.make_node("Conv", ["image", "c1w", "c1b"], ["c1"], pads=[2, 2, 2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "c2w", "c2b"], ["c2"]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "f1w", "f1b"], ["h1"], transB=1),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "f2w", "f2b"], ["h2"], transB=1),
        helper.make_node("Relu", ["h2"], ["a2"]),
        helper.make_node("Gemm", ["a2", "f3w", "f3b"], ["logits"], transB=1),
    ]
    initializers = [
        weight("c1w", 6, 1, 5, 5), bias("c1b", 6), weight("c2w", 16, 6, 5, 5), bias("c2b", 16),
        weight("f1w", 120, 400), bias("f1b", 120), weight("f2w", 84, 120), bias("f2b", 84),
        weight("f3w", 10, 84), bias("f3b", 10),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "lenet",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=initializers,
    )
    directory = repository / "classifier" / "1"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    Manifest(
        name="classifier",
        version=1,
        task="image-classification",
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        opset=18,
        inputs=[TensorSpec(name="image", dtype="float32", shape=[-1, 1, 28, 28])],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=[-1, 10])],
        labels=[str(i) for i in range(10)],
        parameters=sum(int(np.prod(t.dims)) for t in initializers),
    ).write(directory / "manifest.json")
    return path
