"""Where training and benchmark contexts come from, and how experts are scored on them.

One core serves every model: :class:`DenoiserEnvironment` implements the trainer's
:class:`Environment` protocol for any :class:`~moe_sampler.experts.base.Denoiser`
(``model(x, sigma, **extra_args)``), given

- a :class:`ContextSource`: draws a generation (conditioning and its unconditional partner,
  guidance, noise seed, latent shape, img2img start data and denoise strength) and gives its
  router state;
- a reference solver (:class:`DormandPrince` by default: an adaptive Runge-Kutta 5(4) pair, a
  different family from every expert it grades), run once per context and start sigma from
  the same noise as the experts.

Each expert runs from that noise and is scored by its relative error to the reference,
``quality = clip(-log10(error) / 3, 0, 1)``. img2img starts from data plus noise; with
``start_grid`` the start sigma of each expert is snapped to a shared log grid, so experts
starting at the same grid sigma share one reference (see docs/ROUTER.md for what it saves and
costs). Outcomes and references are cached in memory; ``calls`` counts model calls of
references and experts.

:class:`AnalyticEnvironment` is this core on a family of
:class:`~moe_sampler.experts.analytic.AnalyticModel` (exact-answer yardstick);
:class:`PromptContexts` is a ready source for any denoiser that takes ``cond``/``uncond``
embeddings (the original API and the learned-model yardstick use it); ComfyUI's training
environment (``nodes/comfy_environment.py``) is a subclass that samples through the bridge.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor

from ..experts.analytic import REFERENCE_SIGMA_END, AnalyticModel, _dopri5, _rk4, quality_from_error, random_prompts
from ..experts.base import CountingDenoiser, Denoiser, Expert, ModelSchedule
from .calibration import calibration_inputs, stored_inputs
from .features import state_from_analytic, state_from_conditioning

logger = logging.getLogger(__name__)

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Outcome:
    """One expert's run on one context: relative error to the reference, quality score in
    [0, 1] (``quality_from_error``), model calls, seconds, and success (finite, finished)."""

    expert: str
    relative_error: float
    quality: float
    nfe: int
    seconds: float
    success: bool


class Environment(Protocol):
    """Where training contexts come from and how experts are scored on them (the trainer's view).

    ``sample_context(rng)`` draws a context with the given ``random.Random`` only (so training
    is reproducible); ``state(context, priority)`` is its [64] state; ``evaluate(context,
    experts)`` runs a high-accuracy reference once from the context's noise, then each expert
    from the same noise, and returns one :class:`Outcome` per expert, in order.
    """

    def sample_context(self, rng: random.Random) -> Any: ...

    def state(self, context: Any, priority: float) -> Tensor: ...

    def evaluate(self, context: Any, experts: Sequence[Expert]) -> list[Outcome]: ...


@dataclass(frozen=True)
class RunReport:
    """A fresh expert run on a context, as ``on_run`` receives it (the training node records it).

    ``priority`` is the environment's ``report_priority`` and ``state`` the context's state at
    that priority: a pure function of the context, whatever was asked before.
    """

    context: Any
    expert: str
    nfe: int
    steps: int
    seconds: float
    quality: float
    relative_error: float
    success: bool
    error: str | None
    priority: float | None
    state: Any
    estimate: Any = None  # the run's calibration inputs (router.calibration.calibration_inputs), or None

    def pair_details(self) -> dict | None:
        """The run's calibration pair as stats-row details (``estimate``: the inputs, 6 significant
        digits; ``true_error``: the relative error against the reference), or None when the run
        failed or has no estimate."""
        if not self.success or self.estimate is None or not math.isfinite(self.relative_error):
            return None
        return {"estimate": stored_inputs(self.estimate), "true_error": float(self.relative_error)}


@dataclass(frozen=True)
class Sampled:
    """What one expert run produced: the latent (None when it failed or is not finite), its
    model calls, steps and seconds, and what went wrong."""

    latent: Tensor | None
    nfe: int
    steps: int
    seconds: float
    error: str | None = None
    estimate: Any = None  # calibration inputs of the run's fidelity estimate, or None


class ContextSource(Protocol):
    """How a :class:`DenoiserEnvironment` draws generations (contexts are hashable and have
    ``seed`` and ``denoise``).

    ``latent_shape(context)`` is the full latent shape ``[B, ...]`` (from the model or the
    caller, never assumed); ``extra_args(context)`` what the denoiser takes besides ``x`` and
    ``sigma`` (conditioning, unconditional partner, ``cfg``; the environment adds ``seed``);
    ``clean_latent(context)`` the img2img start data ``[B, ...]`` (None for text-to-image).
    ``relative_error(context, x, reference)`` is optional: per-sample error [B] (default
    ``rms(x - reference) / rms(reference)`` per sample).
    """

    def sample_context(self, rng: random.Random) -> Any: ...

    def state(self, context: Any, priority: float) -> Tensor: ...

    def latent_shape(self, context: Any) -> tuple[int, ...]: ...

    def extra_args(self, context: Any) -> dict: ...

    def clean_latent(self, context: Any) -> Tensor | None: ...


class _FlowReference:
    """A reference solve of the probability-flow ODE ``dx/dt = x - D(x, e^t)`` in ``t = log
    sigma`` (float64), from the start sigma down to ``sigma_end`` (the model's ``sigma_min``
    when None), then ``D`` there, as every expert's last step does; subclasses integrate."""

    sigma_end: float | None = None
    dtype: torch.dtype = torch.float64

    def integrate(self, f: Callable[[Tensor, float], Tensor], x: Tensor, t0: float, t1: float) -> Tensor:
        raise NotImplementedError

    def __call__(self, model: Denoiser, x: Tensor, sigma_start: float, extra_args: dict,
                 schedule: ModelSchedule) -> Tensor:
        sigma_end = self.sigma_end if self.sigma_end is not None else schedule.sigma_min
        x = x.to(self.dtype).clone()
        b = x.shape[0]

        def f(x_: Tensor, t: float) -> Tensor:
            sigma = torch.full((b,), math.exp(t), dtype=self.dtype, device=x_.device)
            return x_ - model(x_, sigma, **extra_args)

        x = self.integrate(f, x, math.log(sigma_start), math.log(sigma_end))
        return model(x, torch.full((b,), sigma_end, dtype=self.dtype, device=x.device), **extra_args)


class DormandPrince(_FlowReference):
    """The reference solver: Dormand-Prince 5(4) with step control on the probability-flow ODE
    (see :class:`_FlowReference`) down to ``sigma_end`` (the model's ``sigma_min`` when None).

    An adaptive Runge-Kutta pair is a different family from the experts it grades (multistep
    DPM-Solver++, DPM-Solver-1/2 pairs, Euler/DDPM): its errors do not line up with theirs.
    ``dtype`` is what the state is integrated in (float64; a float32 network's outputs are cast
    to it). ``atol``: the absolute tolerance (``rtol / 100`` by default); a looser one saves
    calls but, on the learned model, costs most of the accuracy (docs/ROUTER.md).
    """

    def __init__(self, rtol: float = 1e-5, sigma_end: float | None = None, dtype: torch.dtype = torch.float64,
                 atol: float | None = None) -> None:
        if not (0 < rtol < 1):
            raise ValueError(f"rtol must be in (0, 1), got {rtol}")
        self.rtol, self.sigma_end, self.dtype, self.atol = rtol, sigma_end, dtype, atol

    def integrate(self, f: Callable[[Tensor, float], Tensor], x: Tensor, t0: float, t1: float) -> Tensor:
        return _dopri5(f, x, t0, t1, rtol=self.rtol, atol=self.atol)


class RungeKutta4(_FlowReference):
    """A fixed-step reference: classical RK4 with ``steps`` equal steps in ``log sigma`` down to
    ``sigma_end`` (the model's ``sigma_min`` when None), then ``D`` there (``4 * steps + 1``
    model calls): a fixed cost, a one-step Runge-Kutta method (a different family from the
    multistep and embedded-pair experts). Not the default: on the learned digits model 100
    steps are only 3-4x below the best expert's error and 200 steps 6-12x, where Dormand-Prince
    at rtol 1e-5 is 23-37x below (docs/ROUTER.md).
    """

    def __init__(self, steps: int = 200, sigma_end: float | None = None) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps, self.sigma_end = steps, sigma_end

    def integrate(self, f: Callable[[Tensor, float], Tensor], x: Tensor, t0: float, t1: float) -> Tensor:
        return _rk4(f, x, t0, t1, self.steps)


def snap_to_grid(sigma: float, per_decade: int, above: float = 0.0) -> float:
    """The nearest point of the log grid with ``per_decade`` points per decade of sigma that is
    above ``above`` (the next grid point up when the nearest is not)."""
    position = math.log10(sigma) * per_decade
    snapped = 10.0 ** (round(position) / per_decade)
    return snapped if snapped > above else 10.0 ** (math.ceil(position) / per_decade)


def relative_rms_error(x: Tensor, reference: Tensor) -> Tensor:
    """Per-sample ``rms(x - reference) / rms(reference)``, shape [B]."""
    b = x.shape[0]
    diff = (x.double() - reference.double()).reshape(b, -1).square().mean(1).sqrt()
    return diff / reference.double().reshape(b, -1).square().mean(1).sqrt().clamp_min(1e-12)


class DenoiserEnvironment:
    """The trainer's :class:`Environment` for any denoiser (see the module docstring).

    Args:
        model: the :class:`~moe_sampler.experts.base.Denoiser`, with ``schedule()`` unless
            ``schedule`` is given.
        contexts: a :class:`ContextSource`.
        reference: ``reference(model, x, sigma_start, extra_args, schedule) -> Tensor``;
            :class:`DormandPrince` (rtol 1e-5) by default.
        schedule: the model's noise levels (``model.schedule()`` when None).
        start_grid: snap img2img start sigmas to a log grid with this many points per decade
            (None: every expert keeps its own start sigma and gets its own reference). 20 cuts
            the references of img2img contexts from 4.6 to 1.9 per context on the analytic
            benchmark, moving qualities by 0.002 on average (docs/ROUTER.md).
        reference_cache: references kept in memory (least recently used dropped first).
        on_run: called with a :class:`RunReport` after every fresh expert run.
        report_priority: the priority that :class:`RunReport` states are computed at.

    ``calls["reference"]`` and ``calls["experts"]`` count the model calls spent so far.
    """

    def __init__(self, model: Denoiser | None, contexts: ContextSource | None, reference: Callable | None = None, *,
                 schedule: ModelSchedule | None = None, start_grid: int | None = 20, reference_cache: int = 512,
                 on_run: Callable[[RunReport], None] | None = None, report_priority: float = 0.5) -> None:
        if start_grid is not None and start_grid < 1:
            raise ValueError(f"start_grid must be None or >= 1 point per decade, got {start_grid}")
        self.model, self.source = model, contexts
        self.reference_solver = reference if reference is not None else DormandPrince()
        self._schedule = schedule
        self.start_grid = start_grid
        self.on_run, self.report_priority = on_run, report_priority
        self._outcomes: dict[tuple, Outcome] = {}
        self._references: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()
        self._reference_cache = reference_cache
        self.calls = {"reference": 0, "experts": 0}

    # -- what a context means (overridden by environments with several models)

    def model_for(self, context: Any) -> Denoiser:
        """The denoiser a context runs on."""
        return self.model

    def schedule_for(self, context: Any) -> ModelSchedule:
        """The noise levels experts build their schedules from."""
        return self._schedule if self._schedule is not None else self.model_for(context).schedule()

    def extra_args(self, context: Any) -> dict:
        """The denoiser's extra arguments for a context, with its noise ``seed``."""
        return {**self.source.extra_args(context), "seed": context.seed}

    def relative_error(self, context: Any, x: Tensor, reference: Tensor) -> Tensor:
        """Per-sample relative error [B] of a result against the reference."""
        custom = getattr(self.source, "relative_error", None)
        return custom(context, x, reference) if custom is not None else relative_rms_error(x, reference)

    # -- the Environment protocol

    def sample_context(self, rng: random.Random) -> Any:
        """A context drawn with ``rng`` only."""
        return self.source.sample_context(rng)

    def state(self, context: Any, priority: float) -> Tensor:
        """The context's router state [64] for ``priority``."""
        return self.source.state(context, priority)

    def evaluate(self, context: Any, experts: Sequence[Expert]) -> list[Outcome]:
        """Run each expert from the context's noise and score it against the reference."""
        return [self._evaluate_one(context, expert) for expert in experts]

    def outcomes(self) -> list[Outcome]:
        """Every outcome measured so far (one per context and expert), in measuring order."""
        return list(self._outcomes.values())

    @property
    def reference_share(self) -> float:
        """Share of all model calls so far spent on references (NaN before any call)."""
        total = self.calls["reference"] + self.calls["experts"]
        return self.calls["reference"] / total if total else math.nan

    # -- runs

    def expert_sigmas(self, context: Any, expert: Expert) -> Tensor:
        """The expert's schedule for the context (img2img: truncated by ``denoise``, its start
        moved to the nearest ``start_grid`` point above its second sigma, unless that is above
        the model's ``sigma_max``)."""
        schedule = self.schedule_for(context)
        sigmas = expert.sigmas(schedule, context.denoise)
        if self.start_grid is not None and context.denoise < 1.0 and len(sigmas) > 1:
            snapped = snap_to_grid(float(sigmas[0]), self.start_grid, above=float(sigmas[1]))
            if snapped <= schedule.sigma_max:
                sigmas = sigmas.clone()
                sigmas[0] = snapped
        return sigmas

    def initial_latent(self, context: Any, sigma_start: float) -> Tensor:
        """``sigma_start`` times N(0, I) noise from the context's seed (float64), plus the clean
        latent for img2img (as ComfyUI does), as float32."""
        shape = tuple(self.source.latent_shape(context))
        g = torch.Generator().manual_seed(int(context.seed))
        x = torch.randn(*shape, generator=g, dtype=torch.float64) * sigma_start
        if context.denoise < 1.0:
            clean = self.source.clean_latent(context)
            if clean is None:
                raise ValueError(f"context {context} has denoise {context.denoise} < 1 but no clean latent to start from")
            x = clean.to(torch.float64).reshape(x.shape) + x
        return x.float()

    def start(self, context: Any, sigma_start: float) -> tuple[Tensor, Tensor]:
        """The starting latent [B, ...] float32 at ``sigma_start`` and its reference solution
        (computed once per context and start sigma)."""
        key = (context, round(sigma_start, 6))
        if key in self._references:
            self._references.move_to_end(key)
            return self._references[key]
        x = self.initial_latent(context, sigma_start)
        counted = CountingDenoiser(self.model_for(context))
        reference = self.reference_solver(counted, x, sigma_start, self.extra_args(context), self.schedule_for(context))
        self.calls["reference"] += counted.calls
        self._references[key] = (x, reference)
        if len(self._references) > self._reference_cache:
            self._references.popitem(last=False)
        return x, reference

    def prepare(self, context: Any, expert: Expert) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """``(start latent, sigmas, reference)`` for one expert's run on a context."""
        sigmas = self.expert_sigmas(context, expert)
        x, reference = self.start(context, float(sigmas[0]))
        return x, sigmas, reference

    def sample(self, context: Any, expert: Expert, x: Tensor | None, sigmas: Tensor | None) -> Sampled:
        """Run the expert; an expert that raises or returns NaN/Inf is a failed run (no latent)."""
        try:
            result, run = expert.run(self.model_for(context), x.clone(), sigmas, extra_args=self.extra_args(context))
        except (RuntimeError, ValueError, ArithmeticError) as exc:
            logger.warning("expert %s failed on %s: %s", expert.name, context, exc)
            return Sampled(None, expert.descriptor.max_nfe, 0, 0.0, f"{type(exc).__name__}: {exc}")
        if not run.finite:
            return Sampled(None, run.nfe, run.steps, run.seconds, "non-finite output")
        report = {"error_estimate": run.error_estimate, "estimate_features": run.estimate_features, "nfe": run.nfe}
        return Sampled(result, run.nfe, run.steps, run.seconds,
                       estimate=calibration_inputs(report, cfg=getattr(context, "cfg", None)))

    def _evaluate_one(self, context: Any, expert: Expert) -> Outcome:
        key = (context, expert.name, expert.descriptor)
        if key in self._outcomes:
            return self._outcomes[key]
        x, sigmas, reference = self.prepare(context, expert)
        run = self.sample(context, expert, x, sigmas)
        self.calls["experts"] += run.nfe
        if run.latent is not None:
            error = self.relative_error(context, run.latent, reference)
            outcome = Outcome(expert.name, float(error.mean()), float(quality_from_error(error).mean()),
                              run.nfe, run.seconds, True)
        else:
            outcome = Outcome(expert.name, math.inf, 0.0, run.nfe, run.seconds, False)
        self._outcomes[key] = outcome
        if self.on_run is not None:
            priority = self.report_priority
            self.on_run(RunReport(context, expert.name, run.nfe, run.steps, run.seconds, outcome.quality,
                                  outcome.relative_error, outcome.success, run.error, priority,
                                  self.state(context, priority), run.estimate if run.latent is not None else None))
        return outcome


# ------------------------------------------------------------------------- any cond/uncond denoiser


@dataclass(frozen=True)
class PromptContext:
    """One generation of a :class:`PromptContexts` source: prompt index, cfg, noise seed,
    img2img denoise strength (1.0: text-to-image) and which clean latent it starts from."""

    prompt: int
    cfg: float
    seed: int
    denoise: float = 1.0
    image: int = 0


class PromptContexts:
    """A :class:`ContextSource` for a denoiser that takes ``cond``/``uncond``/``cfg`` (the
    convention of ``DiffusersDenoiser`` and the learned yardstick).

    Args:
        prompts: per prompt, what the model gets as ``cond``: a conditioning tensor ``[1,
            tokens, width]`` (then also what the router's state reads) or anything else the
            model takes (a class label, ...) with ``state_conditioning``.
        negative: the unconditional partner (``uncond``), or None (a model that makes its own).
        state_conditioning, state_negative: the tensors ``[1, tokens, width]`` the router's state
            reads per prompt and for the negative, when ``prompts``/``negative`` are not such
            tensors (e.g. a class-conditional model's class embeddings).
        latent_shape: the latent of one sample, e.g. ``(4, 64, 64)`` (required: never assumed).
        model_family: ``"eps"``, ``"v"`` or ``"flow"`` (the state's family slots).
        cfgs: guidance values drawn uniformly; ``denoise_range`` and ``img2img_fraction``: the
            img2img share and its strength.
        images: clean latents ``[N, *latent_shape]`` that img2img contexts start from (required
            when ``img2img_fraction > 0``); or ``images_per_prompt`` of them per prompt.
        contexts: when set, draw from this fixed list instead of fresh contexts.
        extra: more extra_args for the model (e.g. ``{"model_options": ...}``).
        relative_error: ``(x, reference) -> [B]`` per-sample error (default ``rms(x - reference)
            / rms(reference)``), e.g. a model's error relative to its data rms.
    """

    def __init__(self, prompts: Sequence[Tensor], negative: Tensor | None, latent_shape: Sequence[int],
                 model_family: str = "eps", cfgs: Sequence[float] = (1.0, 3.0, 5.0, 7.5), img2img_fraction: float = 0.0,
                 denoise_range: tuple[float, float] = (0.3, 0.9), images: Tensor | None = None,
                 images_per_prompt: bool = False, contexts: Sequence[PromptContext] | None = None,
                 extra: dict | None = None, state_conditioning: Sequence[Tensor] | None = None,
                 state_negative: Tensor | None = None,
                 relative_error: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        if not prompts:
            raise ValueError("prompts: give at least one conditioning tensor [1, tokens, width]")
        if len(tuple(latent_shape)) < 1:
            raise ValueError(f"latent_shape must be the shape of one sample, e.g. (4, 64, 64), got {latent_shape!r}")
        if img2img_fraction > 0 and images is None:
            raise ValueError("images: img2img contexts need clean latents to start from")
        self.prompts, self.negative = list(prompts), negative
        self.shape = tuple(int(s) for s in latent_shape)
        self.family, self.cfgs = model_family, tuple(cfgs)
        self.img2img_fraction, self.denoise_range = img2img_fraction, denoise_range
        self.images, self.images_per_prompt = images, images_per_prompt
        self.contexts = list(contexts) if contexts is not None else None
        self.extra = dict(extra or {})
        self._relative_error = relative_error
        self.state_conditioning = list(state_conditioning) if state_conditioning is not None else self.prompts
        self.state_negative = state_negative if state_negative is not None else negative
        if len(self.state_conditioning) != len(self.prompts) or not all(
                isinstance(c, Tensor) and c.dim() == 3 for c in self.state_conditioning):
            raise ValueError("state_conditioning: the router's state needs one tensor [1, tokens, width] per prompt "
                             "(give state_conditioning when prompts are not such tensors)")

    def draw(self, rng: random.Random) -> PromptContext:
        """A fresh context drawn with ``rng``."""
        prompt = rng.randrange(len(self.prompts))
        cfg = rng.choice(self.cfgs)
        seed = rng.randrange(1 << 31)
        denoise, image = 1.0, 0
        if rng.random() < self.img2img_fraction:
            denoise = round(rng.uniform(*self.denoise_range), 2)
            image = rng.randrange(len(self.images) // (len(self.prompts) if self.images_per_prompt else 1))
        return PromptContext(prompt, cfg, seed, denoise, image)

    def sample_context(self, rng: random.Random) -> PromptContext:
        return rng.choice(self.contexts) if self.contexts is not None else self.draw(rng)

    def latent_shape(self, context: PromptContext) -> tuple[int, ...]:
        return (1, *self.shape)

    def extra_args(self, context: PromptContext) -> dict:
        args = {**self.extra, "cond": self.prompts[context.prompt], "cfg": context.cfg}
        if self.negative is not None:
            args["uncond"] = self.negative
        return args

    def clean_latent(self, context: PromptContext) -> Tensor | None:
        if context.denoise >= 1.0:
            return None
        index = context.image
        if self.images_per_prompt:
            index = context.prompt * (len(self.images) // len(self.prompts)) + context.image
        return self.images[index:index + 1]

    def relative_error(self, context: PromptContext, x: Tensor, reference: Tensor) -> Tensor:
        if self._relative_error is not None:
            return self._relative_error(x, reference)
        return relative_rms_error(x, reference)

    def state(self, context: PromptContext, priority: float, source: str = "training") -> Tensor:
        negative = [[self.state_negative, {}]] if isinstance(self.state_negative, Tensor) else None
        return state_from_conditioning([[self.state_conditioning[context.prompt], {}]], negative,
                                       self.latent_shape(context), context.cfg, context.denoise, self.family,
                                       priority, source)


# ------------------------------------------------------------------------------ the analytic model


@dataclass(frozen=True)
class Conditions:
    """How varied the generation contexts are.

    Args:
        shapes: latent shapes, cycled over the analytic models.
        cfg_one_share: share of contexts at cfg 1 (no guidance); the rest log-uniform in
            ``[1.5, cfg_max]``.
        img2img_fraction: share of contexts with denoise < 1, uniform in ``denoise_range``.
        scale_range: each prompt's data scale is multiplied by a log-uniform factor in this range.
    """

    shapes: tuple[tuple[int, ...], ...] = ((64,), (4, 16, 16))
    cfg_max: float = 12.0
    cfg_one_share: float = 0.15
    img2img_fraction: float = 0.2
    denoise_range: tuple[float, float] = (0.3, 0.9)
    scale_range: tuple[float, float] = (1.0, 1.0)


# The first conditions: two latent sizes, guidance 1-12, one context in five img2img.
STANDARD_CONDITIONS = Conditions()
# More of what varies in real use: a third, non-square latent, a wider data scale, and the
# hires-fix/refiner/inpaint passes of real workflows (one in three, denoise down to 0.15).
VARIED_CONDITIONS = Conditions(shapes=((64,), (4, 16, 16), (4, 8, 12)), img2img_fraction=0.3,
                               denoise_range=(0.15, 0.9), scale_range=(0.5, 2.0))


@dataclass(frozen=True)
class AnalyticContext:
    """One generation on the analytic model: which model and prompt, guidance, noise seed,
    batch and img2img denoise strength (1.0 = text-to-image)."""

    model_index: int
    cond: int
    cfg: float
    seed: int
    batch: int = 1
    denoise: float = 1.0


class AnalyticEnvironment(DenoiserEnvironment):
    """Contexts on a family of analytic models; train and held-out splits share nothing.

    The :class:`DenoiserEnvironment` core with the analytic model as its own context source:
    the reference is :class:`DormandPrince` in float64 down to sigma 1e-5 (what
    ``AnalyticModel.reference`` computes) and the error is relative to the prompt's data rms.

    Args:
        split: ``"train"`` or ``"heldout"``: different prompt seeds (so different knob values),
            different noise seeds and guidance values.
        seed: base seed of the split.
        n_models: analytic models (each with ``prompts_per_model`` prompts); their latent
            shapes cycle through ``shapes``.
        pool_size: when set, contexts are drawn from a fixed list of this many contexts (a
            finite training set); otherwise each draw is fresh.
        conditions: :class:`Conditions` (``VARIED_CONDITIONS`` by default).
        rtol: relative tolerance of the reference solve (1e-5: median error 1e-6, at least 38x
            below the best expert's error on every benchmark context; docs/ROUTER.md).
        models: use these analytic models instead of building ``n_models`` (e.g. the user's own).
        start_grid: see :class:`DenoiserEnvironment` (None: a reference per start sigma, as
            before; with rtol 1e-6 that reproduces the earlier outcomes bitwise).
    """

    def __init__(self, split: str = "train", seed: int = 0, n_models: int = 8, prompts_per_model: int = 2,
                 conditions: Conditions | None = None, pool_size: int | None = None, rtol: float = 1e-5,
                 reference_cache: int = 512, models: Sequence[AnalyticModel] | None = None,
                 start_grid: int | None = 20, on_run: Callable[[RunReport], None] | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        super().__init__(None, self, DormandPrince(rtol, sigma_end=REFERENCE_SIGMA_END), start_grid=start_grid,
                         reference_cache=reference_cache, on_run=on_run)
        self.split, self.seed, self.rtol = split, seed, rtol
        self.conditions = conditions = conditions if conditions is not None else VARIED_CONDITIONS
        split_seed = 1_000_003 * seed + 7_919 * (1 + SPLITS.index(split))
        scale_rng = random.Random(split_seed + 1)
        low, high = (math.log(v) for v in conditions.scale_range)
        prompts = [dataclasses.replace(p, scale=p.scale * math.exp(scale_rng.uniform(low, high)))
                   for p in random_prompts(n_models * prompts_per_model, split_seed)]
        shapes = conditions.shapes
        self.models = list(models) if models else [
            AnalyticModel(prompts[i * prompts_per_model:(i + 1) * prompts_per_model], shape=shapes[i % len(shapes)],
                          background_seed=split_seed + i)
            for i in range(n_models)
        ]
        self.contexts = self.draw_contexts(pool_size, random.Random(split_seed)) if pool_size else None

    def draw_contexts(self, n: int, rng: random.Random) -> list[AnalyticContext]:
        """``n`` fresh contexts drawn with ``rng``."""
        return [self._draw(rng) for _ in range(n)]

    def _draw(self, rng: random.Random) -> AnalyticContext:
        c = self.conditions
        log_cfg = rng.uniform(math.log(1.5), math.log(c.cfg_max))
        cfg = 1.0 if rng.random() < c.cfg_one_share else round(math.exp(log_cfg), 2)
        denoise = round(rng.uniform(*c.denoise_range), 2) if rng.random() < c.img2img_fraction else 1.0
        model_index = rng.randrange(len(self.models))
        return AnalyticContext(model_index=model_index, cond=rng.randrange(len(self.models[model_index].prompts)),
                               cfg=cfg, seed=rng.randrange(1 << 31), denoise=denoise)

    # -- the context source (this environment is its own)

    def sample_context(self, rng: random.Random) -> AnalyticContext:
        """A context from the fixed list (``pool_size``) or a fresh one, drawn with ``rng`` only."""
        return rng.choice(self.contexts) if self.contexts is not None else self._draw(rng)

    def state(self, context: AnalyticContext, priority: float) -> Tensor:
        """The context's state [64] for a given priority."""
        model = self.models[context.model_index]
        return state_from_analytic(model, context.cond, context.cfg, context.batch, priority,
                                   denoise=context.denoise, source="training")

    def model_for(self, context: AnalyticContext) -> AnalyticModel:
        return self.models[context.model_index]

    def latent_shape(self, context: AnalyticContext) -> tuple[int, ...]:
        return (context.batch, *self.models[context.model_index].shape)

    def extra_args(self, context: AnalyticContext) -> dict:
        return {"cond": context.cond, "cfg": context.cfg, "seed": context.seed}

    def clean_latent(self, context: AnalyticContext) -> Tensor | None:
        """A data sample of the prompt (img2img starts from it plus noise, as ComfyUI does)."""
        if context.denoise >= 1.0:
            return None
        g = torch.Generator().manual_seed(context.seed + 1)
        return self.models[context.model_index].cond_mixtures[context.cond].sample(context.batch, g)

    def relative_error(self, context: AnalyticContext, x: Tensor, reference: Tensor) -> Tensor:
        """Per-sample ``rms(x - reference) / data_rms`` of the prompt."""
        return self.models[context.model_index].relative_error(x, reference, cond=context.cond)
