"""``python -m services.restore`` (or ``nnserve serve restore``): the restore gRPC service."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from services.core import oip
from services.core.dataplane import DataPlane
from services.core.deployment import ModelSlot
from services.core.entrypoint import main as service_main
from services.core.metrics import Metrics
from services.core.server import Service
from services.proto.nnserve.v1 import restore_pb2, restore_pb2_grpc
from services.restore.model import RestorerModel
from services.restore.servicer import RestoreServicer
from services.restore.settings import RestoreSettings

SERVICE_NAME = restore_pb2.DESCRIPTOR.services_by_name["RestoreService"].full_name


def build(settings: RestoreSettings, registry: CollectorRegistry | None = None) -> Service:
    """Load and warm the autoencoder, and wire model, batcher and servicers together."""
    metrics = Metrics(registry or CollectorRegistry(), "restore")
    slot = ModelSlot(
        settings,
        settings.model_name,
        metrics,
        lambda manifest, runtime: RestorerModel(manifest, settings.max_images_per_request, settings.max_request_pixels),
        settings.model_version,
    )
    service = Service(name="restore", metrics=metrics, slots=[slot])
    plane = DataPlane(service.slots)
    service.add_servicer(
        restore_pb2_grpc.add_RestoreServiceServicer_to_server, RestoreServicer(plane, settings.model_name), SERVICE_NAME
    )
    oip_servicer = oip.InferenceServicer(plane, settings.max_images_per_request)
    service.add_servicer(oip.add_to_server, oip_servicer, oip.SERVICE_NAME)
    return service


def main(argv: Sequence[str] | None = None) -> int:
    return service_main("nnserve serve restore", RestoreSettings, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
