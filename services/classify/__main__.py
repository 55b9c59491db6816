"""``python -m services.classify`` (or ``nnserve serve classify``): the classify gRPC service."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from services.classify.model import ClassifierModel
from services.classify.servicer import ClassifyServicer
from services.classify.settings import ClassifySettings
from services.core import oip
from services.core.dataplane import DataPlane
from services.core.deployment import ModelSlot
from services.core.entrypoint import main as service_main
from services.core.metrics import Metrics
from services.core.server import Service
from services.proto.nnserve.v1 import classify_pb2, classify_pb2_grpc

SERVICE_NAME = classify_pb2.DESCRIPTOR.services_by_name["ClassifyService"].full_name


def build(settings: ClassifySettings, registry: CollectorRegistry | None = None) -> Service:
    """Load and warm the classifier, and wire model, batcher and servicers together."""
    metrics = Metrics(registry or CollectorRegistry(), "classify")
    slot = ModelSlot(
        settings,
        settings.model_name,
        metrics,
        lambda manifest, runtime: ClassifierModel(
            manifest, settings.max_images_per_request, settings.max_request_pixels
        ),
        settings.model_version,
    )
    service = Service(name="classify", metrics=metrics, slots=[slot])
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
