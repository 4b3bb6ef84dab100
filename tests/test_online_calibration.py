"""The online loop calibrates the runs' fidelity estimates with the model's own pairs.

A run's quality at generation time is its estimate's; only audited and swept runs know their true
error. These tests check that those pairs rescore the estimate rows (so the feedback the router
learns from is calibrated), that estimate rows no pair of this model calibrates cannot move the
guard's choices, and that the pairs travel through the real stats store and the router file.
"""

from __future__ import annotations

import random

from helpers import import_node_module

from moe_sampler.experts import default_pool
from moe_sampler.experts.analytic import quality_from_error
from moe_sampler.router.features import DENOISE_SLOT
from moe_sampler.router.model import Router
from moe_sampler.router.online import (
    RAW_BIAS,
    LoggedRow,
    best_fixed,
    calibrate_rows,
    evidence_from_rows,
    rows_from_records,
    update,
)
from moe_sampler.router.policy import cost_from_nfe, lambda_from_priority
from moe_sampler.stats.store import StatsStore

bridge = import_node_module("bridge")
POOL = default_pool()
NAMES = [e.name for e in POOL]
NFE = {e.name: e.descriptor.max_nfe for e in POOL}


def _inputs(estimate: float, sigma_start: float = 14.6) -> dict:
    return {"estimate": estimate, "first_order": estimate, "tail": estimate / 2, "sigma_start": sigma_start,
            "sigma_end": 0.03, "scale": 1.0, "nfe": 20.0, "cfg": 5.0}


def _row(expert: str, i: int, source: str, estimate: float, true_error: float | None,
         quality: float | None = None, denoise: float = 1.0) -> LoggedRow:
    state = [0.0] * 64
    state[DENOISE_SLOT] = 2 * denoise - 1
    state[0] = (i % 17) / 17  # distinct contexts
    if quality is None:
        quality = float(quality_from_error(true_error if source != "estimate" else estimate))
    return LoggedRow(tuple(state), expert, quality, float(cost_from_nfe(NFE[expert])), 1.0, 0.5, source,
                     f"{expert}|{source}|{i}", _inputs(estimate), true_error)


def _biased_rows(expert: str, audits: int, estimates: int, factor: float = 10.0, seed: int = 0) -> list[LoggedRow]:
    """Rows whose true error is ``factor`` times the raw estimate (so the raw quality is too high)."""
    rng = random.Random(seed)
    rows = []
    for i in range(audits + estimates):
        estimate = 10 ** rng.uniform(-2.7, -1.5)  # quality 0.5-0.9 raw, a third lower true
        source = "audit" if i < audits else "estimate"
        rows.append(_row(expert, i, source, estimate, estimate * factor * 10 ** rng.gauss(0, 0.05)))
    return rows


def test_estimate_rows_are_rescored_with_the_models_own_audit_pairs():
    rows = _biased_rows("SpeedDemon", audits=16, estimates=100)
    estimates = [r for r in rows if r.quality_source == "estimate"]
    true_mean = sum(float(quality_from_error(r.true_error)) for r in estimates) / len(estimates)
    raw_mean = sum(r.quality for r in estimates) / len(estimates)
    assert raw_mean - true_mean > 0.3  # a factor 10 in error is a third of the quality scale

    # The estimate rows' true errors are not pairs: only the audited rows may calibrate.
    unpaired = [r if r.quality_source == "audit" else LoggedRow(*[*r.__dict__.values()][:-1], None) for r in rows]
    rescored, calibration, bias = calibrate_rows(unpaired)
    assert calibration is not None and calibration.fits["SpeedDemon"].pairs == 16
    new_mean = sum(r.quality for r in rescored if r.quality_source == "estimate") / len(estimates)
    assert abs(new_mean - true_mean) < 0.03
    assert [r.quality for r in rescored if r.quality_source == "audit"] == \
        [r.quality for r in rows if r.quality_source == "audit"]  # the exact ones are kept
    assert 0 < bias["SpeedDemon"] < 0.02 and "QualityMaster" not in bias

    # Without pairs nothing is rescored, and no expert is calibrated.
    alone = [r for r in unpaired if r.quality_source == "estimate"]
    same, none, no_bias = calibrate_rows(alone)
    assert same == alone and none is None and no_bias == {}


def _fixed_rows(source: str, n: int = 40) -> list[LoggedRow]:
    """QualityMaster and BalancedMaster rows at priority 0.5 whose mean utilities differ by 0.25
    in BalancedMaster's favour (the prior's fixed expert there is QualityMaster)."""
    lam = lambda_from_priority(0.5)
    cost = {name: float(cost_from_nfe(NFE[name])) for name in ("QualityMaster", "BalancedMaster")}
    q_quality = 0.6
    q_balanced = q_quality + 0.25 - lam * (cost["QualityMaster"] - cost["BalancedMaster"])
    assert 0 < q_balanced < 1
    rows = []
    for name, q in (("QualityMaster", q_quality), ("BalancedMaster", q_balanced)):
        error = 10 ** (-3 * q)
        for i in range(n):
            rows.append(_row(name, i, source, error, error if source != "estimate" else None, quality=q))
    return rows


def test_uncalibrated_estimates_cannot_move_the_fixed_expert_but_audited_rows_can():
    assert NAMES[best_fixed(evidence_from_rows([]), POOL, 0.5)] == "QualityMaster"
    # The same rows, the gap 0.25 well outside the noise (z * 0.15 * sqrt(2 / 40) = 0.055):
    audited = evidence_from_rows(_fixed_rows("audit"), bias={})
    assert audited.experts["BalancedMaster"].bias == 0.0
    assert NAMES[best_fixed(audited, POOL, 0.5)] == "BalancedMaster"
    # ... but as raw estimates (no pair of this model): each mean may be off by RAW_BIAS, and
    # 2 * RAW_BIAS > 0.25, so they do not separate the experts.
    rows = _fixed_rows("estimate")
    _, calibration, bias = calibrate_rows(rows)
    assert calibration is None
    raw = evidence_from_rows(rows, bias=bias)
    assert raw.experts["BalancedMaster"].bias == RAW_BIAS and 2 * RAW_BIAS > 0.25
    assert NAMES[best_fixed(raw, POOL, 0.5)] == "QualityMaster"
    # Without the bound (the loop before calibration) the raw estimates would have moved it.
    assert NAMES[best_fixed(evidence_from_rows(rows), POOL, 0.5)] == "BalancedMaster"


def test_the_pairs_go_through_the_store_and_the_update_keeps_the_calibration(tmp_path):
    inputs = _inputs(2e-3)
    attempt = bridge.Attempt(expert="SpeedDemon", outcome="ok", nfe=12, steps=12, seconds=0.5, error_estimate=2e-3,
                             estimate_inputs=inputs)
    selection = type("S", (), {"confidence": 0.5, "propensity": 0.9})()
    store = StatsStore(tmp_path / "stats.db")
    try:
        rng = random.Random(1)
        for i in range(60):
            (record,) = bridge.run_records([attempt], state=[rng.random() for _ in range(64)], selection=selection,
                                           router="default", priority=rng.random(), seed=i)
            assert record.details_dict()["estimate"] == inputs  # 6 significant digits kept
            details = {**record.details_dict(), "true_error": 2e-2} if i % 3 == 0 else None
            fields = {"quality_source": "audit", "quality": float(quality_from_error(2e-2))} if details else {}
            store.record(record.__class__(**{**record.__dict__, "model": "m", **fields,
                                             **({"details": details} if details else {})}))
        stored = rows_from_records(store.runs(), model="m")
    finally:
        store.close()
    assert len(stored) == 60
    audited = [r for r in stored if r.quality_source == "audit"]
    assert len(audited) == 20 and all(r.true_error == 2e-2 and r.inputs == inputs for r in audited)
    assert all(r.true_error is None and r.inputs == inputs for r in stored if r.quality_source == "estimate")

    result = update(Router.default(), stored, POOL, model="m", seed=1)
    saved = result.candidate.save(tmp_path / "r.safetensors")
    again = Router.load(saved)
    data = again.training["calibration"]
    assert data["experts"]["SpeedDemon"]["pairs"] == 20
    # the estimate rows it learned from were rescored to the audits' (10x the raw error)
    ev = result.candidate.training["guard"]["experts"]["SpeedDemon"]
    assert abs(ev["quality"] - float(quality_from_error(2e-2))) < 0.02
