"""EarlyStopper: DPM-Solver++(2M) that stops once the denoised prediction has converged.

The stop rule (docs/EXPERTS.md has the measurements). After step ``i`` at noise level
``sigma_i`` the relative change of the denoised prediction is

    r_i = rms(D_i - D_{i-1}) / rms(D_i)        (per sample, the batch's largest counts)

In the low-noise tail, where each posterior component is resolved (sigma below its std ``s``),
``D(sigma) - D(0)`` shrinks like ``sigma^2``: for a Gaussian component
``D - x0 = (s / sqrt(s^2 + sigma^2) - 1)(x0 - mu) ~ -sigma^2 / (2 s^2) (x0 - mu)``. The change still to
come is then projected from the last one as

    R_i = r_i * sigma_i^2 / (sigma_{i-1}^2 - sigma_i^2)

and the loop returns ``D_i`` (never the noisy latent) once ``i >= min_steps``,
``sigma_i <= max_sigma_ratio * rms(D_i)`` and ``R_i <= tol``. At mid-range sigma ``D`` is a blurry
posterior mean that still moves like ``1 / sigma``; there ``R_i`` is large, so the rule does not
fire where a plain "``r_i`` < 1%" rule does (measured: 2.6x the error of the full run, worse than
20 fixed steps). The sigma guard keeps a momentary stall of ``D`` at high noise from stopping the run.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .base import Denoiser
from .dpm_solver import dpmpp_multistep, reject_options

DEFAULT_TOL = 5e-3
DEFAULT_MIN_STEPS = 12
DEFAULT_MAX_SIGMA_RATIO = 0.5


def _rms(t: Tensor) -> Tensor:
    """Per-sample root mean square, [B, ...] -> [B] (float64)."""
    return t.reshape(t.shape[0], -1).double().square().mean(1).sqrt()


class ConvergenceRule:
    """The stop rule above; remembers the last relative change ``r_i`` for the report."""

    def __init__(self, tol: float, min_steps: int, max_sigma_ratio: float) -> None:
        if tol <= 0 or min_steps < 1 or max_sigma_ratio <= 0:
            raise ValueError(
                f"need tol > 0, min_steps >= 1, max_sigma_ratio > 0; got tol={tol}, "
                f"min_steps={min_steps}, max_sigma_ratio={max_sigma_ratio}"
            )
        self.tol = tol
        self.min_steps = min_steps
        self.max_sigma_ratio = max_sigma_ratio
        self.last_change: float | None = None
        self.projected: float | None = None

    def __call__(self, i: int, sigma: float, sigma_prev: float, denoised: Tensor, denoised_prev: Tensor) -> bool:
        scale = _rms(denoised).clamp_min(1e-12)
        change = _rms(denoised - denoised_prev) / scale
        self.last_change = float(change.max())
        self.projected = self.last_change * sigma**2 / (sigma_prev**2 - sigma**2)
        if i < self.min_steps:
            return False
        in_tail = sigma <= self.max_sigma_ratio * float(scale.min())
        return in_tail and self.projected <= self.tol


@torch.no_grad()
def sample_early_stop(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
    report: dict | None = None,
    tol: float = DEFAULT_TOL,
    min_steps: int = DEFAULT_MIN_STEPS,
    max_sigma_ratio: float = DEFAULT_MAX_SIGMA_RATIO,
    **options: Any,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095) with a convergence stop on the denoised
    prediction; returns that prediction when it stops.

    Writes ``report["stopped_early"]``, ``report["steps"]`` and ``report["estimate"]`` (the last
    relative change ``r_i`` of the denoised prediction; None if fewer than two steps ran).
    """
    reject_options("early_stop", options)
    rule = ConvergenceRule(tol, min_steps, max_sigma_ratio)
    steps_run: dict = {}
    out = dpmpp_multistep(model, x, sigmas, 2, extra_args, callback, steps_run, stop=rule)
    if report is not None:
        report["steps"] = steps_run["steps"]
        report["stopped_early"] = steps_run["steps"] < len(sigmas) - 1
        report["estimate"] = rule.last_change
    return out
