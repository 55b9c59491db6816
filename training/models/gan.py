"""Class-conditional DCGAN: a generator with conditional batch norm, a projection discriminator
with spectral norm, an optional minibatch standard-deviation feature and an auxiliary classifier
head; DiffAugment (Zhao et al. 2020) for the discriminator's inputs."""

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


def minibatch_stddev(h: torch.Tensor, group: int = 4) -> torch.Tensor:
    """Append one channel: the feature standard deviation across a group of samples (Karras et al. 2018).

    A generator that gives every sample of a group the same picture shows a zero there, which the
    discriminator can learn to reject; that is its lever against mode collapse.
    """
    b, c, height, width = h.shape
    g = min(group, b)
    while b % g:
        g -= 1
    y = h.view(g, -1, c, height, width)
    y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # [B / g]
    y = y.view(-1, 1, 1, 1).repeat(g, 1, height, width)
    return torch.cat([h, y], dim=1)


class Discriminator(nn.Module):
    """Returns (realness logit [B], class logits [B, num_classes]) for images and their labels."""

    def __init__(self, num_classes: int = 10, width: int = 64, mbstd_group: int = 0) -> None:
        super().__init__()
        self.mbstd_group = mbstd_group
        self.features = nn.Sequential(
            spectral_norm(nn.Conv2d(1, width, 4, stride=2, padding=1)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(width, 2 * width, 4, stride=2, padding=1)),
            nn.LeakyReLU(0.2),
        )
        extra = 1 if mbstd_group else 0
        self.head = nn.Sequential(
            spectral_norm(nn.Conv2d(2 * width + extra, 4 * width, 3, padding=1)), nn.LeakyReLU(0.2)
        )
        self.linear = spectral_norm(nn.Linear(4 * width, 1))
        self.project = spectral_norm(nn.Embedding(num_classes, 4 * width))
        self.aux = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x * 2 - 1)
        if self.mbstd_group:
            h = minibatch_stddev(h, self.mbstd_group)
        h = self.head(h).sum(dim=(2, 3))
        realness = self.linear(h).squeeze(1) + (self.project(label) * h).sum(dim=1)
        return realness, self.aux(h)


def diff_augment(x: torch.Tensor, policy: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Differentiable augmentation (Zhao et al. 2020), applied alike to real and generated images
    before the discriminator, so it cannot memorise the training set and the generator still gets
    gradients through it.

    ``policy``: comma-separated ``translation`` (shift by up to 1/8 of the side, zero padded) and
    ``cutout`` (zero a random square of half the side).
    """
    for name in filter(None, policy.split(",")):
        if name == "translation":
            x = _translation(x, 0.125, generator)
        elif name == "cutout":
            x = _cutout(x, 0.5, generator)
        else:
            raise ValueError(f"unknown DiffAugment policy {name!r}; use translation and/or cutout")
    return x


def _translation(x: torch.Tensor, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    tx = torch.randint(-sh, sh + 1, (b, 1, 1), generator=generator)
    ty = torch.randint(-sw, sw + 1, (b, 1, 1), generator=generator)
    gb, gx, gy = torch.meshgrid(torch.arange(b), torch.arange(h), torch.arange(w), indexing="ij")
    gx = torch.clamp(gx + tx + 1, 0, h + 1)
    gy = torch.clamp(gy + ty + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    return padded.permute(0, 2, 3, 1)[gb, gx, gy].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ox = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), generator=generator)
    oy = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), generator=generator)
    gb, gx, gy = torch.meshgrid(torch.arange(b), torch.arange(ch), torch.arange(cw), indexing="ij")
    gx = torch.clamp(gx + ox - ch // 2, 0, h - 1)
    gy = torch.clamp(gy + oy - cw // 2, 0, w - 1)
    mask = torch.ones(b, h, w, dtype=x.dtype)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)
