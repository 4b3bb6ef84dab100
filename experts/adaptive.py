"""NoiseAdaptive: step sizes from an embedded local error estimate, with a hard cap on model calls.

Each attempted step from ``sigma_s`` over ``h`` in ``lambda = -log sigma`` evaluates the embedded
pair of Lu et al. (2022): DPM-Solver-1 (first order) and DPM-Solver-2 with its midpoint
``r = 1/2`` (second order), in the data-prediction form of DPM-Solver++ (arXiv 2211.01095):

    x_low  = (sigma_t / sigma_s) x + h phi_1(-h) D(x, sigma_s)
    x_high = (sigma_t / sigma_s) x + h phi_1(-h) D(u, sigma_mid),  u = first-order step to sigma_mid

The error ratio is ``err = rms((x_high - x_low) / (atol + rtol * max(|x|, |x_high|)))`` (the batch's
largest per-sample value); a step is accepted when ``err <= 1`` and continues from ``x_high``
(local extrapolation, so error falls like NFE^-2). The next ``h`` comes from a PI controller
(Gustafsson 1991; Hairer, Norsett & Wanner, Solving ODEs I, sec. II.4):
``h *= safety * err^(-0.7/k) * err_prev^(0.4/k)`` with ``k = 2``, the order of the estimate.

Every step costs two model calls (one after a rejection: ``D(x, sigma_s)`` is kept). Before each
attempt the loop checks that the attempt plus a reserve for a cheap finish (one call per
``FINISH_STEP`` of lambda still to go, plus the final call) fit in ``max_nfe``; when they do not, it
spends the calls left on DPM-Solver++(2M) steps over a log-uniform grid to ``sigma_end`` and the
final step to 0, so a run never exceeds ``max_nfe``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .base import Denoiser, progress_bar
from .dpm_solver import h_phis, multistep_update

DEFAULT_RTOL = 0.05
DEFAULT_ATOL = 0.0078
DEFAULT_MAX_NFE = 64
DEFAULT_H_INIT = 0.5
SAFETY = 0.9
ERROR_ORDER = 2
H_MIN = 1e-8  # keeps phi_k(-h) finite when a broken model makes every attempt fail
# Lambda span per cheap finishing step: about SpeedDemon's density (10 steps over SD's 6.2).
FINISH_STEP = 0.6


def _error_ratio(x: Tensor, x_low: Tensor, x_high: Tensor, rtol: float, atol: float) -> float:
    scale = atol + rtol * torch.maximum(x.abs(), x_high.abs())
    ratio = ((x_high - x_low) / scale).reshape(x.shape[0], -1).double()
    return float(ratio.square().mean(1).sqrt().max())


@torch.no_grad()
def sample_noise_adaptive(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
    report: dict | None = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    max_nfe: int = DEFAULT_MAX_NFE,
    h_init: float = DEFAULT_H_INIT,
) -> Tensor:
    """Adaptive DPM-Solver-1/2 (Lu et al. 2022, arXiv 2206.00927 sec. 3.3 / 2211.01095) from
    ``sigmas[0]`` to the last nonzero sigma of ``sigmas`` (only the span is used), then to 0 if
    ``sigmas`` ends in 0; at most ``max_nfe`` model calls, one callback per accepted step, a
    console progress bar over the model calls unless ``disable``.

    Writes ``report["steps"]`` (accepted steps, finishing steps included), ``report["error_ratio"]``
    (mean error ratio of the accepted adaptive steps, None if none) and ``report["rejected"]``.
    """
    if rtol <= 0 or atol < 0 or h_init <= 0 or max_nfe < 1:
        raise ValueError(f"need rtol > 0, atol >= 0, h_init > 0, max_nfe >= 1; got {rtol}, {atol}, {h_init}, {max_nfe}")
    extra_args = {} if extra_args is None else extra_args
    values = sigmas.tolist()
    to_zero = len(values) > 1 and values[-1] == 0
    nonzero = [v for v in values if v > 0]
    if len(values) < 2 or not nonzero:
        return x
    sigma, sigma_end = nonzero[0], nonzero[-1]
    lam, lam_end = -math.log(sigma), -math.log(sigma_end)

    def reserve(lam_now: float) -> int:
        # Calls kept for the cheap finish from lam_now: one 2M step per FINISH_STEP of lambda plus the
        # final call, so a budget spent on rejections still ends on a usable grid, not one jump to 0.
        return 1 + math.ceil(max(lam_end - lam_now, 0.0) / FINISH_STEP)

    calls, steps, h, err_prev = 0, 0, h_init, 1.0
    accepted_errors: list[float] = []
    rejected = 0
    denoised: Tensor | None = None

    bar = progress_bar(max_nfe, disable)

    def denoise(x_: Tensor, sigma_: float) -> Tensor:
        nonlocal calls
        calls += 1
        bar.update(1)
        return model(x_, x_.new_full([x_.shape[0]], sigma_), **extra_args)

    def emit(x_: Tensor, sigma_: float, denoised_: Tensor) -> None:
        if callback is not None:
            level = x_.new_tensor(sigma_)
            callback({"x": x_, "i": steps, "sigma": level, "sigma_hat": level, "denoised": denoised_})

    while lam_end - lam > 1e-9 and calls + (denoised is None) + 1 + reserve(lam) <= max_nfe:
        h = lam_end - lam if lam + 1.1 * h >= lam_end else h
        if denoised is None:
            denoised = denoise(x, sigma)
        sigma_next, sigma_mid = math.exp(-(lam + h)), math.exp(-(lam + h / 2))
        c1, c1_mid = h_phis(h)[0], h_phis(h / 2)[0]
        x_low = (sigma_next / sigma) * x + c1 * denoised
        u = (sigma_mid / sigma) * x + c1_mid * denoised
        x_high = (sigma_next / sigma) * x + c1 * denoise(u, sigma_mid)
        err = _error_ratio(x, x_low, x_high, rtol, atol)
        if not math.isfinite(err):
            err = 1e10
        if err <= 1.0:
            emit(x, sigma, denoised)
            x, lam, sigma, denoised = x_high, lam + h, sigma_next, None
            steps += 1
            accepted_errors.append(err)
            factor = SAFETY * max(err, 1e-10) ** (-0.7 / ERROR_ORDER) * err_prev ** (0.4 / ERROR_ORDER)
            err_prev = max(err, 1e-4)
        else:
            rejected += 1
            factor = SAFETY * err ** (-1.0 / ERROR_ORDER)
        h = max(H_MIN, h * min(5.0, max(0.2, factor)))

    x, steps = _finish(denoise, x, sigma, sigma_end, denoised, max_nfe - calls, to_zero, emit, steps)
    bar.close()
    if report is not None:
        report["steps"] = steps
        report["error_ratio"] = sum(accepted_errors) / len(accepted_errors) if accepted_errors else None
        report["rejected"] = rejected
    return x


def _finish(
    denoise: Callable[[Tensor, float], Tensor], x: Tensor, sigma: float, sigma_end: float,
    denoised: Tensor | None, budget: int, to_zero: bool, emit: Callable[[Tensor, float, Tensor], None], steps: int,
) -> tuple[Tensor, int]:
    """Cheap DPM-Solver++(2M) steps from ``sigma`` to ``sigma_end`` (then 0) in at most ``budget`` calls."""
    levels = [sigma]
    if math.log(sigma / sigma_end) > 1e-9:
        # n levels log-uniform from sigma to sigma_end; each costs a call, except a known D(x, sigma)
        # and, when the run stops at sigma_end, the last level itself.
        n = budget + (denoised is not None) + (0 if to_zero else 1)
        if n >= 2:
            levels = [sigma * (sigma_end / sigma) ** (k / (n - 1)) for k in range(n)]
    grid = [*levels, 0.0] if to_zero else levels
    history: list[Tensor] = []
    h_prev: list[float] = []
    for level, level_next in zip(grid[:-1], grid[1:]):
        if denoised is None:
            denoised = denoise(x, level)
        emit(x, level, denoised)
        steps += 1
        history = [denoised, *history][:2]
        if level_next == 0:
            x = denoised.to(x.dtype)
        else:
            x = multistep_update(x, level, level_next, history, h_prev, 2)
            h_prev = [math.log(level / level_next)]
        denoised = None
    return x, steps
