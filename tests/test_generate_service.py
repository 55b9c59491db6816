"""The generate service on stand-in graphs: GAN, diffusion sampling, streaming, step-level batching."""

from __future__ import annotations

import asyncio
import io
import time

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from services.client import GenerateClient
from services.core.manifest import Manifest
from services.generate.model import DiffusionSchedule, ddim_step, timesteps
from services.proto.nnserve.v1 import generate_pb2, generate_pb2_grpc
from tests.helpers import ServiceProcess, metric_value
from training.diffusion import sampler as reference


def tensor_of(reply: generate_pb2.GenerateResponse) -> np.ndarray:
    return np.frombuffer(reply.tensor.data, dtype="<f4").reshape(reply.tensor.shape)


def test_gan_is_deterministic_by_seed(generate_server: ServiceProcess) -> None:
    with GenerateClient(generate_server.address) as client:
        a = client.generate(count=4, labels=[3], seed=7, output="tensor")
        b = client.generate(count=4, labels=[3], seed=7, output="tensor")
        c = client.generate(count=4, labels=[3], seed=8, output="tensor")
        pngs = client.generate(count=3, seed=1)
        grid = client.generate(count=5, seed=1, output="grid")
    assert a.tensor.data == b.tensor.data and a.tensor.data != c.tensor.data
    assert list(a.labels) == [3, 3, 3, 3] and a.seed == 7 and a.model_name == "gan_generator"
    assert tensor_of(a).shape == (4, 1, 28, 28)
    assert len(pngs.pngs) == 3 and all(Image.open(io.BytesIO(p)).size == (28, 28) for p in pngs.pngs)
    assert len(pngs.labels) == 3 and all(0 <= label < 10 for label in pngs.labels)  # random classes
    assert Image.open(io.BytesIO(grid.grid_png)).size == (92, 62)  # 3 columns x 2 rows of 28 px tiles, 2 px gaps


def test_step_matches_the_reference_sampler() -> None:
    rng = np.random.default_rng(0)
    ac = np.asarray(reference_schedule(), dtype=np.float32)
    for t, t_prev, eta in ((999, 979, 0.0), (500, 480, 0.5), (20, 0, 1.0), (5, -1, 0.3)):
        x, eps, noise = (rng.standard_normal((3, 1, 28, 28)).astype(np.float32) for _ in range(3))
        ours = ddim_step(eps, t, t_prev, x, ac, eta, noise)
        ref = reference.step(
            torch.from_numpy(eps), t, t_prev, torch.from_numpy(x), torch.from_numpy(ac), eta, torch.from_numpy(noise)
        )
        for a, b in zip(ours, ref, strict=True):
            np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-5)
    assert list(timesteps(1000, 4)) == list(reference.timesteps(1000, 4)) == [750, 500, 250, 0]


def reference_schedule() -> np.ndarray:
    from training.diffusion.schedule import cosine_alphas_cumprod

    return cosine_alphas_cumprod(1000)


@pytest.mark.parametrize("eta, guidance", [(0.0, 1.0), (0.0, 2.0), (1.0, 2.0)])
def test_service_sampling_matches_reference_loop(
    generate_server: ServiceProcess, tiny_repository, eta: float, guidance: float
) -> None:  # type: ignore[no-untyped-def]
    """The whole loop in the service equals the reference sampler fed the same random numbers."""
    import onnxruntime as ort

    labels, steps, seed = [1, 4, 9], 8, 11
    with GenerateClient(generate_server.address) as client:
        reply = client.generate(
            model="diffusion",
            count=3,
            labels=labels,
            seed=seed,
            output="tensor",
            steps=steps,
            eta=eta,
            guidance_scale=guidance,
            sampler="ddim",  # the reference loop is DDIM; the service's default is DPM-Solver++
        )
    rng = np.random.default_rng(seed)
    initial = rng.standard_normal((3, 1, 28, 28), dtype=np.float32)
    noises = (
        [torch.from_numpy(rng.standard_normal((3, 1, 28, 28), dtype=np.float32)) for _ in range(steps)] if eta else None
    )
    manifest = Manifest.read(tiny_repository / "diffusion_denoiser" / "1" / "manifest.json")
    schedule = DiffusionSchedule.from_manifest(manifest)
    session = ort.InferenceSession(str(tiny_repository / "diffusion_denoiser" / "1" / "model.onnx"))

    def denoiser(x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"x_t": x.numpy(), "t": t.numpy(), "label": label.numpy()})[0])

    expected = reference.sample(
        denoiser,
        torch.tensor(labels),
        schedule.alphas_cumprod,
        steps,
        schedule.null_class,
        guidance,
        eta,
        initial=torch.from_numpy(initial),
        noises=noises,
    )
    np.testing.assert_allclose(tensor_of(reply), expected.numpy(), rtol=1e-4, atol=1e-4)


def test_stream_reports_progress_and_previews(generate_server: ServiceProcess) -> None:
    with GenerateClient(generate_server.address) as client:
        events = list(client.stream(model="diffusion", count=2, seed=3, steps=6, preview_every=3, output="tensor"))
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [p.step for p in progress] == [1, 2, 3, 4, 5, 6] and {p.total_steps for p in progress} == {6}
    assert [bool(p.preview_png) for p in progress] == [False, False, True, False, False, True]
    assert events[-1].HasField("result") and tensor_of(events[-1].result).shape == (2, 1, 28, 28)


def test_cancelled_stream_stops_and_frees_its_rows(generate_server: ServiceProcess) -> None:
    with GenerateClient(generate_server.address) as client:
        stream = client.stream(model="diffusion", count=8, seed=3, sampler="ddpm", steps=1000)
        first = next(stream)
        assert first.progress.step == 1
        stream.cancel()
        time.sleep(0.5)
        rows_after_cancel = metric_value(
            generate_server.metrics_text(), "nnserve_model_inference_rows_total", model="diffusion_denoiser"
        )
        time.sleep(0.5)
        rows_later = metric_value(
            generate_server.metrics_text(), "nnserve_model_inference_rows_total", model="diffusion_denoiser"
        )
        assert rows_later == rows_after_cancel, "the cancelled job kept running"
        assert (
            metric_value(
                generate_server.metrics_text(),
                "nnserve_batch_rejected_total",
                model="diffusion_denoiser",
                reason="cancelled",
            )
            >= 1
        )
        assert len(client.generate(model="diffusion", count=1, steps=2, seed=1).pngs) == 1


def test_expired_deadline_stops_sampling(generate_server: ServiceProcess) -> None:
    def rows() -> float:
        return metric_value(
            generate_server.metrics_text(), "nnserve_model_inference_rows_total", model="diffusion_denoiser"
        )

    before = rows()
    with GenerateClient(generate_server.address) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.generate(model="diffusion", count=8, sampler="ddpm", steps=1000, timeout=0.05)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(0.3)
    stopped_at = rows()
    time.sleep(0.3)
    assert rows() == stopped_at, "sampling went on after the deadline"
    assert stopped_at - before < 16_000  # it never ran all 1000 guided steps of 8 images


def test_concurrent_requests_share_denoiser_calls(generate_server: ServiceProcess) -> None:
    """Requests at different steps and with different step counts run in the same calls."""
    before = generate_server.metrics_text()

    async def run() -> list[generate_pb2.GenerateResponse]:
        async with grpc.aio.insecure_channel(generate_server.address) as channel:
            stub = generate_pb2_grpc.GenerateServiceStub(channel)
            calls = [
                stub.Generate(
                    GenerateClient.request(model="diffusion", count=1, steps=steps, seed=i, guidance_scale=1.0),
                    timeout=30,
                )
                for i, steps in enumerate([20, 30, 40, 50] * 2)
            ]
            return await asyncio.gather(*calls)

    replies = asyncio.run(run())
    assert len(replies) == 8
    after = generate_server.metrics_text()
    rows = metric_value(after, "nnserve_model_inference_rows_total", model="diffusion_denoiser") - metric_value(
        before, "nnserve_model_inference_rows_total", model="diffusion_denoiser"
    )
    calls = metric_value(after, "nnserve_model_executions_total", model="diffusion_denoiser") - metric_value(
        before, "nnserve_model_executions_total", model="diffusion_denoiser"
    )
    assert rows == 2 * (20 + 30 + 40 + 50)
    assert calls < rows / 2, f"{calls} denoiser calls for {rows} rows: steps were not shared"


BAD = {
    "count zero": (dict(count=0), "INVALID_ARGUMENT", "count"),
    "count too large": (dict(count=17), "INVALID_ARGUMENT", "count: 17 is out of range (1..16)"),
    "label out of range": (dict(count=2, labels=[10]), "INVALID_ARGUMENT", "labels[0]"),
    "label count": (dict(count=3, labels=[1, 2]), "INVALID_ARGUMENT", "labels"),
    "steps": (dict(model="diffusion", count=1, steps=1001), "INVALID_ARGUMENT", "diffusion.steps"),
    "eta": (dict(model="diffusion", count=1, eta=1.5), "INVALID_ARGUMENT", "diffusion.eta"),
    "guidance": (dict(model="diffusion", count=1, guidance_scale=float("nan")), "INVALID_ARGUMENT", "guidance_scale"),
    "work": (
        dict(model="diffusion", count=16, steps=1000, sampler="ddpm", guidance_scale=2.0),
        "INVALID_ARGUMENT",
        "denoiser rows",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_generate_requests(generate_server: ServiceProcess, case: str) -> None:
    kwargs, code, needle = BAD[case]
    with GenerateClient(generate_server.address) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.generate(timeout=10, **kwargs)
        assert caught.value.code().name == code and needle in caught.value.details(), caught.value.details()
        assert len(client.generate(count=1, seed=0).pngs) == 1


def test_generate_cli(generate_server: ServiceProcess, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from services.cli import main as cli

    grid = tmp_path / "grid.png"
    assert (
        cli(
            [
                "generate",
                "--address",
                generate_server.address,
                "--model",
                "diffusion",
                "--label",
                "3",
                "--count",
                "4",
                "--steps",
                "5",
                "--seed",
                "2",
                "--out",
                str(grid),
            ]
        )
        == 0
    )
    assert Image.open(grid).size == (62, 62)
    captured = capsys.readouterr()
    # The progress bar is drawn only on a terminal; captured output is not one.
    assert "seed 2" in captured.out and "\r" not in captured.err
    assert cli(["generate", "--address", generate_server.address, "--count", "2", "--out", str(tmp_path / "pngs")]) == 0
    assert len(list((tmp_path / "pngs").glob("gan-*.png"))) == 2


def test_oip_serves_both_generators(generate_server: ServiceProcess) -> None:
    from services.proto.inference import grpc_service_pb2 as pb
    from services.proto.inference import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(generate_server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="diffusion_denoiser")
        x = np.ones((2, 1, 28, 28), np.float32)
        for name, datatype, array in (
            ("x_t", "FP32", x),
            ("t", "INT64", np.array([10, 20])),
            ("label", "INT64", np.array([1, 10])),
        ):
            request.inputs.add(name=name, datatype=datatype, shape=array.shape)
            request.raw_input_contents.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
        reply = stub.ModelInfer(request, timeout=10)
        eps = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(2, 1, 28, 28)
        np.testing.assert_allclose(eps[:, 0, 0, 0], [0.5 + 0.01 + 0.001, 0.5 + 0.1 + 0.002], rtol=1e-5)
        config = stub.ModelConfig(pb.ModelConfigRequest(name="gan_generator")).config
        assert [(i.name, list(i.dims)) for i in config.input] == [("z", [8]), ("label", [])]
