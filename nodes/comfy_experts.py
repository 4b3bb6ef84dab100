"""ComfyUI samplers as experts, and the expert pools the nodes take.

:func:`expert_from_comfy` turns any ComfyUI sampler + scheduler + step count (+ stop rule) into
an expert with an honest descriptor (:data:`COMFY_SOLVERS`) that samples as core KSampler does
with the same settings. :func:`model_family` and :func:`schedule_for` read a ComfyUI MODEL's
``model_sampling``. :func:`assemble_pool`, :func:`check_pool` and :func:`forced_expert` build and
check pools and the ``mode`` input, with errors that name the node input.

ComfyUI is imported inside functions only: the pure parts (descriptor table, names, pool
assembly, model family) import and test without it.
"""

from __future__ import annotations

import functools
import logging
import re
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
    registered_experts,
)
from ..experts.observer import ConvergenceStop, convergence_min_steps  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

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
    if len(sigmas) > 1 and not bool((sigmas[1:] < sigmas[:-1]).all()):
        # e.g. 'simple' takes every (1000 / steps)-th of the model's 1000 trained noise levels:
        # beyond 1000 steps it repeats levels, which no solver can step between.
        distinct = int(torch.unique(sigmas[sigmas > 0]).numel())
        raise ValueError(
            f"steps: the {scheduler!r} scheduler repeats noise levels when asked for {steps} (the steps, or "
            f"steps / denoise for img2img) on this model, which gives {distinct} distinct ones; use fewer steps "
            f"(at most {distinct} at denoise 1) or another scheduler"
        )
    return sigmas


def _comfy_loop(sampler_function: Callable) -> Callable:
    """A ComfyUI sampler function with the expert loop signature (it takes no ``report``).

    The stop rule is not here: :meth:`Expert.__call__ <moe_sampler.experts.base.Expert.__call__>`
    applies it through the callback for every expert (:mod:`moe_sampler.experts.observer`).
    """

    @torch.no_grad()
    def loop(model, x, sigmas, extra_args=None, callback=None, disable=None, report=None, **options):
        return sampler_function(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                                **options)

    return loop


def expert_from_comfy(sampler_name: str, scheduler: str, steps: int, stop_rule: str = "none") -> ComfySamplerExpert:
    """An expert running ComfyUI's own ``sampler_name`` on ``scheduler`` sigmas with ``steps`` steps.

    Equivalent to core KSampler with the same settings (same sigmas, same sampler function,
    same inpaint options); ``stop_rule="converged"`` stops once the denoised prediction settles
    (EarlyStopper's rule, applied by the same step observer as EarlyStopper's) and returns it. ValueErrors name the node input at fault.
    """
    import comfy.samplers

    if sampler_name not in comfy.samplers.SAMPLER_NAMES:
        raise ValueError(f"sampler_name: unknown ComfyUI sampler {sampler_name!r}")
    if scheduler not in comfy.samplers.SCHEDULER_NAMES:
        raise ValueError(
            f"scheduler: unknown ComfyUI scheduler {scheduler!r}; one of {', '.join(comfy.samplers.SCHEDULER_NAMES)}"
        )
    ksampler = comfy.samplers.sampler_object(sampler_name)
    discard = sampler_name in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
    return expert_from_sampler_function(
        ksampler.sampler_function, sampler_name, scheduler, steps, stop_rule,
        make_sigmas=functools.partial(_comfy_sigmas, scheduler, discard), options=dict(ksampler.extra_options),
        inpaint_options=dict(ksampler.inpaint_options),
    )


def expert_from_sampler_function(sampler_function: Callable, sampler_name: str, scheduler: str, steps: int,
                                 stop_rule: str = "none", *, make_sigmas: Callable[[ModelSchedule, int], Tensor],
                                 options: Mapping[str, Any] | None = None,
                                 inpaint_options: Mapping[str, Any] | None = None) -> ComfySamplerExpert:
    """The expert of :func:`expert_from_comfy` around any k-diffusion-signature ``sampler_function``
    (no ComfyUI import): the descriptor of ``sampler_name``, and the stop rule applied by the
    step observer that every expert runs under."""
    return ComfySamplerExpert(
        descriptor=comfy_descriptor(sampler_name, scheduler, steps, stop_rule),
        sampler=_comfy_loop(sampler_function),
        make_sigmas=make_sigmas,
        options=dict(options or {}),
        sampler_name=sampler_name,
        scheduler=scheduler,
        inpaint_options=dict(inpaint_options or {}),
        stop=ConvergenceStop() if stop_rule == "converged" else None,
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
