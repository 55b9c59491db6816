"""Loading a model version into a warmed-up onnxruntime session behind a dynamic batcher."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.core.batching import DynamicBatcher, Predict
from services.core.metrics import Metrics
from services.core.repository import ModelRepository, ModelVersion
from services.core.runtime import OnnxModel
from services.core.settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A verified model version, its session and the batcher in front of it."""

    version: ModelVersion
    runtime: OnnxModel
    batcher: DynamicBatcher


def make_batcher(
    settings: ServiceSettings, predict: Predict, name: str, metrics: Metrics, provider: str = "CPUExecutionProvider"
) -> DynamicBatcher:
    """A dynamic batcher over ``predict`` configured from the service's settings.

    Small requests run inline when the model is idle only on the CPU provider and without a
    batching delay: there a row costs the same in any batch, so merging buys nothing and the
    thread hand-off is pure overhead; on a GPU, or when a delay asks for company, they queue.
    """
    inline = settings.batching and settings.max_delay_ms == 0 and provider == "CPUExecutionProvider"
    return DynamicBatcher(
        predict,
        name=name,
        max_batch_size=settings.max_batch_size,
        max_delay_s=settings.max_delay_ms / 1000.0,
        max_queue_size=settings.max_queue_size,
        max_queue_wait_s=settings.max_queue_wait_ms / 1000.0,
        enabled=settings.batching,
        metrics=metrics.for_model(name),
        inline_max_rows=settings.inline_max_rows if inline else 0,
    )


def load_batched_model(
    settings: ServiceSettings, name: str, metrics: Metrics, version: int | None = None, warmup_rows: int | None = None
) -> LoadedModel:
    """Resolve ``name`` in the repository, load and warm it, and put a batcher in front of it."""
    resolved = ModelRepository(settings.model_repository).resolve(name, version, precision=settings.precision)
    runtime = OnnxModel(resolved, settings.providers, settings.threads, settings.allow_spinning)
    if settings.warmup:
        runtime.warmup(sorted({1, warmup_rows or settings.max_batch_size}))
    batcher = make_batcher(settings, runtime.predict, resolved.name, metrics, runtime.provider)
    metrics.model_info.labels(
        metrics.service, resolved.name, str(resolved.version), runtime.provider, resolved.precision
    ).set(1)
    log.info("serving %s/%d in %s on %s", resolved.name, resolved.version, resolved.precision, runtime.provider)
    return LoadedModel(resolved, runtime, batcher)
