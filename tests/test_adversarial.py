"""Attacks and the ONNX-to-torch interpreter they differentiate through (training/adversarial.py), in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training import adversarial
from training.data import fake_split
from training.evaluate import to_input
from training.export import export_onnx
from training.models.classifier import Classifier, ScoredClassifier


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def linear(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """A softmax regression trained on the fake data (learnable, and attackable by construction)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    data = fake_split(512, seed=0)
    x, y = torch.from_numpy(to_input(data.images)), torch.from_numpy(data.labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    path = tmp_path_factory.mktemp("linear") / "model.onnx"
    export_onnx(model, {"image": torch.rand(2, 1, 28, 28)}, ["logits"], path)
    return model, path


@pytest.mark.parametrize("batch_norm", [True, False])
def test_interpreter_matches_onnxruntime_on_both_outputs(tmp_path: Path, batch_norm: bool) -> None:
    torch.manual_seed(1)
    model = Classifier(widths=(4, 8), hidden=16, batch_norm=batch_norm)
    model.train()
    model(torch.rand(16, 1, 28, 28))  # batch-norm statistics away from their defaults
    model.eval()
    rng = np.random.default_rng(0)
    scored = ScoredClassifier(model, rng.normal(size=(10, 58)), np.eye(58) * 0.5, tta_flip=True).eval()
    path = tmp_path / "model.onnx"
    export_onnx(scored, {"image": torch.rand(2, 1, 28, 28)}, ["logits", "ood_score"], path)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ("BatchNormalization" in ops) == batch_norm or not batch_norm
    x = rng.random((9, 1, 28, 28), dtype=np.float32)
    logits, score = _session(path).run(None, {"image": x})
    with torch.no_grad():
        ours_logits = adversarial.OnnxModule(path)(torch.from_numpy(x)).numpy()
        ours_score = adversarial.OnnxModule(path, "ood_score")(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours_logits, logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours_score, score, rtol=1e-4, atol=1e-4)


def test_interpreter_names_an_unsupported_operator(tmp_path: Path) -> None:
    node = onnx.helper.make_node("Erf", ["image"], ["logits"])
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, 2])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 2])],
    )
    path = tmp_path / "erf.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    with pytest.raises(NotImplementedError, match="Erf"):
        adversarial.OnnxModule(path)


def test_attacks_stay_in_the_ball_and_pgd_beats_fgsm(linear: tuple[nn.Module, Path]) -> None:
    model, _ = linear
    data = fake_split(200, seed=5)
    x, y = torch.from_numpy(to_input(data.images)), torch.from_numpy(data.labels)
    eps = 0.2  # the fake classes are bars of light: the margin is wide
    clean = (model(x).argmax(1) == y).float().mean().item()
    fg = adversarial.fgsm(model, x, y, eps)
    generator = torch.Generator().manual_seed(0)
    pg = adversarial.pgd(model, x, y, eps, 20, generator=generator)
    early = adversarial.pgd(model, x, y, eps, 20, generator=torch.Generator().manual_seed(0), stop_when_fooled=True)
    for adv in (fg, pg, early):
        assert float((adv - x).abs().max()) <= eps + 1e-6
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    with torch.no_grad():
        acc = {
            k: (model(v).argmax(1) == y).float().mean().item()
            for k, v in {"fgsm": fg, "pgd": pg, "early": early}.items()
        }
    assert clean > 0.9
    assert acc["pgd"] <= acc["fgsm"] < clean
    # Keeping the first fooling iterate never makes the attack weaker.
    assert acc["early"] <= acc["pgd"]


def test_robustness_report_scores_attacks_through_onnxruntime(linear: tuple[nn.Module, Path]) -> None:
    model, path = linear
    data = fake_split(96, seed=6)
    report = adversarial.robustness_report(
        path, data.images, data.labels, eps_grid=(0.1, 0.2), fgsm_eps=(0.2,), steps_check=(0.2, 40, 48), chunk=48
    )
    logits = _session(path).run(None, {"image": to_input(data.images)})[0]
    assert report["clean"] == pytest.approx(float((logits.argmax(1) == data.labels).mean()), abs=1e-4)
    assert report["images"] == 96 and report["interpreter_max_abs_diff"] < 1e-4
    assert set(report["pgd20"]) == {"0.1", "0.2"} and set(report["fgsm"]) == {"0.2"}
    # Monotone in eps for this model, and more steps never help the model.
    assert report["pgd20"]["0.2"] <= report["pgd20"]["0.1"] and report["pgd20"]["0.2"] < report["clean"]
    check = report["steps_check"]
    assert check["images"] == 48 and check["pgd40"] <= check["pgd20"]
    assert report["fgsm"]["0.2"] >= report["pgd20"]["0.2"]
