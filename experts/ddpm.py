"""Compatibility experts of the original system: DDPM ancestral sampling over the discrete schedule.

DDPM (Ho et al. 2020, arXiv 2006.11239) samples ``x_{t-1} ~ q(x_{t-1} | x_t, x0 = x0_hat)``, the
forward-process posterior of eqs. 6-7 with ``x0_hat`` the model's prediction and the "fixed_small"
variance ``beta~_t = (1 - alphā_{t-1}) / (1 - alphā_t) * beta_t``. Between two arbitrary levels of
the schedule (diffusers' ``DDPMScheduler`` with ``num_inference_steps``) ``beta_t = 1 - alphā_t /
alphā_prev``. In the k-diffusion convention ``x = x0 + sigma * eps`` with ``alphā = 1 / (1 + sigma^2)``
and ``x_VP = x / sqrt(1 + sigma^2)``, substituting and converting back gives the closed form

    mean = x0_hat + (sigma_next / sigma)^2 * (x - x0_hat)
    var  = sigma_next^2 * (1 - (sigma_next / sigma)^2)

which is k-diffusion's Euler ancestral step with ``eta = 1``. The last step (to sigma 0, where
``alphā_prev = 1``) returns ``x0_hat`` exactly, as the DDPM posterior does there.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .base import Denoiser, Expert, ExpertDescriptor, ModelSchedule, progress_range
from .schedules import append_zero, discrete_timestep_sigmas, seeded_noise_sampler

FALLBACK_TRAIN_STEPS = 1000
# The original system's default ran the DDPM chain at full length; 100 steps keeps its stochastic
# character at a tenth of the cost, between the router's fast experts and the 500/1000-step
# compatibility experts (the descriptor carries the real cost, so the names do not mislead the router).
DEFAULT_ADAPTIVE_STEPS = 100
FAST_STEPS = 500
QUALITY_STEPS = 1000

NoiseSampler = Callable[[Tensor, Tensor], Tensor]


def ddpm_posterior(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std of the DDPM posterior ``q(x_next | x, x0 = denoised)`` in sigma form.

    Ho et al. (2020) eqs. 6-7 with "fixed_small" variance, rewritten for ``x = x0 + sigma * eps``
    (see the module docstring). ``sigma``/``sigma_next`` are scalar tensors with ``sigma > sigma_next >= 0``.
    """
    ratio_sq = (sigma_next / sigma) ** 2
    mean = denoised + ratio_sq * (x - denoised)
    std = sigma_next * (1 - ratio_sq).clamp_min(0).sqrt()
    return mean, std


@torch.no_grad()
def sample_ddpm_ancestral(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
    report: dict | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, eq. 6-7, "fixed_small") between consecutive sigmas.

    ``noise_sampler(sigma, sigma_next) -> N(0, I)`` overrides the seeded default (used by the parity
    test to drive this loop and diffusers' ``DDPMScheduler`` with identical noise).
    """
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = seeded_noise_sampler(x, extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    steps = len(sigmas) - 1
    for i in progress_range(steps, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if sigma_next == 0:
            x = denoised.to(x.dtype)
            continue
        mean, std = ddpm_posterior(x, denoised, sigma.to(x.dtype), sigma_next.to(x.dtype))
        x = mean + std * noise_sampler(sigma, sigma_next)
    if report is not None:
        report["steps"] = steps
    return x


def fallback_discrete_sigmas(schedule: ModelSchedule, train_steps: int = FALLBACK_TRAIN_STEPS) -> Tensor:
    """The model's discrete table, or for a continuous-time model ``train_steps`` levels uniform in
    log sigma between ``sigma_min`` and ``sigma_max``; ascending, shape [train_steps]."""
    if schedule.discrete_sigmas is not None:
        return schedule.discrete_sigmas
    log_min, log_max = math.log(schedule.sigma_min), math.log(schedule.sigma_max)
    return torch.linspace(log_min, log_max, train_steps, dtype=torch.float64).exp().float()


def ddpm_sigmas(schedule: ModelSchedule, n: int) -> Tensor:
    """``n`` levels at "trailing"-spaced timesteps of the discrete table, plus the final zero, shape [n + 1].

    More levels than the table has (img2img with ``denoise < 1`` asks for ``steps / denoise``) use
    ``n`` fractional timesteps evenly spaced from the last to the first trained one, interpolated in
    log sigma as ComfyUI's ``ModelSamplingDiscrete.sigma`` does.
    """
    table = fallback_discrete_sigmas(schedule)
    train_steps = len(table)
    if n <= train_steps:
        return discrete_timestep_sigmas(n, table)
    timesteps = torch.linspace(train_steps - 1, 0, n, dtype=torch.float64)
    low = timesteps.floor().long()
    high = (low + 1).clamp_max(train_steps - 1)
    frac = timesteps - low
    log_table = table.double().log()
    sigmas = ((1 - frac) * log_table[low] + frac * log_table[high]).exp()
    return append_zero(sigmas).float()


def _compat(name: str, steps: int, description: str) -> Expert:
    descriptor = ExpertDescriptor(
        name=name, solver="ddpm", order=0.5, calls_per_step=1, steps=steps, schedule="discrete",
        stochastic=True, description=description,
    )
    return Expert(descriptor, sample_ddpm_ancestral, ddpm_sigmas, compat=True)


def compat_experts() -> list[Expert]:
    """The original system's DDPM experts (registered off by default, after the main experts)."""
    return [
        _compat("DefaultAdaptiveSampler", DEFAULT_ADAPTIVE_STEPS,
                f"Original default: DDPM ancestral sampling, {DEFAULT_ADAPTIVE_STEPS} discrete steps."),
        _compat("FastSampler", FAST_STEPS,
                f"Original fast mode: DDPM ancestral sampling, {FAST_STEPS} discrete steps."),
        _compat("QualitySampler", QUALITY_STEPS,
                f"Original quality mode: DDPM ancestral sampling over all {QUALITY_STEPS} discrete steps."),
    ]
