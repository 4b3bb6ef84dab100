"""The expert contract: descriptor, schedule source, run report and the one registry.

An expert is a sampling loop with the k-diffusion signature

    fn(model, x, sigmas, extra_args=None, callback=None, disable=None, report=None, **fixed) -> x

where ``model(x, sigma, **extra_args)`` returns the denoised prediction, so it drops into
``comfy.samplers.KSAMPLER`` unchanged, plus a frozen :class:`ExpertDescriptor` that the router
scores. Each expert also owns its step budget and sigma schedule (:meth:`Expert.sigmas`) and,
optionally, a stop rule; :meth:`Expert.__call__` runs every loop under the one step observer of
:mod:`.observer` (stop rule and fidelity estimate, read from the per-step callback).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor

from .observer import ConvergenceStop, run_observed

try:  # k-diffusion's console progress bar; tqdm comes with diffusers and ComfyUI
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover - only without tqdm installed
    _tqdm = None

STOP_RULES = ("none", "converged", "error_control")
SCHEDULES = ("karras", "exponential", "discrete", "adaptive", "other")
DESCRIPTOR_DIM = 16
CALLBACK_KEYS = frozenset({"x", "i", "sigma", "sigma_hat", "denoised"})


@runtime_checkable
class Denoiser(Protocol):
    """``model(x, sigma, **extra_args) -> denoised``; x [B, ...], sigma [B], result shaped like x."""

    def __call__(self, x: Tensor, sigma: Tensor, **extra_args: Any) -> Tensor: ...


class SamplerFn(Protocol):
    """The k-diffusion sampler signature every expert loop has."""

    def __call__(
        self,
        model: Denoiser,
        x: Tensor,
        sigmas: Tensor,
        extra_args: dict | None = None,
        callback: Callable[[dict], None] | None = None,
        disable: bool | None = None,
        report: dict | None = None,
    ) -> Tensor: ...


def progress_range(steps: int, disable: bool | None) -> Iterable[int]:
    """``range(steps)`` with a console progress bar unless ``disable``, as k-diffusion's
    ``trange(len(sigmas) - 1, disable=disable)`` (no bar when tqdm is missing)."""
    return range(steps) if _tqdm is None else _tqdm(range(steps), disable=disable)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, disable: bool | None) -> Any:
    """A console progress bar with ``update(n)`` and ``close()`` for loops that are not a range."""
    return _NoBar() if _tqdm is None else _tqdm(total=total, disable=disable)


@dataclass(frozen=True)
class ModelSchedule:
    """What an expert needs to know of a model's noise levels.

    ``discrete_sigmas`` is the model's ascending table of trained noise levels (ComfyUI's
    ``model_sampling.sigmas``), or None for a continuous-time model. ``native`` is the
    framework's own sampling object (ComfyUI's ``model_sampling``) when there is one, for
    experts built from a framework scheduler; pure-torch experts never need it.
    """

    sigma_min: float
    sigma_max: float
    discrete_sigmas: Tensor | None = field(default=None, compare=False)
    native: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not (0 < self.sigma_min < self.sigma_max) or not math.isfinite(self.sigma_max):
            raise ValueError(
                f"sigma range must satisfy 0 < sigma_min < sigma_max < inf, got "
                f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"
            )

    @classmethod
    def from_model_sampling(cls, model_sampling: Any) -> "ModelSchedule":
        """Read ``sigma_min``/``sigma_max``/``sigmas`` from a ComfyUI ``model_sampling`` object."""
        table = getattr(model_sampling, "sigmas", None)
        table = table.detach().float().cpu() if isinstance(table, Tensor) else None
        return cls(float(model_sampling.sigma_min), float(model_sampling.sigma_max), table, model_sampling)


@dataclass(frozen=True)
class ExpertDescriptor:
    """An honest, frozen summary of an expert that the router can score without running it.

    Args:
        name: registry name, e.g. ``"BalancedMaster"``.
        solver: solver family, e.g. ``"dpmpp_2m"``, ``"heun"``, ``"ddpm"``.
        order: global convergence order of the deterministic solver (1 for Euler); for a
            stochastic solver, its strong order (0.5 for ancestral samplers).
        calls_per_step: model calls per step (2 for Heun, 1 for multistep solvers).
        steps: step budget (number of sigma intervals of its schedule).
        schedule: one of ``SCHEDULES``.
        stochastic: whether it injects fresh noise (seeded from ``extra_args["seed"]``).
        stop_rule: one of ``STOP_RULES``.
        max_nfe: hard cap on model calls for one run.
        description: one sentence for tooltips.
    """

    name: str
    solver: str
    order: float
    calls_per_step: float
    steps: int
    schedule: str
    stochastic: bool
    stop_rule: str = "none"
    max_nfe: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"expert {self.name!r}: steps must be >= 1, got {self.steps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"expert {self.name!r}: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.stop_rule not in STOP_RULES:
            raise ValueError(f"expert {self.name!r}: stop_rule must be one of {STOP_RULES}, got {self.stop_rule!r}")
        if self.max_nfe == 0:
            object.__setattr__(self, "max_nfe", int(math.ceil(self.steps * self.calls_per_step)))

    def to_features(self) -> Tensor:
        """The descriptor as a fixed float vector, shape [DESCRIPTOR_DIM], for the router."""
        log_nfe = math.log2(max(self.max_nfe, 1))
        values = [
            log_nfe / 10.0,
            math.log2(self.steps) / 10.0,
            self.order / 3.0,
            self.calls_per_step / 3.0,
            float(self.stochastic),
            *[float(self.stop_rule == rule) for rule in STOP_RULES],
            *[float(self.schedule == sched) for sched in SCHEDULES],
            self.order * log_nfe / 30.0,
            float(self.stop_rule != "none") * log_nfe / 10.0,
            1.0,
        ]
        assert len(values) == DESCRIPTOR_DIM
        return torch.tensor(values, dtype=torch.float32)


@dataclass(frozen=True)
class ExpertRun:
    """What one run cost and what the expert could measure about itself.

    ``error_estimate``: the raw fidelity estimate of :mod:`.observer` (about the relative error
    to the exact solution, uncalibrated; None when fewer than two steps ran);
    ``estimate_features``: its parts, for :mod:`moe_sampler.router.calibration`.
    """

    expert: str
    nfe: int
    steps: int
    seconds: float
    error_estimate: float | None = None
    stopped_early: bool = False
    finite: bool = True
    estimate_features: Mapping[str, float] | None = None


SigmaFn = Callable[[ModelSchedule, int], Tensor]


@dataclass(frozen=True)
class Expert:
    """A registered expert: descriptor, sampling loop, schedule, fixed options and stop rule.

    Calling the expert runs its loop with the k-diffusion signature under the step observer
    (:func:`.observer.run_observed`); pass ``report={}`` to have it filled with ``nfe``,
    ``steps``, ``seconds``, ``stopped_early``, ``error_estimate``, ``estimate_features`` and
    ``last_change``. ``stop``: a convergence stop applied through the callback (EarlyStopper,
    and experts built from ComfyUI samplers with ``stop_rule="converged"``).
    """

    descriptor: ExpertDescriptor
    sampler: SamplerFn
    make_sigmas: SigmaFn
    options: Mapping[str, Any] = field(default_factory=dict)
    compat: bool = False
    stop: ConvergenceStop | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def name(self) -> str:
        return self.descriptor.name

    def sigmas(self, schedule: ModelSchedule, denoise: float = 1.0) -> Tensor:
        """The expert's schedule for a model, shape [steps + 1], ending in 0.

        With ``denoise < 1`` (img2img), like ComfyUI: build ``int(steps / denoise)`` levels and
        keep the last ``steps + 1``.
        """
        if not (0.0 < denoise <= 1.0):
            raise ValueError(f"denoise must be in (0, 1], got {denoise}")
        steps = self.descriptor.steps
        if denoise >= 1.0:
            return self.make_sigmas(schedule, steps)
        total = max(int(steps / denoise), steps)
        return self.make_sigmas(schedule, total)[-(steps + 1):]

    def __call__(
        self,
        model: Denoiser,
        x: Tensor,
        sigmas: Tensor,
        extra_args: dict | None = None,
        callback: Callable[[dict], None] | None = None,
        disable: bool | None = None,
        report: dict | None = None,
        **options: Any,
    ) -> Tensor:
        validate_inputs(x, sigmas)
        merged = {**self.options, **options}
        if len(sigmas) < 2:
            if report is not None:
                report.update(nfe=0, steps=0, seconds=0.0, stopped_early=False, error_estimate=None)
            return x
        counted = CountingDenoiser(model)
        start = time.perf_counter()
        try:
            out = run_observed(self.sampler, counted, x, sigmas, extra_args=extra_args, callback=callback,
                               disable=disable, report=report, stop=self.stop, order=self.descriptor.order,
                               **merged)
        finally:
            # Also when the loop raises (e.g. the user interrupts): those model calls were spent.
            if report is not None:
                report["nfe"] = counted.calls
        if report is not None:
            report["seconds"] = time.perf_counter() - start
        return out

    def run(
        self,
        model: Denoiser,
        x: Tensor,
        sigmas: Tensor,
        extra_args: dict | None = None,
        callback: Callable[[dict], None] | None = None,
    ) -> tuple[Tensor, ExpertRun]:
        """Run and return the result with its :class:`ExpertRun` report."""
        report: dict = {}
        out = self(model, x, sigmas, extra_args=extra_args, callback=callback, disable=True, report=report)
        run = ExpertRun(
            expert=self.name,
            nfe=int(report.get("nfe", 0)),
            steps=int(report.get("steps", 0)),
            seconds=float(report.get("seconds", 0.0)),
            error_estimate=report.get("error_estimate"),
            stopped_early=bool(report.get("stopped_early", False)),
            finite=bool(torch.isfinite(out).all()),
            estimate_features=report.get("estimate_features"),
        )
        return out, run


class CountingDenoiser:
    """Wraps a denoiser and counts its calls (the NFE)."""

    def __init__(self, model: Denoiser) -> None:
        self.inner = model
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor, **extra_args: Any) -> Tensor:
        self.calls += 1
        return self.inner(x, sigma, **extra_args)

    def __getattr__(self, name: str) -> Any:
        # KSAMPLER models expose inner_model etc.; solvers that need them see through the wrapper.
        return getattr(self.inner, name)


def validate_inputs(x: Tensor, sigmas: Tensor) -> None:
    """Raise a clear ValueError/TypeError for inputs no expert can sample."""
    if not isinstance(x, Tensor) or not isinstance(sigmas, Tensor):
        raise TypeError("x and sigmas must be torch tensors")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have a batch dimension and at least one data dimension, got shape {tuple(x.shape)}")
    if sigmas.dim() != 1:
        raise ValueError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
    if not sigmas.is_floating_point():
        raise TypeError(f"sigmas must be a floating-point tensor, got dtype {sigmas.dtype}")
    if not torch.isfinite(sigmas).all() or (sigmas < 0).any():
        raise ValueError("sigmas must be finite and non-negative")
    if len(sigmas) > 1 and not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError(f"sigmas must be strictly decreasing, got {sigmas.tolist()[:8]}...")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or Inf; refusing to sample from a non-finite latent")


class UnknownExpertError(KeyError):
    """Raised for an expert name that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0])


_REGISTRY: dict[str, Expert] = {}


def register(expert: Expert) -> Expert:
    """Register an expert once; a second registration of the same name is an error."""
    if expert.name in _REGISTRY:
        raise ValueError(f"expert {expert.name!r} is already registered")
    _REGISTRY[expert.name] = expert
    return expert


def get_expert(name: str) -> Expert:
    """Look up a registered expert by name."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownExpertError(
            f"unknown expert {name!r}; registered experts: {', '.join(sorted(_REGISTRY))}"
        ) from None


def registered_experts(include_compat: bool = True) -> list[Expert]:
    """All registered experts in registration order; compatibility experts last."""
    experts = list(_REGISTRY.values())
    if not include_compat:
        experts = [e for e in experts if not e.compat]
    return experts


def expert_names(include_compat: bool = True) -> list[str]:
    return [e.name for e in registered_experts(include_compat)]


def default_pool() -> list[Expert]:
    """The pool the router chooses from by default (compatibility experts are off)."""
    return registered_experts(include_compat=False)


def features_of(experts: Iterable[Expert | ExpertDescriptor]) -> Tensor:
    """Stack descriptor features of experts (or descriptors), shape [n_experts, DESCRIPTOR_DIM]."""
    return torch.stack([getattr(e, "descriptor", e).to_features() for e in experts])
