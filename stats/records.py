"""Run records and per-expert scores: what :mod:`moe_sampler.stats.store` keeps and reports.

:class:`RunRecord` (one run, checked on construction), :class:`ExpertStats` (one expert's
aggregates), the conversion between a record and a database row, and the score computation.
Pure Python (no SQLite, no torch).
Score definitions: docs/STATS.md.
"""

from __future__ import annotations

import json
import math
import numbers
import sys
import time
import uuid
from array import array
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = [
    "COLUMNS",
    "INSERT_RUNS",
    "SELECT_RUNS",
    "SOURCES",
    "STATE_DIM",
    "ExpertStats",
    "RunRecord",
    "row_to_dict",
    "run_to_row",
    "score_experts",
]

SOURCES = ("sampling", "training", "benchmark", "audit")
QUALITY_SOURCES = ("estimate", "audit", "sweep")  # where a run's ``quality`` came from
MAX_DETAILS = 65_536  # characters of the ``details`` JSON text
STATE_DIM = 64  # router.features.STATE_DIM, repeated so that this module needs no torch
NFE_WEIGHT = 0.8  # cost = nfe ** 0.8 * seconds ** 0.2: model calls dominate, seconds break ties
MIN_NFE, MIN_SECONDS = 1.0, 1e-3  # cost floors: a run with no model call (denoise 0) costs > 0
COLUMNS = (
    "created", "source", "expert", "router", "state", "priority", "nfe", "steps",
    "seconds", "quality", "success", "confidence", "propensity", "error", "seed",
    "quality_source", "error_estimate", "model", "details", "audit_seconds", "job", "run_id",
)  # fmt: skip
# The SQL of the runs table that every writer and reader shares ({table}: Backend.sql fills it in).
# A run already stored (a retry after a commit whose answer was lost) is not stored again.
INSERT_RUNS = (f"INSERT INTO {{table}} ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
               "ON CONFLICT (run_id) DO NOTHING")
SELECT_RUNS = f"SELECT id, {', '.join(COLUMNS)} FROM {{table}}"
# name: (low, high, low excluded, None allowed)
_BOUNDS = {
    "created": (0.0, math.inf, False, False),
    "seconds": (0.0, math.inf, False, False),
    "quality": (0.0, 1.0, False, True),
    "confidence": (0.0, 1.0, False, True),
    "priority": (0.0, 1.0, False, True),
    "propensity": (0.0, 1.0, True, True),
    "error_estimate": (-math.inf, math.inf, False, True),
    "audit_seconds": (0.0, math.inf, False, True),
}


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """One run of one expert; keyword-only, checked on construction (ValueError naming the field).

    Attributes:
        expert: expert name. router: router name and version (e.g. ``"default@3"``, ``"manual"``).
        nfe: model calls (int >= 0). steps: solver steps (int >= 0). seconds: wall time (>= 0).
        success: finished with a finite output and not interrupted.
        source: ``"sampling"``, ``"training"``, ``"benchmark"`` or ``"audit"``.
        quality: quality estimate in [0, 1], or None when nothing measured it.
        confidence: the router's probability for its pick, in [0, 1], or None.
        propensity: the probability with which the policy picked this expert, in (0, 1], or None.
        priority: the user's quality-versus-speed priority in [0, 1], or None.
        state: the [64] context vector (any float sequence or tensor; kept as float32), or None.
        error: the failure reason, or None. seed: the sampling seed, or None.
        created: unix time; defaults to now.
        quality_source: where ``quality`` came from: ``"estimate"`` (the expert's own estimate),
            ``"audit"`` (a reference run measured it), ``"sweep"`` (a training sweep), or None.
        error_estimate: the expert's raw fidelity (error) estimate, a finite number, or None.
        model: the fingerprint of the model the run used, or None.
        details: a JSON object (a dict, or its JSON text) with why this expert was picked, the
            expert's settings and the router version; kept as compact JSON text (at most
            65536 characters), or None. :meth:`details_dict` parses it back.
        audit_seconds: extra wall seconds an audit of this run took (>= 0), or None.
        job: the farm training job whose sweep wrote this run (:mod:`moe_sampler.stats.claims`), or None.
        run_id: a unique id, drawn when the record is made (32 hex digits); the store keeps one row
            per id, so a write retried after a commit whose answer was lost stores the run once.
            None only for rows written before schema v5.
    """

    expert: str
    router: str
    nfe: int
    steps: int
    seconds: float
    success: bool
    source: str = "sampling"
    quality: float | None = None
    confidence: float | None = None
    propensity: float | None = None
    priority: float | None = None
    state: tuple[float, ...] | None = None
    error: str | None = None
    seed: int | None = None
    created: float = field(default_factory=time.time)
    quality_source: str | None = None
    error_estimate: float | None = None
    model: str | None = None
    details: str | None = None
    audit_seconds: float | None = None
    job: str | None = None
    run_id: str | None = field(default_factory=lambda: uuid.uuid4().hex)

    def details_dict(self) -> dict[str, Any] | None:
        """:attr:`details` as a dict, or None."""
        return None if self.details is None else json.loads(self.details)

    def __post_init__(self) -> None:
        for name in ("expert", "router"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"RunRecord.{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.source not in SOURCES:
            raise ValueError(f"RunRecord.source must be one of {', '.join(SOURCES)}; got {self.source!r}")
        if not isinstance(self.success, bool):
            raise ValueError(f"RunRecord.success must be True or False, got {self.success!r}")
        if self.error is not None and not isinstance(self.error, str):
            raise ValueError(f"RunRecord.error must be a string or None, got {self.error!r}")
        if self.run_id is not None and (not isinstance(self.run_id, str) or not 0 < len(self.run_id) <= 64):
            raise ValueError(f"RunRecord.run_id must be a string of 1 to 64 characters or None, got {self.run_id!r}")
        for name in ("model", "job"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"RunRecord.{name} must be a non-empty string or None, got {value!r}")
        if self.quality_source is not None and self.quality_source not in QUALITY_SOURCES:
            raise ValueError(
                f"RunRecord.quality_source must be one of {', '.join(QUALITY_SOURCES)} or None; got {self.quality_source!r}"
            )
        object.__setattr__(self, "details", _checked_details(self.details))
        for name in ("nfe", "steps", "seed"):
            value = getattr(self, name)
            if name == "seed" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (name != "seed" and value < 0):
                kind = "an int" if name == "seed" else "an int >= 0"
                raise ValueError(f"RunRecord.{name} must be {kind}, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name, bounds in _BOUNDS.items():
            object.__setattr__(self, name, _checked_real(name, getattr(self, name), *bounds))
        object.__setattr__(self, "state", _checked_state(self.state))


@dataclass(frozen=True)
class ExpertStats:
    """One expert's aggregates over the runs a query selected (docs/STATS.md has the rationale).

    Attributes:
        expert, runs: the expert and how many runs matched.
        quality_score: mean quality estimate of successful runs that have one; None if none has.
        speed_score: ``min_k cost_k / cost``, the cheapest expert of this result scoring 1, where
            ``cost = max(mean_nfe, 1) ** 0.8 * max(mean_seconds, 0.001) ** 0.2``.
        efficiency_score: ``quality_score * speed_score``, quality per unit of cost where the unit
            is the cheapest expert's cost; in [0, 1].
        success_rate: successful runs / runs.
        mean_confidence: mean router confidence of the runs that recorded one.
        mean_nfe, mean_seconds: mean model calls and wall seconds of successful runs.
    Every field but ``expert`` and ``runs`` is None when there is nothing to average.
    """

    expert: str
    runs: int
    quality_score: float | None
    speed_score: float | None
    efficiency_score: float | None
    success_rate: float | None
    mean_confidence: float | None
    mean_nfe: float | None
    mean_seconds: float | None


def _checked_real(name: str, value: Any, low: float, high: float, low_open: bool, optional: bool) -> float | None:
    if value is None and optional:
        return None
    number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    inside = (low < number if low_open else low <= number) and number <= high
    if not (inside and math.isfinite(number)):
        span = f">= {low:g}" if high == math.inf else f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        allowed = f"a finite number {span}{' or None' if optional else ''}"
        raise ValueError(f"RunRecord.{name} must be {allowed}, got {value!r}")
    return number


def _checked_state(state: Any) -> tuple[float, ...] | None:
    if state is None:
        return None
    values = state.tolist() if hasattr(state, "tolist") else state
    try:
        packed = array("f", values)
    except (TypeError, OverflowError):
        packed = array("f")
    if len(packed) != STATE_DIM or not all(math.isfinite(v) for v in packed):
        size = len(values) if hasattr(values, "__len__") else "unknown"
        raise ValueError(
            f"RunRecord.state must be {STATE_DIM} finite float32 numbers or None, got a "
            f"{type(state).__name__} of length {size} (non-numeric or non-finite values are refused)"
        )
    return tuple(packed)


def _checked_details(details: Any) -> str | None:
    """A JSON object (dict or JSON text) as compact JSON text, so equal details compare equal."""
    if details is None:
        return None
    value = details
    if isinstance(details, str):
        try:
            value = json.loads(details)
        except ValueError:
            value = None
    text = None
    if isinstance(value, dict):
        try:
            text = json.dumps(value, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError):
            text = None
    if text is None or len(text) > MAX_DETAILS:
        raise ValueError(
            f"RunRecord.details must be a JSON object (a dict of JSON values without NaN, or its text) of at most "
            f"{MAX_DETAILS} characters, or None; got {type(details).__name__} {str(details)[:80]!r}"
        )
    return text


def _short_float32(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (0.1, not 0.10000000149011612)."""
    for digits in range(6, 10):
        short = float(f"{value:.{digits}g}")
        if array("f", [short])[0] == value:
            return short
    return value


def row_to_dict(row: Sequence[Any]) -> dict[str, Any]:
    """A stored row (in COLUMNS order) as plain Python values, unchecked (exports keep every row)."""
    values = dict(zip(COLUMNS, row))
    if values["state"] is not None:
        floats = array("f")
        floats.frombytes(values["state"])
        if sys.byteorder == "big":
            floats.byteswap()
        values["state"] = [_short_float32(v) for v in floats]
    values["success"] = bool(values["success"])
    values["seed"] = None if values["seed"] is None else int(values["seed"])
    return values


def run_to_row(run: RunRecord) -> tuple[Any, ...]:
    values = {name: getattr(run, name) for name in COLUMNS}
    if run.state is not None:
        floats = array("f", run.state)
        if sys.byteorder == "big":
            floats.byteswap()  # stored little-endian, so a file moves between machines
        values["state"] = floats.tobytes()
    values["success"] = int(run.success)
    values["seed"] = None if run.seed is None else str(run.seed)
    return tuple(values[name] for name in COLUMNS)


def score_experts(rows: Sequence[Sequence[Any]]) -> list[ExpertStats]:
    """Rows of (expert, runs, success_rate, quality, confidence, mean_nfe, mean_seconds) -> stats."""
    costs = {
        row[0]: max(row[5], MIN_NFE) ** NFE_WEIGHT * max(row[6], MIN_SECONDS) ** (1 - NFE_WEIGHT)
        for row in rows
        if row[5] is not None
    }
    cheapest = min(costs.values(), default=None)
    result = []
    for expert, runs, success_rate, quality, confidence, nfe, seconds in rows:
        speed = cheapest / costs[expert] if expert in costs else None
        efficiency = quality * speed if quality is not None and speed is not None else None
        result.append(ExpertStats(expert, runs, quality, speed, efficiency, success_rate, confidence, nfe, seconds))
    return result
