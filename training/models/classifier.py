"""A small VGG-style CNN for 28x28 grayscale images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def _conv_block(c_in: int, c_out: int, batch_norm: bool = True) -> nn.Sequential:
    if not batch_norm:
        # The layout of an exported (batch norm folded) graph, so its weights load back unchanged.
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=True), nn.ReLU(inplace=True))
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class Classifier(nn.Module):
    """Two stages of two 3x3 convolutions each, then a small MLP head.

    Takes pixels in [0, 1] shaped [B, 1, 28, 28] and returns logits [B, num_classes]. Input
    normalisation is part of the graph, so the exported model's contract is plain [0, 1] pixels.
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, int] = (32, 64),
        hidden: int = 128,
        dropout: float = 0.3,
        mean: float = 0.286,
        std: float = 0.353,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        w1, w2 = widths
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))
        self.features = nn.Sequential(
            _conv_block(1, w1, batch_norm),
            _conv_block(w1, w1, batch_norm),
            nn.MaxPool2d(2),
            _conv_block(w1, w2, batch_norm),
            _conv_block(w2, w2, batch_norm),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(w2 * 7 * 7, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, hidden] (used for domain FID by the evaluation code)."""
        h = self.features((x - self.mean) / self.std)
        return self.head[:4](h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - self.mean) / self.std))

    def logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the penultimate (hidden-layer) features, which the Mahalanobis OOD score reads."""
        h = self.head[:5](self.features((x - self.mean) / self.std))
        return self.head[5](h), h


def from_onnx(path: str | Path, **kwargs: Any) -> Classifier:
    """A batch-norm-free :class:`Classifier` holding the weights of an exported one.

    The exporter folds batch norm into the convolutions (``<conv>.weight`` and ``<conv>.bias``;
    ``<conv>.weight_bias`` in round 1's graphs; ``model.``-prefixed in served graphs), so the
    graph's initializers map one to one onto the layers of ``Classifier(batch_norm=False)``;
    widths and hidden size are read from their shapes.
    """
    import onnx
    from onnx import numpy_helper

    weights = {
        t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in onnx.load(str(path)).graph.initializer
    }
    # A served graph (ScoredClassifier, round 2 on) names the classifier's weights "model.<name>".
    weights.update({name.removeprefix("model."): w for name, w in weights.items() if name.startswith("model.")})
    widths = (int(weights["features.0.0.weight"].shape[0]), int(weights["features.3.0.weight"].shape[0]))
    model = Classifier(widths=widths, hidden=int(weights["head.2.weight"].shape[0]), batch_norm=False, **kwargs)
    state = {}
    for name in model.state_dict():
        source = name
        if name.startswith("features.") and name not in weights:
            source = name.replace(".0.bias", ".0.weight_bias")  # round 1's exporter folded batch norm this way
        state[name] = weights[source].reshape(model.state_dict()[name].shape)
    model.load_state_dict(state)
    return model


def ood_features(model: Classifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits, and the features the Mahalanobis OOD score reads: the spatial mean and standard
    deviation of every convolution block's output channels and the logits, concatenated.

    The early blocks see pixel statistics (constant images, noise, stripes, inverted contrast)
    that the last layers alone map close to clothing; the logits carry the class evidence.
    """
    h = (x - model.mean) / model.std
    means, stds = [], []
    for layer in model.features:
        h = layer(h)
        if isinstance(layer, nn.Sequential):
            m = h.mean(dim=(2, 3))
            means.append(m)
            centred = h - m[:, :, None, None]
            stds.append(torch.sqrt((centred * centred).mean(dim=(2, 3)) + 1e-12))
    logits = model.head(h)
    return logits, torch.cat([*means, *stds, logits], dim=1)


def energy(logits: torch.Tensor) -> torch.Tensor:
    """-logsumexp(logits), written out so that it exports to plain operators."""
    m = logits.max(dim=1, keepdim=True).values
    return -(m[:, 0] + torch.log(torch.exp(logits - m).sum(dim=1)))


class ScoredClassifier(nn.Module):
    """The served graph: logits (mean over the image and its mirror with ``tta_flip``) and ``ood_score``.

    ``ood_score`` adds two standardised scores: the log of the minimum over classes of the
    squared Mahalanobis distance of :func:`ood_features` to the class means under one tied
    covariance (``whiten`` is its inverse square root), and the energy of the logits. Each is
    standardised by its mean and standard deviation on held-out in-distribution images
    (:meth:`standardise`), so neither dominates: Mahalanobis catches images whose low-level
    statistics are unlike clothing, energy catches clothing-like shapes the classifier is
    unsure of (handwritten digits).
    """

    def __init__(self, model: Classifier, means: Any, whiten: Any, tta_flip: bool = False) -> None:
        super().__init__()
        self.model = model
        self.tta_flip = tta_flip
        w = torch.as_tensor(whiten, dtype=torch.float32)
        self.register_buffer("whiten", w)
        self.register_buffer("centres", torch.as_tensor(means, dtype=torch.float32) @ w)
        self.register_buffer("location", torch.zeros(2))
        self.register_buffer("scale", torch.ones(2))

    def components(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, classes] and the raw (log Mahalanobis, energy) pair [B, 2]."""
        logits, features = ood_features(self.model, x)
        z = features @ self.whiten
        distance = ((z[:, None, :] - self.centres[None]) ** 2).sum(dim=2).min(dim=1).values
        return logits, torch.stack([torch.log(distance + 1e-6), energy(logits)], dim=1)

    @torch.no_grad()
    def standardise(self, x: torch.Tensor, batch_size: int = 1000) -> None:
        """Set the location and scale of both components from in-distribution images ``x``."""
        raw = torch.cat([self.components(x[s : s + batch_size])[1] for s in range(0, len(x), batch_size)])
        self.location.copy_(raw.mean(dim=0))
        self.scale.copy_(raw.std(dim=0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, raw = self.components(x)
        if self.tta_flip:
            logits = 0.5 * (logits + self.model(x.flip(3)))
        return logits, ((raw - self.location) / self.scale).sum(dim=1)
