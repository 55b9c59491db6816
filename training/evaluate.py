"""Model quality figures computed from the exported ONNX files (never hard-coded).

``python -m training.evaluate classifier --model-dir models/classifier/1`` prints the figures;
the training scripts call the same functions and store their results in the manifest.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.data import LABELS, Split, load_split
from training.export import MODEL_FILE, onnx_session, run_onnx


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] in [0, 1], the models' input contract."""
    return (images.astype(np.float32) / 255.0)[:, None]


def energy_score(logits: np.ndarray) -> np.ndarray:
    """Energy OOD score, -logsumexp(logits) (Liu et al. 2020): higher means more out-of-distribution."""
    m = logits.max(axis=1, keepdims=True)
    return -(m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))


def classifier_logits(model_dir: Path, images: np.ndarray) -> np.ndarray:
    """Logits of the exported classifier over uint8 images."""
    session = onnx_session(model_dir / MODEL_FILE)
    return run_onnx(session, {"image": to_input(images)})[0]


def classifier_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy, per-class accuracy and the confusion matrix."""
    pred = logits.argmax(axis=1)
    per_class = {LABELS[c]: round(float((pred[labels == c] == c).mean()), 4) for c in range(len(LABELS))}
    confusion = np.zeros((len(LABELS), len(LABELS)), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    return {
        "accuracy": round(float((pred == labels).mean()), 4),
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
        "examples": int(len(labels)),
    }


def synthetic_ood(n: int, seed: int) -> dict[str, np.ndarray]:
    """Inputs that are plainly not clothing, to report how often the OOD flag catches them."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
    blank = np.full((n, 28, 28), 255, dtype=np.uint8)
    checker = np.indices((28, 28)).sum(axis=0) // 4 % 2 * 255
    checkers = np.broadcast_to(checker.astype(np.uint8), (n, 28, 28)).copy()
    return {"uniform_noise": noise, "all_white": blank, "checkerboard": checkers}


def calibrate_ood(val_logits: np.ndarray, quantile: float = 0.95) -> float:
    """Energy threshold that keeps ``quantile`` of in-distribution validation images unflagged."""
    return float(np.quantile(energy_score(val_logits), quantile))


def ood_report(model_dir: Path, threshold: float, test: Split, seed: int = 0) -> dict[str, float]:
    """Fraction flagged as OOD: the in-distribution test set and each synthetic OOD set."""
    report = {"test_flagged": float((energy_score(classifier_logits(model_dir, test.images)) > threshold).mean())}
    for name, images in synthetic_ood(500, seed).items():
        report[f"{name}_flagged"] = float((energy_score(classifier_logits(model_dir, images)) > threshold).mean())
    return {k: round(v, 4) for k, v in report.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", choices=["classifier"])
    parser.add_argument("--model-dir", type=Path, default=Path("models/classifier/1"))
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    test = load_split("test", args.data_dir)
    metrics = classifier_metrics(classifier_logits(args.model_dir, test.images), test.labels)
    metrics.pop("confusion_matrix")
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
