"""Blocking client of ``nnserve.model.v1.ModelInfo``, which every nnserve service serves."""

from __future__ import annotations

from typing import Self

import grpc

from services.client.errors import with_rich_errors
from services.proto.nnserve.model.v1 import model_info_pb2, model_info_pb2_grpc


class ModelInfoClient:
    """What a server says about its models: model cards (task, labels, metrics, provenance, ...)."""

    def __init__(self, target: str, channel: grpc.Channel | None = None) -> None:
        self.channel = with_rich_errors(channel or grpc.insecure_channel(target))
        self.stub = model_info_pb2_grpc.ModelInfoStub(self.channel)

    def describe(self, name: str = "", version: str = "", timeout: float | None = None) -> model_info_pb2.ModelCard:
        """The card of model ``name`` ('' where the server serves one model) at ``version`` ('' the served one)."""
        return self.stub.DescribeModel(  # type: ignore[no-any-return]
            model_info_pb2.DescribeModelRequest(name=name, version=version), timeout=timeout
        )

    def list(self, timeout: float | None = None) -> list[model_info_pb2.ModelCard]:
        """The cards of every model the server serves."""
        return list(self.stub.ListModels(model_info_pb2.ListModelsRequest(), timeout=timeout).models)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _number(value: object) -> str:
    if isinstance(value, float):  # Struct holds every number as a double: 10000 comes back 10000.0
        return f"{int(value):,}" if value.is_integer() else f"{value:.4g}"
    return str(value)


def format_card(card: model_info_pb2.ModelCard) -> str:
    """A model card as a few lines of text for a terminal (scalar metrics only; JSON has everything)."""
    from google.protobuf.json_format import MessageToDict

    variants = ", ".join(card.precisions)
    lines = [f"{card.name}/{card.version}  {card.task}  {card.precision} (variants: {variants})"]
    rows = [
        ("parameters", f"{card.parameters:,}"),
        ("sha256", card.sha256),
        ("inputs", ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in card.inputs)),
        ("outputs", ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in card.outputs)),
        ("provider", card.provider),
    ]
    if card.labels:
        rows.append(("labels", ", ".join(card.labels)))
    metrics = MessageToDict(card.metrics)
    scalars = [f"{k} {_number(v)}" for k, v in metrics.items() if isinstance(v, (int, float, str, bool))]
    if scalars:
        rows.append(("metrics", ", ".join(scalars)))
    if card.HasField("ood"):
        rows.append(("ood", f"{card.ood.score} > {card.ood.threshold:.4g} ({card.ood.calibration})"))
    if card.HasField("training"):
        t = card.training
        rows += [
            ("trained by", t.command),
            ("seed", str(t.seed)),
            ("data", t.data),
            ("hardware", f"{t.hardware}, torch {t.torch_version}, {t.epochs} epochs in {t.duration_s:.0f} s"),
        ]
    lines += [f"  {key:<11}{value}" for key, value in rows if value]
    return "\n".join(lines)
