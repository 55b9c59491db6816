"""The Open Inference Protocol's REST API (KServe v2) with Triton's binary tensor data extension.

Every route converts the HTTP request into the gRPC OIP request message and calls the same
:class:`~services.core.oip.InferenceServicer` method the gRPC server calls, so model lookup,
validation (``decode_inputs``), batching, statistics and error messages are those of the gRPC side;
this module only converts JSON (and binary tensor data) to and from those messages.

Binary tensor data (Triton's extension, used by ``tritonclient.http`` and ``perf_analyzer -i http``):
the body is a JSON header of ``Inference-Header-Content-Length`` bytes followed by the raw tensors of
the inputs that declare ``parameters.binary_data_size``, in input order. Outputs asked for with
``parameters.binary_data`` (or all, with the request parameter ``binary_data_output``) come back the
same way.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from aiohttp import web
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from services.core import oip
from services.core.errors import InvalidInput, shorten
from services.core.http_context import HttpContext, convert, read_body
from services.core.modelinfo import card_parameters
from services.proto.inference import grpc_service_pb2 as pb

BINARY_HEADER = "Inference-Header-Content-Length"
# Content types an inference body may be sent with (none: curl -d sends form-urlencoded, refused).
INFER_CONTENT_TYPES = ("application/json", "application/octet-stream")
_INTEGER_TYPES = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_SFIXED64,
    FieldDescriptor.TYPE_SFIXED32,
}


def proto_json(message: Message, full: bool = False) -> dict[str, Any]:
    """A message as Triton's HTTP endpoints write it: proto field names, 64-bit integers as numbers
    (not proto3 JSON's strings), every scalar and list present; unset sub-messages only if ``full``
    (statistics readers expect every counter, config readers test for ``sequence_batching``)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {str(k): _value(value_field, v, full) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_value(field, v, full) for v in value]
        elif field.message_type is not None:
            if full or message.HasField(field.name):
                out[field.name] = proto_json(value, full)
        elif field.containing_oneof is None or message.HasField(field.name):
            out[field.name] = _value(field, value, full)
    return out


def _value(field: FieldDescriptor, value: Any, full: bool) -> Any:
    if field.message_type is not None:
        return proto_json(value, full)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name if value in field.enum_type.values_by_number else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return value.decode("latin-1")
    if field.type in _INTEGER_TYPES:
        return int(value)
    return value


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(where, f"must be a JSON object, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidInput(where, f"must be a JSON array, got {type(value).__name__}")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(where, f"must be a string, got {type(value).__name__}")
    return value


def _shape(value: Any, where: str) -> list[int]:
    dims = _list(value, where)
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise InvalidInput(where, f"must be a list of integers, got {shorten(dims)}")
    if any(d < 0 or d > 2**62 for d in dims):
        raise InvalidInput(where, f"dimensions must be in [0, 2^62], got {shorten(dims)}")
    return dims


def _flag(parameters: dict[str, Any], name: str, where: str) -> bool:
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"{where}.{name}", f"must be true or false, got {shorten(value)}")
    return value


def json_tensor(data: Any, datatype: str, where: str) -> np.ndarray:
    """JSON ``data`` (flat or nested, row-major) as a flat array of ``datatype``.

    Typing problems are told here in JSON's terms; datatype, shape and count against the model are
    left to ``oip.decode_inputs``, as for gRPC.
    """
    dtype = oip.BY_OIP_NAME[datatype].numpy
    try:
        array = np.asarray(data)
    except (ValueError, TypeError):
        array = np.asarray([], dtype=object)
    if array.dtype.kind not in "biuf" or (array.dtype.kind == "b") != (dtype.kind == "b"):
        kind = "true/false" if dtype.kind == "b" else "numbers"
        raise InvalidInput(where, f"data must be {kind} in a flat or evenly nested array for {datatype}")
    if dtype.kind in "iu":
        if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
            raise InvalidInput(where, f"data must be integers for {datatype}")
        info = np.iinfo(dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise InvalidInput(where, f"data must be in [{info.min}, {info.max}] for {datatype}")
    return np.ascontiguousarray(array.ravel(), dtype=dtype)


def infer_request(
    document: Any, binary: bytes, model: str, version: str
) -> tuple[pb.ModelInferRequest, set[str], bool]:
    """The gRPC ModelInferRequest for a REST inference body, the outputs wanted in binary, and
    whether every output is (the request parameter ``binary_data_output``)."""
    document = _object(document, "request body")
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    if "id" in document:
        request.id = _string(document["id"], "id")
    parameters = _object(document.get("parameters", {}), "parameters")
    all_binary = _flag(parameters, "binary_data_output", "parameters")
    offset = 0
    raws: list[bytes | None] = []  # None: JSON data, in `arrays`
    arrays: dict[int, np.ndarray] = {}
    for i, entry in enumerate(_list(document.get("inputs"), "inputs")):
        where = f"inputs[{i}]"
        entry = _object(entry, where)
        name = _string(entry.get("name"), f"{where}.name")
        datatype = _string(entry.get("datatype"), f"{where}.datatype")
        shape = _shape(entry.get("shape"), f"{where}.shape")
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        tensor_parameters = _object(entry.get("parameters", {}), f"{where}.parameters")
        size = tensor_parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInput(f"{where}.parameters.binary_data_size", f"must be a byte count, got {shorten(size)}")
            if "data" in entry:
                raise InvalidInput(where, "has both data and parameters.binary_data_size")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"{where}.parameters.binary_data_size",
                    f"{size} bytes at offset {offset}, but the binary part of the body has {len(binary)} bytes",
                )
            raws.append(binary[offset : offset + size])
            offset += size
        elif "data" not in entry:
            raise InvalidInput(where, "needs data or parameters.binary_data_size")
        elif datatype not in oip.BY_OIP_NAME:
            raws.append(b"")  # decode_inputs names the datatype the model wants
        else:
            raws.append(None)
            arrays[i] = json_tensor(entry["data"], datatype, f"input {name!r}")
    if offset != len(binary):
        raise InvalidInput(
            BINARY_HEADER,
            f"the binary part of the body has {len(binary)} bytes, the inputs' binary_data_size add up to {offset}",
        )
    contents = {i: oip.BY_OIP_NAME[request.inputs[i].datatype].contents for i in arrays}
    counted = all(a.size == int(np.prod(list(request.inputs[i].shape))) for i, a in arrays.items())
    if len(arrays) == len(raws) and all(contents.values()) and not counted:
        # All JSON with a count problem: typed contents, so decode_inputs checks and words everything
        # (datatype and shape first) as for a gRPC client. Well-counted data goes raw: the same arrays
        # and checks, without a round trip through protobuf's repeated fields.
        for i, array in arrays.items():
            getattr(request.inputs[i].contents, contents[i]).extend(array.tolist())
    else:  # gRPC's raw_input_contents is all or nothing: JSON inputs beside binary ones go raw too
        for i, raw in enumerate(raws):
            if raw is None:
                tensor = request.inputs[i]
                count = int(np.prod(list(tensor.shape)))
                if arrays[i].size != count:
                    problem = f"data has {arrays[i].size} values, shape {list(tensor.shape)} needs {count}"
                    raise InvalidInput(f"input {tensor.name!r}", problem)
                raw = arrays[i].tobytes()
            request.raw_input_contents.append(raw)
    binary_outputs: set[str] = set()
    for i, entry in enumerate(_list(document.get("outputs", []), "outputs")):
        where = f"outputs[{i}]"
        entry = _object(entry, where)
        name = _string(entry.get("name"), f"{where}.name")
        output_parameters = _object(entry.get("parameters", {}), f"{where}.parameters")
        if "classification" in output_parameters:
            raise InvalidInput(f"{where}.parameters.classification", "is not supported; ask for the raw output")
        if _flag(output_parameters, "binary_data", f"{where}.parameters"):
            binary_outputs.add(name)
        request.outputs.add(name=name)
    return request, binary_outputs, all_binary


def infer_response(
    reply: pb.ModelInferResponse, binary_outputs: set[str], all_binary: bool
) -> tuple[dict[str, Any], list[bytes]]:
    """The REST body of a ModelInfer reply: its JSON document and the binary chunks that follow it."""
    outputs = []
    chunks: list[bytes] = []
    for tensor, raw in zip(reply.outputs, reply.raw_output_contents, strict=True):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if all_binary or tensor.name in binary_outputs:
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = np.frombuffer(raw, dtype=oip.BY_OIP_NAME[tensor.datatype].numpy).tolist()
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": reply.model_name, "model_version": reply.model_version}
    if reply.id:
        document["id"] = reply.id
    document["outputs"] = outputs
    return document, chunks


def parse_infer_body(
    body: bytes, header_length: str | None, model: str, version: str
) -> tuple[pb.ModelInferRequest, set[str], bool]:
    """:func:`infer_request` for a whole body: JSON, or a JSON header of ``header_length`` bytes and
    binary tensor data."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidInput(
                f"{BINARY_HEADER} header",
                f"{shorten(header_length)} is not a byte count within the body's {len(body)} bytes",
            )
        header, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        document = json.loads(header)
    except (ValueError, RecursionError) as exc:
        problem = "undecodable"
        if isinstance(exc, json.JSONDecodeError):
            problem = f"line {exc.lineno} column {exc.colno}: {exc.msg}"
        raise InvalidInput("request body", f"is not valid JSON ({problem})") from None
    return infer_request(document, binary, model, version)


def encode_infer_response(
    reply: pb.ModelInferResponse, binary_outputs: set[str], all_binary: bool
) -> tuple[bytes, list[bytes]]:
    """The encoded JSON document of a ModelInfer reply and the binary chunks that follow it."""
    document, chunks = infer_response(reply, binary_outputs, all_binary)
    return json.dumps(document, separators=(",", ":")).encode(), chunks


def _media_type(request: web.Request) -> str:
    raw = request.headers.get("Content-Type")
    return "" if raw is None else request.content_type


class OipRoutes:
    """The OIP REST routes of one service, over its gRPC OIP servicer."""

    def __init__(self, servicer: oip.InferenceServicer) -> None:
        self.servicer = servicer

    def routes(self) -> list[web.RouteDef]:
        """Every route; fixed paths before the ``{model}`` ones so ``/v2/models/stats`` is not a model."""
        models = "/v2/models/{model}"
        versioned = "/v2/models/{model}/versions/{version}"
        routes = [
            web.get("/v2", self.server_metadata),
            web.get("/v2/health/live", self.live),
            web.get("/v2/health/ready", self.ready),
            web.get("/v2/models/stats", self.statistics),
        ]
        for base in (models, versioned):
            routes += [
                web.get(base, self.model_metadata),
                web.get(base + "/ready", self.model_ready),
                web.get(base + "/config", self.model_config),
                web.get(base + "/stats", self.statistics),
                web.post(base + "/infer", self.infer),
            ]
        return routes

    @staticmethod
    def _context(request: web.Request) -> HttpContext:
        return HttpContext(request, request.get("deadline"))

    @staticmethod
    def _names(request: web.Request) -> tuple[str, str]:
        return request.match_info.get("model", ""), request.match_info.get("version", "")

    async def server_metadata(self, request: web.Request) -> web.Response:
        """``GET /v2``: name, version and extensions."""
        reply = await self.servicer.ServerMetadata(pb.ServerMetadataRequest(), self._context(request))  # type: ignore[arg-type]
        return web.json_response(proto_json(reply))

    async def live(self, request: web.Request) -> web.Response:
        """``GET /v2/health/live``: 200 while the process serves HTTP at all."""
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        """``GET /v2/health/ready``: 200 when every model accepts work, else 503 (probes fail on it)."""
        ready = self.servicer.plane.ready()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def model_ready(self, request: web.Request) -> web.Response:
        """``GET /v2/models/{model}[/versions/{version}]/ready``: 200, 503 not accepting work, 404 unknown."""
        name, version = self._names(request)
        self.servicer.plane.deployment(name, version)  # ModelNotFound names what is served
        ready = self.servicer.plane.ready(name, version)
        return web.json_response({"name": name, "ready": ready}, status=200 if ready else 503)

    async def model_metadata(self, request: web.Request) -> web.Response:
        """``GET /v2/models/{model}[/versions/{version}]``: inputs, outputs, versions, platform, and the
        model card's facts as ``parameters`` (the REST protocol's optional object, as MLServer answers;
        gRPC's ModelMetadataResponse has no such field: there they are in ModelConfig.parameters)."""
        name, version = self._names(request)
        message = pb.ModelMetadataRequest(name=name, version=version)
        reply = await self.servicer.ModelMetadata(message, self._context(request))  # type: ignore[arg-type]
        document = proto_json(reply)
        document["parameters"] = card_parameters(self.servicer.plane.deployment(name, version))
        return web.json_response(document)

    async def model_config(self, request: web.Request) -> web.Response:
        """``GET .../config`` (Triton's extension): the model configuration itself, as Triton answers."""
        name, version = self._names(request)
        message = pb.ModelConfigRequest(name=name, version=version)
        reply = await self.servicer.ModelConfig(message, self._context(request))  # type: ignore[arg-type]
        return web.json_response(proto_json(reply.config))

    async def statistics(self, request: web.Request) -> web.Response:
        """``GET /v2/models[/{model}[/versions/{version}]]/stats`` (Triton's extension)."""
        name, version = self._names(request)
        message = pb.ModelStatisticsRequest(name=name, version=version)
        reply = await self.servicer.ModelStatistics(message, self._context(request))  # type: ignore[arg-type]
        return web.json_response(proto_json(reply, full=True))

    async def infer(self, request: web.Request) -> web.Response:
        """``POST .../infer``: JSON tensors, or a JSON header and binary tensor data."""
        media = _media_type(request)
        if media and media not in INFER_CONTENT_TYPES:
            accepted = " or ".join(INFER_CONTENT_TYPES)
            raise web.HTTPUnsupportedMediaType(
                text=f"Content-Type: {shorten(media)} is not accepted for inference; send {accepted}"
            )
        body = await read_body(request)
        name, version = self._names(request)
        header_length = request.headers.get(BINARY_HEADER)
        message, binary_outputs, all_binary = await convert(
            len(body), parse_infer_body, body, header_length, name, version
        )
        reply = await self.servicer.ModelInfer(message, self._context(request))  # type: ignore[arg-type]
        size = sum(len(raw) for raw in reply.raw_output_contents)
        encoded, chunks = await convert(size, encode_infer_response, reply, binary_outputs, all_binary)
        if not chunks:
            return web.Response(body=encoded, content_type="application/json")
        return web.Response(
            body=b"".join([encoded, *chunks]),
            content_type="application/octet-stream",
            headers={BINARY_HEADER: str(len(encoded))},
        )
