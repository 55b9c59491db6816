"""Conformance check run with Triton's own HTTP client (tritonclient[http]) in its own venv.

    .venv-triton/bin/python tests/triton/triton_http_check.py HOST:PORT reference.npz

``reference.npz`` holds, for one model: ``model`` (its name), and for batch B in (1, 8) its inputs
``in{B}:{input name}`` and the outputs ``out{B}:{output name}`` that in-process onnxruntime computed.
Every request is made twice, with JSON tensors and with binary tensor data. Prints a JSON summary;
exits non-zero on the first failed check.
"""

import json
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype


def main() -> int:
    url, reference = sys.argv[1], np.load(sys.argv[2])
    model = str(reference["model"])
    client = httpclient.InferenceServerClient(url=url)
    summary = {"model": model}
    assert client.is_server_live(), "server not live"
    assert client.is_server_ready(), "server not ready"
    assert client.is_model_ready(model), f"{model} not ready"
    assert not client.is_model_ready(model, model_version="999"), "a version not served is ready"
    server = client.get_server_metadata()
    summary["server"] = {k: server.get(k) for k in ("name", "version", "extensions")}
    metadata = client.get_model_metadata(model)
    assert metadata["platform"] == "onnxruntime_onnx", metadata
    version = metadata["versions"][0]
    assert client.get_model_metadata(model, model_version=version)["name"] == model
    config = client.get_model_config(model)
    assert int(config["max_batch_size"]) >= 8, config
    config_inputs = {i["name"]: i for i in config["input"]}
    for tensor in metadata["inputs"]:
        assert config_inputs[tensor["name"]]["dims"] == tensor["shape"][1:], (config, metadata)
    summary["config"] = {"max_batch_size": config["max_batch_size"], "inputs": sorted(config_inputs)}
    names = sorted({key.split(":", 1)[1] for key in reference.files if key.startswith("in1:")})
    outputs = sorted({key.split(":", 1)[1] for key in reference.files if key.startswith("out1:")})
    for batch in (1, 8):
        for binary in (False, True):
            tensors = []
            for name in names:
                x = reference[f"in{batch}:{name}"]
                tensor = httpclient.InferInput(name, list(x.shape), np_to_triton_dtype(x.dtype))
                tensor.set_data_from_numpy(x, binary_data=binary)
                tensors.append(tensor)
            requested = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in outputs]
            request_id = f"conformance-{batch}-{'binary' if binary else 'json'}"
            result = client.infer(model, tensors, outputs=requested, request_id=request_id)
            for name in outputs:
                np.testing.assert_allclose(
                    result.as_numpy(name), reference[f"out{batch}:{name}"], rtol=1e-5, atol=1e-5, err_msg=request_id
                )
            assert result.get_response()["id"] == request_id, result.get_response()
            summary[f"infer_batch_{batch}_{'binary' if binary else 'json'}"] = "match"
    # No outputs named: tritonclient asks for all of them in binary (binary_data_output).
    result = client.infer(model, tensors)
    for name in outputs:
        np.testing.assert_allclose(result.as_numpy(name), reference[f"out8:{name}"], rtol=1e-5, atol=1e-5)
    try:
        client.infer("no_such_model", tensors)
        raise AssertionError("inference on an unknown model succeeded")
    except InferenceServerException as exc:
        assert exc.status() == "404" and "no_such_model" in exc.message(), exc
        summary["unknown_model"] = exc.message()
    first = reference[f"in1:{names[0]}"]
    wrong_type = "INT32" if first.dtype != np.int32 else "FP32"
    wrong = httpclient.InferInput(names[0], list(first.shape), wrong_type)
    wrong.set_data_from_numpy(first.astype(np.int32 if wrong_type == "INT32" else np.float32))
    try:
        client.infer(model, [wrong])
        raise AssertionError("inference with the wrong datatype succeeded")
    except InferenceServerException as exc:
        assert exc.status() == "400" and names[0] in exc.message(), exc
        summary["wrong_datatype"] = exc.message()
    stats = client.get_inference_statistics(model)["model_stats"][0]
    assert int(stats["inference_count"]) >= 2 * (1 + 8) + 8, stats
    summary["statistics"] = {k: stats[k] for k in ("inference_count", "execution_count")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
