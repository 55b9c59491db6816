"""The restore service, as a real process on a free port (on a stand-in restorer graph)."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from services.cli import main as cli
from services.client import RestoreClient, channel_options, tensor_message
from services.proto.nnserve.v1 import restore_pb2, restore_pb2_grpc, tensor_pb2
from tests.helpers import ServiceProcess, metric_value


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def images(n: int) -> np.ndarray:
    x = np.zeros((n, 28, 28), np.uint8)
    x[:, 6:22, 8:20] = 200
    return x


def test_restore_tensor_round_trip_and_anomaly_scores(restore_server: ServiceProcess) -> None:
    x = images(3)
    masks = np.zeros((3, 28, 28), np.uint8)
    masks[1, :4, :] = 255  # image 1 has its top rows marked for inpainting
    with RestoreClient(restore_server.address) as client:
        reply = client.restore(tensor=x, mask_tensor=masks, as_tensor=True)
    out = np.frombuffer(reply.tensor.data, dtype="<f4").reshape(reply.tensor.shape)
    expected = x.astype(np.float32)[:, None] / 255
    expected[1, 0, :4, :] = 0.5  # the stand-in graph fills masked pixels with 0.5
    np.testing.assert_allclose(out, expected, atol=1e-6)
    scores = [r.anomaly_score for r in reply.restorations]
    assert scores[0] == pytest.approx(0.0, abs=1e-9) and scores[1] == pytest.approx(0.25 * 4 / 28, rel=1e-4)
    assert [r.anomalous for r in reply.restorations] == [False, True, False]  # threshold 0.01
    assert reply.model_name == "autoencoder" and reply.model_version == 1


def test_restore_pngs(restore_server: ServiceProcess) -> None:
    x = images(2)
    with RestoreClient(restore_server.address) as client:
        reply = client.restore(images=[png(im) for im in x])
    for original, result in zip(x, reply.restorations, strict=True):
        restored = np.asarray(Image.open(io.BytesIO(result.png)))
        np.testing.assert_array_equal(restored, original)  # no mask: the stand-in returns its input


U8 = tensor_pb2.DATA_TYPE_UINT8
BAD = {
    "empty": (restore_pb2.RestoreRequest(), "images"),
    "undecodable": (restore_pb2.RestoreRequest(images=[b"xx"]), "images[0]"),
    "mask count": (
        restore_pb2.RestoreRequest(images=[png(images(1)[0])] * 2, masks=[png(images(1)[0])]),
        "1 masks for 2 images",
    ),
    "bad mask tensor": (
        restore_pb2.RestoreRequest(
            images=[png(images(1)[0])], mask_tensor=tensor_pb2.Tensor(dtype=U8, shape=[1, 27, 28], data=bytes(756))
        ),
        "mask_tensor.shape",
    ),
    "too many": (restore_pb2.RestoreRequest(tensor=tensor_pb2.Tensor(dtype=U8, shape=[2000, 28, 28])), "limit of 1024"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_restore_requests(restore_server: ServiceProcess, case: str) -> None:
    request, needle = BAD[case]
    with grpc.insecure_channel(restore_server.address, options=channel_options()) as channel:
        stub = restore_pb2_grpc.RestoreServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Restore(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in caught.value.details()
        ok = stub.Restore(restore_pb2.RestoreRequest(tensor=tensor_message(images(1))), timeout=10)
        assert len(ok.restorations) == 1


def test_restore_cli_writes_files(restore_server: ServiceProcess, tmp_path: Path) -> None:
    source = tmp_path / "shirt.png"
    source.write_bytes(png(images(1)[0]))
    assert cli(["restore", str(source), "--address", restore_server.address, "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "shirt.restored.png").read_bytes()[:4] == b"\x89PNG"
    text = restore_server.metrics_text()
    restore = {"grpc_service": "nnserve.v1.RestoreService", "grpc_method": "Restore"}
    assert metric_value(text, "nnserve_grpc_requests_total", **restore, grpc_code="OK") >= 1


def test_oip_model_infer_on_the_restorer(restore_server: ServiceProcess) -> None:
    from services.proto.inference import grpc_service_pb2 as pb
    from services.proto.inference import grpc_service_pb2_grpc as pb_grpc

    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    m = (np.random.default_rng(1).random((4, 1, 28, 28)) < 0.3).astype(np.float32)
    request = pb.ModelInferRequest(model_name="autoencoder", id="r1")
    for name, array in (("image", x), ("mask", m)):
        request.inputs.add(name=name, datatype="FP32", shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    with grpc.insecure_channel(restore_server.address) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    out = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(4, 1, 28, 28)
    np.testing.assert_allclose(out, x * (1 - m) + 0.5 * m, atol=1e-6)
    assert reply.id == "r1" and reply.outputs[0].name == "restored"
