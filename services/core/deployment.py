"""Model slots: the version of a model a service serves now, swapped atomically on reload.

A :class:`ModelSlot` holds one :class:`Deployment` (verified version, warm session, running
batcher, and the service's view of the manifest). Servicers read ``slot.current`` once per
request, so a request runs entirely on one version. A reload resolves the new version (checksum),
loads and warms it off the event loop, checks that its signature matches the serving one, starts
its batcher and swaps it in; the old batcher then finishes what it already holds and stops. A
version that fails any check is rejected with a log line and a metric, and the old one keeps
serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from services.core.batching import DynamicBatcher
from services.core.errors import ModelLoadError, ModelNotFound
from services.core.hosting import load_batched_model
from services.core.manifest import Manifest
from services.core.metrics import Metrics
from services.core.repository import ModelRepository, ModelVersion
from services.core.runtime import OnnxModel
from services.core.settings import ServiceSettings

log = logging.getLogger(__name__)

V = TypeVar("V")


@dataclass(frozen=True)
class Deployment(Generic[V]):
    """One loaded model version with its batcher and the service's view of its manifest."""

    version: ModelVersion
    runtime: OnnxModel
    batcher: DynamicBatcher
    view: V

    @property
    def manifest(self) -> Manifest:
        return self.version.manifest

    @property
    def number(self) -> int:
        return self.version.version


@dataclass(frozen=True)
class StaticSlot(Generic[V]):
    """A deployment that never reloads, behind the same ``current`` interface as ModelSlot."""

    current: Deployment[V]


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
        make_view: Callable[[Manifest], V],
        version: int | None = None,
    ) -> None:
        self.settings = settings
        self.name = name
        self.metrics = metrics
        self.make_view = make_view
        self.pinned = version
        self.current: Deployment[V] = self._load(version)
        self._lock: asyncio.Lock | None = None
        self._rejected: set[tuple[object, ...]] = set()
        self._retiring: set[asyncio.Task[None]] = set()

    def _load(self, version: int | None) -> Deployment[V]:
        loaded = load_batched_model(self.settings, self.name, self.metrics, version)
        return Deployment(loaded.version, loaded.runtime, loaded.batcher, self.make_view(loaded.version.manifest))

    # The server starts and drains slots like batchers.
    def start(self) -> None:
        self.current.batcher.start()

    def begin_drain(self) -> None:
        self.current.batcher.begin_drain()

    async def stop(self) -> None:
        await self.current.batcher.stop()
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
            if target is None or (target == self.current.number and not explicit):
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
                    await new.batcher.stop()
                    raise ModelLoadError(
                        f"{new.version.directory}: inputs/outputs {signature(new.manifest)} differ from the serving "
                        f"version's {signature(old.manifest)}"
                    )
            except (ModelNotFound, ModelLoadError, ValueError, OSError) as exc:
                self._rejected.add(fingerprint)
                self.metrics.reloads.labels(self.metrics.service, self.name, "rejected").inc()
                log.error(
                    "reload of %s version %s rejected, still serving version %d: %s", self.name, target, old.number, exc
                )
                return False
            new.batcher.start()
            self.current = new  # atomic for every request that starts from now on
            self.metrics.reloads.labels(self.metrics.service, self.name, "loaded").inc()
            labels = (self.metrics.service, self.name)
            self.metrics.model_info.remove(*labels, str(old.number), old.runtime.provider, old.version.precision)
            self.metrics.model_info.labels(*labels, str(new.number), new.runtime.provider, new.version.precision).set(1)
            old.batcher.begin_drain()
            task = loop.create_task(old.batcher.stop())
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            log.info("%s: now serving version %d (was %d)", self.name, new.number, old.number)
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
