"""Reference DDIM/DDPM sampler with classifier-free guidance, in PyTorch.

The step mirrors diffusers' ``DDIMScheduler.step()`` (epsilon prediction, no thresholding, x_0
clipped to [-1, 1]) and implements eq. 12 of Song et al. 2021 ("DDIM"), where eta = 0 is
deterministic DDIM and eta = 1 matches DDPM's posterior variance. ``ddpm`` is the same loop over
every one of the T steps with eta = 1. The service's numpy sampler is tested against
:func:`step` and :func:`timesteps` step by step.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def timesteps(num_train_steps: int, num_steps: int) -> np.ndarray:
    """Descending timesteps, evenly spaced ("leading" spacing, as diffusers' default for DDIM)."""
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"steps must be in 1..{num_train_steps}, got {num_steps}")
    ratio = num_train_steps // num_steps
    return (np.arange(num_steps) * ratio)[::-1].astype(np.int64)


def guided_epsilon(
    model: Denoiser, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, null_class: int, guidance: float
) -> torch.Tensor:
    """eps = eps_uncond + w (eps_cond - eps_uncond) (Ho & Salimans 2022); w = 1 is plain conditioning."""
    if guidance == 1.0:
        return model(x, t, labels)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, null_class)]))
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)


def step(
    eps: torch.Tensor,
    t: int,
    t_prev: int,
    x: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    eta: float,
    noise: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update from x_t to x_{t_prev} (t_prev < 0 means the final step). Returns (x_prev, x0_pred)."""
    a_t = alphas_cumprod[t]
    a_prev = alphas_cumprod[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=alphas_cumprod.dtype)
    x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
    eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()  # re-derived from the clipped x0, as diffusers does
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    direction = (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
    x_prev = a_prev.sqrt() * x0 + direction
    if eta > 0 and noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev, x0


@torch.no_grad()
def sample(
    model: Denoiser,
    labels: torch.Tensor,
    alphas_cumprod: np.ndarray,
    num_steps: int,
    null_class: int,
    guidance: float = 1.0,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    initial: torch.Tensor | None = None,
    noises: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sample images in [0,1] for ``labels``; DDIM with ``eta`` (DDPM: num_steps = T, eta = 1).

    ``initial`` (x_T) and ``noises`` (one per step) replace the generator's draws, so another
    implementation can be compared with this one on the same random numbers.
    """
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
    x = initial.clone() if initial is not None else torch.randn((len(labels), 1, 28, 28), generator=generator)
    ts = timesteps(len(ac), num_steps)
    for i, t in enumerate(ts):
        t_prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
        eps = guided_epsilon(
            model, x, torch.full((len(labels),), int(t), dtype=torch.int64), labels, null_class, guidance
        )
        if eta > 0:
            noise = noises[i] if noises is not None else torch.randn(x.shape, generator=generator)
        else:
            noise = None
        x, x0 = step(eps, int(t), t_prev, x, ac, eta, noise)
        if callback is not None:
            callback(i, x, x0)
    return ((x + 1) / 2).clamp(0, 1)
