"""The zero-copy ModelInfer reader against protobuf's own parser, on valid and broken bytes."""

from __future__ import annotations

import random

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from services.core.wire import ZERO_COPY_MIN_BYTES, InferRequest, read_infer_request
from services.proto.inference import grpc_service_pb2 as pb


def random_request(rng: random.Random) -> pb.ModelInferRequest:
    """A request with every kind of top-level field, in protobuf's order or shuffled."""
    request = pb.ModelInferRequest(model_name="m" * rng.randint(0, 300), model_version=str(rng.randint(0, 9)))
    if rng.random() < 0.5:
        request.id = "x" * rng.randint(1, 200)
    for i in range(rng.randint(0, 3)):
        request.parameters[f"p{i}"].int64_param = rng.randint(-(2**40), 2**40)
    for i in range(rng.randint(1, 3)):
        request.inputs.add(name=f"in{i}", datatype="FP32", shape=[rng.randint(1, 64), 1, 28, 28])
        size = rng.choice([0, 1, 3136, ZERO_COPY_MIN_BYTES, 200_704])
        request.raw_input_contents.append(rng.randbytes(size))
    for i in range(rng.randint(0, 2)):
        request.outputs.add(name=f"out{i}")
    return request


def shuffled_fields(request: pb.ModelInferRequest, rng: random.Random) -> bytes:
    """The message's fields serialized one by one and concatenated in a random order (valid
    protobuf: raw contents may come first, between inputs, or split around other fields)."""
    parts = [
        pb.ModelInferRequest(model_name=request.model_name).SerializeToString(),
        pb.ModelInferRequest(model_version=request.model_version, id=request.id).SerializeToString(),
    ]
    for key in request.parameters:
        one = pb.ModelInferRequest()
        one.parameters[key].CopyFrom(request.parameters[key])
        parts.append(one.SerializeToString())
    for tensor in request.inputs:
        parts.append(pb.ModelInferRequest(inputs=[tensor]).SerializeToString())
    for output in request.outputs:
        parts.append(pb.ModelInferRequest(outputs=[output]).SerializeToString())
    for raw in request.raw_input_contents:
        parts.append(pb.ModelInferRequest(raw_input_contents=[raw]).SerializeToString())
    rng.shuffle(parts)
    return b"".join(parts)


@pytest.mark.parametrize("seed", range(40))
def test_reads_the_same_message_as_protobuf(seed: int) -> None:
    rng = random.Random(seed)
    request = random_request(rng)
    data = request.SerializeToString() if seed % 2 else shuffled_fields(request, rng)
    expected = pb.ModelInferRequest.FromString(data)
    got = read_infer_request(data)
    assert [bytes(raw) for raw in got.raw_input_contents] == list(expected.raw_input_contents)
    if isinstance(got, InferRequest):
        assert len(data) >= ZERO_COPY_MIN_BYTES
        rest = pb.ModelInferRequest()
        rest.CopyFrom(expected)
        del rest.raw_input_contents[:]
        assert got.message == rest
        assert got.model_name == expected.model_name and list(got.inputs) == list(expected.inputs)
        # Views of the received bytes, not copies.
        assert all(raw.obj is data for raw in got.raw_input_contents if isinstance(raw, memoryview))
        array = np.frombuffer(got.raw_input_contents[0], dtype=np.uint8)
        assert not array.flags.owndata
    else:
        assert got == expected


def test_a_large_request_is_read_without_copying_and_a_small_one_as_usual() -> None:
    x = np.arange(64 * 784, dtype=np.float32).reshape(64, 1, 28, 28)
    request = pb.ModelInferRequest(model_name="classifier")
    request.inputs.add(name="image", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    got = read_infer_request(request.SerializeToString())
    assert isinstance(got, InferRequest)
    np.testing.assert_array_equal(np.frombuffer(got.raw_input_contents[0], np.float32).reshape(x.shape), x)
    small = pb.ModelInferRequest(model_name="classifier")
    small.raw_input_contents.append(x[:1].tobytes())
    assert isinstance(read_infer_request(small.SerializeToString()), pb.ModelInferRequest)


@pytest.mark.parametrize("seed", range(30))
def test_broken_bytes_raise_rather_than_read_past_the_end(seed: int) -> None:
    rng = random.Random(seed)
    request = random_request(rng)
    request.raw_input_contents.append(b"\0" * ZERO_COPY_MIN_BYTES)
    data = request.SerializeToString()
    cut = data[: rng.randint(1, len(data) - 1)]
    try:
        protobuf = pb.ModelInferRequest.FromString(cut)
    except DecodeError:
        protobuf = None
    try:
        ours = read_infer_request(cut)
    except (ValueError, DecodeError):
        ours = None
    if protobuf is None:
        assert ours is None  # whatever protobuf refuses, so does the reader
    elif ours is not None:  # a cut at a field boundary is a valid, shorter message
        assert [bytes(r) for r in ours.raw_input_contents] == list(protobuf.raw_input_contents)


def test_classify_reply_bytes_parse_to_the_message_the_constructor_builds() -> None:
    """The hand-encoded ClassifyResponse against protobuf's own construction and serialization:
    labels of every length (one- and two-byte length varints, non-ASCII text), top-k from 1 to all
    classes, flags both ways, scores of any sign and size, large versions."""
    from services.classify.model import Classifications
    from services.classify.reply import ReplyEncoder, varint
    from services.proto.nnserve.v1 import classify_pb2

    rng = random.Random(0)
    for case in range(200):
        classes = rng.randint(1, 12)
        names = ["", "Bag", "Ankle boot", "Séance ☂", "l" * rng.randint(100, 300)]
        labels = [rng.choice(names) for _ in range(classes)]
        rows = rng.randint(1, 70)
        k = rng.randint(1, classes)
        ids = [rng.sample(range(classes), k) for _ in range(rows)]
        probabilities = [[rng.choice([0.0, 1.0, rng.random(), 1e-30]) for _ in range(k)] for _ in range(rows)]
        scores = [rng.choice([0.0, -rng.expovariate(0.1), rng.expovariate(0.001)]) for _ in range(rows)]
        scores = np.float32(scores).tolist()  # the service's scores are float32 values
        result = Classifications(ids, probabilities, scores, [rng.random() < 0.3 for _ in range(rows)])
        name, version = "m" * rng.randint(0, 200), rng.choice([1, 2, 127, 128, 2**40])
        expected = classify_pb2.ClassifyResponse(
            model_name=name,
            model_version=version,
            classifications=[
                {
                    "predictions": [
                        {"class_id": c, "label": labels[c], "probability": p} for c, p in zip(row, probs, strict=True)
                    ],
                    "ood_score": score,
                    "out_of_distribution": flag,
                }
                for row, probs, score, flag in zip(ids, probabilities, scores, result.out_of_distribution, strict=True)
            ],
        )
        got = ReplyEncoder(labels).reply(name, version, result)
        assert got == expected, f"case {case}"
        assert got.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
    assert [varint(n) for n in (0, 1, 127, 128, 300, 2**40)] == [
        b"\x00",
        b"\x01",
        b"\x7f",
        b"\x80\x01",
        b"\xac\x02",
        b"\x80\x80\x80\x80\x80\x20",
    ]
    with pytest.raises(ValueError, match="negative"):
        varint(-1)
