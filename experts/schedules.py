"""Shared sampling math: sigma schedules, `to_d`, phi functions and seeded noise.

Every solver module imports these; none copies them. Notation follows
k-diffusion (Karras et al. 2022, arXiv 2206.00364): ``x = x0 + sigma * eps`` and the
model returns the denoised prediction ``D(x, sigma)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SD_BETA_START = 0.00085
SD_BETA_END = 0.012
SD_TRAIN_STEPS = 1000


def to_d(x: Tensor, sigma: Tensor | float, denoised: Tensor) -> Tensor:
    """Probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (Karras eq. 3)."""
    return (x - denoised) / sigma


def append_zero(sigmas: Tensor) -> Tensor:
    """Append the final sigma = 0 that every schedule ends on."""
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) eq. 5: ``n`` noise levels plus the final zero, shape [n + 1]."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas).float()


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Noise levels uniform in log sigma (uniform in the half-log-SNR ``lambda``), shape [n + 1]."""
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return append_zero(sigmas).float()


def scaled_linear_discrete_sigmas(
    beta_start: float = SD_BETA_START, beta_end: float = SD_BETA_END, train_steps: int = SD_TRAIN_STEPS
) -> Tensor:
    """The discrete sigma table of Stable Diffusion's ``scaled_linear`` betas, ascending, shape [train_steps].

    ``sigma_t = sqrt((1 - alphā_t) / alphā_t)``, as ComfyUI's ``ModelSamplingDiscrete`` and
    diffusers' ``DDPMScheduler(beta_schedule="scaled_linear")`` compute it.
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, train_steps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()


def discrete_timestep_sigmas(n: int, discrete_sigmas: Tensor) -> Tensor:
    """``n`` levels of an ascending discrete table at evenly spaced timesteps with "trailing"
    spacing (the first step is the last trained timestep, so every schedule starts at
    sigma_max; Lin et al. 2023, arXiv 2305.08891, Table 2), plus the final zero, shape [n + 1]."""
    train_steps = len(discrete_sigmas)
    if n < 1 or n > train_steps:
        raise ValueError(f"steps must be in [1, {train_steps}] for this model's discrete schedule, got {n}")
    timesteps = (train_steps - torch.arange(n, dtype=torch.float64) * (train_steps / n)).round().long() - 1
    sigmas = discrete_sigmas.double()[timesteps.clamp(0, train_steps - 1)]
    return append_zero(sigmas).float()


def phi_1(neg_h: Tensor) -> Tensor:
    """phi_1(-h) = (exp(-h) - 1) / (-h), stable near 0 (DPM-Solver, Lu et al. 2022)."""
    return torch.special.expm1(neg_h) / neg_h


def phi_2(neg_h: Tensor) -> Tensor:
    """phi_2(-h) = (phi_1(-h) - 1) / (-h)."""
    return (phi_1(neg_h) - 1) / neg_h


def phi_3(neg_h: Tensor) -> Tensor:
    """phi_3(-h) = (phi_2(-h) - 1/2) / (-h), the third-order coefficient of DPM-Solver++(3M)."""
    return (phi_2(neg_h) - 0.5) / neg_h


def seeded_noise_sampler(x: Tensor, seed: int | None):
    """Return ``f(sigma, sigma_next) -> N(0, I)`` noise shaped like ``x``, drawn from a generator
    seeded with ``seed`` (0 when None), never from torch's global RNG."""
    generator = torch.Generator(device=x.device)
    generator.manual_seed(0 if seed is None else int(seed))

    def sample(sigma: Tensor | None = None, sigma_next: Tensor | None = None) -> Tensor:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)

    return sample
