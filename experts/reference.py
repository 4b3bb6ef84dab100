"""The reference that grades experts, as a sampler loop any sampling path can run.

:func:`dormand_prince_sampler` has the k-diffusion signature (``fn(model, x, sigmas,
extra_args=None, callback=None, disable=None)``), so ComfyUI can run it through
``comfy.samplers.KSAMPLER`` like any expert (the bridge does: model patches, LoRA, ControlNet and
inpainting masks apply as in real use). It integrates the probability-flow ODE ``dx/dt = x -
D(x, e^t)`` in ``t = log sigma`` from ``sigmas[0]`` to the schedule's last nonzero sigma with
Dormand-Prince 5(4) step control (:class:`~moe_sampler.router.environment.DormandPrince`'s
method: an adaptive Runge-Kutta pair, a different family from every expert it grades), then
takes ``D`` there, as every expert's last step does. The last stage of each accepted step is
reused as the next step's first (6 model calls per step).

A hard cap on model calls (``max_calls``, final ``D`` included) keeps a stiff context from
running for ever: step control may use ``adaptive_share`` of it; a solve that has not finished
by then completes the rest of the interval with equal Dormand-Prince steps (no error control)
in the calls left, and the result is logged as a warning and noted in ``notes`` (``capped``).
ComfyUI's discrete-time models (SD1.5, SDXL: ``ModelSamplingDiscrete`` rounds sigma to the
nearest of 1,000 trained levels) make the ODE's right side jump between levels, which step
control cannot resolve cheaply: that is where the cap binds (docs/ROUTER.md).

:func:`reference_expert` wraps it as an :class:`~moe_sampler.experts.base.Expert` (not
registered: never in a pool) with Karras sigmas, so ``Expert.sigmas(schedule, denoise)`` gives
the start (``sigma_max`` for text-to-image, the img2img start otherwise) and ``sigma_min``.

:class:`AuditBudget` keeps the sampler's audits (this reference run after a generation) within a
share of a model's model calls (:data:`AUDIT_SHARE`, 4%): the audit stays a coin flip with
probability ``audit_rate``, but a run is not audited while the model's audits so far, plus one
more of their mean cost, would exceed that share of all its model calls; a coin that landed then
is kept (one at most) and audits the first run the budget allows. The decision reads only the
history (earlier runs and coins), never the current run's outcome, and each draw records the
probability the run had of being audited given that history (``audit_rate``; 1 for a kept coin;
0 while the budget is spent).
"""

from __future__ import annotations

import logging
import math
import random
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .analytic import _DP_A, _DP_B5, _DP_C, CallBudgetExhausted, _dopri5
from .base import Expert, ExpertDescriptor, get_expert

logger = logging.getLogger(__name__)

REFERENCE_RTOL = 1e-5  # the generic environment's default (docs/ROUTER.md: >= 38x below the best expert)
CALLS_PER_STEP = 4  # the ComfyUI trainer's budget: max_calls = CALLS_PER_STEP * reference_steps
AUDIT_SHARE = 0.04  # audits may use at most this share of a model's model calls (AuditBudget)


def dormand_prince_sampler(model: Any, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                           callback: Callable[[dict], None] | None = None, disable: bool | None = None,
                           report: dict | None = None, rtol: float = REFERENCE_RTOL, atol: float | None = None,
                           max_calls: int = 400, notes: list | None = None, adaptive_share: float = 0.5) -> Tensor:
    """The reference solve as a k-diffusion sampler loop (see the module docstring).

    The state is integrated in float64; ``model`` is called with ``x``'s dtype (what the
    sampling path gives, float32 in ComfyUI) and its output cast up. ``callback`` gets the
    k-diffusion dict after every accepted step (``i`` counts accepted steps). ``notes``, when
    given, receives one dict per run: ``calls`` (model calls), ``steps``, ``sigma_reached``
    (where the integration ended) and ``capped`` (True when ``max_calls`` cut it short).
    Returns the result in ``x``'s dtype.
    """
    if max_calls < 1:
        raise ValueError(f"max_calls must be >= 1, got {max_calls}")
    extra_args = {} if extra_args is None else extra_args
    in_dtype = x.dtype
    positive = sigmas[sigmas > 0]
    sigma_start, sigma_end = float(sigmas[0]), float(positive[-1]) if len(positive) else 0.0
    b = x.shape[0]
    calls = [0]

    def denoise(x_: Tensor, sigma: float) -> Tensor:
        calls[0] += 1
        s = torch.full((b,), sigma, dtype=in_dtype, device=x_.device)
        return model(x_.to(in_dtype), s, **extra_args).to(torch.float64)

    def f(x_: Tensor, t: float) -> Tensor:
        return x_ - denoise(x_, math.exp(t))

    steps = [0]

    def on_step(t: float, x_: Tensor, k: Tensor | None) -> None:
        if callback is not None:
            sigma = torch.tensor(math.exp(t), dtype=in_dtype)
            denoised = (x_ - k) if k is not None else x_
            callback({"x": x_.to(in_dtype), "i": steps[0], "sigma": sigma, "sigma_hat": sigma,
                      "denoised": denoised.to(in_dtype)})
        steps[0] += 1

    state, sigma_reached, capped = x.to(torch.float64), sigma_start, False
    if 0 < sigma_end < sigma_start and max_calls > 1:
        t1 = math.log(sigma_end)
        try:
            state = _dopri5(f, state, math.log(sigma_start), t1, rtol=rtol, atol=atol,
                            max_calls=max(1, int(adaptive_share * (max_calls - 1))), on_step=on_step, fsal=True)
            sigma_reached = sigma_end
        except CallBudgetExhausted as stop:
            capped, t = True, stop.t
            n = (max_calls - 1 - calls[0] - 1) // 6  # k1 once, then 6 calls per step (its last stage is the next k1)
            state = stop.x
            if n >= 1:
                h = (t1 - t) / n
                k = f(state, t)
                for i in range(n):
                    state, k = _fixed_step(f, state, t + i * h, h, k)
                    on_step(t + (i + 1) * h, state, k)
            sigma_reached = sigma_end if n >= 1 else math.exp(t)
            logger.warning("reference: step control did not finish in %d of its %d model calls (stopped at sigma "
                           "%.4g); finished down to sigma %.4g with %d equal steps, a coarser reference",
                           stop.calls, max_calls, math.exp(stop.t), sigma_reached, max(n, 0))
    out = denoise(state, sigma_reached) if sigma_reached > 0 else state
    if report is not None:
        report["steps"] = steps[0]
    if notes is not None:
        notes.append({"calls": calls[0], "steps": steps[0], "sigma_reached": sigma_reached, "capped": capped})
    return out.to(in_dtype)


def _fixed_step(f: Callable[[Tensor, float], Tensor], x: Tensor, t: float, h: float,
                k1: Tensor) -> tuple[Tensor, Tensor]:
    """One Dormand-Prince 5th-order step without error control from ``(x, t)`` with ``k1 = f(x,
    t)``; returns the new state and ``f`` there (its last stage): 6 calls."""
    ks = [k1]
    for c, a in zip(_DP_C[1:], _DP_A[1:]):
        ks.append(f(x + h * sum(aij * kj for aij, kj in zip(a, ks)), t + c * h))
    return x + h * sum(b * k for b, k in zip(_DP_B5, ks)), ks[-1]


def reference_expert(max_calls: int, steps: int = 100, rtol: float = REFERENCE_RTOL, notes: list | None = None,
                     name: str = "Reference") -> Expert:
    """:func:`dormand_prince_sampler` as an unregistered :class:`Expert` with at most
    ``max_calls`` model calls. Its sigmas are QualityMaster's Karras schedule with ``steps``
    levels: only their first (the start; img2img truncates by ``denoise`` as ComfyUI does) and
    last nonzero value (``sigma_min``) are used. ``notes``: see :func:`dormand_prince_sampler`."""
    if max_calls < 2:
        raise ValueError(f"max_calls must be >= 2 (one step and the final denoise), got {max_calls}")
    karras = get_expert("QualityMaster").make_sigmas
    descriptor = ExpertDescriptor(name=name, solver="dopri5", order=5.0, calls_per_step=6.0, steps=steps,
                                  schedule="adaptive", stochastic=False, stop_rule="none",
                                  max_nfe=max_calls,
                                  description="Dormand-Prince 5(4) reference solve of the probability-flow ODE")
    return Expert(descriptor, dormand_prince_sampler, karras,
                  options={"rtol": rtol, "max_calls": max_calls, "notes": notes})


def audit_sigmas(reference: Expert, expert_sigmas: Tensor, schedule: Any, denoise: float = 1.0) -> Tensor:
    """The reference's schedule for auditing a run whose expert used ``expert_sigmas``: it starts
    where the expert started. With ``denoise < 1`` (img2img) each schedule truncates at its own
    level, and a start a percent apart is another initial value problem (the clean latent plus
    more or less noise); solved from its own start the reference would grade the expert against
    another image (on the analytic yardstick: 0.13 mean quality error). Only the first and the
    last nonzero sigma matter to :func:`dormand_prince_sampler`, so the schedule is ``[the expert's
    start, the reference's last nonzero sigma, 0]`` (the reference's own when the expert starts at
    or below that)."""
    sigmas = reference.sigmas(schedule, denoise)
    start, end = float(expert_sigmas[0]), float(sigmas[sigmas > 0][-1])
    if start <= end:
        return sigmas
    return torch.tensor([start, end, 0.0], dtype=sigmas.dtype)


# ----------------------------------------------------------------------------- the audit budget


@dataclass(frozen=True)
class AuditDraw:
    """One run's audit decision.

    ``audit``: run the reference after the expert. ``probability``: the probability this run had
    of being audited given the history (``audit_rate`` while the budget allows, 1 when a coin kept
    from a skipped run is due, 0 while the budget is spent; what an unbiased estimate from audited
    rows weighs by). ``share``: the model's audit share of its model calls before this run.
    ``skipped``: the coin said audit but the budget was spent (the coin is kept).
    """

    audit: bool
    probability: float
    share: float
    skipped: bool = False


def check_audit_rate(audit_rate: float) -> float:
    """``audit_rate`` as a float in [0, 1]; a ValueError naming ``audit_rate`` otherwise."""
    try:
        rate = float(audit_rate)
    except (TypeError, ValueError):
        raise ValueError(f"audit_rate: must be a number in [0, 1] (0 turns audits off), got {audit_rate!r}") from None
    if not 0.0 <= rate <= 1.0:  # also NaN
        raise ValueError(f"audit_rate: must be in [0, 1] (0 turns audits off), got {audit_rate}")
    return rate


class AuditBudget:
    """Keeps audits within ``share`` of each model's model calls, deciding from history only.

    A ledger per model key (expert calls, audit calls, audits) filled by :meth:`note` after each
    run. :meth:`draw` flips the ``audit_rate`` coin and allows the audit only when the audit calls
    so far plus one more audit of their mean cost stay within ``share`` of all model calls
    (expert calls plus audit calls) including it. A coin that lands while the budget is spent is
    kept (at most one per model) and audits the next run the budget allows, so the audits reach
    their share instead of losing the coins that land while the budget recovers. Before the first
    audit its cost is taken to be ``first_cost`` (the sampler passes the reference's call cap, so
    the share never exceeds ``share`` by more than the audits' cost spread: a model's first audit
    comes after ``first_cost / share`` of its calls, 10,000 for a 400-call cap); ``first_cost``
    0: the first coin that lands is allowed, and the share can exceed ``share`` by that one audit
    until enough calls follow. ``share`` None: no budget (every landed coin audits). Thread-safe;
    the ledger lives in the process; :meth:`start` fills a model's from its stored runs (the
    sampler does it on the model's first run in a process), so a restart does not forget them.
    """

    def __init__(self, share: float | None = AUDIT_SHARE, first_cost: float = 0.0) -> None:
        if share is not None and not 0.0 < share <= 1.0:
            raise ValueError(f"share must be in (0, 1] or None, got {share}")
        if not first_cost >= 0.0:
            raise ValueError(f"first_cost must be >= 0, got {first_cost}")
        self.share, self.first_cost = share, float(first_cost)
        self._ledger: dict[str, list] = {}
        self._pending: set[str] = set()  # models with a kept coin
        self._lock = threading.Lock()

    def _entry(self, key: str) -> list:
        return self._ledger.setdefault(key, [0, 0, 0])

    def allows(self, key: str) -> bool:
        """Whether one more audit of the model ``key`` fits the budget now."""
        if self.share is None:
            return True
        with self._lock:
            expert, audit, n = self._entry(key)
        predicted = audit / n if n else self.first_cost
        return audit + predicted <= self.share * (expert + audit + predicted)

    def draw(self, key: str, audit_rate: float, rng: random.Random | None = None) -> AuditDraw:
        """The audit decision for the next run of model ``key`` (fresh entropy unless ``rng``)."""
        rate = check_audit_rate(audit_rate)
        share = self.share_of(key)
        if rate <= 0.0:  # audits off
            return AuditDraw(False, 0.0, share)
        coin = (rng or random.SystemRandom()).random() < rate
        allowed = self.allows(key)
        with self._lock:
            pending = key in self._pending
            if not allowed:
                if coin:
                    self._pending.add(key)
                return AuditDraw(False, 0.0, share, coin)
        # A kept coin is spent only by an audit that ran (note() with its calls): a run that falls
        # back, fails or is cancelled before its audit leaves it for the next run.
        return AuditDraw(coin or pending, 1.0 if pending else rate, share)

    def started(self, key: str) -> bool:
        """Whether model ``key`` has a ledger in this process (:meth:`start`, :meth:`note`)."""
        with self._lock:
            return key in self._ledger

    def start(self, key: str, expert_calls: int, audit_calls: int, audits: int) -> None:
        """Add what earlier processes spent on model ``key`` (its stored runs) to its ledger."""
        with self._lock:
            entry = self._entry(key)
            entry[0] += max(int(expert_calls), 0)
            entry[1] += max(int(audit_calls), 0)
            entry[2] += max(int(audits), 0)

    def note(self, key: str, expert_calls: int, audit_calls: int | None = None) -> None:
        """Add a finished run: its expert's model calls and, when it was audited, the audit's."""
        with self._lock:
            entry = self._entry(key)
            entry[0] += max(int(expert_calls), 0)
            if audit_calls is not None:
                entry[1] += max(int(audit_calls), 0)
                entry[2] += 1
                self._pending.discard(key)

    def share_of(self, key: str) -> float:
        """The audits' share of model ``key``'s model calls so far (0 before any call)."""
        with self._lock:
            expert, audit, _ = self._entry(key)
        return audit / (expert + audit) if expert + audit else 0.0

    def calls(self, key: str) -> tuple[int, int, int]:
        """(expert calls, audit calls, audits) of model ``key`` so far."""
        with self._lock:
            return tuple(self._entry(key))
