"""``python -m services.classify`` (or ``nnserve serve classify``): the classify gRPC service."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from services.classify.model import ClassifierModel
from services.classify.servicer import ClassifyServicer
from services.classify.settings import ClassifySettings
from services.core import oip
from services.core.dataplane import DataPlane
from services.core.deployment import ModelSlot
from services.core.entrypoint import main as service_main
from services.core.manifest import Manifest
from services.core.metrics import Metrics
from services.core.repository import ModelRepository
from services.core.runtime import OnnxModel
from services.core.server import Service
from services.proto.nnserve.v1 import classify_pb2, classify_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = classify_pb2.DESCRIPTOR.services_by_name["ClassifyService"].full_name


def robust_models(settings: ClassifySettings) -> list[str]:
    """The robust classifier to serve beside the standard one, if any.

    Named explicitly, it must be in the repository (the slot fails to load otherwise); left at its
    default, it is served only when present, so a repository without it still serves classify.
    """
    name = settings.robust_model
    if not name or name == settings.model_name:
        return []
    present = ModelRepository(settings.model_repository).models()
    if "robust_model" not in settings.model_fields_set and name not in present:
        log.info("no %s in %s: serving %s alone", name, settings.model_repository, settings.model_name)
        return []
    return [name]


def build(settings: ClassifySettings, registry: CollectorRegistry | None = None) -> Service:
    """Load and warm the classifier, and wire model, batcher and servicers together."""
    metrics = Metrics(registry or CollectorRegistry(), "classify")

    def view(manifest: Manifest, runtime: OnnxModel) -> ClassifierModel:
        return ClassifierModel(manifest, settings.max_images_per_request, settings.max_request_pixels)

    slots = [ModelSlot(settings, settings.model_name, metrics, view, settings.model_version)]
    for name in robust_models(settings):
        slots.append(ModelSlot(settings, name, metrics, view))
    service = Service(name="classify", metrics=metrics, slots=slots)
    plane = DataPlane(service.slots)
    service.add_servicer(
        classify_pb2_grpc.add_ClassifyServiceServicer_to_server,
        ClassifyServicer(plane, settings.model_name, settings.default_top_k),
        SERVICE_NAME,
    )
    oip_servicer = oip.InferenceServicer(plane, settings.max_images_per_request)
    service.add_servicer(oip.add_to_server, oip_servicer, oip.SERVICE_NAME)
    return service


def main(argv: Sequence[str] | None = None) -> int:
    return service_main("nnserve serve classify", ClassifySettings, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
