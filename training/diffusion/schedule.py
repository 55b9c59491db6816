"""Noise schedules and the training objective (Ho et al. 2020, "DDPM"; Nichol & Dhariwal 2021).

Everything is a pure function of arrays, so the serving side can rebuild the schedule from the
manifest's ``alphas_cumprod`` alone.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def cosine_alphas_cumprod(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """alpha_bar(t) of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), betas clipped at max_beta."""
    f = lambda t: math.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - f(i + 1) / f(i), max_beta) for i in range(timesteps)], dtype=np.float64)
    return np.cumprod(1.0 - betas)


def linear_alphas_cumprod(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """alpha_bar(t) of the linear schedule of DDPM (Ho et al. 2020)."""
    return np.cumprod(1.0 - np.linspace(beta_start, beta_end, timesteps, dtype=np.float64))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps  (DDPM eq. 4)."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """[0,1] pixels -> [-1,1], the data range the denoiser is trained on."""
    return images * 2 - 1


def epsilon_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    labels: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    null_class: int,
    p_uncond: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """The simple epsilon-prediction loss (DDPM eq. 14), with labels dropped to the null class at
    rate ``p_uncond`` so one network learns both branches of classifier-free guidance."""
    n = x0.shape[0]
    t = torch.randint(0, len(alphas_cumprod), (n,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    drop = torch.rand(n, generator=generator) < p_uncond
    labels = torch.where(drop, torch.full_like(labels, null_class), labels)
    prediction = model(q_sample(x0, t, noise, alphas_cumprod), t, labels)
    return F.mse_loss(prediction, noise)
