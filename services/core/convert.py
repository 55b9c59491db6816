"""Conversions between nnserve's shared protobuf messages and plain values, for every servicer."""

from __future__ import annotations

import time

import numpy as np
from grpc import aio

from services.core.images import TensorInput
from services.proto.nnserve.v1 import tensor_pb2

_DTYPE_NAMES = {tensor_pb2.DATA_TYPE_UINT8: "uint8", tensor_pb2.DATA_TYPE_FLOAT32: "float32"}


def tensor_input(message: tensor_pb2.Tensor) -> TensorInput:
    """A request Tensor as plain values; an unknown dtype keeps a readable name for the error."""
    dtype = _DTYPE_NAMES.get(message.dtype)
    if dtype is None:
        known = message.dtype in tensor_pb2.DataType.values()
        dtype = tensor_pb2.DataType.Name(message.dtype) if known else f"unknown data type {message.dtype}"
    return TensorInput(dtype=dtype, shape=list(message.shape), data=message.data)


def deadline_of(context: aio.ServicerContext) -> float | None:
    """The call's deadline as a ``time.perf_counter()`` instant, or None when it has none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.perf_counter() + remaining


def tensor_message(array: np.ndarray) -> tensor_pb2.Tensor:
    """A Tensor message from a uint8 or float32 numpy array (little-endian, row-major)."""
    if array.dtype == np.uint8:
        dtype = tensor_pb2.DATA_TYPE_UINT8
    elif array.dtype == np.float32:
        dtype = tensor_pb2.DATA_TYPE_FLOAT32
    else:
        raise TypeError(f"tensor must be uint8 or float32, got {array.dtype}")
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return tensor_pb2.Tensor(dtype=dtype, shape=list(array.shape), data=data)
