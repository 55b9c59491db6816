"""OOD benchmark sets, metrics and the exported OOD score (training/ood.py, ScoredClassifier), in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from training import ood
from training.data import fake_split
from training.evaluate import to_input
from training.export import export_onnx
from training.models.classifier import Classifier, ScoredClassifier, ood_features


@pytest.fixture(scope="module")
def sets() -> dict[str, np.ndarray]:
    return ood.benchmark_sets(fake_split(64, seed=1).images, n=40, seed=3)


def test_benchmark_sets_are_complete_seeded_and_as_described(sets: dict[str, np.ndarray]) -> None:
    assert set(sets) == set(ood.FAR_OOD) | set(ood.NEAR_OOD)
    for name, images in sets.items():
        assert images.shape == (40, 28, 28) and images.dtype == np.uint8, name
    again = ood.benchmark_sets(fake_split(64, seed=1).images, n=40, seed=3)
    assert all(np.array_equal(sets[k], again[k]) for k in sets)
    other = ood.benchmark_sets(fake_split(64, seed=1).images, n=40, seed=4)
    assert not np.array_equal(sets["uniform_noise"], other["uniform_noise"])
    assert not np.array_equal(sets["font_glyphs"], other["font_glyphs"])
    assert (sets["constant_black"] == 0).all() and (sets["constant_white"] == 255).all()
    assert (sets["constant_grey"] == 128).all()
    # MNIST-like digits: ink inside the central 20x20 box only, as MNIST centres its digits.
    digits = sets["mnist_digits"]
    assert digits[:, 4:24, 4:24].reshape(40, -1).max(1).min() > 100 and digits[:, :4].max() == 0
    assert all(len(np.unique(im)) >= 2 for im in sets["checkerboard"])
    assert all(len(np.unique(im)) >= 2 for im in sets["stripes"])
    assert (sets["font_glyphs"].reshape(40, -1).max(1) > 0).all()  # thin or cropped glyphs are dimmer
    # Pixel shuffling keeps each histogram; undoing either rotation gives back the same test images.
    assert np.array_equal(
        np.sort(sets["pixel_shuffled"].reshape(40, -1), 1), np.sort(sets["rotated_180"].reshape(40, -1), 1)
    )
    assert np.array_equal(np.rot90(sets["rotated_180"], 2, axes=(1, 2)), np.rot90(sets["rotated_90"], 1, axes=(2, 1)))


def test_font_glyphs_fall_back_to_pil_default_font(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ood, "FONT_GLOB", "/nonexistent/*.ttf")
    glyphs = ood.font_glyphs(10, np.random.default_rng(0))
    assert glyphs.shape == (10, 28, 28) and (glyphs.reshape(10, -1).max(1) > 0).all()


def test_auroc_matches_pairwise_count_with_ties() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, size=57).astype(float)
    b = rng.integers(2, 9, size=41).astype(float)
    pairwise = ((b[None, :] > a[:, None]) + 0.5 * (b[None, :] == a[:, None])).mean()
    assert ood.auroc(a, b) == pytest.approx(pairwise)
    assert ood.auroc(np.zeros(5), np.ones(5)) == 1.0 and ood.auroc(np.ones(5), np.zeros(5)) == 0.0


def test_fpr_at_95_tpr() -> None:
    out = np.arange(100, dtype=float)  # threshold at the 5th lowest OOD score: 4
    inside = np.array([0.0, 3.0, 4.0, 10.0])
    assert ood.fpr_at_95_tpr(inside, out) == 0.5
    table = ood.ood_table(inside, {"x": out})
    assert table["x"]["fpr95"] == 0.5 and 0.0 <= table["x"]["auroc"] <= 1.0


def test_mahalanobis_is_the_tied_covariance_distance() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=600)
    features = rng.normal(size=(600, 4)) @ rng.normal(size=(4, 4)) + labels[:, None] * 2.0
    maha = ood.Mahalanobis.fit(features, labels, 3, shrinkage=0.0)
    means = np.stack([features[labels == c].mean(0) for c in range(3)])
    centred = features - means[labels]
    precision = np.linalg.inv(centred.T @ centred / len(features))
    query = rng.normal(size=(7, 4)) * 3
    expected = np.min([np.einsum("nd,de,ne->n", query - m, precision, query - m) for m in means], axis=0)
    np.testing.assert_allclose(maha.score(query), expected, rtol=1e-4)


def test_scored_classifier_exports_logits_and_a_standardised_score(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Classifier(widths=(4, 8), hidden=16, batch_norm=False).eval()
    data = fake_split(300, seed=2)
    x = torch.from_numpy(to_input(data.images))
    with torch.no_grad():
        _, features = ood_features(model, x)
    maha = ood.Mahalanobis.fit(features.numpy(), data.labels, 10)
    scored = ScoredClassifier(model, maha.means, maha.whiten, tta_flip=True).eval()
    scored.standardise(x)
    path = tmp_path / "model.onnx"
    export_onnx(scored, {"image": torch.rand(2, 1, 28, 28)}, ["logits", "ood_score"], path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "ood_score"]
    logits, score = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        ref_logits, ref_score = scored(x)
    np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(score, ref_score.numpy(), rtol=1e-3, atol=5e-3)
    # The flip averaging is in the graph: logits are the mean over the image and its mirror.
    with torch.no_grad():
        mirrored = 0.5 * (model(x) + model(x.flip(3)))
    np.testing.assert_allclose(logits, mirrored.numpy(), rtol=1e-4, atol=1e-5)
    # Standardised on these images: both parts have mean 0, so the sum does too, and noise scores higher.
    assert abs(float(score.mean())) < 1e-3
    noise = np.random.default_rng(0).random((50, 1, 28, 28), dtype=np.float32)
    assert float(np.median(session.run(None, {"image": noise})[1])) > float(np.quantile(score, 0.95))
