from services.proto.nnserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClassifyRequest(_message.Message):
    __slots__ = ("images", "tensor", "top_k", "model_version", "model_name")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    tensor: _tensor_pb2.Tensor
    top_k: int
    model_version: int
    model_name: str
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., tensor: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., top_k: _Optional[int] = ..., model_version: _Optional[int] = ..., model_name: _Optional[str] = ...) -> None: ...

class ClassPrediction(_message.Message):
    __slots__ = ("class_id", "label", "probability")
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    class_id: int
    label: str
    probability: float
    def __init__(self, class_id: _Optional[int] = ..., label: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("predictions", "ood_score", "out_of_distribution")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    OOD_SCORE_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[ClassPrediction]
    ood_score: float
    out_of_distribution: bool
    def __init__(self, predictions: _Optional[_Iterable[_Union[ClassPrediction, _Mapping]]] = ..., ood_score: _Optional[float] = ..., out_of_distribution: _Optional[bool] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("classifications", "model_name", "model_version")
    CLASSIFICATIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    classifications: _containers.RepeatedCompositeFieldContainer[Classification]
    model_name: str
    model_version: int
    def __init__(self, classifications: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...
