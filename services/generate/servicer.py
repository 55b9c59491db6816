"""GenerateService: protobuf -> generation job -> batcher(s) -> protobuf."""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from grpc import aio

from services.core import logs
from services.core.continuous import StepBatcher
from services.core.convert import deadline_of, tensor_message
from services.core.deployment import Deployment, ModelSlot
from services.core.errors import InvalidInput, ModelNotFound, OutOfRange
from services.core.images import encode_png, off_loop
from services.core.manifest import Manifest
from services.generate.grid import grid_png
from services.generate.model import (
    DEFAULT_SPACING,
    DiffusionJob,
    DiffusionSchedule,
    check_count,
    gan_inputs,
    resolve_labels,
    timesteps,
)
from services.proto.nnserve.v1 import generate_pb2, generate_pb2_grpc

# SAMPLER_UNSPECIFIED means DPM-Solver++: with the denoiser manifest's preset (extra.sampler_defaults:
# 10 steps at guidance 2.5 for the shipped model) it samples as well as DDIM at 50 steps with a fifth
# of the denoiser calls (models/diffusion_denoiser/1/MODEL_CARD.md). Steps when a request and the
# manifest leave them unset, per sampler:
DEFAULT_SAMPLER = generate_pb2.SAMPLER_DPM_SOLVER_PP
DEFAULT_STEPS = {
    generate_pb2.SAMPLER_DDIM: 50,
    generate_pb2.SAMPLER_DDPM: 50,
    generate_pb2.SAMPLER_DPM_SOLVER_PP: 10,
}
# A GenerateStream whose reader falls behind keeps at most this many progress events and this many
# preview snapshots waiting (older ones are dropped, newest kept): a client that never reads costs
# a bounded amount of memory however many steps it asked for.
MAX_PENDING_EVENTS = 256
MAX_PENDING_PREVIEWS = 2


def _check_enum(value: int, enum: object, field: str) -> None:
    """Unknown enum numbers (a client built against another proto version, or a typo) are errors."""
    values = enum.values()  # type: ignore[attr-defined]
    if value not in values:
        names = ", ".join(enum.Name(v) for v in values)  # type: ignore[attr-defined]
        raise InvalidInput(field, f"unknown value {value} (known: {names})")


@dataclass(frozen=True)
class Prepared:
    """A request resolved once: the generator's deployment (one version throughout), the labels,
    the seed and its random stream."""

    kind: str
    deployment: Deployment[Any]
    labels: np.ndarray
    seed: int
    rng: np.random.Generator


@dataclass(frozen=True)
class GanView:
    """What generation needs from a GAN generator's manifest."""

    latent_dim: int
    num_classes: int
    output: str

    @classmethod
    def from_manifest(cls, manifest: Manifest, runtime: object = None) -> GanView:
        extra = manifest.extra
        return cls(
            int(extra["latent_dim"]),
            int(extra.get("num_classes", len(manifest.labels) or 10)),
            manifest.outputs[0].name,
        )


@dataclass(frozen=True)
class DiffusionView:
    """A diffusion denoiser as the service runs it: its schedule, and the step batcher that runs
    every sampling request's steps over the deployment's session (a worker of the deployment, so
    it is started, drained and replaced on reload with it)."""

    schedule: DiffusionSchedule
    stepper: StepBatcher

    @property
    def workers(self) -> list[StepBatcher]:
        return [self.stepper]


class GenerateServicer(generate_pb2_grpc.GenerateServiceServicer):
    def __init__(
        self,
        gan: ModelSlot[GanView] | None,
        diffusion: ModelSlot[DiffusionView] | None,
        max_count: int,
        max_step_rows: int,
    ) -> None:
        self.gan = gan
        self.diffusion = diffusion
        self.max_count = max_count
        self.max_step_rows = max_step_rows

    def _diffusion_job(self, request: generate_pb2.GenerateRequest, prepared: Prepared) -> DiffusionJob:
        labels, rng = prepared.labels, prepared.rng
        schedule = prepared.deployment.view.schedule
        options = request.diffusion
        total = schedule.num_train_steps
        chosen = options.sampler or DEFAULT_SAMPLER
        sampler = "dpmpp2m" if chosen == generate_pb2.SAMPLER_DPM_SOLVER_PP else "ddim"
        steps = options.steps or schedule.steps_for(sampler, DEFAULT_STEPS[chosen])
        if not 1 <= steps <= total:
            raise OutOfRange("diffusion.steps", steps, f"1..{total}")
        eta = float(options.eta)
        if chosen != generate_pb2.SAMPLER_DDPM and (not 0.0 <= eta <= 1.0 or not np.isfinite(eta)):
            raise OutOfRange("diffusion.eta", eta, "0..1")
        if chosen == generate_pb2.SAMPLER_DDPM:
            eta = 1.0
        guidance = options.guidance_scale if options.HasField("guidance_scale") else schedule.guidance_for(sampler)
        if not np.isfinite(guidance) or not 0.0 <= guidance <= 20.0:
            raise OutOfRange("diffusion.guidance_scale", guidance, "0..20")
        spaced = timesteps(total, steps, DEFAULT_SPACING[sampler])
        job = DiffusionJob(labels, float(guidance), eta, spaced, schedule, rng, sampler=sampler)
        work = job.rows * steps
        if work > self.max_step_rows:
            raise OutOfRange(
                "count x diffusion.steps",
                work,
                f"at most {self.max_step_rows} denoiser rows per request (x2 with guidance)",
            )
        return job

    def _prepare(self, request: generate_pb2.GenerateRequest) -> Prepared:
        _check_enum(request.model, generate_pb2.GeneratorModel, "model")
        _check_enum(request.output, generate_pb2.GenerateOutput, "output")
        _check_enum(request.diffusion.sampler, generate_pb2.Sampler, "diffusion.sampler")
        model = request.model or generate_pb2.GENERATOR_MODEL_GAN
        kind = "gan" if model == generate_pb2.GENERATOR_MODEL_GAN else "diffusion"
        slot: ModelSlot[Any] | None = self.gan if kind == "gan" else self.diffusion
        if slot is None:
            raise ModelNotFound(f"model: the {kind} generator is not served here")
        deployment = slot.current  # one version for the whole request, even across a reload
        logs.note_model(deployment.name, deployment.version)  # for the call's log lines
        count = check_count(request.count, self.max_count)
        seed = request.seed if request.HasField("seed") else secrets.randbits(63)
        rng = np.random.default_rng(seed)
        view = deployment.view
        classes = view.num_classes if kind == "gan" else view.schedule.num_classes
        labels = resolve_labels(list(request.labels), count, classes, rng)
        return Prepared(kind, deployment, labels, seed, rng)

    def _response(
        self,
        request: generate_pb2.GenerateRequest,
        images: np.ndarray,
        labels: np.ndarray,
        seed: int,
        name: str,
        version: int,
    ) -> generate_pb2.GenerateResponse:
        response = generate_pb2.GenerateResponse(
            labels=labels.tolist(), seed=seed, model_name=name, model_version=version
        )
        if request.output == generate_pb2.GENERATE_OUTPUT_TENSOR:
            response.tensor.CopyFrom(tensor_message(images.astype(np.float32)))
        elif request.output == generate_pb2.GENERATE_OUTPUT_GRID:
            response.grid_png = grid_png(images)
        else:
            response.pngs.extend(encode_png(image) for image in images)
        return response

    async def _gan(
        self, request: generate_pb2.GenerateRequest, prepared: Prepared, context: aio.ServicerContext
    ) -> generate_pb2.GenerateResponse:
        gan = prepared.deployment
        inputs = gan_inputs(prepared.labels, gan.view.latent_dim, prepared.rng)
        outputs = await gan.batcher.submit(inputs, deadline_of(context))
        return await off_loop(
            self._response,
            request,
            outputs[gan.view.output],
            prepared.labels,
            prepared.seed,
            gan.manifest.name,
            gan.version,
        )

    async def _diffusion_result(
        self, request: generate_pb2.GenerateRequest, prepared: Prepared, job: DiffusionJob
    ) -> generate_pb2.GenerateResponse:
        deployment = prepared.deployment
        return await off_loop(
            self._response, request, job.images(), prepared.labels, prepared.seed, deployment.name, deployment.version
        )

    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: aio.ServicerContext
    ) -> generate_pb2.GenerateResponse:
        prepared = self._prepare(request)
        if prepared.kind == "gan":
            return await self._gan(request, prepared, context)
        job = self._diffusion_job(request, prepared)
        await prepared.deployment.view.stepper.run(job, deadline_of(context))
        return await self._diffusion_result(request, prepared, job)

    async def GenerateStream(
        self, request: generate_pb2.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[generate_pb2.GenerateEvent]:
        prepared = self._prepare(request)
        if prepared.kind == "gan":
            yield generate_pb2.GenerateEvent(progress=generate_pb2.GenerateProgress(step=1, total_steps=1))
            yield generate_pb2.GenerateEvent(result=await self._gan(request, prepared, context))
            return
        job = self._diffusion_job(request, prepared)
        total = len(job.steps)
        every = request.diffusion.preview_every
        # Bounded, newest-wins buffers between the sampler (which never waits for this reader) and
        # the stream: step numbers, and x0 snapshots for previews (PNGs are made only when sent).
        steps: deque[int] = deque(maxlen=MAX_PENDING_EVENTS)
        previews: dict[int, np.ndarray] = {}
        ready = asyncio.Event()

        def on_step() -> None:
            steps.append(job.index)
            if every and (job.index % every == 0 or job.index == total) and job.x0 is not None:
                previews[job.index] = job.x0
                while len(previews) > MAX_PENDING_PREVIEWS:
                    del previews[min(previews)]
            ready.set()

        task = asyncio.ensure_future(prepared.deployment.view.stepper.run(job, deadline_of(context), on_step))
        try:
            while not task.done() or steps:
                if not steps:
                    ready.clear()
                    waiter = asyncio.ensure_future(ready.wait())
                    await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    continue
                step = steps.popleft()
                progress = generate_pb2.GenerateProgress(step=step, total_steps=total)
                x0 = previews.pop(step, None)
                if x0 is not None:
                    progress.preview_png = await off_loop(grid_png, (x0 + 1) / 2)
                yield generate_pb2.GenerateEvent(progress=progress)
            await task  # re-raises a failure of the job
        finally:
            if not task.done():
                task.cancel()  # the client went away: the scheduler frees the job's rows before its next step
            steps.clear()
            previews.clear()
        yield generate_pb2.GenerateEvent(result=await self._diffusion_result(request, prepared, job))
