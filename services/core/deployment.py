"""Model slots: the version of a model a service serves now, swapped atomically on reload.

A :class:`ModelSlot` is the only place a model is loaded. It holds one :class:`Deployment`: the
verified version's files, its warm onnxruntime session, the dynamic batcher in front of it, and
the service's view of the manifest (which may bring workers of its own, such as the diffusion
denoiser's step batcher). Servicers read ``slot.current`` once per request, so a request runs
entirely on one version. A reload resolves the new version (checksum), loads and warms it off the
event loop, checks that its signature matches the serving one, starts its workers and swaps it in;
the old workers then finish what they already hold and stop. A version that fails any check is
rejected with a log line and a metric, and the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from services.core.batching import DynamicBatcher, Predict
from services.core.errors import ModelLoadError, ModelNotFound
from services.core.manifest import Manifest
from services.core.metrics import Metrics
from services.core.repository import ModelRepository, ModelVersion
from services.core.runtime import OnnxModel
from services.core.settings import ServiceSettings, available_cpus

log = logging.getLogger(__name__)

V = TypeVar("V")


class Worker(Protocol):
    """Something a deployment runs on the event loop: started before serving, drained at the end."""

    def start(self) -> None: ...

    def begin_drain(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class Deployment(Generic[V]):
    """One loaded model version: its files, session, batcher and the service's view of it."""

    resolved: ModelVersion
    runtime: OnnxModel
    batcher: DynamicBatcher
    view: V

    @property
    def manifest(self) -> Manifest:
        return self.resolved.manifest

    @property
    def name(self) -> str:
        return self.resolved.name

    @property
    def version(self) -> int:
        return self.resolved.version

    @property
    def workers(self) -> list[Worker]:
        """The batcher, and whatever workers the view runs over the same session."""
        extra: Sequence[Worker] = getattr(self.view, "workers", ())
        return [self.batcher, *extra]


def make_batcher(
    settings: ServiceSettings,
    predict: Predict,
    name: str,
    metrics: Metrics,
    provider: str = "CPUExecutionProvider",
    release: Callable[[], None] | None = None,
    *,
    version: int,
) -> DynamicBatcher:
    """A dynamic batcher over ``predict`` configured from the service's settings.

    Small requests run inline when the model is idle only on the CPU provider, without a batching
    delay, and when each worker has a core to itself (the default of one worker per CPU, or a
    server pinned to one core): there a row costs the same in any batch, so merging buys nothing
    and the thread hand-off is pure overhead. On a GPU, when a delay asks for company, or when
    a worker has spare cores to overlap inference with the event loop, they queue.
    """
    # Inline only where a worker has no spare core: with one, inference in the batcher's thread
    # overlaps the event loop's work on the next requests (onnxruntime releases the GIL).
    inline = (
        settings.batching
        and settings.max_delay_ms == 0
        and provider == "CPUExecutionProvider"
        and settings.workers >= available_cpus()
    )
    return DynamicBatcher(
        predict,
        name=name,
        max_batch_size=settings.max_batch_size,
        max_delay_s=settings.max_delay_ms / 1000.0,
        max_queue_size=settings.max_queue_size,
        max_queue_wait_s=settings.max_queue_wait_ms / 1000.0,
        enabled=settings.batching,
        metrics=metrics.for_model(name, version),
        inline_max_rows=settings.inline_max_rows if inline else 0,
        inline_budget_s=settings.inline_budget_ms / 1000.0,
        release=release,
    )


def signature(manifest: Manifest) -> tuple[object, ...]:
    """What must not change across a reload: input and output names, dtypes and shapes."""
    return tuple((s.name, s.dtype, tuple(s.shape)) for s in (*manifest.inputs, *manifest.outputs))


class ModelSlot(Generic[V]):
    """The serving deployment of one model name, reloadable while the service runs."""

    def __init__(
        self,
        settings: ServiceSettings,
        name: str,
        metrics: Metrics,
        make_view: Callable[[Manifest, OnnxModel], V],
        version: int | None = None,
        warmup_rows: int | None = None,
    ) -> None:
        """``make_view(manifest, runtime)`` builds the service's view of each version it loads; it
        may refuse a manifest with ``ValueError``/``KeyError`` (a ModelLoadError at start-up, a
        rejected version on reload)."""
        self.settings = settings
        self.name = name
        self.metrics = metrics
        self.make_view = make_view
        self.pinned = version
        self.warmup_rows = warmup_rows
        self.current: Deployment[V] = self._load(version)
        self._lock: asyncio.Lock | None = None
        self._rejected: set[tuple[object, ...]] = set()
        self._retiring: set[asyncio.Task[None]] = set()

    def _load(self, version: int | None) -> Deployment[V]:
        """Resolve, verify, load and warm ``version`` (default: the newest), with its batcher and view."""
        settings = self.settings
        resolved = ModelRepository(settings.model_repository).resolve(self.name, version, precision=settings.precision)
        runtime = OnnxModel(resolved, settings.providers, settings.threads, settings.allow_spinning)
        if settings.warmup:
            runtime.warmup(sorted({1, self.warmup_rows or settings.max_batch_size}))
        try:
            view = self.make_view(resolved.manifest, runtime)
        except (KeyError, ValueError) as exc:
            raise ModelLoadError(f"{resolved.directory / 'manifest.json'}: not usable by this service: {exc}") from None
        batcher = make_batcher(
            settings,
            runtime.predict,
            resolved.name,
            self.metrics,
            runtime.provider,
            runtime.release_memory,
            version=resolved.version,
        )
        self.metrics.model_info.labels(
            self.metrics.service, resolved.name, str(resolved.version), runtime.provider, resolved.precision
        ).set(1)
        log.info("serving %s/%d in %s on %s", resolved.name, resolved.version, resolved.precision, runtime.provider)
        if resolved.precision != "fp32" and runtime.provider != "CPUExecutionProvider":
            # QDQ int8 graphs pay off on CPUs (VNNI kernels); a GPU provider runs fp32 better.
            log.warning("%s precision is meant for CPUs; on %s serve fp32", resolved.precision, runtime.provider)
        return Deployment(resolved, runtime, batcher, view)

    # The server starts and drains slots like any worker.
    def start(self) -> None:
        for worker in self.current.workers:
            worker.start()

    def begin_drain(self) -> None:
        for worker in self.current.workers:
            worker.begin_drain()

    async def stop(self) -> None:
        for worker in self.current.workers:
            await worker.stop()
        if self._retiring:
            await asyncio.gather(*self._retiring)

    def newest_version(self) -> int | None:
        versions = ModelRepository(self.settings.model_repository).versions(self.name)
        return versions[-1] if versions else None

    def _fingerprint(self, version: int) -> tuple[object, ...]:
        directory = self.settings.model_repository / self.name / str(version)
        try:
            entries = sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in directory.iterdir())
        except OSError:
            entries = []
        return (version, *entries)

    async def reload(self, version: int | None = None, explicit: bool = False) -> bool:
        """Load ``version`` (default: the newest) and swap it in; False if rejected or unchanged."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if explicit:
                self._rejected.clear()
            target = version or self.pinned or self.newest_version()
            if target is None or (target == self.current.version and not explicit):
                return False
            # A rejected version is tried again only once its files change (say, a copy finishing).
            fingerprint = self._fingerprint(target)
            if fingerprint in self._rejected:
                return False
            old = self.current
            loop = asyncio.get_running_loop()
            try:
                new = await loop.run_in_executor(None, self._load, target)
                if signature(new.manifest) != signature(old.manifest):
                    for worker in new.workers:
                        await worker.stop()
                    raise ModelLoadError(
                        f"{new.resolved.directory}: inputs/outputs {signature(new.manifest)} differ from the serving "
                        f"version's {signature(old.manifest)}"
                    )
            except (ModelNotFound, ModelLoadError, ValueError, OSError) as exc:
                self._rejected.add(fingerprint)
                self.metrics.reloads.labels(self.metrics.service, self.name, str(target), "rejected").inc()
                log.error(
                    "reload of %s version %s rejected, still serving version %d: %s",
                    self.name,
                    target,
                    old.version,
                    exc,
                )
                return False
            for worker in new.workers:
                worker.start()
            self.current = new  # atomic for every request that starts from now on
            self.metrics.reloads.labels(self.metrics.service, self.name, str(new.version), "loaded").inc()
            labels = (self.metrics.service, self.name)
            self.metrics.model_info.remove(*labels, str(old.version), old.runtime.provider, old.resolved.precision)
            self.metrics.model_info.labels(*labels, str(new.version), new.runtime.provider, new.resolved.precision).set(
                1
            )
            for worker in old.workers:
                worker.begin_drain()
                task = loop.create_task(worker.stop())
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
            log.info("%s: now serving version %d (was %d)", self.name, new.version, old.version)
            return True

    async def watch(self, interval: float) -> None:
        """Poll the repository and load newer versions as they appear (unless a version is pinned)."""
        while True:
            await asyncio.sleep(interval)
            if self.pinned is None:
                try:
                    await self.reload()
                except Exception:  # a watcher must outlive any surprise
                    log.exception("watching %s failed", self.name)
