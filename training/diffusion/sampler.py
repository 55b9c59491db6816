"""Reference DDIM/DDPM and DPM-Solver++(2M) samplers with classifier-free guidance, in PyTorch.

The DDIM step mirrors diffusers' ``DDIMScheduler.step()`` (epsilon prediction, no thresholding,
x_0 clipped to [-1, 1]) and implements eq. 12 of Song et al. 2021 ("DDIM"), where eta = 0 is
deterministic DDIM and eta = 1 matches DDPM's posterior variance. ``ddpm`` is the same loop over
every one of the T steps with eta = 1.

:func:`dpm_solver_pp_step` is the multistep second-order DPM-Solver++ of Lu et al. 2022
("DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
arXiv:2211.01095), Algorithm 2 (eq. 8 for the first-order start), in its data-prediction form:
the denoiser's epsilon becomes an x_0 prediction clipped to [-1, 1] exactly as DDIM clips it,
and with lambda_t = log(alpha_t / sigma_t), h_i = lambda_{t_i} - lambda_{t_{i-1}}, r_i = h_{i-1} / h_i,

    D_i = (1 + 1 / (2 r_i)) x0_{i-1} - 1 / (2 r_i) x0_{i-2}
    x_{t_i} = sigma_{t_i} / sigma_{t_{i-1}} x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i

with D_1 = x0_0 on the first step (that step is DDIM), and the final step to t = 0 taken at first
order (it returns the last x_0 prediction), as diffusers' ``DPMSolverMultistepScheduler`` does
with ``lower_order_final`` and ``final_sigmas_type="zero"``. Few-step solvers start from the
last trained timestep ("trailing" spacing, Lin et al. 2023, "Common Diffusion Noise Schedules
and Sample Steps are Flawed", table 2) so that x_T ~ N(0, I) is what the first call assumes.

The service's numpy sampler is tested against :func:`step`, :func:`dpm_solver_pp_step` and
:func:`timesteps` step by step.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


SAMPLERS = ("ddim", "ddpm", "dpmpp2m")
SPACINGS = ("leading", "trailing", "linspace")


def timesteps(num_train_steps: int, num_steps: int, spacing: str = "leading") -> np.ndarray:
    """Descending timesteps, evenly spaced.

    "leading" (diffusers' default for DDIM): 0, k, 2k, ... with k = T // steps, so sampling starts
    below T - 1. "trailing" (Lin et al. 2023): T - 1, T - 1 - T/steps, ..., rounded, so it starts at
    the pure-noise end, which matters when the steps are few.
    """
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"steps must be in 1..{num_train_steps}, got {num_steps}")
    if spacing == "trailing":
        return (np.round(np.arange(num_train_steps, 0, -num_train_steps / num_steps)) - 1).astype(np.int64)
    if spacing == "linspace":
        return np.round(np.linspace(0, num_train_steps - 1, num_steps))[::-1].astype(np.int64)
    if spacing != "leading":
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
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


def _alpha_sigma_lambda(alphas_cumprod: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = alphas_cumprod[t]
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    return alpha, sigma, torch.log(alpha) - torch.log(sigma)


def dpm_solver_pp_step(
    eps: torch.Tensor,
    t: int,
    t_next: int,
    x: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    x0_last: torch.Tensor | None,
    t_last: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++(2M) update x_t -> x_{t_next} (t_next < 0: the final step, to clean data).

    ``x0_last``/``t_last`` are the previous step's x_0 prediction and timestep (None on the first
    step, which is then first order). Returns (x_next, x0_pred); x0_pred is the next step's x0_last.
    """
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(alphas_cumprod, t)
    x0 = ((x - sigma_t * eps) / alpha_t).clamp(-1, 1)
    if t_next < 0:
        return x0, x0
    alpha_n, sigma_n, lambda_n = _alpha_sigma_lambda(alphas_cumprod, t_next)
    h = lambda_n - lambda_t
    d = x0
    if x0_last is not None and t_last is not None:
        r = (lambda_t - _alpha_sigma_lambda(alphas_cumprod, t_last)[2]) / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_last
    x_next = (sigma_n / sigma_t) * x - alpha_n * torch.expm1(-h) * d
    return x_next, x0


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
    method: str = "ddim",
    spacing: str | None = None,
) -> torch.Tensor:
    """Sample images in [0,1] for ``labels``; DDIM with ``eta`` (DDPM: num_steps = T, eta = 1),
    or ``method="dpmpp2m"`` (DPM-Solver++(2M), deterministic; ``eta`` unused).

    ``spacing`` defaults to "leading" for DDIM/DDPM and "trailing" for DPM-Solver++.
    ``initial`` (x_T) and ``noises`` (one per step) replace the generator's draws, so another
    implementation can be compared with this one on the same random numbers.
    """
    if method not in SAMPLERS:
        raise ValueError(f"method must be one of {SAMPLERS}, got {method!r}")
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
    x = initial.clone() if initial is not None else torch.randn((len(labels), 1, 28, 28), generator=generator)
    ts = timesteps(len(ac), num_steps, spacing or ("trailing" if method == "dpmpp2m" else "leading"))
    x0_last: torch.Tensor | None = None
    t_last: int | None = None
    for i, t in enumerate(ts):
        t_prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
        eps = guided_epsilon(
            model, x, torch.full((len(labels),), int(t), dtype=torch.int64), labels, null_class, guidance
        )
        if method == "dpmpp2m":
            x, x0 = dpm_solver_pp_step(eps, int(t), t_prev, x, ac, x0_last, t_last)
            x0_last, t_last = x0, int(t)
        else:
            if eta > 0:
                noise = noises[i] if noises is not None else torch.randn(x.shape, generator=generator)
            else:
                noise = None
            x, x0 = step(eps, int(t), t_prev, x, ac, eta, noise)
        if callback is not None:
            callback(i, x, x0)
    return ((x + 1) / 2).clamp(0, 1)
