"""Learning from logged runs, safely: rows of one model, a guarded policy, update and adoption.

What ordinary use logs (one stats row per run: state, expert, quality from the calibrated
estimate or an audit, model calls, propensity, priority, model) is enough to improve the router,
if three things hold. This module provides them; :mod:`moe_sampler.nodes.online_learning` runs
them in ComfyUI and ``bench/online.py`` measures them on the analytic model.

1. **One router per model.** :func:`model_key` names a model by its family and a cheap
   fingerprint of a few weight tensors (:func:`fingerprint_tensors`); :func:`rows_from_records`
   keeps the rows of one model only.
2. **A guarded policy** (:class:`GuardedPolicy`), **per group** of contexts (:data:`GROUPS`:
   text-to-image and img2img, told apart by the state's denoise slot; their best experts
   differ: img2img runs a share of the steps). It starts from the **best fixed expert** of the
   context's group for the priority. With no rows that is the group's entry of
   :data:`PRIOR_FIXED` (the expert with the smallest worst-case regret over both yardsticks'
   training contexts: on text-to-image SpeedDemon below priority 0.375, BalancedMaster to 0.404,
   QualityMaster above; on img2img SpeedDemon below 0.545, BalancedMaster to 0.697, QualityMaster
   above; an expert missing from the pool falls back to the untrained router's descriptor prior,
   see :mod:`.model`). Logged rows move it to the expert with the best mean utility
   (self-normalised inverse-propensity means, shrunk with the weight of :data:`PRIOR_ROWS`
   rows) only when they separate it from that pick by ``z`` standard errors; the group's own
   rows decide once both experts have :data:`MIN_GROUP_ROWS` rows in it, all the model's rows
   before. It deviates on a context only to an expert whose predicted utility gain over the
   fixed expert keeps a positive **lower confidence bound**: ``gain - z * sqrt(s_a^2 / n_a +
   s_f^2 / n_f)`` with ``s`` the router's out-of-sample quality error per expert (measured on
   held-out rows at the update, per group where it has the rows) and ``n`` the expert's logged
   rows; and only once the router has been updated from at least ``min_rows`` rows and beat the
   group's best fixed expert (strictly) on the group's held-out rows (all held-out rows when the group has
   fewer than ``min_heldout``). Until then it is in its **learning phase** and uses the best
   fixed expert. Exploration is epsilon-greedy (:data:`EPSILON`): with probability epsilon a
   uniform draw from the pool; the pick's propensity is logged, which keeps the
   inverse-propensity estimates unbiased.
3. **Adoption on held-out rows** (:func:`update`). A candidate router is fitted (warm start from
   the current one) on the training share of the rows; the held-out share (a stable hash of each
   row, :data:`HELDOUT_SHARE`) scores the candidate's guarded policy, the current one's and the
   best fixed expert with a doubly robust estimate (the candidate's predictions, fitted on the
   other rows, corrected by the logged reward where the policy's pick was logged, weighted by
   the inverse propensity; :func:`policy_values`): full-sweep rows count as full information.
   The candidate is
   adopted only if it is **not worse than the current** policy on those rows; a paired
   bootstrap interval of the difference is reported with it.
4. **Calibrated feedback** (:func:`calibrate_rows`). An estimate row's quality is only as good as
   the calibration of the run's fidelity estimate on this model. Each update fits it on the
   model's pairs (audited and swept rows keep their true error next to the estimate's inputs),
   rescores the estimate rows of every expert it covers and keeps it in the candidate
   (``training["calibration"]``). An expert it does not cover keeps its raw estimate and a
   systematic-error bound :data:`RAW_BIAS` in every margin of item 2, so uncalibrated estimates
   cannot move the guard.

Pure torch; no ComfyUI import.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from ..experts.base import ExpertDescriptor
from .calibration import POOLED, Calibration
from .features import DENOISE_SLOT, STATE_DIM
from .model import ExpertScorer, Router
from .policy import REFERENCE_TEMPERATURE, Selection, check_priority, cost_from_nfe, draw, lambda_from_priority
from .policy import probabilities as softmax_probabilities

logger = logging.getLogger(__name__)

EPSILON = 0.05  # exploration: share of uniformly drawn picks (propensities logged)
Z = 1.64  # one-sided 95% normal quantile of the deviation bound
PRIOR_ROWS = 5.0  # weight of the descriptor prior in the best-fixed-expert estimate, in rows
MIN_ROWS = 30  # rows of a model before the router may deviate from the best fixed expert
MIN_HELDOUT = 10  # held-out rows needed to judge a candidate
HELDOUT_SHARE = 0.25
RANGE_MARGIN = 0.1  # a state slot may leave the logged range by 10% of its width (+ 0.1) and still count as known
DEFAULT_QUALITY_SD = 0.15  # out-of-sample quality error assumed for an expert with too few held-out rows
PROPENSITY_CLIP = 10.0  # largest regression weight 1 / propensity (as MoERLTrainer)
PHASES = ("learning", "guarded")
GROUPS = ("text-to-image", "img2img")  # the guard's groups of contexts, told apart by the state's denoise slot
MIN_GROUP_ROWS = 5  # rows of an expert in a group before the group's own evidence is used (else the pooled)
# Systematic error of the mean quality of an expert's estimate rows when no calibration fitted on
# this model's own pairs (audits, sweeps) covers that expert: the raw estimate's per-expert bias
# reached 0.16 on each yardstick, a calibration fitted on the other yardstick 0.17 (docs/ROUTER.md).
RAW_BIAS = 0.15

__all__ = ["EPSILON", "GROUPS", "Evidence", "GuardedChoice", "GuardedPolicy", "LoggedRow", "UpdateResult",
           "PRIOR_FIXED", "RAW_BIAS", "calibrate_rows", "fingerprint_tensors", "fit_candidate", "group_index",
           "model_key", "prior_fixed", "policy_values", "rows_from_records", "split_rows",
           "update"]


# ----------------------------------------------------------------------------- which model


def fingerprint_tensors(named: Iterable[tuple[str, Tensor]], limit: int = 4) -> str:
    """A cheap fingerprint of a network's weights: SHA-1 of the names, shapes and float64 sums of
    the first and last ``limit`` tensors (10 hex digits). Same weights, same fingerprint; a
    fine-tune or another checkpoint changes the sums. Reads 2 x ``limit`` tensors only."""
    items = list(named)
    chosen = items[:limit] + items[max(limit, len(items) - limit):]
    digest = hashlib.sha1()
    for name, tensor in chosen:
        t = tensor.detach()
        total = float(t.double().sum()) if t.numel() else 0.0
        digest.update(f"{name}:{tuple(t.shape)}:{total:.10e};".encode())
    digest.update(f"n={len(items)}".encode())
    return digest.hexdigest()[:10]


def model_key(family: str, fingerprint: str) -> str:
    """``"<family>-<fingerprint>"``: the name of a model's router and the ``model`` of its rows."""
    safe = "".join(ch if ch.isalnum() or ch in "_.-" else "_" for ch in f"{family}-{fingerprint}")
    return safe[:80]


# ----------------------------------------------------------------------------- logged rows


@dataclass(frozen=True)
class LoggedRow:
    """One logged run usable for learning: state [64], expert, quality in [0, 1] (0 for a failed
    run), cost ``log2(nfe) / 10``, the propensity of its pick (1 for sweep and forced rows), the
    priority it was run at, where its quality came from, and a stable key for the held-out split."""

    state: tuple[float, ...]
    expert: str
    quality: float
    cost: float
    propensity: float
    priority: float
    quality_source: str
    key: str
    # The run's calibration inputs (router.calibration.calibration_inputs) and, for an audited or
    # swept run, its true relative error: one calibration pair.
    inputs: Any = None
    true_error: float | None = None


def rows_from_records(records: Sequence[Any], model: str | None = None,
                      experts: Sequence[str] | None = None) -> list[LoggedRow]:
    """Learnable rows of ``records`` (``RunRecord``s): with a state and a quality (or failed), of
    ``model`` when given (rows recorded before the store had a ``model`` column never match a
    model), and of ``experts`` when given. Fallback runs (no propensity, source sampling) were not
    chosen by the policy and are skipped."""
    wanted = set(experts) if experts is not None else None
    rows = []
    for r in records:
        if model is not None and getattr(r, "model", None) != model:
            continue
        if r.state is None or (wanted is not None and r.expert not in wanted):
            continue
        if r.source == "sampling" and r.propensity is None:
            continue  # a fallback run
        if r.success and r.quality is None:
            continue
        quality = float(r.quality) if r.success else 0.0
        source = getattr(r, "quality_source", None) or ("sweep" if r.source == "training" else "estimate")
        digest = hashlib.sha1(repr(tuple(r.state)).encode()).hexdigest()[:12]
        key = f"{digest}|{r.seed}|{r.expert}|{r.priority}|{r.created!r}"
        inputs, true_error = _pair_of(r) if r.success else (None, None)
        rows.append(LoggedRow(tuple(r.state), r.expert, quality, float(cost_from_nfe(r.nfe)),
                              float(r.propensity or 1.0), 0.5 if r.priority is None else float(r.priority),
                              source, key, inputs, true_error))
    return rows


def _pair_of(record: Any) -> tuple[dict | None, float | None]:
    """(calibration inputs, true relative error) kept in a record's details (``estimate``,
    ``true_error``; either None when absent or unreadable)."""
    getter = getattr(record, "details_dict", None)
    try:
        details = (getter() if callable(getter) else None) or {}
    except (TypeError, ValueError):
        return None, None
    inputs = details.get("estimate")
    if not isinstance(inputs, dict) or not math.isfinite(float(inputs.get("estimate", math.nan))):
        inputs = None
    error = details.get("true_error")
    try:
        error = float(error) if error is not None and math.isfinite(float(error)) and float(error) >= 0 else None
    except (TypeError, ValueError):
        error = None
    return inputs, error


def calibrate_rows(rows: Sequence[LoggedRow], pairs: Sequence[tuple[str, Any, float]] = ()
                   ) -> tuple[list[LoggedRow], Calibration | None, dict[str, float]]:
    """The rows with each estimate row's quality from the model's calibration, that
    calibration, and each expert's bound on the systematic error of its estimate rows' quality.

    The calibration is fitted (:meth:`~.calibration.Calibration.fit`) on the pairs (inputs, true
    error) of the audited and swept rows, plus ``pairs`` (``(expert, inputs, true error)`` of
    this model from outside the rows). An expert without a fit of its own keeps its raw
    estimate's quality and the bound :data:`RAW_BIAS`; a calibrated one ``std / 3 / sqrt(pairs)``
    (the standard error of its fit's intercept, in quality units).
    """
    pairs = [*pairs, *((r.expert, r.inputs, r.true_error) for r in rows
                       if r.inputs is not None and r.true_error is not None)]
    calibration = Calibration.fit(pairs) if pairs else None
    if calibration is not None and not calibration.fits:
        calibration = None  # fewer pairs than one fit needs
    fits = {name: fit for name, fit in (calibration.fits if calibration else {}).items() if name != POOLED}
    bias = {name: fit.std / 3.0 / math.sqrt(max(fit.pairs, 1)) for name, fit in fits.items()}
    if calibration is None:
        return list(rows), None, bias
    out = []
    for r in rows:
        if r.quality_source == "estimate" and r.inputs is not None and r.expert in fits:
            r = dataclasses.replace(r, quality=float(calibration.predict_quality(r.expert, r.inputs)[0]))
        out.append(r)
    return out, calibration, bias


def is_heldout(row: LoggedRow, share: float = HELDOUT_SHARE) -> bool:
    """Stable assignment of a row to the held-out share (a hash of its key, so a row keeps its side
    across updates). Rows of one context (same state and seed) land on the same side."""
    context = row.key.split("|")
    digest = hashlib.sha1(("|".join(context[:2]) if row.quality_source == "sweep" else row.key).encode())
    return int.from_bytes(digest.digest()[:4], "little") / 2**32 < share


def split_rows(rows: Sequence[LoggedRow], share: float = HELDOUT_SHARE) -> tuple[list[LoggedRow], list[LoggedRow]]:
    """(training rows, held-out rows)."""
    train, heldout = [], []
    for row in rows:
        (heldout if is_heldout(row, share) else train).append(row)
    return train, heldout


def group_index(states: Tensor) -> Tensor:
    """[R] index into :data:`GROUPS` of states [R, 64]: 0 text-to-image (denoise 1), 1 img2img
    (the denoise slot ``2 * denoise - 1`` below 1)."""
    return (states[:, DENOISE_SLOT] < 0.999).long()


# ----------------------------------------------------------------------------- evidence


@dataclass(frozen=True)
class ExpertEvidence:
    """What a model's logged rows say about one expert: rows, their SNIPS mean quality and cost,
    and the router's out-of-sample quality error for it (RMSE on held-out rows)."""

    rows: int
    quality: float
    cost: float
    quality_sd: float = DEFAULT_QUALITY_SD
    # Bound on the systematic error of ``quality`` (its estimate rows' share times the expert's
    # calibration bound, :func:`calibrate_rows`): added to the guard's margins.
    bias: float = 0.0


@dataclass(frozen=True)
class Evidence:
    """The guard's data, kept in the router's metadata (``training["guard"]``).

    ``rows``: logged rows the router was updated from; ``trusted``: the router beat the best
    fixed expert on held-out rows at its adoption; ``experts``: per-expert evidence;
    ``state_low``/``state_high``: the range of each state slot over those rows (a context
    outside it, widened by :data:`RANGE_MARGIN`, is new to the router: the guard keeps the
    fixed expert there); ``groups``: the per-expert evidence of each group of :data:`GROUPS`
    (text-to-image, img2img), used where an expert has :data:`MIN_GROUP_ROWS` rows in the
    group; ``trusted_groups``: whether the router beat the group's best fixed expert on the
    group's held-out rows (a group with too few held-out rows follows ``trusted``).
    """

    rows: int = 0
    trusted: bool = False
    experts: dict[str, ExpertEvidence] = field(default_factory=dict)
    state_low: tuple[float, ...] | None = None
    state_high: tuple[float, ...] | None = None
    groups: dict[str, dict[str, ExpertEvidence]] = field(default_factory=dict)
    trusted_groups: dict[str, bool] = field(default_factory=dict)

    def trusted_in(self, group: str) -> bool:
        """Whether the router may deviate from the fixed expert on contexts of ``group``."""
        return self.trusted_groups.get(group, self.trusted)

    def to_json(self) -> dict:
        return {"rows": self.rows, "trusted": self.trusted,
                "experts": {k: dataclasses.asdict(v) for k, v in self.experts.items()},
                "state_low": None if self.state_low is None else [round(v, 5) for v in self.state_low],
                "state_high": None if self.state_high is None else [round(v, 5) for v in self.state_high],
                "groups": {g: {k: dataclasses.asdict(v) for k, v in ev.items()} for g, ev in self.groups.items()},
                "trusted_groups": dict(self.trusted_groups)}

    def known(self, states: Tensor) -> Tensor:
        """[R] bool: each state [R, 64] lies inside the logged range (True without a range)."""
        if self.state_low is None or self.state_high is None:
            return torch.ones(len(states), dtype=torch.bool)
        low = torch.tensor(self.state_low, dtype=torch.float32)
        high = torch.tensor(self.state_high, dtype=torch.float32)
        margin = RANGE_MARGIN * (high - low) + RANGE_MARGIN
        return ((states >= low - margin) & (states <= high + margin)).all(dim=1)

    @classmethod
    def from_json(cls, data: Any) -> "Evidence":
        """Evidence from router metadata; empty for anything unreadable (a hand-made file)."""
        def experts_of(entries: Any) -> dict[str, ExpertEvidence]:
            return {str(k): ExpertEvidence(int(v["rows"]), float(v["quality"]), float(v["cost"]),
                                           float(v.get("quality_sd", DEFAULT_QUALITY_SD)), float(v.get("bias", 0.0)))
                    for k, v in dict(entries).items()}

        try:
            experts = experts_of(data.get("experts", {}))
            low, high = data.get("state_low"), data.get("state_high")
            ranges = ((tuple(float(v) for v in low), tuple(float(v) for v in high))
                      if isinstance(low, list) and isinstance(high, list) and len(low) == len(high) == STATE_DIM
                      else (None, None))
            groups = {str(g): experts_of(ev) for g, ev in dict(data.get("groups") or {}).items() if g in GROUPS}
            trusted_groups = {str(g): bool(v) for g, v in dict(data.get("trusted_groups") or {}).items()
                              if g in GROUPS}
            return cls(int(data.get("rows", 0)), bool(data.get("trusted", False)), experts, *ranges, groups,
                       trusted_groups)
        except (AttributeError, KeyError, TypeError, ValueError):
            return cls()


def _prior() -> Router:
    global _PRIOR
    if _PRIOR is None:
        _PRIOR = Router.default()
    return _PRIOR


_PRIOR: Router | None = None


def prior_quality_cost(experts: Sequence[Any]) -> tuple[Tensor, Tensor]:
    """The untrained router's quality and cost of each expert, [N] each: a function of the
    descriptor alone (its learned residual starts at zero), so the same for every context."""
    return _prior().predict(torch.zeros(STATE_DIM), experts)


def _name(expert: Any) -> str:
    return getattr(expert, "descriptor", expert).name


def fixed_utilities(evidence: Evidence, experts: Sequence[Any], priority: float) -> Tensor:
    """Each expert's estimated mean utility at ``priority`` over the model's contexts [N]: the
    logged SNIPS means shrunk towards the descriptor prior (weight :data:`PRIOR_ROWS`)."""
    q, c = _fixed_quality_cost(evidence, experts)
    return q - lambda_from_priority(priority) * c


def _fixed_quality_cost(evidence: Evidence, experts: Sequence[Any], group: str | None = None
                        ) -> tuple[Tensor, Tensor]:
    """Mean quality and cost [N] float64 of each expert over the model's contexts (see
    :func:`fixed_utilities`); with ``group``, over that group's contexts, shrunk towards the
    pooled means with the same weight."""
    if group is None:
        q_prior, c_prior = prior_quality_cost(experts)
        q, c, source = q_prior.double().clone(), c_prior.double().clone(), evidence.experts
    else:
        (q, c), source = _fixed_quality_cost(evidence, experts), evidence.groups.get(group, {})
    for i, expert in enumerate(experts):
        ev = source.get(_name(expert))
        if ev is not None and ev.rows > 0:
            q[i] = (ev.rows * ev.quality + PRIOR_ROWS * q[i]) / (ev.rows + PRIOR_ROWS)
            c[i] = (ev.rows * ev.cost + PRIOR_ROWS * c[i]) / (ev.rows + PRIOR_ROWS)
    return q, c


def _group_rows(evidence: Evidence, experts: Sequence[Any], group: str) -> Tensor:
    """[N] float64: each expert's rows in ``group``."""
    ev = evidence.groups.get(group, {})
    return torch.tensor([float(ev[_name(e)].rows) if _name(e) in ev else 0.0 for e in experts], dtype=torch.float64)


def best_fixed(evidence: Evidence, experts: Sequence[Any], priority: float, state: Tensor | None = None) -> int:
    """Index of the best fixed expert for ``priority`` (see :func:`fixed_choices`; with ``state``
    [64], for its group)."""
    lam = torch.tensor([[lambda_from_priority(priority)]], dtype=torch.float64)
    return int(fixed_choices(evidence, experts, lam, states=None if state is None else state.reshape(1, -1))[0])


def fixed_choices(evidence: Evidence, experts: Sequence[Any], lam: Tensor, z: float = Z,
                  states: Tensor | None = None) -> Tensor:
    """The best fixed expert for each price ``lam`` [R, 1] -> indices [R].

    The prior's pick, unless the logged rows show another expert's mean utility
    (:func:`fixed_utilities`) above it by more than ``z`` standard errors
    (``DEFAULT_QUALITY_SD / sqrt(rows)`` per expert): the estimated best of a few noisy means is
    not trusted over the prior until the data separates them. Without ``states`` the prior's
    pick is the untrained router's and the rows are all the model's rows. With ``states``
    [R, 64], per group of :data:`GROUPS`: the prior's pick is the group's in
    :data:`PRIOR_FIXED` (the untrained router's when that expert is not in the pool), and the
    rows are the group's own (means shrunk towards the pooled ones) where the group has
    :data:`MIN_GROUP_ROWS` rows of both experts compared, else all the model's rows.
    """
    q_prior, c_prior = prior_quality_cost(experts)
    descriptor_prior = torch.argmax(q_prior.double()[None] - lam * c_prior.double()[None], dim=1)
    pooled_rows = torch.tensor([float((evidence.experts.get(_name(e)) or ExpertEvidence(0, 0, 0)).rows)
                                for e in experts], dtype=torch.float64)
    pooled_q, pooled_c = _fixed_quality_cost(evidence, experts)
    pooled_bias = _biases(evidence.experts, experts)
    if states is None:
        return _separated(pooled_q, pooled_c, pooled_rows, lam, descriptor_prior, z, pooled_bias)
    out = descriptor_prior.clone()
    index = group_index(states)
    for g, group in enumerate(GROUPS):
        mask = index == g
        if not bool(mask.any()):
            continue
        prior = prior_fixed(experts, lam[mask], group)
        prior = torch.where(prior >= 0, prior, descriptor_prior[mask])
        choice = _separated(pooled_q, pooled_c, pooled_rows, lam[mask], prior, z, pooled_bias)
        rows = _group_rows(evidence, experts, group)
        if bool((rows >= MIN_GROUP_ROWS).any()):
            q, c = _fixed_quality_cost(evidence, experts, group)
            own = _separated(q, c, torch.where(rows >= MIN_GROUP_ROWS, rows, torch.zeros_like(rows)), lam[mask],
                             prior, z, _biases(evidence.groups.get(group, {}), experts))
            choice = torch.where(rows[prior] >= MIN_GROUP_ROWS, own, choice)
        out[mask] = choice
    return out


def _biases(source: dict[str, ExpertEvidence], experts: Sequence[Any]) -> Tensor:
    """[N] float64: each expert's systematic-error bound in ``source`` (0 without rows)."""
    return torch.tensor([float(source[_name(e)].bias) if _name(e) in source else 0.0 for e in experts],
                        dtype=torch.float64)


def _separated(q: Tensor, c: Tensor, rows: Tensor, lam: Tensor, prior: Tensor, z: float,
               bias: Tensor | None = None) -> Tensor:
    """[R]: the expert of best mean utility ``q - lam c`` where it beats ``prior`` [R] by ``z``
    standard errors (``DEFAULT_QUALITY_SD / sqrt(rows)`` per expert, none without rows) plus both
    experts' systematic-error bounds ``bias`` [N] (:func:`calibrate_rows`), else ``prior``."""
    utility = q[None] - lam * c[None]  # [R, N]
    r = torch.arange(len(lam))
    candidates = (rows > 0)[None].repeat(len(lam), 1)
    candidates[r, prior] = True
    best = torch.argmax(torch.where(candidates, utility, torch.full_like(utility, -math.inf)), dim=1)
    var = torch.where(rows > 0, DEFAULT_QUALITY_SD ** 2 / rows.clamp_min(1), torch.full_like(rows, math.inf))
    margin = utility[r, best] - utility[r, prior] - z * (var[best] + var[prior]).sqrt()
    if bias is not None:
        margin = margin - bias[best] - bias[prior]
    return torch.where((best == prior) | (margin > 0), best, prior)


# The best fixed expert with no data, per group: on the default pool, the expert with the smallest
# worst-case regret over both yardsticks' training contexts (analytic 3,000 contexts, learned 100;
# ``python -m bench.routing --fit-prior`` prints it), as (from priority, expert). The untrained
# router's descriptor prior (router.model.PRIOR_INIT) gives the pooled table; img2img runs fewer
# steps, so its best fixed expert is cheaper up to a higher priority.
PRIOR_FIXED = {
    "text-to-image": ((0.0, "SpeedDemon"), (0.375, "BalancedMaster"), (0.404, "QualityMaster")),
    "img2img": ((0.0, "SpeedDemon"), (0.545, "BalancedMaster"), (0.697, "QualityMaster")),
}


def prior_fixed(experts: Sequence[Any], lam: Tensor, group: str) -> Tensor:
    """[R]: index in ``experts`` of the group's :data:`PRIOR_FIXED` expert at each price ``lam``
    [R, 1] (-1 where that expert is not in the pool)."""
    names = [_name(e) for e in experts]
    priorities = _priority_of(lam.reshape(-1))
    table = PRIOR_FIXED[group]
    out = []
    for p in priorities.tolist():
        name = [expert for start, expert in table if p >= start - 1e-9][-1]
        out.append(names.index(name) if name in names else -1)
    return torch.tensor(out, dtype=torch.long)


def _priority_of(lam: Tensor) -> Tensor:
    """The priority of each price (the inverse of :func:`~.policy.lambda_from_priority`)."""
    low, high = lambda_from_priority(0.0), lambda_from_priority(1.0)
    return (torch.log(lam.double() / low) / math.log(high / low)).clamp(0.0, 1.0)


def _weighted_sums(rows: Sequence[LoggedRow]) -> dict[str, list[float]]:
    """Per expert: [rows, sum of 1/propensity, and of quality and cost weighted by it, and of
    1/propensity over estimate rows] (SNIPS sums)."""
    sums: dict[str, list[float]] = {}
    for row in rows:
        w = 1.0 / row.propensity
        s = sums.setdefault(row.expert, [0, 0.0, 0.0, 0.0, 0.0])
        s[0] += 1
        s[1] += w
        s[2] += w * row.quality
        s[3] += w * row.cost
        s[4] += w if row.quality_source == "estimate" else 0.0
    return sums


def _evidence(name: str, sums: list[float], sd: float, bias: dict[str, float] | None) -> ExpertEvidence:
    n, ws, qs, cs, we = sums
    bound = 0.0 if bias is None else (we / ws) * bias.get(name, RAW_BIAS)
    return ExpertEvidence(int(n), qs / ws, cs / ws, sd, bound)


def evidence_from_rows(rows: Sequence[LoggedRow], heldout: Sequence[LoggedRow] = (), router: Router | None = None,
                       descriptors: dict[str, ExpertDescriptor] | None = None, trusted: bool = False,
                       bias: dict[str, float] | None = None) -> Evidence:
    """Per-expert SNIPS means from ``rows`` and the router's RMSE per expert on ``heldout``;
    with ``bias`` (:func:`calibrate_rows`), each expert's bound on the systematic error of its
    mean quality (0 without)."""
    sums = _weighted_sums(rows)
    sd = _heldout_rmse(router, heldout, descriptors) if router is not None and descriptors else {}
    experts = {name: _evidence(name, s, sd.get(name, sd.get("*", DEFAULT_QUALITY_SD)), bias)
               for name, s in sums.items()}
    low = high = None
    groups: dict[str, dict[str, ExpertEvidence]] = {}
    if rows:
        states = torch.tensor([r.state for r in rows], dtype=torch.float32)
        low, high = tuple(states.min(0).values.tolist()), tuple(states.max(0).values.tolist())
        index = group_index(states).tolist()
        held_index = group_index(torch.tensor([r.state for r in heldout], dtype=torch.float32)).tolist() \
            if heldout else []
        for g, group in enumerate(GROUPS):
            members = [row for row, i in zip(rows, index) if i == g]
            if not members:
                continue
            group_sums = _weighted_sums(members)
            held = [row for row, i in zip(heldout, held_index) if i == g]
            group_sd = _heldout_rmse(router, held, descriptors) if router is not None and descriptors else {}
            groups[group] = {
                name: _evidence(name, s, group_sd.get(name, group_sd.get("*", experts[name].quality_sd)), bias)
                for name, s in group_sums.items()}
    return Evidence(len(rows), trusted, experts, low, high, groups)


def _heldout_rmse(router: Router, heldout: Sequence[LoggedRow],
                  descriptors: dict[str, ExpertDescriptor]) -> dict[str, float]:
    rows = [r for r in heldout if r.expert in descriptors]
    if not rows:
        return {}
    with torch.no_grad():
        states = torch.tensor([r.state for r in rows], dtype=torch.float32)
        feats = torch.stack([descriptors[r.expert].to_features() for r in rows])
        q, _ = router.scorer(states, feats)
    err = (q.double() - torch.tensor([r.quality for r in rows], dtype=torch.float64)).square()
    out = {"*": max(float(err.mean().sqrt()), 0.02)}
    for name in {r.expert for r in rows}:
        mask = torch.tensor([r.expert == name for r in rows])
        if int(mask.sum()) >= 3:
            out[name] = max(float(err[mask].mean().sqrt()), 0.02)
    return out


# ----------------------------------------------------------------------------- the guarded policy


@dataclass(frozen=True)
class GuardedChoice:
    """A guarded decision: the :class:`~.policy.Selection` (with the epsilon-greedy probabilities
    and the pick's propensity), the phase (``"learning"``: the best fixed expert; ``"guarded"``:
    the router may deviate where the bound allows), the best fixed expert, the greedy pick, the
    lower bound of each expert's gain over the fixed one, and whether this pick explored."""

    selection: Selection
    phase: str
    fixed_expert: str
    greedy_expert: str
    gain_bounds: tuple[float, ...]
    explored: bool


class GuardedPolicy:
    """A router plus its evidence, choosing as the module docstring says.

    Args:
        router: the scorer (``Router.default()`` before any update).
        evidence: the router's :class:`Evidence` (``Evidence.from_json(router.training["guard"])``).
        epsilon: exploration share (0: greedy).
        z: the bound's normal quantile.
        min_rows: rows before the router may deviate.
    """

    def __init__(self, router: Router, evidence: Evidence | None = None, epsilon: float = EPSILON, z: float = Z,
                 min_rows: int = MIN_ROWS) -> None:
        if not (0.0 <= epsilon < 1.0):
            raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
        self.router = router
        self.evidence = evidence if evidence is not None else Evidence.from_json(router.training.get("guard", {}))
        self.epsilon, self.z, self.min_rows = epsilon, z, min_rows

    @classmethod
    def for_router(cls, router: Router, **kwargs: Any) -> "GuardedPolicy":
        return cls(router, Evidence.from_json(router.training.get("guard", {})), **kwargs)

    @property
    def phase(self) -> str:
        """``"learning"`` until the router was updated from ``min_rows`` rows and trusted."""
        trusted = self.evidence.trusted or any(self.evidence.trusted_groups.values())
        return "guarded" if trusted and self.evidence.rows >= self.min_rows else "learning"

    def greedy(self, state: Tensor, experts: Sequence[Any], priority: float) -> tuple[int, int, Tensor, Tensor, Tensor]:
        """(greedy index, fixed index, quality [N], cost [N], gain lower bounds [N]) for one state [64]."""
        picks, fixed, quality, cost, bounds = self.greedy_batch(state[None], experts, [check_priority(priority)])
        return int(picks[0]), int(fixed[0]), quality[0], cost[0], bounds[0]

    def greedy_batch(self, states: Tensor, experts: Sequence[Any], priorities: Sequence[float]
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The greedy guarded picks for states [R, 64] at ``priorities`` [R]: (picks [R], fixed [R],
        quality [R, N], cost [R, N], gain lower bounds [R, N]; 0 for the fixed expert, -inf where
        there is no evidence)."""
        n = len(experts)
        lam = torch.tensor([lambda_from_priority(p) for p in priorities], dtype=torch.float64)[:, None]
        fixed = fixed_choices(self.evidence, experts, lam, self.z, states)
        quality, cost = self.predict_batch(states, experts)
        rows = torch.arange(len(states))
        bounds = torch.full((len(states), n), -math.inf, dtype=torch.float64)
        bounds[rows, fixed] = 0.0
        if self.phase == "learning":
            return fixed, fixed, quality, cost, bounds
        utility = quality.double() - lam * cost.double()
        var, count = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        for i, expert in enumerate(experts):
            ev = self.evidence.experts.get(_name(expert))
            if ev is not None and ev.rows > 0:
                var[i], count[i] = ev.quality_sd ** 2, ev.rows
        known = count > 0
        pooled = torch.where(known, var / count.clamp_min(1), torch.full_like(var, math.inf))
        per_expert = pooled[None].repeat(len(states), 1)  # [R, N]: the group's where it has enough rows
        bias = _biases(self.evidence.experts, experts)[None].repeat(len(states), 1)
        index = group_index(states)
        trusted = torch.ones(len(states), dtype=torch.bool)
        for g, group in enumerate(GROUPS):
            mask = index == g
            trusted[mask] = self.evidence.trusted_in(group)
            ev_g = self.evidence.groups.get(group, {})
            for i, expert in enumerate(experts):
                ev = ev_g.get(_name(expert))
                if ev is not None and ev.rows >= MIN_GROUP_ROWS:
                    per_expert[mask, i] = ev.quality_sd ** 2 / ev.rows
                    bias[mask, i] = ev.bias
        se = (per_expert + per_expert[rows, fixed][:, None]).sqrt()  # [R, N]
        gain = utility - utility[rows, fixed][:, None] - bias - bias[rows, fixed][:, None]
        bounds = torch.where(torch.isfinite(se), gain - self.z * se, torch.full_like(gain, -math.inf))
        bounds[rows, fixed] = 0.0
        bounds = torch.where((self.evidence.known(states) & trusted)[:, None], bounds,
                             torch.full_like(bounds, -math.inf))
        bounds[rows, fixed] = 0.0
        allowed = bounds > 0
        allowed[rows, fixed] = True
        picks = torch.argmax(torch.where(allowed, utility, torch.full_like(utility, -math.inf)), dim=1)
        return picks, fixed, quality, cost, bounds

    def predict_batch(self, states: Tensor, experts: Sequence[Any]) -> tuple[Tensor, Tensor]:
        """The router's quality and cost [R, N] for states [R, 64] (one scorer call)."""
        scorer = getattr(self.router, "scorer", None)
        if scorer is None:  # a router-like object with predict() only
            pairs = [self.router.predict(s, experts) for s in states]
            return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        r, n = len(states), len(experts)
        feats = torch.stack([getattr(e, "descriptor", e).to_features() for e in experts])
        with torch.no_grad():
            q, c = scorer(states.float().repeat_interleave(n, 0), feats.repeat(r, 1))
        return q.reshape(r, n), c.reshape(r, n)

    def select(self, state: Tensor, experts: Sequence[Any], priority: float = 0.5, seed: int | None = None,
               epsilon: float | None = None) -> GuardedChoice:
        """Choose for ``state`` [64]: the greedy guarded pick, or with probability epsilon a uniform
        draw; the selection's ``propensity`` is the probability of the expert actually picked."""
        start = time.perf_counter()
        if experts is None or len(experts) == 0:
            raise ValueError("expert pool is empty: connect at least one MoE Expert or use the default pool")
        epsilon = self.epsilon if epsilon is None else epsilon
        greedy, fixed, quality, cost, bounds = self.greedy(state, experts, priority)
        n = len(experts)
        probs = torch.full((n,), epsilon / n, dtype=torch.float64)
        probs[greedy] += 1.0 - epsilon
        index = draw(probs, seed)
        utility = quality.double() - lambda_from_priority(priority) * cost.double()
        names = [_name(e) for e in experts]
        selection = Selection(
            expert=names[index], index=index, propensity=float(probs[index]),
            confidence=float(softmax_probabilities(utility, REFERENCE_TEMPERATURE)[index]),
            probabilities=tuple(float(p) for p in probs), utilities=tuple(float(u) for u in utility),
            predicted_quality=tuple(float(q) for q in quality), predicted_cost=tuple(float(c) for c in cost),
            decision_seconds=time.perf_counter() - start)
        return GuardedChoice(selection, self.phase, names[fixed], names[greedy], tuple(float(b) for b in bounds),
                             index != greedy)


# ----------------------------------------------------------------------------- fit, evaluate, adopt


def fit_candidate(router: Router, rows: Sequence[LoggedRow], descriptors: dict[str, ExpertDescriptor],
                  steps: int | None = None, learning_rate: float = 3e-3, batch_size: int = 64, seed: int = 0,
                  should_stop: Callable[[], bool] | None = None,
                  pause: float | Callable[[], None] = 0.0) -> Router:
    """A copy of ``router`` trained on ``rows`` (weighted MSE on quality and cost, weights
    ``min(1 / propensity, PROPENSITY_CLIP)``, as ``MoERLTrainer.learn_from_records``); the
    original is not touched. ``steps`` defaults to ``clamp(2 * rows, 100, 600)`` Adam steps;
    ``pause`` seconds of sleep after each step leave the CPU (and the GIL) to sampling when the
    fit runs in the background; a callable is called after each step instead (the sampler's
    gate: it waits while a sampling run is in progress)."""
    with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; the copy must be trainable
        scorer = ExpertScorer(hidden=router.scorer.hidden)
        scorer.load_state_dict({k: v.clone() for k, v in router.scorer.state_dict().items()})
    candidate = Router(scorer, name=router.name, training=dict(router.training), descriptors=router.descriptors)
    rows = [r for r in rows if r.expert in descriptors]
    if not rows:
        return candidate
    steps = steps if steps is not None else int(min(max(2 * len(rows), 100), 600))
    states = torch.tensor([r.state for r in rows], dtype=torch.float32)
    feats = torch.stack([descriptors[r.expert].to_features() for r in rows])
    quality = torch.tensor([r.quality for r in rows], dtype=torch.float32)
    cost = torch.tensor([r.cost for r in rows], dtype=torch.float32)
    weight = torch.tensor([min(1.0 / r.propensity, PROPENSITY_CLIP) for r in rows], dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    scorer = candidate.scorer
    optimizer = torch.optim.Adam(scorer.parameters(), lr=learning_rate)
    with torch.inference_mode(False), torch.enable_grad():
        for _ in range(steps):
            if should_stop is not None and should_stop():
                break
            idx = torch.randint(len(rows), (min(batch_size, len(rows)),), generator=generator)
            q_pred, c_pred = scorer(states[idx], feats[idx])
            err = (q_pred - quality[idx]).square() + (c_pred - cost[idx]).square()
            loss = (weight[idx] * err).sum() / weight[idx].sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if callable(pause):
                pause()
            elif pause > 0:
                time.sleep(pause)
    names = {d.name: d for d in candidate.descriptors}
    names.update(descriptors)
    candidate.descriptors = tuple(names.values())
    candidate.training = {**candidate.training, "contexts": int(candidate.training.get("contexts", 0) or 0),
                          "runs": len(rows)}
    return candidate


def policy_values(policies: dict[str, GuardedPolicy], rows: Sequence[LoggedRow], experts: Sequence[Any],
                  bootstrap: int = 200, seed: int = 0, pairs: Sequence[tuple[str, str]] = (),
                  reward_model: Any = None) -> dict:
    """Value of each policy's greedy pick on logged ``rows`` (reward ``quality - lambda(p) cost``),
    and for each ``(a, b)`` in ``pairs`` the difference ``value(a) - value(b)`` with a paired
    bootstrap 90% interval. Rows of experts outside the pool are ignored.

    Bandit rows (one expert per context, drawn with the logged propensity) are scored **doubly
    robust**: ``u_hat(x, pi(x)) + [pi(x) = a] / p (r - u_hat(x, a))``, where ``u_hat`` is the
    utility predicted by ``reward_model`` (a :class:`GuardedPolicy` or router fitted on other
    rows; without one the estimate is plain inverse propensity weighting, ``u_hat = 0``). With
    the true propensities it is unbiased whatever ``u_hat``, and the better ``u_hat`` the smaller
    its variance; two policies that agree on a row get the same term, so paired differences are
    tight. Sweep rows (every expert of a context, ``quality_source == "sweep"``) are full
    information: the row of the policy's pick counts its reward. ``matched`` is how many rows'
    logged expert is the policy's pick.
    """
    index = {_name(e): i for i, e in enumerate(experts)}
    rows = [r for r in rows if r.expert in index]
    out: dict[str, Any] = {"rows": len(rows), "values": {}, "matched": {}, "differences": {}}
    if not rows:
        for name in policies:
            out["values"][name], out["matched"][name] = math.nan, 0
        return out
    reward = torch.tensor([r.quality - lambda_from_priority(r.priority) * r.cost for r in rows], dtype=torch.float64)
    inverse = torch.tensor([1.0 / r.propensity for r in rows], dtype=torch.float64)
    logged = torch.tensor([index[r.expert] for r in rows])
    sweep = torch.tensor([r.quality_source == "sweep" for r in rows])
    states = torch.tensor([r.state for r in rows], dtype=torch.float32)
    priorities = [r.priority for r in rows]
    lam = torch.tensor([lambda_from_priority(p) for p in priorities], dtype=torch.float64)[:, None]
    if reward_model is not None:
        predictor = reward_model if hasattr(reward_model, "predict_batch") else GuardedPolicy(reward_model, Evidence())
        q_hat, c_hat = predictor.predict_batch(states, experts)
        u_hat = q_hat.double() - lam * c_hat.double()
    else:
        u_hat = torch.zeros((len(rows), len(experts)), dtype=torch.float64)
    r_idx = torch.arange(len(rows))
    terms, counts = {}, {}
    for name, policy in policies.items():
        picks = policy.greedy_batch(states, experts, priorities)[0]
        match = (picks == logged).double()
        dr = u_hat[r_idx, picks] + match * inverse * (reward - u_hat[r_idx, logged])
        terms[name] = torch.where(sweep, match * reward, dr)
        counts[name] = torch.where(sweep, match, torch.ones_like(match))
        out["matched"][name] = int(match.sum())
        total = float(counts[name].sum())
        out["values"][name] = float(terms[name].sum()) / total if total > 0 else math.nan
    generator = torch.Generator().manual_seed(seed)
    resample = torch.randint(len(rows), (bootstrap, len(rows)), generator=generator)
    for a, b in pairs:
        va = terms[a][resample].sum(1) / counts[a][resample].sum(1)
        vb = terms[b][resample].sum(1) / counts[b][resample].sum(1)
        diff = (va - vb)[torch.isfinite(va - vb)]
        point = out["values"][a] - out["values"][b]
        low, high = ((float(torch.quantile(diff, 0.05)), float(torch.quantile(diff, 0.95)))
                     if diff.numel() >= 10 else (math.nan, math.nan))
        out["differences"][f"{a}-{b}"] = {"value": point, "low": low, "high": high}
    return out


class FixedPolicy(GuardedPolicy):
    """Always the best fixed expert of ``evidence`` (what the guard falls back to)."""

    def __init__(self, evidence: Evidence) -> None:
        super().__init__(_prior(), evidence, epsilon=0.0)

    @property
    def phase(self) -> str:
        return "learning"

    def predict_batch(self, states: Tensor, experts: Sequence[Any]) -> tuple[Tensor, Tensor]:
        q, c = _fixed_quality_cost(self.evidence, experts)
        return q[None].expand(len(states), -1), c[None].expand(len(states), -1)


@dataclass(frozen=True)
class UpdateResult:
    """What :func:`update` did: the candidate (with its evidence and evaluation in its
    ``training`` metadata), whether it is adopted and why, the rows used, and the held-out values
    of the candidate, the current policy and the best fixed expert."""

    candidate: Router
    adopted: bool
    reason: str
    train_rows: int
    heldout_rows: int
    values: dict
    seconds: float

    def summary(self) -> str:
        v = self.values.get("values", {})
        diff = self.values.get("differences", {}).get("candidate-current", {})
        fmt = lambda x: "n/a" if x is None or not math.isfinite(x) else f"{x:+.4f}"  # noqa: E731
        return (f"{'adopted' if self.adopted else 'not adopted'} ({self.reason}); {self.train_rows} training rows, "
                f"{self.heldout_rows} held-out; held-out utility candidate {fmt(v.get('candidate'))}, current "
                f"{fmt(v.get('current'))}, best fixed {fmt(v.get('fixed'))}; candidate - current "
                f"{fmt(diff.get('value'))} [90% {fmt(diff.get('low'))}, {fmt(diff.get('high'))}]")


def update(current: Router, records_or_rows: Sequence[Any], experts: Sequence[Any], model: str | None = None,
           heldout_share: float = HELDOUT_SHARE, min_heldout: int = MIN_HELDOUT, min_rows: int = MIN_ROWS,
           steps: int | None = None, seed: int = 0, should_stop: Callable[[], bool] | None = None,
           pause: float | Callable[[], None] = 0.0,
           calibration_pairs: Sequence[tuple[str, Any, float]] = ()) -> UpdateResult:
    """One online update of ``current`` from logged runs of ``model`` over the pool ``experts``.

    ``records_or_rows``: ``RunRecord``s (filtered by :func:`rows_from_records`) or
    :class:`LoggedRow`s. The estimate rows' quality is recomputed with the calibration the
    audited and swept rows give (:func:`calibrate_rows`; ``calibration_pairs``: more pairs of
    this model from outside the rows), which the candidate keeps in
    ``training["calibration"]``. Returns an :class:`UpdateResult`; the caller publishes the
    candidate only when ``adopted`` (see :mod:`.versions`).
    """
    start = time.perf_counter()
    descriptors = {_name(e): getattr(e, "descriptor", e) for e in experts}
    rows = [r for r in records_or_rows if isinstance(r, LoggedRow)]
    if len(rows) != len(records_or_rows):
        rows = rows_from_records(records_or_rows, model=model, experts=list(descriptors))
    rows = [r for r in rows if r.expert in descriptors]
    rows, fitted, bias = calibrate_rows(rows, calibration_pairs)
    train, heldout = split_rows(rows, heldout_share)
    candidate = fit_candidate(current, train, descriptors, steps=steps, seed=seed, should_stop=should_stop,
                              pause=pause)
    if callable(pause):
        pause()  # the evaluation below, too, runs between generations
    candidate_evidence = evidence_from_rows(train, heldout, candidate, descriptors, trusted=True, bias=bias)
    policies = {"candidate": GuardedPolicy(candidate, candidate_evidence, epsilon=0.0, min_rows=min_rows),
                "current": GuardedPolicy.for_router(current, epsilon=0.0, min_rows=min_rows),
                "fixed": FixedPolicy(candidate_evidence)}
    values = policy_values(policies, heldout, experts, seed=seed,
                           pairs=[("candidate", "current"), ("candidate", "fixed")], reward_model=candidate)
    v = values["values"]
    # Trusted (free to deviate) only where its deviations showed a gain: a tie means none was seen.
    beats_fixed = math.isfinite(v["candidate"]) and math.isfinite(v["fixed"]) and v["candidate"] > v["fixed"]
    trusted_groups, values["groups"] = {}, {}
    if heldout:
        held_index = group_index(torch.tensor([r.state for r in heldout], dtype=torch.float32)).tolist()
        for g, group in enumerate(GROUPS):
            held = [r for r, i in zip(heldout, held_index) if i == g]
            if len(held) < min_heldout:
                continue  # too few held-out rows in the group: it follows the pooled verdict
            vg = policy_values({"candidate": policies["candidate"], "fixed": policies["fixed"]}, held, experts,
                               bootstrap=0, seed=seed, reward_model=candidate)["values"]
            values["groups"][group] = {"rows": len(held), **vg}
            trusted_groups[group] = (math.isfinite(vg["candidate"]) and math.isfinite(vg["fixed"])
                                     and vg["candidate"] > vg["fixed"])
    candidate_evidence = dataclasses.replace(candidate_evidence, trusted=beats_fixed, trusted_groups=trusted_groups)
    if len(heldout) < min_heldout:
        adopted, reason = False, f"{len(heldout)} held-out rows, {min_heldout} needed to judge it"
    elif not math.isfinite(v["candidate"]) or not math.isfinite(v["current"]):
        adopted, reason = False, "no held-out row matches both policies' picks"
    elif v["candidate"] < v["current"]:
        adopted, reason = False, "worse than the current router on held-out rows"
    else:
        adopted = True
        reason = ("not worse than the current router on held-out rows"
                  + ("" if beats_fixed
                     else "; not above the best fixed expert there, so it keeps the best fixed expert"))
    candidate.training = {
        **candidate.training, "model": model if model is not None else current.training.get("model"),
        "guard": candidate_evidence.to_json(),
        "calibration": None if fitted is None else fitted.to_dict(),
        "online": {"adopted": adopted, "reason": reason, "train_rows": len(train), "heldout_rows": len(heldout),
                   "values": _finite(values), "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    candidate.created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result = UpdateResult(candidate, adopted, reason, len(train), len(heldout), values, time.perf_counter() - start)
    logger.info("online update of %s: %s", model or current.name, result.summary())
    return result


def _finite(data: Any) -> Any:
    """JSON-safe copy (NaN -> None)."""
    return json.loads(json.dumps(data, default=str).replace("NaN", "null"))
