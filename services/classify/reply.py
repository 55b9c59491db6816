"""A ClassifyResponse built as protobuf wire bytes from cached pieces, then parsed once.

Building the reply from Python values (one constructor call with nested dicts, or ``add()`` per
message) makes upb create a message object per classification and per prediction: for a 64-image
request that was about a fifth of the server's time on it. Every prediction of a class starts
with the same bytes (its field tags, class id and label), so those are encoded once per model;
a reply is then those pieces, the probabilities and scores packed as float32, and one parse in C.
The parsed message equals the one the constructor builds (the tests compare them).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from services.proto.nnserve.v1 import classify_pb2

if TYPE_CHECKING:
    from services.classify.model import Classifications

_float32 = struct.Struct("<f").pack  # rounds a Python float to float32 as protobuf does

# Field keys: (field number << 3) | wire type (0 varint, 2 length-delimited, 5 32-bit).
_CLASSIFICATIONS = b"\x0a"  # ClassifyResponse.classifications = 1
_MODEL_NAME = b"\x12"  # ClassifyResponse.model_name = 2
_MODEL_VERSION = b"\x18"  # ClassifyResponse.model_version = 3
_PREDICTIONS = b"\x0a"  # Classification.predictions = 1
_OOD_SCORE = b"\x15"  # Classification.ood_score = 2
_OUT_OF_DISTRIBUTION = b"\x18\x01"  # Classification.out_of_distribution = 3, true
_CLASS_ID, _LABEL, _PROBABILITY = b"\x08", b"\x12", b"\x1d"  # ClassPrediction fields 1, 2, 3


def varint(value: int) -> bytes:
    """A non-negative integer as a protobuf varint."""
    if value < 0:
        raise ValueError(f"varint of a negative value {value}")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_ONE_BYTE = [bytes((n,)) for n in range(0x80)]  # the lengths of nearly every piece, looked up


def _length(n: int) -> bytes:
    return _ONE_BYTE[n] if n < 0x80 else varint(n)


class ReplyEncoder:
    """Encodes the classify service's replies for one model (its labels)."""

    def __init__(self, labels: Sequence[str]) -> None:
        # For each class: the predictions field's key and length, then the ClassPrediction's
        # class id and label and the probability's key; only the 4 probability bytes follow.
        self._heads = []
        for class_id, label in enumerate(labels):
            text = label.encode("utf-8")
            body = _CLASS_ID + varint(class_id) + _LABEL + _length(len(text)) + text + _PROBABILITY
            self._heads.append(_PREDICTIONS + _length(len(body) + 4) + body)

    def encode(self, model_name: str, model_version: int, result: Classifications) -> bytes:
        """The serialized ClassifyResponse: one classification per row of ``result``, in order."""
        heads = self._heads
        parts = []
        rows = zip(result.class_ids, result.probabilities, result.ood_scores, result.out_of_distribution, strict=True)
        for ids, probs, score, flag in rows:
            if len(ids) == 1:  # the common top-1 request, without a join
                body = heads[ids[0]] + _float32(probs[0]) + _OOD_SCORE + _float32(score)
            else:
                predictions = b"".join([heads[c] + _float32(p) for c, p in zip(ids, probs, strict=True)])
                body = predictions + _OOD_SCORE + _float32(score)
            if flag:
                body += _OUT_OF_DISTRIBUTION
            parts.append(_CLASSIFICATIONS + _length(len(body)) + body)
        name = model_name.encode("utf-8")
        parts.append(_MODEL_NAME + _length(len(name)) + name + _MODEL_VERSION + varint(model_version))
        return b"".join(parts)

    def reply(self, model_name: str, model_version: int, result: Classifications) -> classify_pb2.ClassifyResponse:
        """:meth:`encode`, parsed into the message (one C call)."""
        return classify_pb2.ClassifyResponse.FromString(self.encode(model_name, model_version, result))
