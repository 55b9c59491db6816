"""A small U-Net restorer: corrupted image (+ optional inpainting mask) in, clean image out."""

from __future__ import annotations

from pathlib import Path

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


class ResidualBlock(nn.Module):
    """``x + f(x)`` with f two 3x3 convolutions; f's last norm starts at zero, so the block starts as the identity.

    That lets blocks be added to a trained restorer without changing what it computes at first.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels),
        )
        nn.init.zeros_(self.body[4].weight)
        nn.init.zeros_(self.body[4].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Restorer(nn.Module):
    """Encoder-decoder with skip connections at 28, 14 and 7 pixels.

    Inputs ``image`` [B,1,28,28] in [0,1] and ``mask`` [B,1,28,28] (1 marks pixels known to be
    damaged, to be inpainted; all zeros when unknown). Output: the restored image in [0,1]. The
    skip connections and the input fed to the last layer give an identity path, so clean inputs
    come back nearly unchanged while corruptions are removed. ``mid_blocks`` residual blocks at
    7x7 pixels widen the receptive field where convolutions are cheapest (a 7x7 map costs a
    sixteenth of a 28x28 one).
    """

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), mid_blocks: int = 0, fine_blocks: int = 0) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.enc1 = _block(2, w1)
        self.enc2 = _block(w1, w2)
        self.mid = _block(w2, w3)
        self.deep = nn.Sequential(*(ResidualBlock(w3) for _ in range(mid_blocks)))
        self.up2 = nn.ConvTranspose2d(w3, w2, 2, stride=2)
        self.dec2 = _block(2 * w2, w2)
        self.fine2 = nn.Sequential(*(ResidualBlock(w2) for _ in range(fine_blocks)))
        self.up1 = nn.ConvTranspose2d(w2, w1, 2, stride=2)
        self.dec1 = _block(2 * w1, w1)
        self.fine1 = nn.Sequential(*(ResidualBlock(w1) for _ in range(fine_blocks)))
        self.head = nn.Conv2d(w1 + 2, 1, 3, padding=1)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = torch.cat([image, mask], dim=1)
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.deep(self.mid(F.max_pool2d(e2, 2)))
        d2 = self.fine2(self.dec2(torch.cat([self.up2(m), e2], dim=1)))
        d1 = self.fine1(self.dec1(torch.cat([self.up1(d2), e1], dim=1)))
        return torch.sigmoid(self.head(torch.cat([d1, x], dim=1)))


# Containers of residual blocks: a graph may hold fewer of them than the model built to load it.
BLOCK_GROUPS = ("deep", "fine2", "fine1")


def from_onnx(path: str | Path, mid_blocks: int = 0, fine_blocks: int = 0) -> Restorer:
    """A :class:`Restorer` holding an exported one's weights, with ``mid_blocks`` residual blocks at 7x7
    pixels and ``fine_blocks`` at 14 and at 28 in all.

    Blocks beyond the graph's own start as the identity, so the model computes what the graph does.
    Convolutions keep their module names in the graph; the exporter stores each GroupNorm's scale
    and shift as unnamed [C,1,1] initializers, in module order, which is how they are matched.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    named = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    affine = [v for k, v in named.items() if k.startswith("val_") and v.dim() == 3 and v.shape[1:] == (1, 1)]
    widths = (
        int(named["enc1.0.weight"].shape[0]),
        int(named["enc2.0.weight"].shape[0]),
        int(named["mid.0.weight"].shape[0]),
    )
    have = {g: len({k.split(".")[1] for k in named if k.startswith(g + ".")}) for g in BLOCK_GROUPS}
    want = {"deep": mid_blocks, "fine2": fine_blocks, "fine1": fine_blocks}
    for group, n in have.items():
        if want[group] < n:
            raise ValueError(f"{path}: has {n} residual blocks in {group}, cannot load it into {want[group]}")
    model = Restorer(widths, mid_blocks=mid_blocks, fine_blocks=fine_blocks)
    state = model.state_dict()

    def in_graph(key: str) -> bool:
        group, _, rest = key.partition(".")
        return group not in BLOCK_GROUPS or int(rest.split(".")[0]) < have[group]

    # GroupNorms of the graph's own residual blocks are among its affines; the blocks added here are not.
    norms = [k for k in state if in_graph(k) and k.rsplit(".", 2)[-2] in ("1", "4")]
    if len(norms) != len(affine):
        raise ValueError(f"{path}: {len(affine)} norm parameters in the graph, the model has {len(norms)}")
    for key, value in zip(norms, affine, strict=True):
        state[key] = value.reshape(state[key].shape)
    for key in state:
        if key in named:
            state[key] = named[key].reshape(state[key].shape)
    model.load_state_dict(state)
    return model
