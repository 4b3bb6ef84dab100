"""The one bridge between experts and ComfyUI's sampling path.

:func:`sample_with_expert` runs an :class:`~moe_sampler.experts.base.Expert` exactly as core's
``SamplerCustom`` runs a ``SAMPLER``: ``fix_empty_latent_channels``, ``prepare_noise`` (per
``batch_index``), ``latent_preview.prepare_callback`` and ``comfy.sample.sample_custom`` with the
expert wrapped in ``comfy.samplers.KSAMPLER``. So CFG, LoRA, ControlNet, model patches, inpainting
masks, previews and the progress bar work as with core's KSampler, and core's sampler lists are
never touched. :func:`run_records` and :func:`badge` turn what a run did into stats-store rows
and the node's UI payload.

Experts built from ComfyUI samplers, model family and pools are in :mod:`.comfy_experts`.

ComfyUI is imported inside functions only: the report types, the latent check, the store rows
and the badge import and test without it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..experts.base import Expert, get_expert
from ..router.calibration import calibration_inputs, stored_inputs
from .comfy_experts import schedule_for

logger = logging.getLogger(__name__)

FALLBACK_EXPERT = "BalancedMaster"


# --------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class Attempt:
    """One expert run inside :func:`sample_with_expert`.

    ``outcome``: ``"ok"``, ``"non_finite"`` (NaN/Inf output), ``"interrupted"`` or ``"error"``.
    ``nfe`` counts model calls also for runs that did not finish. ``error_estimate`` is the run's
    own raw fidelity estimate (about its relative error to the exact solution, from the step
    observer of :mod:`moe_sampler.experts.observer`, for every expert) and ``estimate_inputs``
    its :func:`~moe_sampler.router.calibration.calibration_inputs` (None when fewer than two
    steps ran).
    """

    expert: str
    outcome: str
    nfe: int
    steps: int
    seconds: float
    error_estimate: float | None = None
    stopped_early: bool = False
    error: str | None = None
    stop_rule: str = "none"
    estimate_inputs: dict | None = None

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
    def error_estimate(self) -> float | None:
        return self.final.error_estimate

    @property
    def fallback(self) -> bool:
        """True when the requested expert failed and :data:`FALLBACK_EXPERT` produced the latent."""
        return len(self.attempts) > 1


class NonFiniteOutputError(RuntimeError):
    """Both the expert and the fallback produced NaN/Inf: the model itself is producing them."""

    def __init__(self, message: str, attempts: Sequence[Attempt]) -> None:
        super().__init__(message)
        self.attempts = tuple(attempts)


def check_latent(latent: Any, input_name: str = "latent_image", model: Any = None) -> Tensor:
    """The latent's samples tensor; ValueError naming ``input_name`` for a bad, empty or non-finite
    one, or (given ``model``, a ComfyUI MODEL) one with dimensions the model cannot sample."""
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), Tensor):
        raise ValueError(f"{input_name}: expected a LATENT (a dict with a 'samples' tensor)")
    samples = latent["samples"]
    if getattr(samples, "is_nested", False):
        return samples
    shape = tuple(samples.shape)
    if samples.dim() < 3 or 0 in shape:
        raise ValueError(f"{input_name}: the latent has shape {list(shape)}; expected [batch, channels, height, "
                         f"width] with no empty dimension (e.g. from Empty Latent Image or VAE Encode)")
    dims = getattr(getattr(getattr(model, "model", None), "latent_format", None), "latent_dimensions", None)
    if isinstance(dims, int):
        allowed = {dims + 2, 4} if dims == 3 else {dims + 2}  # core unsqueezes image latents for video models
        if samples.dim() not in allowed:
            layout = {1: "[batch, channels, length]", 2: "[batch, channels, height, width]",
                      3: "[batch, channels, frames, height, width]"}.get(dims, f"{dims + 2} dimensions")
            raise ValueError(f"{input_name}: a {samples.dim()}-D latent of shape {list(shape)}, but this model "
                             f"samples {layout}; use a latent made for this model")
    if not torch.isfinite(samples).all():
        bad = int((~torch.isfinite(samples)).sum())
        raise ValueError(
            f"{input_name}: the latent contains {bad} NaN/Inf values; check the node that produced it "
            f"(e.g. a VAE Encode in fp16 or an upstream sampler)"
        )
    return samples


def check_conditioning(conditioning: Any, input_name: str) -> Any:
    """ValueError naming ``input_name`` for a CONDITIONING that is malformed or holds NaN/Inf
    (in its embeddings or ``pooled_output``), which would otherwise surface as a failing expert."""
    if not isinstance(conditioning, (list, tuple)) or not all(
            isinstance(entry, (list, tuple)) and len(entry) >= 2 and isinstance(entry[0], Tensor)
            and isinstance(entry[1], dict) for entry in conditioning):
        raise ValueError(f"{input_name}: expected a CONDITIONING (e.g. from CLIP Text Encode)")
    for entry in conditioning:
        for what, tensor in (("embeddings", entry[0]), ("pooled_output", entry[1].get("pooled_output"))):
            if isinstance(tensor, Tensor) and not torch.isfinite(tensor).all():
                raise ValueError(f"{input_name}: the conditioning's {what} contain NaN/Inf; check the node that "
                                 f"produced it (text encoder, conditioning math, an fp16 overflow)")
    return conditioning


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
                       error_estimate=_finite_or_none(report.get("error_estimate")),
                       estimate_inputs=calibration_inputs(report, cfg),
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


GATE_POLL = 0.5  # seconds between should_stop checks while a caller waits for sampling to end


class SamplingGate:
    """The sampling runs in progress in this process (every :func:`sample_with_expert`: the
    sampler's expert and audit, the trainer's sweeps, the A/B node). A background router update
    waits at its checkpoints (each Adam step of the fit, the store read, the evaluation) while any
    runs, so it never competes with sampling for the GIL or the CPU: it works between generations
    (VAE decode, image saving, an idle queue). Measured on an H200 before the gate: a tiny-model
    run that launches its kernels from Python took 1.6x as long while a fit ran beside it
    (docs/ROUTER.md)."""

    def __init__(self) -> None:
        self._active = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def running(self):
        """Mark a sampling run for the duration of the ``with`` block."""
        with self._changed:
            self._active += 1
        try:
            yield
        finally:
            with self._changed:
                self._active -= 1
                self._changed.notify_all()

    def holding(self, fn: Callable) -> Callable:
        """Decorate ``fn`` so that each call holds the gate from start to end."""

        @functools.wraps(fn)
        def held(*args: Any, **kwargs: Any) -> Any:
            with self.running():
                return fn(*args, **kwargs)

        return held

    @property
    def active(self) -> int:
        return self._active

    def wait_idle(self, should_stop: Callable[[], bool] | None = None, timeout: float | None = None) -> bool:
        """Block until no run is in progress (True), ``should_stop()`` is true or ``timeout`` passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while self._active:
                if should_stop is not None and should_stop():
                    return False
                left = GATE_POLL if deadline is None else min(GATE_POLL, deadline - time.monotonic())
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True


SAMPLING = SamplingGate()  # the process's; background updates wait on it (online_learning.background_pause)


@SAMPLING.holding  # a background router update waits while this runs
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
        ValueError naming ``latent_image`` for a malformed, empty or non-finite latent, or
        ``positive``/``negative`` for malformed or non-finite conditioning;
        ``comfy.model_management.InterruptProcessingException`` when the user interrupts
        (never swallowed); :class:`NonFiniteOutputError` when the fallback fails too.
    """
    import comfy.sample
    import comfy.utils

    attempts = [] if attempts is None else attempts
    first = len(attempts)
    check_latent(latent, model=model)
    check_conditioning(positive, "positive")
    check_conditioning(negative, "negative")
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
                seed: int | None, details: dict | None = None, calibration: Any = None) -> list:
    """One :class:`~moe_sampler.stats.store.RunRecord` per attempt (source ``"sampling"``).

    The first attempt is the routed (or forced) pick and carries the router's propensity and
    confidence (forced: propensity 1, no confidence); a fallback run was not chosen by the
    policy, so it has neither. Every successful attempt with a fidelity estimate stores it
    (``error_estimate``) and a ``quality`` from it (``quality_source="estimate"``): through
    ``calibration`` (a :class:`~moe_sampler.router.calibration.Calibration`) when given, else the
    raw estimate scored with the documented map (``quality_from_error``).
    ``details`` (why this expert: what the router expected from each pool expert, router name and
    version, the expert's settings) goes with the first attempt, the one the router picked.
    """
    from ..stats.store import RunRecord

    records = []
    for i, attempt in enumerate(attempts):
        picked = i == 0
        quality = estimated_quality(attempt, calibration)[0]
        records.append(RunRecord(
            expert=attempt.expert, router=router, nfe=attempt.nfe, steps=attempt.steps,
            seconds=max(attempt.seconds, 0.0), success=attempt.success, source="sampling", quality=quality,
            confidence=selection.confidence if picked and selection is not None else None,
            propensity=(1.0 if selection is None else selection.propensity) if picked else None,
            priority=priority, state=state, error=attempt.error, seed=seed,
            details=_with_estimate(details if picked else None, attempt.estimate_inputs if attempt.success else None),
            error_estimate=attempt.error_estimate,
            quality_source=None if quality is None else "estimate",
        ))
    return records


def estimated_quality(attempt: Attempt, calibration: Any = None) -> tuple[float | None, bool]:
    """(quality score of a successful attempt's fidelity estimate, whether a calibration gave it):
    through ``calibration`` (a :class:`~moe_sampler.router.calibration.Calibration`) when it has a
    fit of the expert's own, else the raw estimate scored with ``quality_from_error`` (as the
    online update rescores rows, :func:`moe_sampler.router.online.calibrate_rows`); (None, False)
    without an estimate."""
    from ..experts.analytic import quality_from_error

    if not attempt.success or attempt.error_estimate is None:
        return None, False
    fits = getattr(calibration, "fits", None) or {}
    if attempt.expert in fits and attempt.estimate_inputs is not None:
        return float(calibration.predict_quality(attempt.expert, attempt.estimate_inputs)[0]), True
    return float(quality_from_error(attempt.error_estimate)), False


def _with_estimate(details: dict | None, inputs: dict | None) -> dict | None:
    """``details`` plus the run's calibration inputs under ``estimate`` (what a later calibration
    rescoring of the row reads, :func:`moe_sampler.router.online.calibrate_rows`)."""
    if inputs is None:
        return details
    return {**(details or {}), "estimate": stored_inputs(inputs)}


def badge(report: SamplingReport, selection: Any, router: str, why: dict | None = None) -> dict:
    """The node's UI payload: ``{"moe_run": [info], "text": [summary]}`` (see docs/NODES.md).

    ``why`` (from :func:`moe_sampler.nodes.why.explain`, with ``router_info`` and ``settings``
    added by the sampler) goes into ``info["why"]`` and its table into the text.
    """
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
    if why is not None:
        from .why import text_lines

        info["why"] = why
        text = "\n".join([text, *text_lines(why, info)[:-1]])
    return {"moe_run": [info], "text": [text]}
