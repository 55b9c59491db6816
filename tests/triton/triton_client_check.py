"""Conformance check run with Triton's own Python client (tritonclient[grpc]) in its own venv.

    .venv-triton/bin/python tests/triton/triton_client_check.py HOST:PORT reference.npz

``reference.npz`` holds inputs x1, x8 and the logits y1, y8 that in-process onnxruntime computed
for them. Prints a JSON summary; exits non-zero on the first failed check.
"""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def main() -> int:
    url, reference = sys.argv[1], np.load(sys.argv[2])
    client = grpcclient.InferenceServerClient(url=url)
    summary = {}
    assert client.is_server_live(), "server not live"
    assert client.is_server_ready(), "server not ready"
    assert client.is_model_ready("classifier"), "classifier not ready"
    server = client.get_server_metadata(as_json=True)
    summary["server"] = {k: server.get(k) for k in ("name", "version", "extensions")}
    metadata = client.get_model_metadata("classifier", as_json=True)
    assert metadata["platform"] == "onnxruntime_onnx", metadata
    assert metadata["inputs"][0]["datatype"] == "FP32" and metadata["inputs"][0]["shape"] == ["-1", "1", "28", "28"], (
        metadata
    )
    config = client.get_model_config("classifier", as_json=True)["config"]
    assert int(config["max_batch_size"]) >= 8 and config["input"][0]["dims"] == ["1", "28", "28"], config
    summary["config"] = {"max_batch_size": config["max_batch_size"], "platform": config["platform"]}
    for batch in (1, 8):
        x = reference[f"x{batch}"]
        tensor = grpcclient.InferInput("image", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer(
            "classifier",
            [tensor],
            outputs=[grpcclient.InferRequestedOutput("logits")],
            request_id=f"conformance-{batch}",
        )
        logits = result.as_numpy("logits")
        np.testing.assert_allclose(logits, reference[f"y{batch}"], rtol=1e-5, atol=1e-6)
        assert result.get_response().id == f"conformance-{batch}"
        summary[f"infer_batch_{batch}"] = "match"
    try:
        client.infer("no_such_model", [tensor])
        raise AssertionError("inference on an unknown model succeeded")
    except InferenceServerException as exc:
        assert "NOT_FOUND" in str(exc.status()), exc
        summary["unknown_model"] = str(exc.status())
    wrong = grpcclient.InferInput("image", [1, 1, 28, 28], "INT64")
    wrong.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.int64))
    try:
        client.infer("classifier", [wrong])
        raise AssertionError("inference with the wrong datatype succeeded")
    except InferenceServerException as exc:
        assert "INVALID_ARGUMENT" in str(exc.status()) and "image" in exc.message(), exc
        summary["wrong_datatype"] = exc.message()
    stats = client.get_inference_statistics("classifier", as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) >= 9, stats
    summary["statistics"] = {k: stats[k] for k in ("inference_count", "execution_count")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
