"""Classifier pre- and post-processing on numpy: request images -> batch, logits -> top-k and OOD."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from services.classify.reply import ReplyEncoder
from services.core.errors import InvalidInput
from services.core.images import MAX_REQUEST_PIXELS, TensorInput, collect_images
from services.core.manifest import Manifest

MAX_TOP_K = 10
OOD_OUTPUT = "ood_score"
# Up to this many images, post-processing runs in plain Python: for a few rows of ten logits each
# numpy call costs more in overhead than the arithmetic (a single image: 4x faster).
SMALL_BATCH = 4


@dataclass(frozen=True)
class Classifications:
    """Per-image results, batch-first, as plain Python values (what the reply is built from)."""

    class_ids: list[list[int]]  # [N][k], most probable first
    probabilities: list[list[float]]  # [N][k]
    ood_scores: list[float]  # [N], float32 values
    out_of_distribution: list[bool]  # [N]


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    e /= e.sum(axis=1, keepdims=True)
    return e


def energy(logits: np.ndarray) -> np.ndarray:
    """-logsumexp(logits): the energy OOD score (higher: less like the training data)."""
    m = logits.max(axis=1)
    return -(m + np.log(np.exp(logits - m[:, None]).sum(axis=1)))


class ClassifierModel:
    """The classify service's view of a classifier manifest."""

    def __init__(self, manifest: Manifest, max_images: int, max_pixels: int = MAX_REQUEST_PIXELS) -> None:
        if len(manifest.inputs) != 1 or len(manifest.outputs) < 1:
            raise ValueError(f"classifier {manifest.name}/{manifest.version} must have one input and a logits output")
        self.manifest = manifest
        self.input_name = manifest.inputs[0].name
        self.output_name = manifest.outputs[0].name
        self.labels = list(manifest.labels)
        self.num_classes = manifest.outputs[0].shape[-1]
        if len(self.labels) != self.num_classes:
            self.labels = [str(i) for i in range(self.num_classes)]
        self.replies = ReplyEncoder(self.labels)
        self.ood_threshold = manifest.ood.threshold if manifest.ood else float("inf")
        # A model may compute its own out-of-distribution score in the graph (classifier v2: a
        # Mahalanobis + energy combination), calibrated by the manifest's threshold; otherwise
        # the service scores the logits' energy.
        names = [spec.name for spec in manifest.outputs]
        self.ood_output = OOD_OUTPUT if OOD_OUTPUT in names else None
        self.max_images = max_images
        self.max_pixels = max_pixels

    def batch(self, images: list[bytes], tensor: TensorInput | None) -> np.ndarray:
        """Validate and convert a request's images into float32 [N, 1, 28, 28]."""
        return collect_images(images, tensor, self.max_images, max_pixels=self.max_pixels)

    def top_k(self, requested: int, default: int) -> int:
        k = requested or default
        if not 1 <= k <= min(MAX_TOP_K, self.num_classes):
            raise InvalidInput("top_k", f"must be between 1 and {min(MAX_TOP_K, self.num_classes)}, got {requested}")
        return k

    def postprocess(self, outputs: dict[str, np.ndarray], k: int) -> Classifications:
        logits = outputs[self.output_name]
        scores = None
        if self.ood_output is not None:
            scores = np.asarray(outputs[self.ood_output], dtype=np.float32).reshape(len(logits)).tolist()
        if len(logits) <= SMALL_BATCH:
            ids, probabilities, energies = _small_batch(logits.tolist(), k)
        else:
            probs = softmax(logits)
            # Softmax keeps the logits' order: sort those (ties stay in class order either way).
            top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
            ids = top.tolist()
            probabilities = probs[np.arange(len(top))[:, None], top].tolist()
            energies = energy(logits).astype(np.float32).tolist() if scores is None else []
        if scores is None:
            scores = energies
        threshold = self.ood_threshold
        return Classifications(
            class_ids=ids,
            probabilities=probabilities,
            ood_scores=scores,
            out_of_distribution=[score > threshold for score in scores],
        )


def _small_batch(rows: list[list[float]], k: int) -> tuple[list[list[int]], list[list[float]], list[float]]:
    """(top-k class ids, their probabilities, energies as float32 values) of a few rows of logits.

    The same figures as :func:`softmax` and :func:`energy` (to float32 rounding); ties stay in
    class order, as the numpy path's stable argsort keeps them.
    """
    ids, probabilities, energies = [], [], []
    f32 = np.float32
    for row in rows:
        m = max(row)
        e = [math.exp(v - m) for v in row]
        total = sum(e)
        top = sorted(range(len(row)), key=row.__getitem__, reverse=True)[:k]
        ids.append(top)
        probabilities.append([e[i] / total for i in top])
        energies.append(float(f32(-(m + math.log(total)))))
    return ids, probabilities, energies
