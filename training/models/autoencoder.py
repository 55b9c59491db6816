"""A small U-Net restorer: corrupted image (+ optional inpainting mask) in, clean image out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.GroupNorm(8, c_out),
        nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(8, c_out),
        nn.SiLU(),
    )


class Restorer(nn.Module):
    """Encoder-decoder with skip connections at 28, 14 and 7 pixels.

    Inputs ``image`` [B,1,28,28] in [0,1] and ``mask`` [B,1,28,28] (1 marks pixels known to be
    damaged, to be inpainted; all zeros when unknown). Output: the restored image in [0,1]. The
    skip connections and the input fed to the last layer give an identity path, so clean inputs
    come back nearly unchanged while corruptions are removed.
    """

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.enc1 = _block(2, w1)
        self.enc2 = _block(w1, w2)
        self.mid = _block(w2, w3)
        self.up2 = nn.ConvTranspose2d(w3, w2, 2, stride=2)
        self.dec2 = _block(2 * w2, w2)
        self.up1 = nn.ConvTranspose2d(w2, w1, 2, stride=2)
        self.dec1 = _block(2 * w1, w1)
        self.head = nn.Conv2d(w1 + 2, 1, 3, padding=1)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = torch.cat([image, mask], dim=1)
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return torch.sigmoid(self.head(torch.cat([d1, x], dim=1)))
