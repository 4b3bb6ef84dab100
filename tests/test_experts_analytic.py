"""Experts against the exact yardstick: measured error, convergence order, stop rule and NFE cap.

The reference is the probability-flow ODE solved to 1e-8 (``AnalyticModel.reference``), which ends
at sigma = 1e-5 followed by one denoise. Order fits therefore run the experts on a schedule whose
last nonzero sigma is that same 1e-5, so a converging solver converges to the reference itself
and the fitted slope is the solver's, not the floor of the model's own sigma_min.
"""

from __future__ import annotations

import math
import os
import statistics
import sys

import pytest
import torch

from moe_sampler.experts import ModelSchedule, get_expert, registered_experts
from moe_sampler.experts.analytic import REFERENCE_SIGMA_END, AnalyticModel, random_prompts
from moe_sampler.experts.dpm_solver import sample_dpmpp_2m
from moe_sampler.experts.schedules import karras_sigmas

ORDER_MARGIN = 0.5
# Stated bound on EarlyStopper's fidelity loss versus its own schedule run to the end, in relative
# error (data rms units); measured: median 0.01 and worst 0.2 percentage points (docs/EXPERTS.md).
EARLY_STOP_MAX_LOSS = 0.005
FIXED_STEP = [e for e in registered_experts() if not e.descriptor.stochastic and e.descriptor.stop_rule == "none"]


@pytest.fixture(scope="module")
def model() -> AnalyticModel:
    return AnalyticModel(random_prompts(4, seed=1), shape=(32,))


@pytest.fixture(scope="module")
def cases(model):
    """(extra_args, x_start, reference) for four prompt/guidance conditions, batch 3."""
    sigma_max = model.schedule().sigma_max
    out = []
    for cond, cfg in [(0, 1.0), (1, 7.5), (2, 1.0), (3, 3.0)]:
        x = model.initial_noise(3, seed=40 + cond, sigma=sigma_max, dtype=torch.float64)
        out.append(({"cond": cond, "cfg": cfg, "seed": 0}, x, model.reference(x, sigma_max, cond=cond, cfg=cfg)))
    return out


def _median_error(model, cases, expert, sigmas, **options) -> tuple[float, float]:
    """Median relative error over all cases and samples, and the mean NFE."""
    errors, nfes = [], []
    for extra_args, x, ref in cases:
        report: dict = {}
        out = expert(model, x, sigmas, extra_args=extra_args, report=report, **options)
        errors.extend(model.relative_error(out, ref, cond=extra_args["cond"]).tolist())
        nfes.append(report["nfe"])
    return statistics.median(errors), statistics.mean(nfes)


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(ys) against log(xs)."""
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = statistics.mean(lx), statistics.mean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


@pytest.mark.parametrize("expert", FIXED_STEP, ids=lambda e: e.name)
def test_convergence_order_matches_descriptor(model, cases, expert):
    """Fit over 40-160 steps, where both solvers are in their asymptotic regime (3M: ~3.2, 2M: ~1.9)."""
    schedule = ModelSchedule(REFERENCE_SIGMA_END, model.schedule().sigma_max)
    steps = [40, 80, 160]
    errors = [_median_error(model, cases, expert, expert.make_sigmas(schedule, n))[0] for n in steps]
    order = -_slope(steps, errors)
    assert abs(order - expert.descriptor.order) <= ORDER_MARGIN, (order, errors)


@pytest.mark.parametrize("expert", FIXED_STEP, ids=lambda e: e.name)
def test_error_falls_as_budget_grows(model, cases, expert):
    steps = expert.descriptor.steps
    budgets = [steps // 2, steps, 2 * steps]
    errors = [_median_error(model, cases, expert, expert.make_sigmas(model.schedule(), n))[0] for n in budgets]
    assert errors[0] > errors[1] > errors[2], errors


def test_named_intents_hold(model, cases):
    """QualityMaster beats BalancedMaster, which beats SpeedDemon, each on its own schedule."""
    errors = {}
    for name in ("QualityMaster", "BalancedMaster", "SpeedDemon"):
        expert = get_expert(name)
        errors[name] = _median_error(model, cases, expert, expert.sigmas(model.schedule()))[0]
    assert errors["QualityMaster"] < errors["BalancedMaster"] < errors["SpeedDemon"] < 0.15, errors


def test_first_multistep_step_is_ddim(model):
    """Step 0 of DPM-Solver++(2M) is DDIM (Song et al. 2021): x1 = D0 + (sigma1 / sigma0)(x0 - D0)."""
    sigmas = torch.tensor([10.0, 4.0, 0.0], dtype=torch.float64)
    x = model.initial_noise(2, seed=1, sigma=10.0, dtype=torch.float64)
    seen: list[dict] = []
    sample_dpmpp_2m(model, x, sigmas, callback=seen.append)
    d0 = model(x, torch.full((2,), 10.0, dtype=torch.float64))
    torch.testing.assert_close(seen[1]["x"], d0 + 0.4 * (x - d0))


def test_early_stopper_returns_the_denoised_prediction(model, cases):
    expert = get_expert("EarlyStopper")
    extra_args, x, _ = cases[0]
    sigmas = expert.sigmas(model.schedule())
    events: list[dict] = []
    report: dict = {}
    out = expert(model, x, sigmas, extra_args=extra_args, callback=events.append, report=report)
    assert report["stopped_early"] and report["steps"] == len(events) < expert.descriptor.steps
    last = events[-1]
    torch.testing.assert_close(out, last["denoised"], rtol=0, atol=0)
    recomputed = model(last["x"], last["sigma"] * torch.ones(x.shape[0], dtype=x.dtype), **extra_args)
    torch.testing.assert_close(out, recomputed, rtol=0, atol=0)
    assert 0 < report["last_change"] < 0.05 and 0 < report["error_estimate"] < 0.05
    assert not torch.equal(out, last["x"]), "returned the latent, not the denoised prediction"


def test_early_stopper_fidelity_loss_and_savings(model, cases):
    expert = get_expert("EarlyStopper")
    sigmas = expert.sigmas(model.schedule())
    losses, steps = [], []
    for extra_args, x, ref in cases:
        report: dict = {}
        stopped = expert(model, x, sigmas, extra_args=extra_args, report=report)
        full = sample_dpmpp_2m(model, x, sigmas, extra_args=extra_args)
        cond = extra_args["cond"]
        losses.extend((model.relative_error(stopped, ref, cond) - model.relative_error(full, ref, cond)).tolist())
        steps.append(report["steps"])
    assert max(losses) <= EARLY_STOP_MAX_LOSS, losses
    assert statistics.mean(steps) <= expert.descriptor.steps - 1, steps


def test_noise_adaptive_error_falls_with_rtol_at_order_two(model, cases):
    expert = get_expert("NoiseAdaptive")
    sigmas = expert.sigmas(model.schedule())
    runs = [_median_error(model, cases, expert, sigmas, rtol=rtol, max_nfe=10_000) for rtol in (0.1, 0.03, 0.01)]
    errors, nfes = [r[0] for r in runs], [r[1] for r in runs]
    assert errors[0] > errors[1] > errors[2] and nfes[0] < nfes[1] < nfes[2], runs
    assert abs(-_slope(nfes, errors) - expert.descriptor.order) <= ORDER_MARGIN, runs


@pytest.mark.parametrize("cfg", [1.0, 7.5, 12.0])
def test_noise_adaptive_holds_error_across_guidance(model, cfg):
    """Error control, not a fixed grid: median error stays near rtol-level at every guidance scale."""
    expert = get_expert("NoiseAdaptive")
    sigma_max = model.schedule().sigma_max
    x = model.initial_noise(3, seed=9, sigma=sigma_max, dtype=torch.float64)
    ref = model.reference(x, sigma_max, cond=1, cfg=cfg)
    out = expert(model, x, expert.sigmas(model.schedule()), extra_args={"cond": 1, "cfg": cfg})
    assert model.relative_error(out, ref, cond=1).median() < 0.03


@pytest.mark.parametrize("cap", [1, 2, 3, 5, 64])
def test_noise_adaptive_never_exceeds_its_cap(model, cap):
    expert = get_expert("NoiseAdaptive")
    x = model.initial_noise(2, seed=3, sigma=model.schedule().sigma_max)
    events: list[dict] = []
    report: dict = {}
    out = expert(model, x, expert.sigmas(model.schedule()), extra_args={"cond": 2, "cfg": 12.0},
                 callback=events.append, report=report, rtol=1e-9, atol=1e-12, max_nfe=cap)
    assert report["nfe"] <= cap and report["steps"] == len(events)
    assert torch.isfinite(out).all()
    assert float(events[-1]["sigma"]) == pytest.approx(model.schedule().sigma_min, rel=1e-5) or cap == 1
    if cap == 64:
        # The absurd tolerance spends the adaptive share; the cheap finish still lands near the answer.
        assert report["nfe"] == cap and report["rejected"] > 0
        ref = model.reference(x, model.schedule().sigma_max, cond=2, cfg=12.0)
        assert model.relative_error(out, ref, cond=2).median() < 0.2


def test_noise_adaptive_stops_at_a_nonzero_end(model):
    """Sigmas that end above zero (ComfyUI's SplitSigmas) end the run at that sigma, not at 0."""
    expert = get_expert("NoiseAdaptive")
    sigmas = torch.tensor([14.6, 3.0, 1.0])
    x = model.initial_noise(2, seed=3, sigma=14.6, dtype=torch.float64)
    events: list[dict] = []
    out = expert(model, x, sigmas, callback=events.append)
    ref_at_one = sample_dpmpp_2m(model, x, karras_sigmas(200, 1.0, 14.6).double()[:-1])
    assert model.relative_error(out, ref_at_one).max() < 0.05
    assert float(events[-1]["sigma"]) > 1.0


@pytest.mark.comfyui
def test_dpmpp_2m_matches_comfyui(model):
    """Parity with ComfyUI's own DPM-Solver++(2M), which BalancedMaster re-implements."""
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    sampling = pytest.importorskip("comfy.k_diffusion.sampling")
    sigmas = karras_sigmas(20, 0.0292, 14.61).double()
    x = model.initial_noise(2, seed=5, sigma=14.61, dtype=torch.float64)
    ours = get_expert("BalancedMaster")(model, x, sigmas, extra_args={"cond": 1, "cfg": 5.0})
    theirs = sampling.sample_dpmpp_2m(model, x, sigmas, extra_args={"cond": 1, "cfg": 5.0}, disable=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
