"""The built-in experts, registered once in this order: QualityMaster, SpeedDemon, BalancedMaster,
EarlyStopper, NoiseAdaptive, then the compatibility experts of :mod:`.ddpm`.

Every number in a descriptor is measured, not hoped for: ``order`` is the global convergence order
fitted on the analytic model (tests/test_experts_analytic.py), step budgets and schedules were
picked by the error-versus-NFE sweeps of ``python -m bench.experts`` (docs/EXPERTS.md).
"""

from __future__ import annotations

from torch import Tensor

from .adaptive import DEFAULT_ATOL, DEFAULT_MAX_NFE, DEFAULT_RTOL, sample_noise_adaptive
from .base import Expert, ExpertDescriptor, ModelSchedule, register
from .ddpm import compat_experts
from .dpm_solver import sample_dpmpp_2m, sample_dpmpp_3m
from .observer import ConvergenceStop
from .schedules import karras_sigmas

QUALITY_STEPS = 40
SPEED_STEPS = 10
BALANCED_STEPS = 20
EARLY_STOP_STEPS = 30
# Accepted steps of NoiseAdaptive at its default rtol, averaged over guidance 1-12 on the benchmark.
ADAPTIVE_TYPICAL_STEPS = 19


def karras_schedule(schedule: ModelSchedule, n: int) -> Tensor:
    """Karras et al. (2022) rho = 7 levels over the model's sigma range, shape [n + 1]."""
    return karras_sigmas(n, schedule.sigma_min, schedule.sigma_max)


def _expert(sampler, make_sigmas, options=None, stop=None, **descriptor) -> Expert:
    return Expert(ExpertDescriptor(stochastic=False, **descriptor), sampler, make_sigmas, options or {}, stop=stop)


def builtin_experts() -> list[Expert]:
    """Fresh instances of the five main experts (not registered)."""
    return [
        _expert(
            sample_dpmpp_3m, karras_schedule, name="QualityMaster", solver="dpmpp_3m", order=3.0,
            calls_per_step=(QUALITY_STEPS + 1) / QUALITY_STEPS, steps=QUALITY_STEPS, schedule="karras",
            max_nfe=QUALITY_STEPS + 1,
            description=f"DPM-Solver++(3M), {QUALITY_STEPS} Karras steps: the highest fidelity, the most model calls.",
        ),
        _expert(
            sample_dpmpp_2m, karras_schedule, name="SpeedDemon", solver="dpmpp_2m", order=2.0, calls_per_step=1,
            steps=SPEED_STEPS, schedule="karras",
            description=f"DPM-Solver++(2M), {SPEED_STEPS} Karras steps: the fewest calls that stay stable at high cfg.",
        ),
        _expert(
            sample_dpmpp_2m, karras_schedule, name="BalancedMaster", solver="dpmpp_2m", order=2.0, calls_per_step=1,
            steps=BALANCED_STEPS, schedule="karras",
            description=f"DPM-Solver++(2M), {BALANCED_STEPS} Karras steps: the sensible default.",
        ),
        _expert(
            sample_dpmpp_2m, karras_schedule, stop=ConvergenceStop(),
            name="EarlyStopper", solver="dpmpp_2m", order=2.0, calls_per_step=1, steps=EARLY_STOP_STEPS,
            schedule="karras", stop_rule="converged",
            description=f"DPM-Solver++(2M) over {EARLY_STOP_STEPS} Karras steps; returns the denoised prediction "
                        "once its projected remaining change is below tolerance.",
        ),
        # NoiseAdaptive reads only the span of its sigmas (first and last nonzero level); a Karras grid
        # rather than [sigma_max, sigma_min, 0] lets Expert.sigmas slice it for img2img (denoise < 1).
        _expert(
            sample_noise_adaptive, karras_schedule, dict(rtol=DEFAULT_RTOL, atol=DEFAULT_ATOL, max_nfe=DEFAULT_MAX_NFE),
            name="NoiseAdaptive", solver="dpm_solver_12_adaptive", order=2.0, calls_per_step=2,
            steps=ADAPTIVE_TYPICAL_STEPS, schedule="adaptive", stop_rule="error_control", max_nfe=DEFAULT_MAX_NFE,
            description=f"Embedded DPM-Solver-1/2 with error control (rtol {DEFAULT_RTOL}), "
                        f"at most {DEFAULT_MAX_NFE} model calls.",
        ),
    ]


def _register_all() -> None:
    for expert in [*builtin_experts(), *compat_experts()]:
        register(expert)


_register_all()
