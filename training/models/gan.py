"""Class-conditional DCGAN: a generator with conditional batch norm, a projection discriminator
with spectral norm and an auxiliary classifier head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose scale and shift are looked up per class (de Vries et al. 2017)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gamma = nn.Embedding(num_classes, channels)
        self.beta = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * self.gamma(y)[:, :, None, None] + self.beta(y)[:, :, None, None]


class Generator(nn.Module):
    """``z`` [B, latent_dim] and ``label`` [B] int64 -> image [B, 1, 28, 28] in [0, 1]."""

    def __init__(self, latent_dim: int = 64, num_classes: int = 10, width: int = 128) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.width = width
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.fc = nn.Linear(2 * latent_dim, width * 7 * 7)
        self.bn0 = ConditionalBatchNorm2d(width, num_classes)
        self.conv1 = nn.Conv2d(width, width // 2, 3, padding=1)
        self.bn1 = ConditionalBatchNorm2d(width // 2, num_classes)
        self.conv2 = nn.Conv2d(width // 2, width // 4, 3, padding=1)
        self.bn2 = ConditionalBatchNorm2d(width // 4, num_classes)
        self.out = nn.Conv2d(width // 4, 1, 3, padding=1)

    def forward(self, z: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, self.embed(label)], dim=1)).view(-1, self.width, 7, 7)
        h = F.relu(self.bn0(h, label))
        h = F.relu(self.bn1(self.conv1(F.interpolate(h, scale_factor=2.0, mode="nearest")), label))
        h = F.relu(self.bn2(self.conv2(F.interpolate(h, scale_factor=2.0, mode="nearest")), label))
        return torch.sigmoid(self.out(h))


class Discriminator(nn.Module):
    """Returns (realness logit [B], class logits [B, num_classes]) for images and their labels."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            spectral_norm(nn.Conv2d(1, width, 4, stride=2, padding=1)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(width, 2 * width, 4, stride=2, padding=1)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(2 * width, 4 * width, 3, padding=1)),
            nn.LeakyReLU(0.2),
        )
        self.linear = spectral_norm(nn.Linear(4 * width, 1))
        self.project = spectral_norm(nn.Embedding(num_classes, 4 * width))
        self.aux = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x * 2 - 1).sum(dim=(2, 3))
        realness = self.linear(h).squeeze(1) + (self.project(label) * h).sum(dim=1)
        return realness, self.aux(h)
