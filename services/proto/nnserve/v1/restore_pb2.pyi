from services.proto.nnserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RestoreOutput(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESTORE_OUTPUT_UNSPECIFIED: _ClassVar[RestoreOutput]
    RESTORE_OUTPUT_PNG: _ClassVar[RestoreOutput]
    RESTORE_OUTPUT_TENSOR: _ClassVar[RestoreOutput]
RESTORE_OUTPUT_UNSPECIFIED: RestoreOutput
RESTORE_OUTPUT_PNG: RestoreOutput
RESTORE_OUTPUT_TENSOR: RestoreOutput

class RestoreRequest(_message.Message):
    __slots__ = ("images", "tensor", "masks", "mask_tensor", "output", "model_version")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    MASK_TENSOR_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    tensor: _tensor_pb2.Tensor
    masks: _containers.RepeatedScalarFieldContainer[bytes]
    mask_tensor: _tensor_pb2.Tensor
    output: RestoreOutput
    model_version: int
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., tensor: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., masks: _Optional[_Iterable[bytes]] = ..., mask_tensor: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., output: _Optional[_Union[RestoreOutput, str]] = ..., model_version: _Optional[int] = ...) -> None: ...

class Restoration(_message.Message):
    __slots__ = ("png", "anomaly_score", "anomalous")
    PNG_FIELD_NUMBER: _ClassVar[int]
    ANOMALY_SCORE_FIELD_NUMBER: _ClassVar[int]
    ANOMALOUS_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    anomaly_score: float
    anomalous: bool
    def __init__(self, png: _Optional[bytes] = ..., anomaly_score: _Optional[float] = ..., anomalous: _Optional[bool] = ...) -> None: ...

class RestoreResponse(_message.Message):
    __slots__ = ("restorations", "tensor", "model_name", "model_version")
    RESTORATIONS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    restorations: _containers.RepeatedCompositeFieldContainer[Restoration]
    tensor: _tensor_pb2.Tensor
    model_name: str
    model_version: int
    def __init__(self, restorations: _Optional[_Iterable[_Union[Restoration, _Mapping]]] = ..., tensor: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...
