"""The one step observer every expert runs under: stop rule and fidelity estimate.

Every sampler, built-in or ComfyUI's, calls ``callback({"x", "i", "sigma", "sigma_hat",
"denoised"})`` once per step. :func:`run_observed` (called by :meth:`Expert.__call__
<moe_sampler.experts.base.Expert.__call__>` for every expert) puts a :class:`StepObserver`
between the loop and the caller's callback. The observer

- applies the expert's stop rule (:class:`ConvergenceStop`, EarlyStopper's rule), the same way
  for a built-in loop and for a ComfyUI sampler: when it fires after step ``i`` the run returns
  that step's ``denoised`` (never the noisy latent);
- estimates the final error relative to the exact ODE solution from what the steps already
  computed, at no extra model call (:class:`FidelityEstimator`);
- writes the same report fields for every expert: ``steps``, ``stopped_early``,
  ``error_estimate`` (raw, in units of relative error), ``estimate_features`` (for the
  calibration of :mod:`moe_sampler.router.calibration`) and ``last_change``.

The fidelity estimate (measured in docs/EXPERTS.md, ``python -m bench.estimate``). With
``lambda = -log sigma``, step ``k`` goes from ``(x_{k-1}, sigma_{k-1})`` to ``(x_k, sigma_k)``
over ``h = lambda_k - lambda_{k-1}``. The exact solution (Lu et al. 2022, arXiv 2211.01095)
is ``x_k = (sigma_k / sigma_{k-1}) x_{k-1} + sigma_k integral e^lambda x0(lambda) dlambda``; a
corrector that interpolates ``x0`` through the denoised predictions at both ends of the step
(and the one before: quadratic, for third-order solvers) gives ``x_c``, and ``x_k - x_c`` is the
local error of the step actually taken (Milne's device: predictor minus corrector). Each local
error reaches the final sample shrunk by the flow's sensitivity, read per latent element off the
trajectory (:class:`FidelityEstimator`). The estimate adds these up along the trajectory, plus
the change still to come after the last step (EarlyStopper's projection
``r sigma^2 / (sigma_prev^2 - sigma^2)``), relative to the final sample's rms, times
:data:`ESTIMATE_SCALE`. It is raw: :mod:`moe_sampler.router.calibration` maps it (with its parts,
the guidance scale and the model calls) to a predicted error per expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

DEFAULT_TOL = 5e-3
DEFAULT_MIN_STEPS = 12
DEFAULT_MAX_SIGMA_RATIO = 0.5
# EarlyStopper always runs 12 of its 30 steps; a stop rule on another step count keeps that share.
MIN_STEP_SHARE = DEFAULT_MIN_STEPS / 30


# The noise levels, relative to the prediction's rms, whose steps ``local_window`` sums.
WINDOW = (0.15, 3.0)


def rms(t: Tensor) -> Tensor:
    """Per-sample root mean square, [B, ...] -> [B] (float64)."""
    return t.reshape(t.shape[0], -1).double().square().mean(1).sqrt()


def convergence_min_steps(steps: int) -> int:
    """Steps a convergence stop always runs: EarlyStopper's share (12 of 30), at least 2."""
    return max(2, round(steps * MIN_STEP_SHARE))


class ConvergenceRule:
    """EarlyStopper's stop rule (docs/EXPERTS.md): after step ``i`` at ``sigma`` the relative
    change ``r_i = rms(D_i - D_{i-1}) / rms(D_i)`` (the batch's largest) is projected to the change
    still to come, ``R_i = r_i sigma_i^2 / (sigma_{i-1}^2 - sigma_i^2)``; stop once
    ``i >= min_steps``, ``sigma_i <= max_sigma_ratio * rms(D_i)`` and ``R_i <= tol``."""

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
        scale = rms(denoised).clamp_min(1e-12)
        change = rms(denoised - denoised_prev) / scale
        self.last_change = float(change.max())
        self.projected = self.last_change * sigma**2 / (sigma_prev**2 - sigma**2)
        if i < self.min_steps:
            return False
        in_tail = sigma <= self.max_sigma_ratio * float(scale.min())
        return in_tail and self.projected <= self.tol


@dataclass(frozen=True)
class ConvergenceStop:
    """The settings of a convergence stop; ``min_steps=None`` takes :func:`convergence_min_steps`
    of the run's step count (12 for EarlyStopper's 30)."""

    tol: float = DEFAULT_TOL
    min_steps: int | None = None
    max_sigma_ratio: float = DEFAULT_MAX_SIGMA_RATIO

    def rule(self, steps: int) -> ConvergenceRule:
        min_steps = convergence_min_steps(steps) if self.min_steps is None else self.min_steps
        return ConvergenceRule(self.tol, min_steps, self.max_sigma_ratio)


class StopSampling(Exception):
    """Raised from the callback to end a loop early; carries the prediction to return."""

    def __init__(self, denoised: Tensor, step: int) -> None:
        super().__init__(step)
        self.denoised, self.step = denoised, step


def _phi_coefficients(h: float) -> tuple[float, float, float]:
    """``h * phi_k(-h)`` for k = 1, 2, 3 in float64 (series near 0, where the closed forms cancel)."""
    if h < 1e-3:
        return h * (1 - h / 2 + h * h / 6), h * (0.5 - h / 6 + h * h / 24), h * (1 / 6 - h / 24 + h * h / 120)
    e = math.expm1(-h)
    phi1 = -e / h
    phi2 = (phi1 - 1) / -h
    phi3 = (phi2 - 0.5) / -h
    return h * phi1, h * phi2, h * phi3


class FidelityEstimator:
    """Local errors of the steps taken, from consecutive callbacks (see the module docstring).

    Feed every callback's ``(x, sigma, denoised)`` to :meth:`observe`; :meth:`features` then gives
    the run's features (the batch's mean of per-sample values, relative to the final sample's rms):

    - ``local``: the local errors ``x_k - x_c`` (corrector of the solver's order: quadratic for
      third-order solvers, else linear), propagated to the end and summed;
    - ``first_order``: the same with ``x_c`` replaced by the first-order step from ``D_{k-1}``
      (the first look of issue 13; its local error is larger, O(h^2), and less noisy);
    - ``tail``: the change still to come after the last step, ``rms(D_N - D_{N-1}) sigma_N^2 /
      (sigma_{N-1}^2 - sigma_N^2)``;
    - ``remaining``: the change still to come down to the run's planned last noise level
      ``sigma_final`` (the smallest positive entry of its grid, where a full run's last step returns
      ``D``): ``rms(D_N - D_{N-1}) (sigma_N^2 - sigma_final^2) / (sigma_{N-1}^2 - sigma_N^2)``, 0 for a
      run that reached it. Only an early stop leaves a remainder; it is most of EarlyStopper's
      error on the learned yardstick (``tail`` projects to 0 instead, the same for every full run);
    - ``last_change``: ``rms(D_N - D_{N-1}) / rms(D_N)``; ``local_plain``: the local errors summed
      without propagation; ``local_last``: the last step's local error alone;
    - ``local_window``: the per-step rms of the local errors (not propagated), summed over the
      steps whose noise level is within :data:`WINDOW` times the prediction's rms: the middle of
      the trajectory (on the learned model it ranks the trajectory's error within a guidance
      scale better than ``local``: 0.45 against 0.14; the calibration's ``log10_stop_total``
      adds it to ``remaining``, docs/EXPERTS.md);
    - ``sigma_start`` and ``sigma_end``: the first and last noise levels seen (an early stop ends
      higher), ``sigma_prev_end`` the one before the last; ``scale``: the final sample's rms.

    Propagation, per latent element: along the exact flow of a Gaussian component of std ``s``,
    ``|x - D| / sigma^2`` is proportional to ``1 / sqrt(s^2 + sigma^2)``, so the ratio of its
    values at step ``k`` and at the last step is the sensitivity ``sqrt(s^2 + sigma_N^2) /
    sqrt(s^2 + sigma_k^2)`` of the final sample to an error made at step ``k``, read off the
    trajectory without knowing ``s``. It is capped at 1 (an error never counts more than once).
    """

    def __init__(self, order: float = 2.0, sigma_final: float | None = None) -> None:
        self.third = order >= 2.5
        self.sigma_final = sigma_final  # the run's planned last positive noise level (None: unknown, 0)
        self.sigma_prev_end: float | None = None
        self.points: list[tuple[Tensor, float, Tensor]] = []  # the last two (x, sigma, denoised)
        self.sigma_start: float | None = None
        self.sigma_end: float | None = None
        self.steps = 0
        # Per element: sum_k |e_k| g_k (weighted) and sum_k |e_k| (the cap), for both local errors.
        self.weighted: dict[str, Tensor] = {}
        self.plain: dict[str, Tensor] = {}
        self.sensitivity: Tensor | None = None  # g_N = |x_N - D_N| / sigma_N^2 at the last step seen
        self.last_change: Tensor | None = None
        self.tail: Tensor | None = None
        self.remaining: Tensor | None = None
        self.local_last: Tensor | None = None
        self.local_window: Tensor | None = None

    def observe(self, x: Tensor, sigma: float, denoised: Tensor) -> None:
        x, denoised = x.detach().float(), denoised.detach().float()
        if self.sigma_start is None:
            self.sigma_start = sigma
        self.sigma_end = sigma
        if self.points and not (0 < sigma < self.points[-1][1]):
            self.points = []  # a restart or a level the formulas cannot use: start the history again
        if sigma > 0:
            self.sensitivity = (x - denoised).abs() / (sigma * sigma)
        if self.points:
            x_prev, sigma_prev, d_prev = self.points[-1]
            h = math.log(sigma_prev / sigma)
            c1, c2, c3 = _phi_coefficients(h)
            first = (sigma / sigma_prev) * x_prev + c1 * d_prev
            slope = (denoised - d_prev) / h  # divided difference f[0, h] of x0(lambda)
            if self.third and len(self.points) >= 2:
                _, sigma_prev2, d_prev2 = self.points[-2]
                h_back = math.log(sigma_prev2 / sigma_prev)
                curvature = (slope - (d_prev - d_prev2) / h_back) / (h + h_back)  # f[-h_back, 0, h]
                corrected = first + c2 * h * (slope - h * curvature) + 2 * c3 * h * h * curvature
            else:
                corrected = first + c2 * h * slope
            local = (x - corrected).abs()
            self.local_last = rms(local)
            level = sigma / rms(denoised).clamp_min(1e-12)
            inside = ((level >= WINDOW[0]) & (level <= WINDOW[1])).double()
            window = self.local_last * inside
            self.local_window = window if self.local_window is None else self.local_window + window
            for name, error in (("local", local), ("first_order", (x - first).abs())):
                if name in self.weighted:
                    self.weighted[name] += error * self.sensitivity
                    self.plain[name] += error
                else:
                    self.weighted[name], self.plain[name] = error * self.sensitivity, error.clone()
            self.steps += 1
            change = rms(denoised - d_prev)
            self.last_change = change / rms(denoised).clamp_min(1e-12)
            self.tail = change * sigma**2 / (sigma_prev**2 - sigma**2)
            end = self.sigma_final or 0.0
            self.remaining = change * max(sigma**2 - end**2, 0.0) / (sigma_prev**2 - sigma**2)
            self.sigma_prev_end = sigma_prev
        self.points = [*self.points[-1:], (x, sigma, denoised)]

    def features(self, out: Tensor) -> dict[str, float]:
        """The run's estimate features (all >= 0; ``local`` etc. relative to the rms of ``out``)."""
        scale = rms(out.detach()).clamp_min(1e-12)
        features = {}
        for name in ("local", "first_order"):
            if name in self.weighted:
                propagated = torch.minimum(self.weighted[name] / self.sensitivity.clamp_min(1e-30), self.plain[name])
                features[name] = float((rms(propagated) / scale).mean())
            else:
                features[name] = 0.0
        features["local_plain"] = float((rms(self.plain["local"]) / scale).mean()) if "local" in self.plain else 0.0
        for name in ("tail", "remaining", "local_last", "local_window"):
            value = getattr(self, name)
            features[name] = float((value / scale).mean()) if value is not None else 0.0
        features["last_change"] = float(self.last_change.mean()) if self.last_change is not None else 0.0
        features["sigma_start"] = float(self.sigma_start or 0.0)
        features["sigma_end"] = float(self.sigma_end or 0.0)
        features["sigma_prev_end"] = float(self.sigma_prev_end or 0.0)
        features["scale"] = float(scale.mean())
        features["steps_seen"] = float(self.steps)
        return features


# Element-wise absolute local errors add up as if they never cancelled: on the analytic yardstick
# ``local + tail`` over-states the relative error by a median factor of 3.5-4.9 for the fixed-grid
# experts (1.0 for NoiseAdaptive, whose steps are all near its tolerance); a quarter centres it.
ESTIMATE_SCALE = 0.25


def error_estimate(features: dict[str, float]) -> float:
    """The raw fidelity estimate: propagated local errors plus the change still to come, scaled."""
    return ESTIMATE_SCALE * (features["local"] + features["tail"])


class StepObserver:
    """The callback wrapper: forwards to ``callback``, feeds the estimator, applies the stop rule.

    The rule is asked after every step's callback except the first (no previous prediction) and
    the last (the run ends there anyway); when it fires, :class:`StopSampling` ends the loop.
    """

    def __init__(self, callback: Callable[[dict], None] | None, steps: int, rule: ConvergenceRule | None,
                 order: float = 2.0, estimate: bool = True, sigma_final: float | None = None) -> None:
        self.callback, self.steps, self.rule = callback, steps, rule
        self.estimator = FidelityEstimator(order, sigma_final) if estimate else None
        self.calls = 0
        self.previous: tuple[float, Tensor] | None = None

    def __call__(self, info: dict) -> None:
        if self.callback is not None:
            self.callback(info)
        self.calls += 1
        i, denoised = int(info["i"]), info["denoised"]
        level = info.get("sigma_hat", info.get("sigma"))
        if level is None:
            # A sampler whose callback omits the noise level (ComfyUI's uni_pc): nothing to estimate
            # or stop on; the run reports no estimate, as the earlier callback-watching code did.
            self.estimator = None
            return
        sigma = float(level.reshape(-1)[0]) if isinstance(level, Tensor) else float(level)
        if self.estimator is not None:
            self.estimator.observe(info["x"], sigma, denoised)
        if self.rule is not None and self.previous is not None and i + 1 < self.steps:
            sigma_prev, denoised_prev = self.previous
            if sigma_prev > sigma > 0 and self.rule(i, sigma, sigma_prev, denoised, denoised_prev):
                raise StopSampling(denoised, i)
        self.previous = (sigma, denoised)


def planned_end(sigmas: Tensor) -> float | None:
    """The smallest positive noise level of a grid (where a full run's last step returns ``D``)."""
    positive = sigmas.detach().reshape(-1)
    positive = positive[positive > 0]
    return float(positive.min()) if positive.numel() else None


def run_observed(sampler: Callable, model: Any, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                 callback: Callable[[dict], None] | None = None, disable: bool | None = None,
                 report: dict | None = None, stop: ConvergenceStop | None = None, order: float = 2.0,
                 **options: Any) -> Tensor:
    """Run ``sampler`` (k-diffusion signature) under a :class:`StepObserver`.

    Fills ``report`` (when given) with ``steps`` (callbacks seen, unless the loop wrote its own),
    ``stopped_early``, ``error_estimate``, ``estimate_features`` and ``last_change``.
    """
    steps = len(sigmas) - 1
    observer = StepObserver(callback, steps, stop.rule(steps) if stop is not None else None, order,
                            estimate=report is not None, sigma_final=planned_end(sigmas))
    stopped = False
    try:
        out = sampler(model, x, sigmas, extra_args=extra_args, callback=observer, disable=disable, report=report,
                      **options)
    except StopSampling as stop_here:
        out, stopped = stop_here.denoised.to(x.dtype), True
        if report is not None:
            report["steps"] = stop_here.step + 1
    if report is not None:
        report.setdefault("steps", observer.calls)
        report["stopped_early"] = stopped
        report["error_estimate"] = report["estimate_features"] = report["last_change"] = None
    if report is not None and observer.estimator is not None:
        features = observer.estimator.features(out)
        report["estimate_features"] = features
        report["error_estimate"] = error_estimate(features) if observer.estimator.steps else None
        change = observer.estimator.last_change
        report["last_change"] = None if change is None else float(change.max())
    return out
