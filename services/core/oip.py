"""The Open Inference Protocol (KServe v2 gRPC) over the models a service hosts.

Every service registers :class:`InferenceServicer` beside its typed API, on the same port, so
Triton's and KServe's clients and load tools work against nnserve. ModelInfer goes through the
same dynamic batcher (and so the same metrics) as the typed API; ModelStatistics reads the
batcher's counters, which are updated at the same points as the Prometheus metrics.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np
from grpc import aio

from services.core.convert import deadline_of
from services.core.dataplane import DataPlane
from services.core.errors import InvalidInput, shorten
from services.core.manifest import NUMPY_DTYPES, Manifest, TensorSpec
from services.core.modelinfo import card_parameters
from services.core.wire import InferRequest, read_infer_request
from services.proto.inference import grpc_service_pb2 as pb
from services.proto.inference import grpc_service_pb2_grpc as pb_grpc
from services.proto.inference import model_config_pb2 as config_pb

LITTLE_ENDIAN = sys.byteorder == "little"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["model_configuration", "statistics"]


@dataclass(frozen=True)
class _DType:
    name: str  # OIP datatype
    numpy: np.dtype[Any]
    contents: str  # InferTensorContents field
    config: config_pb.DataType  # Triton DataType enum


_DTYPES = [
    _DType("BOOL", np.dtype(np.bool_), "bool_contents", config_pb.TYPE_BOOL),
    _DType("UINT8", np.dtype(np.uint8), "uint_contents", config_pb.TYPE_UINT8),
    _DType("UINT16", np.dtype("<u2"), "uint_contents", config_pb.TYPE_UINT16),
    _DType("UINT32", np.dtype("<u4"), "uint_contents", config_pb.TYPE_UINT32),
    _DType("UINT64", np.dtype("<u8"), "uint64_contents", config_pb.TYPE_UINT64),
    _DType("INT8", np.dtype(np.int8), "int_contents", config_pb.TYPE_INT8),
    _DType("INT16", np.dtype("<i2"), "int_contents", config_pb.TYPE_INT16),
    _DType("INT32", np.dtype("<i4"), "int_contents", config_pb.TYPE_INT32),
    _DType("INT64", np.dtype("<i8"), "int64_contents", config_pb.TYPE_INT64),
    _DType("FP16", np.dtype("<f2"), "", config_pb.TYPE_FP16),
    _DType("FP32", np.dtype("<f4"), "fp32_contents", config_pb.TYPE_FP32),
    _DType("FP64", np.dtype("<f8"), "fp64_contents", config_pb.TYPE_FP64),
]
BY_OIP_NAME = {d.name: d for d in _DTYPES}
# A manifest dtype's OIP name, through the one dtype table.
BY_MANIFEST = {name: next(d.name for d in _DTYPES if d.numpy == dtype) for name, dtype in NUMPY_DTYPES.items()}


def _spec_dtype(spec: TensorSpec) -> _DType:
    return BY_OIP_NAME[BY_MANIFEST[spec.dtype]]


@dataclass(frozen=True)
class _InputSpec:
    """What decoding one declared input needs, worked out once per manifest."""

    spec: TensorSpec
    dtype: _DType
    target: np.dtype[Any]  # the array dtype the model takes
    fixed: list[int] | None  # the non-batch dims when only the batch axis is dynamic


_PLANS: dict[int, tuple[Manifest, dict[str, _InputSpec]]] = {}
_OUTPUTS: dict[int, tuple[Manifest, dict[str, str]]] = {}


def _plan(manifest: Manifest) -> dict[str, _InputSpec]:
    """The manifest's inputs by name, ready for decoding (cached: this runs on every request)."""
    cached = _PLANS.get(id(manifest))
    if cached is not None and cached[0] is manifest:
        return cached[1]
    plan = {}
    for spec in manifest.inputs:
        dynamic_rest = any(d == -1 for d in spec.shape[1:])
        fixed = None if dynamic_rest or not spec.shape or spec.shape[0] != -1 else list(spec.shape[1:])
        plan[spec.name] = _InputSpec(spec, _spec_dtype(spec), np.dtype(spec.dtype), fixed)
    if len(_PLANS) >= 64:  # a long-lived server reloads models: keep the cache bounded
        _PLANS.clear()
    _PLANS[id(manifest)] = (manifest, plan)  # holding the manifest keeps its id from being reused
    return plan


def _output_datatypes(manifest: Manifest) -> dict[str, str]:
    """The manifest's outputs in order, {name: OIP datatype} (cached with the input plan)."""
    cached = _OUTPUTS.get(id(manifest))
    if cached is not None and cached[0] is manifest:
        return cached[1]
    datatypes = {spec.name: _spec_dtype(spec).name for spec in manifest.outputs}
    if len(_OUTPUTS) >= 64:
        _OUTPUTS.clear()
    _OUTPUTS[id(manifest)] = (manifest, datatypes)
    return datatypes


def _check_names(request: pb.ModelInferRequest | InferRequest, manifest: Manifest) -> None:
    """The request names each declared input exactly once (raises InvalidInput naming what is wrong)."""
    expected = {spec.name for spec in manifest.inputs}
    given = [t.name for t in request.inputs]
    unknown = [n for n in given if n not in expected]
    if unknown:
        raise InvalidInput(
            f"inputs[{given.index(unknown[0])}]",
            f"model {manifest.name} has no input {shorten(unknown[0])} (inputs: {sorted(expected)})",
        )
    missing = [n for n in expected if n not in given]
    if missing or len(given) != len(set(given)):
        raise InvalidInput(
            "inputs", f"model {manifest.name} needs exactly one each of {sorted(expected)}, got {shorten(given, 200)}"
        )


# Input headers (name, datatype and shape, in raw_input_contents) that decode_inputs has accepted,
# per manifest and row limit: a request that repeats one needs a lookup and a length check, not
# the whole validation. Bounded: only accepted headers are kept, at most one per batch size and
# input. None for a manifest with range-checked inputs, whose values need looking at every time.
_Headers = dict[tuple[Any, ...], tuple[int, np.dtype[Any]]]  # header -> (byte count, array dtype)
_ACCEPTED: dict[int, tuple[Manifest, int, _Headers | None]] = {}


def _accepted(manifest: Manifest, max_rows: int) -> _Headers | None:
    cached = _ACCEPTED.get(id(manifest))
    if cached is not None and cached[0] is manifest and cached[1] == max_rows:
        return cached[2]
    if len(_ACCEPTED) >= 64:
        _ACCEPTED.clear()
    headers: _Headers | None = None if any(spec.range is not None for spec in manifest.inputs) else {}
    _ACCEPTED[id(manifest)] = (manifest, max_rows, headers)  # holding the manifest keeps its id unique
    return headers


def decode_inputs(
    request: pb.ModelInferRequest | InferRequest, manifest: Manifest, max_rows: int
) -> dict[str, np.ndarray]:
    """Validate a ModelInfer request's inputs against the manifest and return them as arrays.

    Inputs in raw_input_contents whose name, datatype and shape were accepted before take a fast
    path: the byte count is checked and the array is a view of the bytes; anything else goes
    through the full validation, whose errors name the field and the limit.
    """
    tensors = request.inputs
    raw = request.raw_input_contents
    accepted = _accepted(manifest, max_rows)
    if accepted is not None and raw and len(raw) == len(tensors) == len(manifest.inputs):
        arrays: dict[str, np.ndarray] = {}
        rows = None
        for i, tensor in enumerate(tensors):
            shape = tuple(tensor.shape)
            known = accepted.get((tensor.name, tensor.datatype, shape))
            if known is None or (rows is not None and shape[0] != rows) or tensor.HasField("contents"):
                break
            data = raw[i]
            if len(data) != known[0]:
                break
            rows = shape[0]
            arrays[tensor.name] = np.frombuffer(data, dtype=known[1]).reshape(shape)
        else:
            if len(arrays) == len(tensors):  # no name twice
                return arrays
    arrays = _decode_inputs(request, manifest, max_rows)
    if accepted is not None and raw:
        plan = _plan(manifest)
        for tensor in tensors:
            array = arrays[tensor.name]
            if array.dtype == plan[tensor.name].dtype.numpy:  # decoded without a conversion
                accepted[(tensor.name, tensor.datatype, tuple(tensor.shape))] = (array.nbytes, array.dtype)
    return arrays


def _decode_inputs(
    request: pb.ModelInferRequest | InferRequest, manifest: Manifest, max_rows: int
) -> dict[str, np.ndarray]:
    plan = _plan(manifest)
    tensors = request.inputs
    if len(tensors) != len(plan) or len({t.name for t in tensors} & plan.keys()) != len(plan):
        _check_names(request, manifest)
    raw = request.raw_input_contents
    if raw and len(raw) != len(tensors):
        raise InvalidInput("raw_input_contents", f"has {len(raw)} entries for {len(tensors)} inputs")
    arrays: dict[str, np.ndarray] = {}
    rows = None
    for i, tensor in enumerate(tensors):
        entry = plan[tensor.name]
        spec, dtype = entry.spec, entry.dtype
        where = f"input {tensor.name!r}"
        if tensor.datatype != dtype.name:
            given_type = shorten(tensor.datatype) if tensor.datatype else "none"
            raise InvalidInput(where, f"datatype must be {dtype.name}, got {given_type}")
        shape = list(tensor.shape)
        if entry.fixed is not None:
            matches = len(shape) == len(spec.shape) and shape[1:] == entry.fixed
        else:
            matches = len(shape) == len(spec.shape) and all(
                e in (-1, s) for s, e in zip(shape, spec.shape, strict=True)
            )
        if not matches:
            raise InvalidInput(where, f"shape {shape} does not match {spec.shape} (-1: any size)")
        if shape[0] < 1 or min(shape) < 0:
            raise InvalidInput(where, f"shape {shape} must be positive with a batch of at least 1")
        if shape[0] > max_rows:
            raise InvalidInput(where, f"batch of {shape[0]} is over the limit of {max_rows}")
        if rows is not None and shape[0] != rows:
            raise InvalidInput(where, f"batch size {shape[0]} differs from the other inputs' {rows}")
        rows = shape[0]
        count = math.prod(shape)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(where, "has contents while raw_input_contents is used")
            data = raw[i]
            needed = count * dtype.numpy.itemsize
            if len(data) != needed:
                problem = f"raw_input_contents[{i}] has {len(data)} bytes, shape {shape} of {dtype.name} needs {needed}"
                raise InvalidInput(where, problem)
            array = np.frombuffer(data, dtype=dtype.numpy).reshape(shape)
        else:
            if not dtype.contents:
                raise InvalidInput(where, f"{dtype.name} data must come in raw_input_contents")
            values = getattr(tensor.contents, dtype.contents)
            if len(values) != count:
                raise InvalidInput(
                    where, f"contents.{dtype.contents} has {len(values)} values, shape {shape} needs {count}"
                )
            array = np.asarray(values, dtype=dtype.numpy).reshape(shape)
        if array.dtype != entry.target:  # frombuffer of the right type is already contiguous
            array = np.ascontiguousarray(array, dtype=entry.target)
        if spec.range is not None:
            check_range(array, spec, where)
        arrays[tensor.name] = array
    return arrays


def check_range(array: np.ndarray, spec: TensorSpec, where: str) -> None:
    """Refuse index-like values outside the manifest's declared range before they join a batch.

    Out of range they would make the whole merged batch fail in onnxruntime (a Gather out of
    bounds), or worse, silently index something else.
    """
    low, high = spec.range  # type: ignore[misc]
    if array.size and (int(array.min()) < low or int(array.max()) > high):
        bad = array[(array < low) | (array > high)].flat[0]
        raise InvalidInput(where, f"values must be in [{low}, {high}], got {int(bad)}")


def _duration(count: int, ns: int) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=count, ns=ns)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService for the models of one service process (one version each)."""

    # The server parses ModelInfer requests with this instead of the generated deserializer: a large
    # request's tensors stay in the received bytes (services/core/wire.py).
    request_readers = {f"/{SERVICE_NAME}/ModelInfer": read_infer_request}

    def __init__(self, plane: DataPlane, max_rows: int, server_name: str = "nnserve") -> None:
        self.plane = plane
        self.max_rows = max_rows
        self.server_name = server_name
        try:
            self.server_version = metadata.version("nnserve")
        except metadata.PackageNotFoundError:
            self.server_version = "0+unknown"

    async def ServerLive(self, request: pb.ServerLiveRequest, context: aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: aio.ServicerContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.plane.ready(request.name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=self.server_name, version=self.server_version, extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        deployment = self.plane.deployment(request.name, request.version)
        manifest = deployment.manifest
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=manifest.name,
            versions=[str(deployment.version)],
            platform=PLATFORM,
            inputs=[tm(name=s.name, datatype=_spec_dtype(s).name, shape=s.shape) for s in manifest.inputs],
            outputs=[tm(name=s.name, datatype=_spec_dtype(s).name, shape=s.shape) for s in manifest.outputs],
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: aio.ServicerContext) -> pb.ModelConfigResponse:
        deployment = self.plane.deployment(request.name, request.version)
        model, batcher = deployment.manifest, deployment.batcher
        gpu = deployment.runtime.provider.startswith(("CUDA", "Tensorrt"))
        config = config_pb.ModelConfig(
            name=model.name,
            platform=PLATFORM,
            backend="onnxruntime",
            max_batch_size=batcher.max_batch_size,
            input=[
                config_pb.ModelInput(name=s.name, data_type=_spec_dtype(s).config, dims=s.shape[1:])
                for s in model.inputs
            ],
            output=[
                config_pb.ModelOutput(name=s.name, data_type=_spec_dtype(s).config, dims=s.shape[1:])
                for s in model.outputs
            ],
            instance_group=[
                config_pb.ModelInstanceGroup(
                    name=f"{model.name}_0",
                    count=1,
                    kind=config_pb.ModelInstanceGroup.KIND_GPU if gpu else config_pb.ModelInstanceGroup.KIND_CPU,
                )
            ],
        )
        if batcher.max_batch_size > 1:
            config.dynamic_batching.max_queue_delay_microseconds = int(batcher.max_delay_s * 1e6)
        # ModelMetadataResponse has no parameters; Triton's config does (tritonclient's get_model_config).
        for key, value in card_parameters(deployment).items():
            config.parameters[key].string_value = value
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            deployments = [self.plane.deployment(request.name, request.version)]
        else:
            deployments = [self.plane.deployment(name) for name in self.plane.names]
        reply = pb.ModelStatisticsResponse()
        for deployment in deployments:
            s = deployment.batcher.stats
            reply.model_stats.add(
                name=deployment.name,
                version=str(deployment.version),
                last_inference=s.last_inference_ms,
                inference_count=s.rows,
                execution_count=s.batches,
                inference_stats=pb.InferStatistics(
                    success=_duration(s.success_count, s.success_ns),
                    fail=_duration(s.fail_count, s.fail_ns),
                    queue=_duration(s.queue_count, s.queue_ns),
                    compute_input=_duration(s.compute_count, 0),
                    compute_infer=_duration(s.compute_count, s.compute_ns),
                    compute_output=_duration(s.compute_count, 0),
                ),
                batch_stats=[
                    pb.InferBatchStatistics(batch_size=size, compute_infer=_duration(count, ns))
                    for size, (count, ns) in sorted(s.by_batch_size.items())
                ],
            )
        return reply

    async def ModelInfer(
        self, request: pb.ModelInferRequest | InferRequest, context: aio.ServicerContext
    ) -> pb.ModelInferResponse:
        deployment = self.plane.deployment(request.model_name, request.model_version)
        model = deployment.manifest
        inputs = decode_inputs(request, model, self.max_rows)
        datatypes = _output_datatypes(model)
        wanted = [o.name for o in request.outputs] or list(datatypes)
        for i, name in enumerate(wanted):
            if name not in datatypes:
                raise InvalidInput(
                    f"outputs[{i}]", f"model {model.name} has no output {shorten(name)} (outputs: {list(datatypes)})"
                )
        outputs = await self.plane.infer(deployment, inputs, deadline_of(context))
        reply = pb.ModelInferResponse(model_name=model.name, model_version=str(deployment.version), id=request.id)
        for name in wanted:
            array = outputs[name]
            reply.outputs.add(name=name, datatype=datatypes[name], shape=array.shape)
            if not LITTLE_ENDIAN or array.dtype.byteorder == ">":
                array = array.astype(array.dtype.newbyteorder("<"))
            reply.raw_output_contents.append(array.tobytes())  # row-major, whatever the array's strides
        return reply


def add_to_server(servicer: InferenceServicer, server: Any) -> None:
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
