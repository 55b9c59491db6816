"""Generation on numpy: request validation, GAN inputs, and the diffusion steps over the ONNX denoiser.

Two updates, both mirroring ``training/diffusion/sampler.py`` and tested against it step by step:
DDIM (diffusers' ``DDIMScheduler.step`` with epsilon prediction and x0 clipping; Song et al. 2021,
eq. 12; DDPM is DDIM with eta = 1 over T steps) and DPM-Solver++(2M) (Lu et al. 2022,
arXiv:2211.01095, Algorithm 2, data prediction with the same x0 clipping), a multistep solver that
keeps the previous step's x0 prediction in the job. Everything the loop needs comes from the
denoiser's manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from services.core.errors import InvalidInput, OutOfRange
from services.core.manifest import Manifest


@dataclass(frozen=True)
class DiffusionSchedule:
    """The denoiser's noise schedule and conditioning conventions, read from its manifest."""

    alphas_cumprod: np.ndarray  # float32 [T]
    null_class: int
    num_classes: int
    default_guidance: float
    # Per-sampler defaults measured for this model (manifest extra.sampler_defaults), e.g. the
    # guidance at which few-step DPM-Solver++ matches DDIM-50's quality.
    sampler_defaults: dict[str, dict[str, float]] = field(default_factory=dict)

    def guidance_for(self, sampler: str) -> float:
        """The guidance scale a request that sets none gets with ``sampler``."""
        return float(self.sampler_defaults.get(sampler, {}).get("guidance_scale", self.default_guidance))

    def steps_for(self, sampler: str, fallback: int) -> int:
        """The step count a request that sets none gets with ``sampler``."""
        return int(self.sampler_defaults.get(sampler, {}).get("steps", fallback))

    @property
    def num_train_steps(self) -> int:
        return len(self.alphas_cumprod)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> DiffusionSchedule:
        extra = manifest.extra
        if extra.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"{manifest.name}: only epsilon prediction is supported, got {extra['prediction_type']}")
        return cls(
            alphas_cumprod=np.asarray(extra["alphas_cumprod"], dtype=np.float32),
            null_class=int(extra["null_class"]),
            num_classes=int(extra.get("num_classes", extra["null_class"])),
            default_guidance=float(extra.get("default_guidance_scale", 1.0)),
            sampler_defaults={
                str(k): {str(f): float(v) for f, v in d.items()} for k, d in extra.get("sampler_defaults", {}).items()
            },
        )


SAMPLERS = ("ddim", "dpmpp2m")  # DDPM is DDIM with eta = 1
# Few-step sampling starts at the last trained timestep ("trailing", Lin et al. 2023): with
# "leading" spacing 10 steps would start at t = 900 from pure noise.
DEFAULT_SPACING = {"ddim": "leading", "dpmpp2m": "trailing"}


def timesteps(num_train_steps: int, num_steps: int, spacing: str = "leading") -> np.ndarray:
    """Descending, evenly spaced timesteps ("leading" or "trailing"), as the reference sampler."""
    if spacing == "trailing":
        return (np.round(np.arange(num_train_steps, 0, -num_train_steps / num_steps)) - 1).astype(np.int64)
    if spacing == "linspace":
        return np.round(np.linspace(0, num_train_steps - 1, num_steps))[::-1].astype(np.int64)
    ratio = num_train_steps // num_steps
    return (np.arange(num_steps) * ratio)[::-1].astype(np.int64)


def ddim_step(
    eps: np.ndarray,
    t: int,
    t_prev: int,
    x: np.ndarray,
    alphas_cumprod: np.ndarray,
    eta: float,
    noise: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """One DDIM update x_t -> x_{t_prev} (t_prev < 0: the last step). Returns (x_prev, predicted x0)."""
    a_t = np.float32(alphas_cumprod[t])
    a_prev = np.float32(alphas_cumprod[t_prev]) if t_prev >= 0 else np.float32(1.0)
    x0 = np.clip((x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t), -1, 1)
    eps = (x - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
    sigma = np.float32(eta) * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    direction = np.sqrt(np.maximum(1 - a_prev - sigma**2, 0)) * eps
    x_prev = np.sqrt(a_prev) * x0 + direction
    if eta > 0 and noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev.astype(np.float32), x0.astype(np.float32)


def _alpha_sigma_lambda(alphas_cumprod: np.ndarray, t: int) -> tuple[np.float32, np.float32, np.float32]:
    a = np.float32(alphas_cumprod[t])
    alpha, sigma = np.sqrt(a), np.sqrt(np.float32(1) - a)
    return alpha, sigma, np.log(alpha) - np.log(sigma)


def dpm_solver_pp_step(
    eps: np.ndarray,
    t: int,
    t_next: int,
    x: np.ndarray,
    alphas_cumprod: np.ndarray,
    x0_last: np.ndarray | None,
    t_last: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """One DPM-Solver++(2M) update x_t -> x_{t_next} (t_next < 0: the last step). Returns (x_next, x0).

    With lambda = log(alpha / sigma), h = lambda_next - lambda_t and r = (lambda_t - lambda_last) / h:
    D = (1 + 1/(2r)) x0 - 1/(2r) x0_last (D = x0 on the first step: DDIM), and
    x_next = sigma_next / sigma_t x - alpha_next (e^-h - 1) D. The last step returns x0.
    """
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(alphas_cumprod, t)
    x0 = np.clip((x - sigma_t * eps) / alpha_t, -1, 1)
    if t_next < 0:
        return x0.astype(np.float32), x0.astype(np.float32)
    alpha_n, sigma_n, lambda_n = _alpha_sigma_lambda(alphas_cumprod, t_next)
    h = lambda_n - lambda_t
    d = x0
    if x0_last is not None and t_last is not None:
        r = (lambda_t - _alpha_sigma_lambda(alphas_cumprod, t_last)[2]) / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_last
    x_next = (sigma_n / sigma_t) * x - alpha_n * np.expm1(-h) * d
    return x_next.astype(np.float32), x0.astype(np.float32)


def to_pixels(x: np.ndarray) -> np.ndarray:
    """Model space [-1, 1] -> pixels [0, 1]."""
    return np.clip((x + 1) / 2, 0, 1).astype(np.float32)


@dataclass
class DiffusionJob:
    """One request's sampling state; the step scheduler advances many of these in shared calls."""

    labels: np.ndarray  # int64 [n]
    guidance: float
    eta: float
    steps: np.ndarray  # descending timesteps
    schedule: DiffusionSchedule
    rng: np.random.Generator
    x: np.ndarray = field(init=False)
    x0: np.ndarray | None = None
    index: int = 0
    sampler: str = "ddim"  # "ddim" (eta > 0 and T steps: DDPM) or "dpmpp2m"

    def __post_init__(self) -> None:
        self.x = self.rng.standard_normal((len(self.labels), 1, 28, 28), dtype=np.float32)

    @property
    def guided(self) -> bool:
        return self.guidance != 1.0

    @property
    def rows(self) -> int:
        """Denoiser rows per step: twice the images under classifier-free guidance."""
        return len(self.labels) * (2 if self.guided else 1)

    @property
    def done(self) -> bool:
        return self.index >= len(self.steps)

    def inputs(self) -> dict[str, np.ndarray]:
        t = np.full(len(self.labels), self.steps[self.index], dtype=np.int64)
        if not self.guided:
            return {"x_t": self.x, "t": t, "label": self.labels}
        null = np.full_like(self.labels, self.schedule.null_class)
        return {
            "x_t": np.concatenate([self.x, self.x]),
            "t": np.concatenate([t, t]),
            "label": np.concatenate([self.labels, null]),
        }

    def advance(self, eps: np.ndarray) -> None:
        """Apply one step with this job's slice of the denoiser output."""
        if self.guided:
            cond, uncond = eps[: len(self.labels)], eps[len(self.labels) :]
            eps = uncond + np.float32(self.guidance) * (cond - uncond)
        t = int(self.steps[self.index])
        t_prev = int(self.steps[self.index + 1]) if self.index + 1 < len(self.steps) else -1
        if self.sampler == "dpmpp2m":
            # The multistep solver needs the previous step's x0 prediction: it is still self.x0.
            t_last = int(self.steps[self.index - 1]) if self.index > 0 else None
            x0_last = self.x0 if self.index > 0 else None
            self.x, self.x0 = dpm_solver_pp_step(eps, t, t_prev, self.x, self.schedule.alphas_cumprod, x0_last, t_last)
        else:
            noise = self.rng.standard_normal(self.x.shape, dtype=np.float32) if self.eta > 0 else None
            self.x, self.x0 = ddim_step(eps, t, t_prev, self.x, self.schedule.alphas_cumprod, self.eta, noise)
        self.index += 1

    def images(self) -> np.ndarray:
        return to_pixels(self.x)


def resolve_labels(labels: list[int], count: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """One label per image: given for each, one for all, or drawn at random."""
    for i, label in enumerate(labels):
        if not 0 <= label < num_classes:
            raise OutOfRange(f"labels[{i}]", label, f"classes are 0..{num_classes - 1}")
    if not labels:
        return rng.integers(0, num_classes, size=count).astype(np.int64)
    if len(labels) == 1:
        return np.full(count, labels[0], dtype=np.int64)
    if len(labels) != count:
        raise InvalidInput("labels", f"give none, one, or count={count} labels; got {len(labels)}")
    return np.asarray(labels, dtype=np.int64)


def check_count(count: int, max_count: int) -> int:
    if not 1 <= count <= max_count:
        raise OutOfRange("count", count, f"1..{max_count}")
    return count


def gan_inputs(labels: np.ndarray, latent_dim: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Seeded standard-normal noise and labels for the GAN generator."""
    return {"z": rng.standard_normal((len(labels), latent_dim), dtype=np.float32), "label": labels}
