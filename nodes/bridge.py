"""The one bridge between experts and ComfyUI's sampling path.

:func:`sample_with_expert` runs an :class:`~moe_sampler.experts.base.Expert` exactly as core's
``SamplerCustom`` runs a ``SAMPLER``: ``fix_empty_latent_channels``, ``prepare_noise`` (per
``batch_index``), ``latent_preview.prepare_callback`` and ``comfy.sample.sample_custom`` with the
expert wrapped in ``comfy.samplers.KSAMPLER``. So CFG, LoRA, ControlNet, model patches, inpainting
masks, previews and the progress bar work as with core's KSampler, and core's sampler lists are
never touched.

:func:`expert_from_comfy` turns any ComfyUI sampler + scheduler + step count into an expert
with an honest descriptor (:data:`COMFY_SOLVERS`).

ComfyUI is imported inside functions only: the pure parts (descriptor table, names, pool
assembly, model family) import and test without it.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from ..experts.base import (
    STOP_RULES,
    Expert,
    ExpertDescriptor,
    ModelSchedule,
    expert_names,
    get_expert,
    registered_experts,
)
from ..experts.builtin import EARLY_STOP_STEPS
from ..experts.early_stop import DEFAULT_MAX_SIGMA_RATIO, DEFAULT_MIN_STEPS, DEFAULT_TOL, ConvergenceRule

logger = logging.getLogger(__name__)

FALLBACK_EXPERT = "BalancedMaster"
CUSTOM_STOP_RULES = ("none", "converged")


# --------------------------------------------------------------------------------------------
# Model family and schedule


# Checked in order: the first class found in the model_sampling MRO decides. EDM is a
# V_PREDICTION subclass (c_skip/c_out parameterisation) and X0/IMG_TO_IMG are EPS subclasses.
_FAMILY_BY_CLASS = (("CONST", "flow"), ("COSMOS_RFLOW", "flow"), ("V_PREDICTION", "v"), ("EPS", "eps"))


def family_of_sampling(model_sampling: Any) -> str:
    """``"eps" | "v" | "flow"`` from a ComfyUI ``model_sampling`` object (by its class hierarchy)."""
    names = {cls.__name__ for cls in type(model_sampling).__mro__}
    for class_name, family in _FAMILY_BY_CLASS:
        if class_name in names:
            return family
    logger.warning("unknown model_sampling type %s; treating it as eps-prediction", type(model_sampling).__name__)
    return "eps"


def model_family(model: Any) -> str:
    """``"eps" | "v" | "flow"`` of a ComfyUI MODEL (its possibly patched ``model_sampling``)."""
    return family_of_sampling(model.get_model_object("model_sampling"))


def schedule_for(model: Any) -> ModelSchedule:
    """The :class:`ModelSchedule` of a ComfyUI MODEL, ``native`` = its ``model_sampling``."""
    return ModelSchedule.from_model_sampling(model.get_model_object("model_sampling"))


# --------------------------------------------------------------------------------------------
# ComfyUI samplers as experts


@dataclass(frozen=True)
class SolverInfo:
    """What the descriptor of a ComfyUI sampler says about it.

    ``order``: global order of the deterministic solver; 0.5 for stochastic ones (the strong
    order of an ancestral/SDE step, as :class:`ExpertDescriptor` defines it). ``calls_per_step``:
    model calls per step. ``schedule``/``stop_rule``: overrides for samplers that ignore the
    sigma schedule they are given.
    """

    order: float
    calls_per_step: float
    stochastic: bool = False
    schedule: str | None = None
    stop_rule: str | None = None


def _sde(calls: float = 1.0) -> SolverInfo:
    return SolverInfo(order=0.5, calls_per_step=calls, stochastic=True)


COMFY_SOLVERS: Mapping[str, SolverInfo] = {
    "euler": SolverInfo(1, 1),
    "euler_cfg_pp": SolverInfo(1, 1),
    "euler_ancestral": _sde(),
    "euler_ancestral_cfg_pp": _sde(),
    "heun": SolverInfo(2, 2),
    "heunpp2": SolverInfo(2, 3),
    "exp_heun_2_x0": SolverInfo(2, 2),
    "exp_heun_2_x0_sde": _sde(2),
    "dpm_2": SolverInfo(2, 2),
    "dpm_2_ancestral": _sde(2),
    "lms": SolverInfo(4, 1),
    "dpm_fast": SolverInfo(3, 1),
    # dpm_adaptive ignores the step count and chooses its own steps (error control): its NFE
    # is unknown in advance; 3 calls per nominal step is a deliberately pessimistic estimate.
    "dpm_adaptive": SolverInfo(3, 3, schedule="adaptive", stop_rule="error_control"),
    "dpmpp_2s_ancestral": _sde(2),
    "dpmpp_2s_ancestral_cfg_pp": _sde(2),
    "dpmpp_sde": _sde(2),
    "dpmpp_sde_gpu": _sde(2),
    "dpmpp_2m": SolverInfo(2, 1),
    "dpmpp_2m_cfg_pp": SolverInfo(2, 1),
    "dpmpp_2m_sde": _sde(),
    "dpmpp_2m_sde_gpu": _sde(),
    "dpmpp_2m_sde_heun": _sde(),
    "dpmpp_2m_sde_heun_gpu": _sde(),
    "dpmpp_3m_sde": _sde(),
    "dpmpp_3m_sde_gpu": _sde(),
    "ddpm": _sde(),
    "lcm": _sde(),
    "ipndm": SolverInfo(4, 1),
    "ipndm_v": SolverInfo(4, 1),
    "deis": SolverInfo(3, 1),
    "res_multistep": SolverInfo(2, 1),
    "res_multistep_cfg_pp": SolverInfo(2, 1),
    "res_multistep_ancestral": _sde(),
    "res_multistep_ancestral_cfg_pp": _sde(),
    "gradient_estimation": SolverInfo(2, 1),
    "gradient_estimation_cfg_pp": SolverInfo(2, 1),
    "er_sde": _sde(),
    "seeds_2": _sde(2),
    "seeds_3": _sde(3),
    "sa_solver": _sde(),
    "sa_solver_pece": _sde(2),
    "ddim": SolverInfo(1, 1),
    "uni_pc": SolverInfo(3, 1),
    "uni_pc_bh2": SolverInfo(3, 1),
}
# A sampler this table does not know (a newer ComfyUI, another pack): assume the worst for the
# router (first order, two calls per step, not reproducible) rather than flatter it.
UNKNOWN_SOLVER = SolverInfo(order=1.0, calls_per_step=2.0, stochastic=True)

# ComfyUI scheduler -> descriptor schedule family.
_SCHEDULE_FAMILY = {
    "karras": "karras",
    "exponential": "exponential",
    "normal": "discrete",
    "simple": "discrete",
    "sgm_uniform": "discrete",
    "ddim_uniform": "discrete",
    "beta": "discrete",
}

_NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def solver_info(sampler_name: str) -> SolverInfo:
    """Table entry for a ComfyUI sampler name, :data:`UNKNOWN_SOLVER` when unknown."""
    return COMFY_SOLVERS.get(sampler_name, UNKNOWN_SOLVER)


def check_steps(steps: Any, input_name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{input_name}: must be a whole number >= 1, got {steps!r}")
    return steps


def check_custom_expert_name(name: str) -> str:
    """A custom expert's name: ``/``-joined parts of letters, digits, ``_ . -``, never a built-in name.

    So the name can never leave a folder if it becomes a file name, and can never shadow a
    built-in expert (built-in names have no ``/``).
    """
    parts = name.split("/") if isinstance(name, str) else []
    if len(parts) < 3 or not all(_NAME_PART.fullmatch(p) and ".." not in p for p in parts):
        raise ValueError(f"invalid custom expert name {name!r}: expected 'sampler/scheduler/steps[/stop_rule]'")
    if name in expert_names(include_compat=True):
        raise ValueError(f"custom expert name {name!r} collides with a built-in expert")
    return name


def custom_expert_name(sampler_name: str, scheduler: str, steps: int, stop_rule: str = "none") -> str:
    """``"euler/normal/20"``, or ``"euler/normal/20/converged"`` with a stop rule."""
    parts = [sampler_name, scheduler, str(steps)] + ([stop_rule] if stop_rule != "none" else [])
    return check_custom_expert_name("/".join(parts))


def comfy_descriptor(sampler_name: str, scheduler: str, steps: int, stop_rule: str = "none") -> ExpertDescriptor:
    """The descriptor of ComfyUI sampler + scheduler + steps (+ stop rule), from :data:`COMFY_SOLVERS`."""
    check_steps(steps)
    if stop_rule not in CUSTOM_STOP_RULES:
        raise ValueError(f"stop_rule: must be one of {', '.join(CUSTOM_STOP_RULES)}, got {stop_rule!r}")
    info = solver_info(sampler_name)
    rule = info.stop_rule if stop_rule == "none" and info.stop_rule else stop_rule
    assert rule in STOP_RULES
    known = "" if sampler_name in COMFY_SOLVERS else " (not in the pack's sampler table: conservative estimate)"
    stop = "" if stop_rule == "none" else ", stops when the denoised prediction has converged"
    return ExpertDescriptor(
        name=custom_expert_name(sampler_name, scheduler, steps, stop_rule),
        solver=sampler_name,
        order=float(info.order),
        calls_per_step=float(info.calls_per_step),
        steps=steps,
        schedule=info.schedule or _SCHEDULE_FAMILY.get(scheduler, "other"),
        stochastic=info.stochastic,
        stop_rule=rule,
        description=f"ComfyUI sampler {sampler_name}, {scheduler} schedule, {steps} steps{stop}{known}.",
    )


@dataclass(frozen=True)
class ComfySamplerExpert(Expert):
    """An expert built from a ComfyUI sampler; ``inpaint_options`` go to ``KSAMPLER`` (``ddim``)."""

    sampler_name: str = ""
    scheduler: str = ""
    inpaint_options: Mapping[str, Any] = field(default_factory=dict)


def _comfy_sigmas(scheduler: str, discard_penultimate: bool, schedule: ModelSchedule, steps: int) -> Tensor:
    """Core KSampler's schedule: ``calculate_sigmas``, dropping the penultimate sigma for the
    samplers that need it (``KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS``)."""
    import comfy.samplers

    if schedule.native is None:
        raise ValueError("experts built from ComfyUI samplers need a ComfyUI model (schedule.native is None)")
    sigmas = comfy.samplers.calculate_sigmas(schedule.native, scheduler, steps + 1 if discard_penultimate else steps)
    if discard_penultimate:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


class _Converged(Exception):
    def __init__(self, denoised: Tensor, step: int, change: float | None) -> None:
        super().__init__(step)
        self.denoised, self.step, self.change = denoised, step, change


def convergence_min_steps(steps: int) -> int:
    """Steps a "converged" custom expert always runs: the share EarlyStopper uses (12 of 30)."""
    return max(2, round(steps * DEFAULT_MIN_STEPS / EARLY_STOP_STEPS))


def _comfy_loop(sampler_function: Callable, stop_rule: str) -> Callable:
    """A ComfyUI sampler function with the expert loop signature, plus the optional stop rule.

    ``"converged"`` applies EarlyStopper's :class:`~moe_sampler.experts.early_stop.ConvergenceRule`
    to the denoised predictions the sampler reports through its callback, and returns the last
    one when the rule fires (never the noisy latent).
    """

    @torch.no_grad()
    def loop(model, x, sigmas, extra_args=None, callback=None, disable=None, report=None, **options):
        if stop_rule == "none":
            return sampler_function(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                                    **options)
        steps = len(sigmas) - 1
        rule = ConvergenceRule(DEFAULT_TOL, convergence_min_steps(steps), DEFAULT_MAX_SIGMA_RATIO)
        previous: list = []

        def watch(info: dict) -> None:
            if callback is not None:
                callback(info)
            i, denoised, sigma = int(info["i"]), info["denoised"], info.get("sigma")
            if previous and sigma is not None and i + 1 < steps:
                sigma_prev, denoised_prev = previous
                if float(sigma_prev) > float(sigma) > 0 and rule(i, float(sigma), float(sigma_prev), denoised,
                                                                 denoised_prev):
                    raise _Converged(denoised, i, rule.last_change)
            previous[:] = [sigma, denoised]

        try:
            return sampler_function(model, x, sigmas, extra_args=extra_args, callback=watch, disable=disable,
                                    **options)
        except _Converged as stop:
            if report is not None:
                report.update(steps=stop.step + 1, stopped_early=True, estimate=stop.change)
            return stop.denoised.to(x.dtype)

    return loop


def expert_from_comfy(sampler_name: str, scheduler: str, steps: int, stop_rule: str = "none") -> ComfySamplerExpert:
    """An expert running ComfyUI's own ``sampler_name`` on ``scheduler`` sigmas with ``steps`` steps.

    Equivalent to core KSampler with the same settings (same sigmas, same sampler function,
    same inpaint options); ``stop_rule="converged"`` stops once the denoised prediction settles
    (EarlyStopper's rule) and returns it. ValueErrors name the node input at fault.
    """
    import comfy.samplers

    if sampler_name not in comfy.samplers.SAMPLER_NAMES:
        raise ValueError(f"sampler_name: unknown ComfyUI sampler {sampler_name!r}")
    if scheduler not in comfy.samplers.SCHEDULER_NAMES:
        raise ValueError(
            f"scheduler: unknown ComfyUI scheduler {scheduler!r}; one of {', '.join(comfy.samplers.SCHEDULER_NAMES)}"
        )
    descriptor = comfy_descriptor(sampler_name, scheduler, steps, stop_rule)
    ksampler = comfy.samplers.sampler_object(sampler_name)
    discard = sampler_name in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
    return ComfySamplerExpert(
        descriptor=descriptor,
        sampler=_comfy_loop(ksampler.sampler_function, stop_rule),
        make_sigmas=functools.partial(_comfy_sigmas, scheduler, discard),
        options=dict(ksampler.extra_options),
        sampler_name=sampler_name,
        scheduler=scheduler,
        inpaint_options=dict(ksampler.inpaint_options),
    )


# --------------------------------------------------------------------------------------------
# Pools and modes


def assemble_pool(enabled: Mapping[str, bool], custom: Iterable[Expert | None] = (),
                  base: Sequence[Expert] | None = None) -> tuple[Expert, ...]:
    """A pool: ``base`` (another pool), then the switched-on built-ins in registry order, then
    ``custom`` experts. Later duplicates of a name are dropped (a name fixes the configuration).

    ``enabled`` maps built-in names to on/off; a name that is not registered is a ValueError.
    """
    registered = {e.name: e for e in registered_experts(include_compat=True)}
    unknown = sorted(set(enabled) - set(registered))
    if unknown:
        raise ValueError(f"unknown built-in experts {unknown}; registered: {', '.join(registered)}")
    pool: dict[str, Expert] = {}
    candidates = [*(base or ()), *(registered[n] for n in registered if enabled.get(n)), *custom]
    for expert in candidates:
        if expert is None:
            continue
        if not isinstance(expert, Expert):
            raise TypeError(f"expected an expert (MOE_EXPERT), got {type(expert).__name__}")
        pool.setdefault(expert.name, expert)
    return tuple(pool.values())


def check_pool(pool: Sequence[Expert] | None, input_name: str = "expert_pool") -> tuple[Expert, ...]:
    """A non-empty tuple of experts, or a ValueError naming ``input_name``."""
    if pool is None:
        raise ValueError(f"{input_name}: no expert pool")
    experts = tuple(pool)
    if not experts:
        raise ValueError(
            f"{input_name}: the expert pool is empty; switch on at least one built-in expert in "
            f"MoE Expert Pool or connect an MoE Expert to it"
        )
    for expert in experts:
        if not isinstance(expert, Expert):
            raise ValueError(f"{input_name}: expected experts, got {type(expert).__name__}")
    return experts


def forced_expert(mode: str, pool: Sequence[Expert], input_name: str = "mode") -> Expert | None:
    """None for ``"auto"``; else the pool's expert called ``mode`` (ValueError naming ``mode`` if absent)."""
    if mode == "auto":
        return None
    for expert in pool:
        if expert.name == mode:
            return expert
    names = ", ".join(e.name for e in pool)
    raise ValueError(
        f"{input_name}: expert {mode!r} is not in the expert pool ({names}); switch it on in "
        f"MoE Expert Pool, connect it, or use 'auto'"
    )


# --------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class Attempt:
    """One expert run inside :func:`sample_with_expert`.

    ``outcome``: ``"ok"``, ``"non_finite"`` (NaN/Inf output), ``"interrupted"`` or ``"error"``.
    ``nfe`` counts model calls also for runs that did not finish. ``estimate`` is what the expert
    measured about itself; its meaning follows ``stop_rule`` (``"converged"``: the last relative
    change of the denoised prediction; ``"error_control"``: the mean accepted error ratio).
    """

    expert: str
    outcome: str
    nfe: int
    steps: int
    seconds: float
    estimate: float | None = None
    stopped_early: bool = False
    error: str | None = None
    stop_rule: str = "none"

    @property
    def success(self) -> bool:
        return self.outcome == "ok"


@dataclass(frozen=True)
class SamplingReport:
    """What :func:`sample_with_expert` did: every attempt, and which one's latent was returned."""

    attempts: tuple[Attempt, ...]
    scheduled_steps: int
    wall_seconds: float

    @property
    def final(self) -> Attempt:
        return self.attempts[-1]

    @property
    def expert(self) -> str:
        return self.final.expert

    @property
    def nfe(self) -> int:
        return self.final.nfe

    @property
    def steps(self) -> int:
        return self.final.steps

    @property
    def seconds(self) -> float:
        return self.final.seconds

    @property
    def estimate(self) -> float | None:
        return self.final.estimate

    @property
    def fallback(self) -> bool:
        """True when the requested expert failed and :data:`FALLBACK_EXPERT` produced the latent."""
        return len(self.attempts) > 1


class NonFiniteOutputError(RuntimeError):
    """Both the expert and the fallback produced NaN/Inf: the model itself is producing them."""

    def __init__(self, message: str, attempts: Sequence[Attempt]) -> None:
        super().__init__(message)
        self.attempts = tuple(attempts)


def check_latent(latent: Any, input_name: str = "latent_image") -> Tensor:
    """The latent's samples tensor; ValueError naming ``input_name`` for a bad or non-finite one."""
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), Tensor):
        raise ValueError(f"{input_name}: expected a LATENT (a dict with a 'samples' tensor)")
    samples = latent["samples"]
    if not getattr(samples, "is_nested", False) and not torch.isfinite(samples).all():
        bad = int((~torch.isfinite(samples)).sum())
        raise ValueError(
            f"{input_name}: the latent contains {bad} NaN/Inf values; check the node that produced it "
            f"(e.g. a VAE Encode in fp16 or an upstream sampler)"
        )
    return samples


def _step_callback(model: Any, steps: int, callback: Callable | None, preview: bool, seen: list[int]) -> Callable:
    """Per-step hook: interruption check, preview + progress bar, the caller's callback."""
    import comfy.model_management
    import latent_preview

    show = latent_preview.prepare_callback(model, steps) if preview else None

    def step(i: int, denoised: Tensor, x: Tensor, total_steps: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        seen[0] = i + 1
        if show is not None:
            show(i, denoised, x, total_steps)
        if callback is not None:
            callback(i, denoised, x, total_steps)

    return step


def _run_once(model: Any, expert: Expert, sigmas: Tensor, noise: Tensor, latent_image: Tensor, positive: Any,
              negative: Any, cfg: float, seed: int, noise_mask: Tensor | None, callback: Callable | None,
              preview: bool, disable_pbar: bool, attempts: list[Attempt]) -> Tensor | None:
    """One run through ``comfy.sample.sample_custom``; appends its :class:`Attempt` (also when it
    raises); returns the samples, or None when they are not finite."""
    import comfy.model_management
    import comfy.sample
    import comfy.samplers

    report: dict = {}  # the expert fills nfe also when its loop is interrupted
    seen = [0]
    sampler = comfy.samplers.KSAMPLER(expert, extra_options={"report": report},
                                      inpaint_options=dict(getattr(expert, "inpaint_options", {}) or {}))
    step = _step_callback(model, len(sigmas) - 1, callback, preview, seen)
    start = time.perf_counter()

    def attempt(outcome: str, error: str | None = None) -> Attempt:
        return Attempt(expert=expert.name, outcome=outcome, nfe=int(report.get("nfe", 0)),
                       steps=int(report.get("steps", seen[0])),
                       seconds=float(report.get("seconds", time.perf_counter() - start)),
                       estimate=_finite_or_none(report.get("estimate")),
                       stopped_early=bool(report.get("stopped_early", False)), error=error,
                       stop_rule=expert.descriptor.stop_rule)

    try:
        samples = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent_image,
                                             noise_mask=noise_mask, callback=step, disable_pbar=disable_pbar,
                                             seed=seed)
    except comfy.model_management.InterruptProcessingException:
        attempts.append(attempt("interrupted", "interrupted by the user"))
        raise
    except Exception as exc:
        attempts.append(attempt("error", f"{type(exc).__name__}: {exc}"))
        raise
    if getattr(samples, "is_nested", False) or torch.isfinite(samples).all():
        attempts.append(attempt("ok"))
        return samples
    attempts.append(attempt("non_finite", "the expert's output contains NaN/Inf"))
    return None


def _finite_or_none(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def sample_with_expert(
    model: Any,
    expert: Expert,
    positive: Any,
    negative: Any,
    latent: dict,
    seed: int,
    cfg: float,
    denoise: float = 1.0,
    sigmas: Tensor | None = None,
    callback: Callable[[int, Tensor, Tensor, int], None] | None = None,
    preview: bool = True,
    disable_pbar: bool | None = None,
    attempts: list[Attempt] | None = None,
    fallback: str | None = FALLBACK_EXPERT,
) -> tuple[dict, SamplingReport]:
    """Sample ``latent`` with ``expert`` through ComfyUI; returns ``(latent dict, report)``.

    Like core's ``common_ksampler``/``SamplerCustom``: the output dict is a copy of ``latent``
    (``batch_index``, ``noise_mask`` kept) with new ``samples`` on ComfyUI's intermediate device.

    Args:
        sigmas: a schedule to use instead of ``expert.sigmas(schedule_for(model), denoise)``.
        callback: also called once per step as ``callback(step, denoised, x, total_steps)``,
            after the interruption check and the preview/progress update.
        preview: send latent previews and progress like core samplers.
        attempts: if given, every run is appended to it as it ends, also when this function
            raises, so that a caller can record failures and interruptions.
        fallback: expert to rerun with when the output has NaN/Inf (None: raise instead).

    Raises:
        ValueError naming ``latent_image`` for a malformed or non-finite latent;
        ``comfy.model_management.InterruptProcessingException`` when the user interrupts
        (never swallowed); :class:`NonFiniteOutputError` when the fallback fails too.
    """
    import comfy.sample
    import comfy.utils

    attempts = [] if attempts is None else attempts
    first = len(attempts)
    check_latent(latent)
    start = time.perf_counter()
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    noise_mask = latent.get("noise_mask")
    disable_pbar = (not comfy.utils.PROGRESS_BAR_ENABLED) if disable_pbar is None else disable_pbar
    denoise = 1.0 if denoise > 0.9999 else denoise  # core KSampler's threshold
    schedule = schedule_for(model) if sigmas is None else None

    candidates = [expert]
    if fallback is not None and fallback != expert.name:
        candidates.append(get_expert(fallback))
    samples = None
    for candidate in candidates:
        run_sigmas = candidate.sigmas(schedule, denoise) if sigmas is None else sigmas
        samples = _run_once(model, candidate, run_sigmas, noise, latent_image, positive, negative, cfg, seed,
                            noise_mask, callback, preview, disable_pbar, attempts)
        if samples is not None:
            break
        logger.warning("expert %s produced NaN/Inf%s", candidate.name,
                       f"; falling back to {fallback}" if candidate is not candidates[-1] else "")
    runs = tuple(attempts[first:])
    if samples is None:
        tried = " and ".join(a.expert for a in runs)
        raise NonFiniteOutputError(
            f"{tried} produced NaN/Inf: the model itself returns non-finite values (try fp32, or check "
            f"model patches and LoRAs)", runs)
    out = latent.copy()
    out["samples"] = samples
    report = SamplingReport(runs, scheduled_steps=len(run_sigmas) - 1,
                            wall_seconds=time.perf_counter() - start)
    return out, report


# --------------------------------------------------------------------------------------------
# What a run leaves behind: store rows and the node's badge


def run_records(attempts: Sequence[Attempt], *, state: Any, selection: Any, router: str, priority: float | None,
                seed: int | None) -> list:
    """One :class:`~moe_sampler.router.store.RunRecord` per attempt (source ``"sampling"``).

    The first attempt is the routed (or forced) pick and carries the router's propensity and
    confidence (forced: propensity 1, no confidence); a fallback run was not chosen by the
    policy, so it has neither. ``quality`` is filled only from a ``"converged"`` stop rule's
    estimate (a relative change of the denoised prediction, scored with the documented map);
    other self-estimates are not errors and stay None.
    """
    from ..experts.analytic import quality_from_error
    from ..router.store import RunRecord

    records = []
    for i, attempt in enumerate(attempts):
        picked = i == 0
        quality = None
        if attempt.success and attempt.estimate is not None and attempt.stop_rule == "converged":
            quality = float(quality_from_error(attempt.estimate))
        records.append(RunRecord(
            expert=attempt.expert, router=router, nfe=attempt.nfe, steps=attempt.steps,
            seconds=max(attempt.seconds, 0.0), success=attempt.success, source="sampling", quality=quality,
            confidence=selection.confidence if picked and selection is not None else None,
            propensity=(1.0 if selection is None else selection.propensity) if picked else None,
            priority=priority, state=state, error=attempt.error, seed=seed,
        ))
    return records


def badge(report: SamplingReport, selection: Any, router: str) -> dict:
    """The node's UI payload: ``{"moe_run": [info], "text": [summary]}`` (see docs/NODES.md)."""
    info = {
        "expert": report.expert,
        "requested": report.attempts[0].expert,
        "confidence": None if selection is None else round(float(selection.confidence), 4),
        "propensity": 1.0 if selection is None else round(float(selection.propensity), 4),
        "nfe": report.nfe,
        "steps": report.steps,
        "seconds": round(report.wall_seconds, 4),
        "router": router,
        "forced": selection is None,
        "fallback": report.fallback,
        "stopped_early": report.final.stopped_early,
        "decision_ms": None if selection is None else round(float(selection.decision_seconds) * 1000, 3),
    }
    how = "forced" if selection is None else f"confidence {selection.confidence:.0%}"
    fell = f" (fallback: {info['requested']} failed)" if report.fallback else ""
    text = f"{report.expert}{fell}: {report.nfe} model calls, {report.wall_seconds:.2f} s, {how}"
    return {"moe_run": [info], "text": [text]}
