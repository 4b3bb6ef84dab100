"""The one step observer: the same stop rule and report for built-in loops and ComfyUI-style sampler
functions, the fidelity estimate at no extra model call, and the console progress bar.

Pure torch: the ComfyUI-style loop here is k-diffusion's ``sample_dpmpp_2m`` (the function ComfyUI
ships), wrapped exactly as the MoE Expert node wraps ComfyUI's (``expert_from_sampler_function``).
tests/test_comfy_stop_rule.py repeats the stop-step check with ComfyUI's own function.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import import_node_module

from moe_sampler.experts import get_expert, registered_experts
from moe_sampler.experts.analytic import AnalyticModel, PromptSpec, random_prompts
from moe_sampler.experts.base import CountingDenoiser
from moe_sampler.experts.dpm_solver import sample_dpmpp_2m
from moe_sampler.experts.observer import ConvergenceStop, StepObserver, convergence_min_steps, run_observed

expert_from_sampler_function = import_node_module("comfy_experts").expert_from_sampler_function

REPORT_FIELDS = {"nfe", "steps", "seconds", "stopped_early", "error_estimate", "estimate_features", "last_change"}


@torch.no_grad()
def k_diffusion_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """k-diffusion's ``sample_dpmpp_2m`` (Crowson; Lu et al. 2022), as ComfyUI ships it: no ``report``."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised
        else:
            r = (t + sigmas[i - 1].log()) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@pytest.fixture(scope="module")
def model():
    return AnalyticModel([PromptSpec(seed=3, n_modes=4, separation=1.5), PromptSpec(seed=8, anisotropy=10.0)])


def _start(model, expert, seed=1, dtype=torch.float64):
    sigmas = expert.sigmas(model.schedule())
    return model.initial_noise(2, seed=seed, sigma=float(sigmas[0]), dtype=dtype), sigmas


def _comfy_style_early_stopper():
    early = get_expert("EarlyStopper")
    return expert_from_sampler_function(k_diffusion_dpmpp_2m, "dpmpp_2m", "karras", early.descriptor.steps,
                                        "converged", make_sigmas=early.make_sigmas)


@pytest.mark.parametrize("cond, cfg", [(0, 1.0), (1, 5.0), (0, 9.0)])
def test_builtin_and_comfy_style_loops_stop_at_the_same_step(model, cond, cfg):
    """EarlyStopper (built-in loop) and dpmpp_2m/karras/30/converged built as the MoE Expert node
    builds it (k-diffusion's loop) stop at the same step, return the same prediction, same report."""
    early, comfy_style = get_expert("EarlyStopper"), _comfy_style_early_stopper()
    x, sigmas = _start(model, early)
    sigmas = sigmas.double()  # both loops in float64: only the formulas' rounding differs
    extra_args = {"cond": cond, "cfg": cfg}
    runs = []
    for expert in (early, comfy_style):
        report: dict = {}
        events: list[dict] = []
        out = expert(model, x.clone(), sigmas, extra_args=extra_args, callback=events.append, report=report)
        runs.append((out, report, events))
    (out_a, report_a, events_a), (out_b, report_b, events_b) = runs
    assert report_a["stopped_early"] and report_b["stopped_early"]
    assert report_a["steps"] == report_b["steps"] == len(events_a) == len(events_b) < early.descriptor.steps
    assert report_a["nfe"] == report_b["nfe"] == report_a["steps"]
    assert set(report_a) == set(report_b) >= REPORT_FIELDS
    torch.testing.assert_close(out_a, out_b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out_b, events_b[-1]["denoised"], rtol=0, atol=0)  # the prediction, not x
    assert report_a["error_estimate"] == pytest.approx(report_b["error_estimate"], rel=1e-6)
    remaining = report_a["estimate_features"]["remaining"]  # an early stop leaves a change still to come
    assert remaining > 0 and remaining == pytest.approx(report_b["estimate_features"]["remaining"], rel=1e-6)


def test_stop_rule_min_steps_follow_the_run_length():
    assert convergence_min_steps(30) == 12 and convergence_min_steps(1) == 2 and convergence_min_steps(50) == 20
    assert ConvergenceStop().rule(30).min_steps == 12 and ConvergenceStop(min_steps=5).rule(30).min_steps == 5
    with pytest.raises(ValueError, match="tol > 0"):
        ConvergenceStop(tol=0.0).rule(30)


def test_observer_never_stops_on_the_first_or_last_step():
    always = ConvergenceStop(tol=1e9, min_steps=1, max_sigma_ratio=1e9).rule(3)
    observer = StepObserver(None, 3, always)
    d = torch.ones(1, 4)
    observer({"x": d, "i": 0, "sigma": torch.tensor(2.0), "sigma_hat": torch.tensor(2.0), "denoised": d})
    with pytest.raises(Exception) as stop:
        observer({"x": d, "i": 1, "sigma": torch.tensor(1.0), "sigma_hat": torch.tensor(1.0), "denoised": 2 * d})
    assert stop.value.step == 1
    last = StepObserver(None, 2, ConvergenceStop(tol=1e9, min_steps=1, max_sigma_ratio=1e9).rule(2))
    last({"x": d, "i": 0, "sigma": torch.tensor(2.0), "sigma_hat": torch.tensor(2.0), "denoised": d})
    last({"x": d, "i": 1, "sigma": torch.tensor(1.0), "sigma_hat": torch.tensor(1.0), "denoised": 2 * d})


@pytest.mark.parametrize("name", [e.name for e in registered_experts(include_compat=False)])
def test_every_expert_reports_the_same_fields_at_no_extra_model_call(model, name):
    expert = get_expert(name)
    x, sigmas = _start(model, expert, dtype=torch.float32)
    extra_args = {"cond": 1, "cfg": 4.0, "seed": 3}
    counted = CountingDenoiser(model)
    plain = expert(counted, x, sigmas, extra_args=extra_args)
    report: dict = {}
    observed = expert(model, x, sigmas, extra_args=extra_args, report=report)
    assert set(report) >= REPORT_FIELDS
    assert report["nfe"] == counted.calls and torch.equal(plain, observed)
    assert report["error_estimate"] > 0 and math.isfinite(report["error_estimate"])
    features = report["estimate_features"]
    assert features["sigma_start"] == pytest.approx(float(sigmas[0]), rel=1e-6)
    assert features["local"] > 0 and features["first_order"] > 0 and features["scale"] > 0
    if report["stopped_early"]:  # the change the early stop left out is estimated, never zero
        assert math.isfinite(features["remaining"]) and features["remaining"] > 0
    else:
        assert features["remaining"] == 0.0  # the run reached its grid's last level


def test_estimate_follows_the_true_error(model):
    """More steps, smaller estimate; and the raw estimate lands within 10x of the true error."""
    prompts = random_prompts(3, seed=11)
    analytic = AnalyticModel(prompts)
    schedule = analytic.schedule()
    from moe_sampler.experts.builtin import karras_schedule

    for cond in range(len(prompts)):
        for cfg in (1.0, 7.5):
            x = analytic.initial_noise(1, seed=cond, sigma=schedule.sigma_max, dtype=torch.float64)
            reference = analytic.reference(x, schedule.sigma_max, cond=cond, cfg=cfg, rtol=1e-8)
            estimates, errors = [], []
            for steps in (8, 16, 32):
                report: dict = {}
                out = run_observed(sample_dpmpp_2m, analytic, x, karras_schedule(schedule, steps).double(),
                                   extra_args={"cond": cond, "cfg": cfg}, report=report)
                estimates.append(report["error_estimate"])
                errors.append(float(analytic.relative_error(out, reference, cond)))
            assert estimates == sorted(estimates, reverse=True), (estimates, errors)
            for estimate, error in zip(estimates, errors):
                assert error / 10 <= estimate <= error * 10, (estimates, errors)


def test_progress_bar_unless_disabled(model, capsys):
    expert = get_expert("SpeedDemon")
    x, sigmas = _start(model, expert, dtype=torch.float32)
    expert(model, x, sigmas, disable=False)
    shown = capsys.readouterr().err
    assert "10/10" in shown
    expert(model, x, sigmas, disable=True)
    get_expert("NoiseAdaptive")(model, x, get_expert("NoiseAdaptive").sigmas(model.schedule()), disable=True)
    assert capsys.readouterr().err == ""
    adaptive = get_expert("NoiseAdaptive")
    report: dict = {}
    adaptive(model, x, adaptive.sigmas(model.schedule()), disable=False, report=report)
    assert f"{report['nfe']}/{adaptive.descriptor.max_nfe}" in capsys.readouterr().err


def test_unknown_keyword_is_pythons_type_error(model):
    expert = get_expert("BalancedMaster")
    x, sigmas = _start(model, expert)
    with pytest.raises(TypeError, match="unexpected keyword argument 'eta'"):
        expert(model, x, sigmas, eta=1.0)


def test_a_callback_without_a_noise_level_reports_no_estimate(model):
    """ComfyUI's uni_pc calls back with x, i and denoised only: no estimate, no stop, no crash."""

    def no_sigma_loop(model_, x, sigmas, extra_args=None, callback=None, disable=None):
        for i in range(len(sigmas) - 1):
            denoised = model_(x, sigmas[i] * x.new_ones([x.shape[0]]), **(extra_args or {}))
            callback({"x": x, "i": i, "denoised": denoised})
            x = denoised + (sigmas[i + 1] / sigmas[i]) * (x - denoised)
        return x

    early = get_expert("EarlyStopper")
    expert = expert_from_sampler_function(no_sigma_loop, "uni_pc", "karras", 30, "converged",
                                          make_sigmas=early.make_sigmas)
    x, sigmas = _start(model, early)
    report: dict = {}
    out = expert(model, x, sigmas, report=report)
    assert torch.isfinite(out).all() and set(report) >= REPORT_FIELDS
    assert report["steps"] == report["nfe"] == 30 and not report["stopped_early"]
    assert report["error_estimate"] is None and report["estimate_features"] is None


def test_remaining_change_is_projected_to_the_planned_last_level():
    """``remaining``: the change still to come down to the grid's last positive level, exact when the
    prediction follows ``D(sigma) = a + c sigma^2``; 0 once the run reached that level."""
    from moe_sampler.experts.observer import FidelityEstimator, planned_end

    sigmas = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.0])
    assert planned_end(sigmas) == 0.25 and planned_end(torch.zeros(3)) is None
    a, c = torch.full((1, 8), 3.0), torch.linspace(-1.0, 1.0, 8).reshape(1, 8)
    estimator = FidelityEstimator(2.0, planned_end(sigmas))
    for sigma in sigmas[:3].tolist():  # an early stop at sigma = 1
        estimator.observe(a + 2 * c * sigma, sigma, a + c * sigma**2)
    out = a + c
    features = estimator.features(out)
    expected = float(c.square().mean().sqrt() * (1.0 - 0.25**2) / out.square().mean().sqrt())
    assert features["remaining"] == pytest.approx(expected, rel=1e-6)
    assert features["tail"] > features["remaining"] > 0  # the tail projects to 0, past the grid's end
    assert features["sigma_end"] == 1.0 and features["sigma_prev_end"] == 2.0
    assert features["last_change"] > 0 and features["local_plain"] >= features["local"] > 0
    # Both steps end at sigma / rms(D) of about 0.5 and 0.3, inside WINDOW: the per-step rms summed.
    assert features["local_window"] >= features["local_plain"]
    for sigma in sigmas[3:5].tolist():  # the run goes on to its planned end
        estimator.observe(a + 2 * c * sigma, sigma, a + c * sigma**2)
    assert estimator.features(a)["remaining"] == 0.0
    far = FidelityEstimator(2.0, 0.25)  # noise levels far above the prediction's rms: outside the window
    for sigma in sigmas[:3].tolist():
        far.observe(1e-3 * (a + 2 * c * sigma), sigma, 1e-3 * (a + c * sigma**2))
    assert far.features(1e-3 * out)["local_window"] == 0.0 and far.features(1e-3 * out)["local"] > 0
