"""DPM-Solver++(2M): the service's numpy step against the torch reference and the published update.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models"
(arXiv:2211.01095), Algorithm 2 (multistep second order, data prediction).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from services.generate.model import DiffusionJob, DiffusionSchedule, ddim_step, dpm_solver_pp_step, timesteps
from training.diffusion import sampler as reference
from training.diffusion.schedule import cosine_alphas_cumprod

AC = cosine_alphas_cumprod(1000).astype(np.float32)


def draws(rng: np.random.Generator, n: int = 3) -> list[np.ndarray]:
    return [rng.standard_normal((2, 1, 28, 28)).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize(
    "t, t_next, t_last",
    [(999, 899, None), (899, 799, 999), (499, 416, 582), (99, 0, 199), (99, -1, 199), (5, 2, 9)],
)
def test_numpy_step_matches_the_torch_reference(t: int, t_next: int, t_last: int | None) -> None:
    x, eps, x0_last = draws(np.random.default_rng(t))
    last = None if t_last is None else x0_last.clip(-1, 1)
    ours = dpm_solver_pp_step(eps, t, t_next, x, AC, last, t_last)
    ref = reference.dpm_solver_pp_step(
        torch.from_numpy(eps),
        t,
        t_next,
        torch.from_numpy(x),
        torch.from_numpy(AC),
        None if last is None else torch.from_numpy(last),
        t_last,
    )
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=2e-5)


def published_update(
    x: np.ndarray, eps: np.ndarray, x0_last: np.ndarray, t_last: int, t: int, t_next: int
) -> np.ndarray:
    """Algorithm 2 of Lu et al. 2022 written out in float64 from alpha_t, sigma_t and lambda_t."""
    a = AC.astype(np.float64)
    alpha = {s: math.sqrt(a[s]) for s in (t_last, t, t_next)}
    sigma = {s: math.sqrt(1 - a[s]) for s in (t_last, t, t_next)}
    lam = {s: math.log(alpha[s] / sigma[s]) for s in (t_last, t, t_next)}
    x0 = np.clip((x - sigma[t] * eps) / alpha[t], -1, 1)
    h, h_last = lam[t_next] - lam[t], lam[t] - lam[t_last]
    r = h_last / h
    d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_last
    return sigma[t_next] / sigma[t] * x - alpha[t_next] * (math.exp(-h) - 1) * d


@pytest.mark.parametrize("t_last, t, t_next", [(999, 899, 799), (582, 499, 416), (199, 99, 49)])
def test_second_order_step_is_the_published_update(t_last: int, t: int, t_next: int) -> None:
    x, eps, x0_last = draws(np.random.default_rng(t))
    x0_last = x0_last.clip(-1, 1)
    ours, _ = dpm_solver_pp_step(eps, t, t_next, x, AC, x0_last, t_last)
    np.testing.assert_allclose(ours, published_update(x, eps, x0_last, t_last, t, t_next), rtol=1e-4, atol=1e-4)


def test_first_order_step_is_ddim() -> None:
    """DPM-Solver++'s first step (D = x0) is deterministic DDIM (Lu et al. 2022, section 4.1)."""
    x, eps, _ = draws(np.random.default_rng(7))
    for t, t_next in ((999, 899), (500, 250), (40, -1)):
        ours = dpm_solver_pp_step(eps, t, t_next, x, AC, None, None)
        ddim = ddim_step(eps, t, t_next, x, AC, 0.0, None)
        for a, b in zip(ours, ddim, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_second_order_term_vanishes_when_the_prediction_repeats() -> None:
    """With x0_last equal to this step's x0, D = x0 and the step falls back to the DDIM update."""
    x, eps, _ = draws(np.random.default_rng(3))
    x0 = np.clip((x - math.sqrt(1 - AC[499]) * eps) / math.sqrt(AC[499]), -1, 1).astype(np.float32)
    second, _ = dpm_solver_pp_step(eps, 499, 416, x, AC, x0, 582)
    np.testing.assert_allclose(second, ddim_step(eps, 499, 416, x, AC, 0.0, None)[0], rtol=1e-4, atol=1e-4)


def test_trailing_spacing_matches_the_reference_and_starts_at_pure_noise() -> None:
    for steps in (1, 4, 10, 12, 50):
        ours = timesteps(1000, steps, "trailing")
        assert list(ours) == list(reference.timesteps(1000, steps, "trailing"))
        assert ours[0] == 999 and len(ours) == steps and (np.diff(ours) < 0).all()
    assert list(timesteps(1000, 10, "trailing")) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert list(timesteps(1000, 4)) == [750, 500, 250, 0]  # DDIM keeps "leading"


class LinearDenoiser:
    """A fixed, label-dependent stand-in for the network: eps = c_label x + 0.01 t / T."""

    def __init__(self) -> None:
        self.c = np.linspace(0.2, 0.8, 11).astype(np.float32)

    def numpy(self, x: np.ndarray, t: np.ndarray, label: np.ndarray) -> np.ndarray:
        return (self.c[label][:, None, None, None] * x + (0.01 * t / 1000.0)[:, None, None, None]).astype(np.float32)

    def torch(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.numpy(x.numpy(), t.numpy(), label.numpy()))


@pytest.mark.parametrize("guidance, steps", [(1.0, 10), (2.0, 12), (2.0, 1)])
def test_job_loop_matches_the_reference_loop(guidance: float, steps: int) -> None:
    """The service's job, advanced one denoiser call at a time, equals the reference sampler's loop."""
    denoiser = LinearDenoiser()
    schedule = DiffusionSchedule(alphas_cumprod=AC, null_class=10, num_classes=10, default_guidance=2.0)
    labels = np.array([1, 4, 9], dtype=np.int64)
    job = DiffusionJob(
        labels, guidance, 0.0, timesteps(1000, steps, "trailing"), schedule, np.random.default_rng(5), sampler="dpmpp2m"
    )
    initial = job.x.copy()
    previews = []
    while not job.done:
        feed = job.inputs()
        job.advance(denoiser.numpy(feed["x_t"], feed["t"], feed["label"]))
        previews.append(job.x0)
    expected = reference.sample(
        denoiser.torch,
        torch.from_numpy(labels),
        AC,
        steps,
        10,
        guidance,
        initial=torch.from_numpy(initial),
        method="dpmpp2m",
    )
    np.testing.assert_allclose(job.images(), expected.numpy(), rtol=1e-4, atol=1e-4)
    assert len(previews) == steps and all(p is not None for p in previews)


# The service: DPM-Solver++ requests through the real generate service (tiny denoiser, conftest).


def dpm_request(count: int, seed: int, steps: int, guidance: float = 2.0, labels: tuple[int, ...] = ()) -> object:
    from services.proto.nnserve.v1 import generate_pb2

    request = generate_pb2.GenerateRequest(
        model=generate_pb2.GENERATOR_MODEL_DIFFUSION,
        count=count,
        labels=list(labels),
        seed=seed,
        output=generate_pb2.GENERATE_OUTPUT_TENSOR,
    )
    request.diffusion.sampler = generate_pb2.SAMPLER_DPM_SOLVER_PP
    request.diffusion.steps = steps
    request.diffusion.guidance_scale = guidance
    return request


def tensor_of(reply) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.frombuffer(reply.tensor.data, dtype="<f4").reshape(reply.tensor.shape)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_service_dpm_solver_matches_the_reference_loop(generate_server, tiny_repository, guidance: float) -> None:  # type: ignore[no-untyped-def]
    """The service's DPM-Solver++ equals the reference sampler on the same x_T and the same ONNX denoiser."""
    import grpc
    import onnxruntime as ort

    from services.core.manifest import Manifest
    from services.proto.nnserve.v1 import generate_pb2_grpc

    labels, steps, seed = (1, 4, 9), 7, 21
    with grpc.insecure_channel(generate_server.address) as channel:
        reply = generate_pb2_grpc.GenerateServiceStub(channel).Generate(
            dpm_request(3, seed, steps, guidance, labels), timeout=30
        )
    initial = np.random.default_rng(seed).standard_normal((3, 1, 28, 28), dtype=np.float32)
    directory = tiny_repository / "diffusion_denoiser" / "1"
    schedule = DiffusionSchedule.from_manifest(Manifest.read(directory / "manifest.json"))
    session = ort.InferenceSession(str(directory / "model.onnx"))

    def denoiser(x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"x_t": x.numpy(), "t": t.numpy(), "label": label.numpy()})[0])

    expected = reference.sample(
        denoiser,
        torch.tensor(labels),
        schedule.alphas_cumprod,
        steps,
        schedule.null_class,
        guidance,
        initial=torch.from_numpy(initial),
        method="dpmpp2m",
    )
    np.testing.assert_allclose(tensor_of(reply), expected.numpy(), rtol=1e-4, atol=1e-4)


def test_service_dpm_solver_is_deterministic_by_seed_and_streams_progress(generate_server) -> None:  # type: ignore[no-untyped-def]
    import grpc

    from services.proto.nnserve.v1 import generate_pb2_grpc

    with grpc.insecure_channel(generate_server.address) as channel:
        stub = generate_pb2_grpc.GenerateServiceStub(channel)
        a, b, c = (stub.Generate(dpm_request(2, seed, 5), timeout=30) for seed in (4, 4, 5))
        request = dpm_request(2, 4, 5)
        request.diffusion.preview_every = 2
        events = list(stub.GenerateStream(request, timeout=30))
    assert a.tensor.data == b.tensor.data != c.tensor.data
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [p.step for p in progress] == [1, 2, 3, 4, 5] and {p.total_steps for p in progress} == {5}
    assert [bool(p.preview_png) for p in progress] == [False, True, False, True, True]
    assert events[-1].result.tensor.data == a.tensor.data  # streaming samples the same images


def test_mixed_samplers_share_denoiser_calls_and_keep_their_results(generate_server) -> None:  # type: ignore[no-untyped-def]
    """DDIM and DPM-Solver++ requests with different step counts run in the same denoiser calls, and
    each gets exactly what it gets alone."""
    import asyncio

    import grpc

    from services.client import GenerateClient
    from services.proto.nnserve.v1 import generate_pb2_grpc
    from tests.helpers import metric_value

    requests = [dpm_request(1, i, steps, 1.0) for i, steps in enumerate((6, 9, 12))]
    requests += [
        GenerateClient.request(
            model="diffusion", count=1, steps=steps, seed=10 + i, guidance_scale=1.0, output="tensor"
        )
        for i, steps in enumerate((15, 20, 25))
    ]

    async def run() -> list:  # type: ignore[type-arg]
        async with grpc.aio.insecure_channel(generate_server.address) as channel:
            stub = generate_pb2_grpc.GenerateServiceStub(channel)
            return await asyncio.gather(*(stub.Generate(r, timeout=60) for r in requests))

    before = generate_server.metrics_text()
    together = asyncio.run(run())
    after = generate_server.metrics_text()
    with grpc.insecure_channel(generate_server.address) as channel:
        stub = generate_pb2_grpc.GenerateServiceStub(channel)
        alone = [stub.Generate(r, timeout=60) for r in requests]
    for x, y in zip(together, alone, strict=True):
        assert x.tensor.data == y.tensor.data
    name = "diffusion_denoiser"
    rows = metric_value(after, "nnserve_model_inference_rows_total", model=name) - metric_value(
        before, "nnserve_model_inference_rows_total", model=name
    )
    calls = metric_value(after, "nnserve_model_executions_total", model=name) - metric_value(
        before, "nnserve_model_executions_total", model=name
    )
    assert rows == 6 + 9 + 12 + 15 + 20 + 25
    assert calls < rows / 2, f"{calls} denoiser calls for {rows} rows: steps were not shared"


def test_dpm_solver_request_past_its_deadline_stops(generate_server) -> None:  # type: ignore[no-untyped-def]
    import grpc

    from services.proto.nnserve.v1 import generate_pb2_grpc

    with grpc.insecure_channel(generate_server.address) as channel:
        stub = generate_pb2_grpc.GenerateServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(dpm_request(8, 1, 1000), timeout=0.05)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert stub.Generate(dpm_request(1, 1, 3), timeout=30).tensor.shape == [1, 1, 28, 28]
