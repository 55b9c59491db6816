from services.proto.nnserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GeneratorModel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GENERATOR_MODEL_UNSPECIFIED: _ClassVar[GeneratorModel]
    GENERATOR_MODEL_GAN: _ClassVar[GeneratorModel]
    GENERATOR_MODEL_DIFFUSION: _ClassVar[GeneratorModel]

class GenerateOutput(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GENERATE_OUTPUT_UNSPECIFIED: _ClassVar[GenerateOutput]
    GENERATE_OUTPUT_PNGS: _ClassVar[GenerateOutput]
    GENERATE_OUTPUT_GRID: _ClassVar[GenerateOutput]
    GENERATE_OUTPUT_TENSOR: _ClassVar[GenerateOutput]

class Sampler(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLER_UNSPECIFIED: _ClassVar[Sampler]
    SAMPLER_DDIM: _ClassVar[Sampler]
    SAMPLER_DDPM: _ClassVar[Sampler]
    SAMPLER_DPM_SOLVER_PP: _ClassVar[Sampler]
GENERATOR_MODEL_UNSPECIFIED: GeneratorModel
GENERATOR_MODEL_GAN: GeneratorModel
GENERATOR_MODEL_DIFFUSION: GeneratorModel
GENERATE_OUTPUT_UNSPECIFIED: GenerateOutput
GENERATE_OUTPUT_PNGS: GenerateOutput
GENERATE_OUTPUT_GRID: GenerateOutput
GENERATE_OUTPUT_TENSOR: GenerateOutput
SAMPLER_UNSPECIFIED: Sampler
SAMPLER_DDIM: Sampler
SAMPLER_DDPM: Sampler
SAMPLER_DPM_SOLVER_PP: Sampler

class DiffusionOptions(_message.Message):
    __slots__ = ("sampler", "steps", "eta", "guidance_scale", "preview_every")
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    sampler: Sampler
    steps: int
    eta: float
    guidance_scale: float
    preview_every: int
    def __init__(self, sampler: _Optional[_Union[Sampler, str]] = ..., steps: _Optional[int] = ..., eta: _Optional[float] = ..., guidance_scale: _Optional[float] = ..., preview_every: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "count", "labels", "seed", "output", "diffusion")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    DIFFUSION_FIELD_NUMBER: _ClassVar[int]
    model: GeneratorModel
    count: int
    labels: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    output: GenerateOutput
    diffusion: DiffusionOptions
    def __init__(self, model: _Optional[_Union[GeneratorModel, str]] = ..., count: _Optional[int] = ..., labels: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ..., output: _Optional[_Union[GenerateOutput, str]] = ..., diffusion: _Optional[_Union[DiffusionOptions, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("pngs", "grid_png", "tensor", "labels", "seed", "model_name", "model_version")
    PNGS_FIELD_NUMBER: _ClassVar[int]
    GRID_PNG_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    pngs: _containers.RepeatedScalarFieldContainer[bytes]
    grid_png: bytes
    tensor: _tensor_pb2.Tensor
    labels: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    model_name: str
    model_version: int
    def __init__(self, pngs: _Optional[_Iterable[bytes]] = ..., grid_png: _Optional[bytes] = ..., tensor: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class GenerateProgress(_message.Message):
    __slots__ = ("step", "total_steps", "preview_png")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_PNG_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    preview_png: bytes
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., preview_png: _Optional[bytes] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: GenerateProgress
    result: GenerateResponse
    def __init__(self, progress: _Optional[_Union[GenerateProgress, _Mapping]] = ..., result: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...
