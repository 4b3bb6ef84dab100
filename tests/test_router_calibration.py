"""The calibration of the fidelity estimate: fit, predict with uncertainty, fallbacks, round trip."""

from __future__ import annotations

import json
import math
import random

import pytest

from moe_sampler.router.calibration import DEFAULT_FEATURES, POOLED, REDUCED, Calibration, ExpertFit, calibration_inputs


def _pairs(expert: str, n: int, slope: float, offset: float, noise: float, seed: int) -> list:
    """Errors that follow ``log10(err) = offset + slope * log10(estimate) + 0.3 * log(cfg) + noise``."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        estimate, cfg = 10 ** rng.uniform(-4, -1), math.exp(rng.uniform(0, math.log(12)))
        log_error = offset + slope * math.log10(estimate) + 0.3 * math.log(cfg) + rng.gauss(0, noise)
        pairs.append((expert, {"estimate": estimate, "first_order": 2 * estimate, "tail": estimate / 10,
                               "sigma_start": 14.6, "scale": 1.0, "nfe": 20, "cfg": cfg}, 10**log_error))
    return pairs


def test_fit_recovers_a_known_relation_and_its_spread():
    pairs = _pairs("A", 400, 0.8, -0.5, 0.1, seed=1) + _pairs("B", 400, 1.2, 0.3, 0.2, seed=2)
    calibration = Calibration.fit(pairs, ("log10_estimate", "log_cfg"))
    fit = calibration.fits["A"]
    assert fit.coef == pytest.approx((-0.5, 0.8, 0.3), abs=0.05)
    assert fit.std == pytest.approx(0.1, rel=0.15) and calibration.fits["B"].std == pytest.approx(0.2, rel=0.15)
    error, std = calibration.predict("A", {"estimate": 1e-2, "cfg": 1.0})
    assert error == pytest.approx(10 ** (-0.5 - 1.6), rel=0.1) and std == fit.std
    quality, quality_std = calibration.predict_quality("A", {"estimate": 1e-2, "cfg": 1.0})
    assert quality == pytest.approx((0.5 + 1.6) / 3, abs=0.02) and quality_std == pytest.approx(std / 3)


def test_few_pairs_reduced_model_and_unknown_expert_pooled_with_a_wider_spread():
    pairs = _pairs("A", 300, 1.0, 0.0, 0.1, seed=3) + _pairs("Few", 10, 1.0, 0.0, 0.1, seed=4) + \
        _pairs("Two", 2, 1.0, 0.0, 0.1, seed=5)
    calibration = Calibration.fit(pairs)
    assert calibration.fits["A"].features == DEFAULT_FEATURES
    assert calibration.fits["Few"].features == REDUCED == ("log10_estimate", "log_sigma_start")
    assert "Two" not in calibration.fits and POOLED in calibration.fits
    inputs = pairs[0][1]
    _, std_known = calibration.predict("A", inputs)
    _, std_unknown = calibration.predict("Two", inputs)
    assert std_unknown > std_known
    with pytest.raises(KeyError, match="no calibration"):
        Calibration().predict("A", inputs)


def test_round_trip_through_plain_json():
    calibration = Calibration.fit(_pairs("A", 200, 0.9, -0.2, 0.1, seed=6) + _pairs("B", 30, 1.1, 0.1, 0.3, seed=7))
    data = json.loads(json.dumps(calibration.to_dict()))
    again = Calibration.from_dict(data)
    inputs = _pairs("A", 1, 1.0, 0.0, 0.0, seed=8)[0][1]
    for expert in ("A", "B", "Unknown"):
        assert again.predict(expert, inputs) == calibration.predict(expert, inputs)
    with pytest.raises(ValueError, match="format version"):
        Calibration.from_dict({**data, "version": 99})
    broken = {**data, "experts": {"A": {**data["experts"]["A"], "features": ["no_such_feature"]}}}
    with pytest.raises(ValueError, match="unknown features"):
        Calibration.from_dict(broken)


def test_non_finite_pairs_are_skipped_and_unknown_features_refused():
    pairs = _pairs("A", 60, 1.0, 0.0, 0.1, seed=9)
    pairs.append(("A", pairs[0][1], math.inf))
    assert Calibration.fit(pairs).fits["A"].pairs == 60
    with pytest.raises(ValueError, match="unknown calibration features"):
        Calibration.fit(pairs, ("log10_estimate", "log_moon_phase"))


def test_inputs_from_a_run_report():
    report = {"error_estimate": 0.01, "nfe": 20, "estimate_features": {"local": 0.04, "first_order": 0.1,
                                                                       "tail": 1e-4, "sigma_start": 14.6,
                                                                       "sigma_end": 0.03, "scale": 0.9}}
    inputs = calibration_inputs(report, cfg=7.5)
    # Parts a report of an older version lacks read 0 (remaining: no early stop; the rest: unknown).
    assert inputs == {"estimate": 0.01, "first_order": 0.1, "tail": 1e-4, "remaining": 0.0, "last_change": 0.0,
                      "local_plain": 0.0, "local_last": 0.0, "local_window": 0.0, "sigma_start": 14.6,
                      "sigma_end": 0.03, "sigma_prev_end": 0.0, "scale": 0.9, "nfe": 20.0, "cfg": 7.5}
    assert calibration_inputs({"error_estimate": None}) is None
    assert calibration_inputs({"error_estimate": math.nan}) is None
    fit = ExpertFit(("log10_estimate",), (0.0, 1.0), 0.1, 10)
    assert fit.predict_log10(inputs) == pytest.approx(-2.0)


def test_a_calibration_stored_before_the_remaining_change_still_loads_and_predicts():
    """Routers store their calibration: one fitted on the first eight features (no ``remaining``)
    keeps loading and predicting from today's inputs; a feature this code does not know is refused."""
    old = ("log10_estimate", "log10_first_order", "log10_tail", "log_sigma_start", "log_sigma_end", "log_cfg",
           "log_nfe", "log_scale")
    stored = {"version": 1, "experts": {"A": {"features": list(old), "coef": [-1.0, 1.0] + [0.0] * 7, "std": 0.2,
                                              "pairs": 80}}}
    calibration = Calibration.from_dict(json.loads(json.dumps(stored)))
    inputs = calibration_inputs({"error_estimate": 1e-3, "nfe": 30,
                                 "estimate_features": {"remaining": 0.5, "first_order": 0.01, "tail": 1e-3}})
    error, std = calibration.predict("A", inputs)
    assert error == pytest.approx(1e-4) and std == 0.2
    stored["experts"]["A"]["features"][-1] = "log_moon_phase"
    with pytest.raises(ValueError, match="unknown features"):
        Calibration.from_dict(stored)


def test_between_8_and_13_features_worth_of_pairs_an_expert_gets_the_first_features_they_support():
    """6 pairs per feature: 60 pairs fit the default list's first 10 features (the early-stop
    remainder and its sum with the trajectory window among them), 48 its first 8 (the calibration
    of before the early-stop remainder), 47 the reduced model."""
    pairs = _pairs("Ten", 60, 1.0, 0.0, 0.1, seed=8) + _pairs("Eight", 48, 1.0, 0.0, 0.1, seed=9) + \
        _pairs("Less", 47, 1.0, 0.0, 0.1, seed=10)
    calibration = Calibration.fit(pairs)
    assert len(DEFAULT_FEATURES) == 13 and DEFAULT_FEATURES[8:10] == ("log10_remaining", "log10_stop_total")
    assert calibration.fits["Ten"].features == DEFAULT_FEATURES[:10]
    assert calibration.fits["Eight"].features == DEFAULT_FEATURES[:8]
    assert calibration.fits["Less"].features == REDUCED
    assert calibration.fits["Ten"].predict_log10(pairs[0][1]) == pytest.approx(math.log10(pairs[0][2]), abs=0.5)


def test_stop_total_adds_the_early_stop_remainder_and_the_trajectory_window_in_linear_space():
    from moe_sampler.router.calibration import FEATURES, STOP_WINDOW_WEIGHT

    feature = FEATURES["log10_stop_total"]
    window = 4e-3 / STOP_WINDOW_WEIGHT
    assert feature({"remaining": 3e-3, "local_window": window}) == pytest.approx(math.log10(5e-3))  # 3-4-5
    assert feature({"remaining": 0.0, "local_window": window}) == pytest.approx(math.log10(4e-3))  # no early stop
    assert feature({}) == pytest.approx(-9.0)  # an old row without either part: the floor
