"""A small VGG-style CNN for 28x28 grayscale images."""

from __future__ import annotations

import torch
from torch import nn


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
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
    ) -> None:
        super().__init__()
        w1, w2 = widths
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))
        self.features = nn.Sequential(
            _conv_block(1, w1),
            _conv_block(w1, w1),
            nn.MaxPool2d(2),
            _conv_block(w1, w2),
            _conv_block(w2, w2),
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
