"""Test helpers: tiny ONNX models in a temporary repository, and real service processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from services.core.manifest import Manifest, OodCalibration, TensorSpec
from services.processes import LaunchError, launch, wait_until_serving
from training.data import LABELS, file_sha256

ROOT = Path(__file__).resolve().parent.parent


def make_tiny_classifier(repository: Path, version: int = 1, name: str = "classifier", seed: int = 0) -> Path:
    """A linear classifier graph (Flatten -> MatMul -> Add) with a valid manifest. Returns its directory."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 0.05, size=(784, 10)).astype(np.float32)
    bias = rng.normal(0, 0.1, size=(10,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["scores"]),
            helper.make_node("Add", ["scores", "b"], ["logits"]),
        ],
        "tiny_classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    ood = OodCalibration(score="energy", threshold=-2.5, calibration="fixed, for tests")
    return save_classifier(model, repository, name, version, ood)


def save_classifier(
    model: onnx.ModelProto,
    repository: Path,
    name: str = "classifier",
    version: int = 1,
    ood: OodCalibration | None = None,
) -> Path:
    """Save an image -> logits graph into the repository with a valid classifier manifest."""
    directory = _save(model, repository, name, version)
    Manifest(
        name=name,
        version=version,
        task="image-classification",
        sha256=file_sha256(directory / "model.onnx"),
        opset=18,
        inputs=[TensorSpec(name="image", dtype="float32", shape=[-1, 1, 28, 28])],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=[-1, 10])],
        labels=list(LABELS),
        ood=ood,
    ).write(directory / "manifest.json")
    return directory


def make_tiny_autoencoder(repository: Path, version: int = 1, name: str = "autoencoder") -> Path:
    """A stand-in restorer graph: restored = image * (1 - mask) + 0.5 * mask."""
    graph = helper.make_graph(
        [
            helper.make_node("Sub", ["one", "mask"], ["keep"]),
            helper.make_node("Mul", ["image", "keep"], ["kept"]),
            helper.make_node("Mul", ["mask", "half"], ["filled"]),
            helper.make_node("Add", ["kept", "filled"], ["restored"]),
        ],
        "tiny_autoencoder",
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, 28, 28]),
        ],
        [helper.make_tensor_value_info("restored", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        initializer=[numpy_helper.from_array(np.float32(1.0), "one"), numpy_helper.from_array(np.float32(0.5), "half")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    directory = repository / name / str(version)
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, directory / "model.onnx")
    spec = [-1, 1, 28, 28]
    Manifest(
        name=name,
        version=version,
        task="image-restoration",
        sha256=file_sha256(directory / "model.onnx"),
        opset=18,
        inputs=[
            TensorSpec(name="image", dtype="float32", shape=spec),
            TensorSpec(name="mask", dtype="float32", shape=spec),
        ],
        outputs=[TensorSpec(name="restored", dtype="float32", shape=spec)],
        ood=OodCalibration(score="reconstruction_mse", threshold=0.01, calibration="fixed, for tests"),
    ).write(directory / "manifest.json")
    return directory


def _save(model: onnx.ModelProto, repository: Path, name: str, version: int) -> Path:
    model.ir_version = 9
    onnx.checker.check_model(model)
    directory = repository / name / str(version)
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, directory / "model.onnx")
    return directory


def make_tiny_gan(repository: Path, latent_dim: int = 8, version: int = 1, name: str = "gan_generator") -> Path:
    """A stand-in generator: image = sigmoid(z @ W + E[label]) reshaped to [B,1,28,28]."""
    rng = np.random.default_rng(5)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["z", "W"], ["zw"]),
            helper.make_node("Gather", ["E", "label"], ["e"], axis=0),
            helper.make_node("Add", ["zw", "e"], ["pre"]),
            helper.make_node("Sigmoid", ["pre"], ["flat"]),
            helper.make_node("Reshape", ["flat", "shape"], ["image"]),
        ],
        "tiny_gan",
        [
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", latent_dim]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
        ],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        initializer=[
            numpy_helper.from_array(rng.normal(0, 1, (latent_dim, 784)).astype(np.float32), "W"),
            numpy_helper.from_array(rng.normal(0, 1, (10, 784)).astype(np.float32), "E"),
            numpy_helper.from_array(np.array([-1, 1, 28, 28], np.int64), "shape"),
        ],
    )
    directory = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), repository, name, version)
    Manifest(
        name=name,
        version=version,
        task="image-generation",
        sha256=file_sha256(directory / "model.onnx"),
        opset=18,
        inputs=[
            TensorSpec(name="z", dtype="float32", shape=[-1, latent_dim]),
            TensorSpec(name="label", dtype="int64", shape=[-1], range=(0, 9)),
        ],
        outputs=[TensorSpec(name="image", dtype="float32", shape=[-1, 1, 28, 28])],
        labels=list(LABELS),
        extra={"latent_dim": latent_dim, "num_classes": 10},
    ).write(directory / "manifest.json")
    return directory


def make_tiny_denoiser(repository: Path, version: int = 1, name: str = "diffusion_denoiser") -> Path:
    """A stand-in epsilon predictor: eps = 0.5 x_t + 0.01 label + 0.0001 t, with a real cosine schedule."""
    from training.diffusion.schedule import cosine_alphas_cumprod

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["t"], ["tf"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["label"], ["lf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["tf", "c_t"], ["tt"]),
            helper.make_node("Mul", ["lf", "c_l"], ["ll"]),
            helper.make_node("Add", ["tt", "ll"], ["bias"]),
            helper.make_node("Reshape", ["bias", "shape"], ["bias4"]),
            helper.make_node("Mul", ["x_t", "c_x"], ["xx"]),
            helper.make_node("Add", ["xx", "bias4"], ["eps"]),
        ],
        "tiny_denoiser",
        [
            helper.make_tensor_value_info("x_t", TensorProto.FLOAT, ["batch", 1, 28, 28]),
            helper.make_tensor_value_info("t", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
        ],
        [helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        initializer=[
            numpy_helper.from_array(np.float32(0.0001), "c_t"),
            numpy_helper.from_array(np.float32(0.01), "c_l"),
            numpy_helper.from_array(np.float32(0.5), "c_x"),
            numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "shape"),
        ],
    )
    directory = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), repository, name, version)
    spec = [-1, 1, 28, 28]
    Manifest(
        name=name,
        version=version,
        task="diffusion-denoiser",
        sha256=file_sha256(directory / "model.onnx"),
        opset=18,
        inputs=[
            TensorSpec(name="x_t", dtype="float32", shape=spec),
            TensorSpec(name="t", dtype="int64", shape=[-1], range=(0, 999)),
            TensorSpec(name="label", dtype="int64", shape=[-1], range=(0, 10)),
        ],
        outputs=[TensorSpec(name="eps", dtype="float32", shape=spec)],
        labels=list(LABELS),
        extra={
            "num_train_timesteps": 1000,
            "prediction_type": "epsilon",
            "null_class": 10,
            "num_classes": 10,
            "default_guidance_scale": 2.0,
            "alphas_cumprod": [float(a) for a in cosine_alphas_cumprod(1000)],
        },
    ).write(directory / "manifest.json")
    return directory


@dataclass
class ServiceProcess:
    """A service started as its own process, as users run it."""

    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int | None
    log_path: Path
    http_port: int | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            return reply.read().decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def start_service(module: str, repository: Path, workdir: Path, *args: str, timeout: float = 60.0) -> ServiceProcess:
    """Start ``python -m module`` on free ports and wait until it reports SERVING."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"ports-{time.monotonic_ns()}.json"
    log_path = port_file.with_suffix(".log")
    flags = [
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--http-port",
        "0",
        "--model-repository",
        str(repository),
        # One serving process unless a test asks for more (the default is one per CPU); a later
        # --workers in ``args`` wins.
        "--workers",
        "1",
        *args,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNSERVE_")}
    with open(log_path, "wb") as log:
        service = launch(module, flags, port_file, env=env, cwd=ROOT, output=log)
    try:
        wait_until_serving([service], timeout)
    except LaunchError as exc:
        service.proc.kill()
        raise RuntimeError(f"{exc}:\n{log_path.read_text()}") from None
    info = service.info
    proc = service.proc
    return ServiceProcess(
        proc=proc,
        port=info["port"],
        metrics_port=info["metrics_port"],
        log_path=log_path,
        http_port=info.get("http_port"),
    )


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
