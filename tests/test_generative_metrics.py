"""The diversity metrics of training/evaluate.py on synthetic feature sets whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluate import (
    diversity_metrics,
    knn_radii,
    mean_pairwise_distance,
    pairwise_distances,
    per_class_subset,
    prdc,
    reference_halves,
)


def _blob(n: int, dim: int, seed: int, centre: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(centre, 1.0, (n, dim))


def test_pairwise_distances_match_the_definition() -> None:
    a, b = _blob(7, 5, 0), _blob(4, 5, 1)
    expected = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    np.testing.assert_allclose(pairwise_distances(a, b), expected, atol=1e-9)


def test_knn_radius_excludes_the_point_itself() -> None:
    points = np.arange(10, dtype=np.float64)[:, None]  # a line: neighbours at distance 1, 2, ...
    radii = knn_radii(points, k=2, chunk=3)
    # The middle points have neighbours at 1 on both sides, so the 2nd is at 1; the ends' 2nd is at 2.
    np.testing.assert_allclose(radii, [2, 1, 1, 1, 1, 1, 1, 1, 1, 2])
    with pytest.raises(ValueError, match="k=5"):
        knn_radii(points[:5], k=5)


def test_identical_sets_score_one() -> None:
    real = _blob(400, 8, 0)
    scores = prdc(real, real.copy(), k=5, chunk=128)
    assert scores["precision"] == 1.0
    assert scores["recall"] == 1.0
    assert scores["coverage"] == 1.0
    # Every point lies in its own ball and in the balls of the neighbours that reach it: about k in all.
    assert 0.8 < scores["density"] < 1.6


def test_disjoint_far_sets_score_zero() -> None:
    real, fake = _blob(300, 8, 0), _blob(300, 8, 1, centre=100.0)
    scores = prdc(real, fake, k=5)
    assert scores == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_two_draws_of_one_distribution_score_high() -> None:
    scores = prdc(_blob(1000, 4, 0), _blob(1000, 4, 1), k=5)
    assert scores["precision"] > 0.85 and scores["recall"] > 0.85 and scores["coverage"] > 0.85


def test_a_collapsed_set_has_high_precision_and_low_recall_and_diversity() -> None:
    real = _blob(500, 8, 0)
    # Mode collapse: every sample is a small jitter around one real point.
    collapsed = real[0] + 0.01 * _blob(500, 8, 1)
    scores = prdc(real, collapsed, k=5)
    assert scores["precision"] == 1.0
    assert scores["recall"] < 0.05
    assert scores["coverage"] < 0.05
    assert mean_pairwise_distance(collapsed) < 0.05 * mean_pairwise_distance(real)


def test_mean_pairwise_distance_of_known_points() -> None:
    # Pairs of (0,0), (3,4), (0,4): distances 5, 4, 3; mean over distinct pairs 4.
    assert mean_pairwise_distance(np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]]), chunk=2) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        mean_pairwise_distance(np.zeros((1, 3)))


def test_diversity_metrics_per_class_finds_the_collapsed_class() -> None:
    rng = np.random.default_rng(0)
    ref_labels = np.repeat(np.arange(10), 100)
    ref = rng.normal(0, 1, (1000, 6)) + 10 * ref_labels[:, None]
    labels = np.repeat(np.arange(10), 100)
    fake = rng.normal(0, 1, (1000, 6)) + 10 * labels[:, None]
    fake[labels == 3] = ref[ref_labels == 3][0] + 0.01 * rng.normal(0, 1, (100, 6))  # class 3 collapsed
    report = diversity_metrics(fake, labels, ref, ref_labels, k=5)
    per_class = report["per_class"]
    assert len(per_class) == 10
    collapsed = per_class["Dress"]  # label 3
    healthy = [row for name, row in per_class.items() if name != "Dress"]
    assert collapsed["recall"] < 0.1 and all(row["recall"] > 0.7 for row in healthy)
    assert collapsed["diversity"] < 0.05 * min(row["diversity"] for row in healthy)
    assert report["samples"] == report["reference_samples"] == 1000
    assert report["within_class_diversity"] == pytest.approx(
        np.mean([r["diversity"] for r in per_class.values()]), abs=1e-3
    )


def test_reference_halves_are_disjoint_and_balanced() -> None:
    labels = np.repeat(np.arange(10), 7)
    first, second = reference_halves(labels, seed=3)
    assert not set(first) & set(second)
    assert np.bincount(labels[first]).tolist() == [3] * 10 == np.bincount(labels[second]).tolist()
    keep = per_class_subset(labels, 2)
    assert np.bincount(labels[keep]).tolist() == [2] * 10
