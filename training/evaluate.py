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
import onnxruntime as ort

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


def psnr(restored: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB for [0,1] images (MSE floored at 1e-10)."""
    mse = ((restored.astype(np.float64) - clean) ** 2).reshape(len(clean), -1).mean(axis=1)
    return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))


def _box_mean(x: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k windows ('valid' positions) of [N, H, W] arrays, via summed-area tables."""
    c = np.pad(x, ((0, 0), (1, 0), (1, 0))).cumsum(1).cumsum(2)
    return (c[:, k:, k:] - c[:, :-k, k:] - c[:, k:, :-k] + c[:, :-k, :-k]) / (k * k)


def ssim(restored: np.ndarray, clean: np.ndarray, window: int = 7) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004) with a uniform 7x7 window, data range 1, as skimage's default."""
    a = restored.reshape(len(restored), 28, 28).astype(np.float64)
    b = clean.reshape(len(clean), 28, 28).astype(np.float64)
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = _box_mean(a, window), _box_mean(b, window)
    n = window * window
    cov = n / (n - 1)  # sample covariance, as skimage
    var_a = (_box_mean(a * a, window) - mu_a**2) * cov
    var_b = (_box_mean(b * b, window) - mu_b**2) * cov
    cov_ab = (_box_mean(a * b, window) - mu_a * mu_b) * cov
    s = ((2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.reshape(len(s), -1).mean(axis=1)


def classifier_with_features(model_dir: Path) -> ort.InferenceSession:
    """The shipped classifier with its penultimate features exposed as a second output."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_dir / MODEL_FILE))
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers[model.graph.output[0].name]
    while node.op_type not in ("Gemm", "MatMul"):
        node = producers[node.input[0]]
    features = node.input[0]
    model.graph.output.append(helper.make_tensor_value_info(features, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def logits_and_features(session: ort.InferenceSession, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [N,1,28,28] in [0,1] -> (logits, penultimate features)."""
    logits, features = run_onnx(session, {"image": images.astype(np.float32)})
    return logits, features.reshape(len(features), -1)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr sqrt(A B) = sum of sqrt of eigenvalues of sqrt(A) B sqrt(A), which is symmetric PSD.
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    return float(
        ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(eig, 0, None)).sum()
    )


def class_consistency(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """How often the classifier labels a generated image as the class it was asked for."""
    pred = logits.argmax(1)
    return {
        "class_consistency": round(float((pred == labels).mean()), 4),
        "per_class_consistency": {
            LABELS[c]: round(float((pred[labels == c] == c).mean()), 4)
            for c in range(len(LABELS))
            if (labels == c).any()
        },
    }


def domain_fid_floors(session: ort.InferenceSession, train: Split, test: Split, seed: int = 0) -> dict[str, float]:
    """The two reference FIDs in classifier-feature space: real train vs test, noisy test vs test."""
    rng = np.random.default_rng(seed)
    test_x = to_input(test.images)
    _, test_f = logits_and_features(session, test_x)
    idx = rng.choice(len(train), size=min(len(test), len(train)), replace=False)
    _, train_f = logits_and_features(session, to_input(train.images[idx]))
    noisy = np.clip(test_x + rng.normal(0, 0.3, test_x.shape).astype(np.float32), 0, 1)
    _, noisy_f = logits_and_features(session, noisy)
    return {
        "fid_train_vs_test": round(frechet_distance(train_f, test_f), 3),
        "fid_noisy_test_sigma0.3_vs_test": round(frechet_distance(noisy_f, test_f), 3),
    }


def generative_metrics(
    samples: np.ndarray, labels: np.ndarray, classifier: Path, train: Split, test: Split
) -> dict[str, Any]:
    """Class consistency and domain FID of generated samples, with the two FID floors beside them."""
    session = classifier_with_features(classifier)
    logits, features = logits_and_features(session, samples)
    _, test_features = logits_and_features(session, to_input(test.images))
    metrics = class_consistency(logits, labels)
    metrics["domain_fid"] = round(frechet_distance(features, test_features), 3)
    metrics.update(domain_fid_floors(session, train, test))
    metrics["samples"] = int(len(samples))
    return metrics


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
