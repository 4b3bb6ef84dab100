"""A table of invalid inputs, each with the exception type and a fragment of its message.

Call-level rows run against every registered expert: validation happens before any model call,
so the table is cheap and no expert can slip past it.
"""

from __future__ import annotations

import re

import pytest
import torch

from moe_sampler.experts import ExpertDescriptor, UnknownExpertError, get_expert, registered_experts
from moe_sampler.experts.adaptive import sample_noise_adaptive
from moe_sampler.experts.analytic import AnalyticModel, PromptSpec
from moe_sampler.experts.dpm_solver import sample_dpmpp_2m, sample_dpmpp_3m
from moe_sampler.experts.early_stop import sample_early_stop

MODEL = AnalyticModel([PromptSpec(seed=3, n_modes=1)], shape=(8,), background_modes=1)
SIGMAS = torch.tensor([10.0, 1.0, 0.1, 0.0])
X = torch.randn(2, 8)


def _descriptor(steps: int, schedule: str = "karras", stop_rule: str = "none") -> ExpertDescriptor:
    return ExpertDescriptor(name="Bad", solver="euler", order=1, calls_per_step=1, steps=steps, schedule=schedule,
                            stochastic=False, stop_rule=stop_rule)


def _with_nan() -> torch.Tensor:
    x = X.clone()
    x[0, 3] = float("nan")
    return x


def _with_inf() -> torch.Tensor:
    x = X.clone()
    x[1, 0] = float("inf")
    return x


# (id, x, sigmas, exception, message fragment): passed to every registered expert.
CALL_CASES = [
    ("sigmas-increasing", X, torch.tensor([0.1, 1.0, 10.0, 0.0]), ValueError, "strictly decreasing"),
    ("sigmas-repeated", X, torch.tensor([10.0, 1.0, 1.0, 0.0]), ValueError, "strictly decreasing"),
    ("sigmas-negative", X, torch.tensor([1.0, -1.0]), ValueError, "non-negative"),
    ("sigmas-nan", X, torch.tensor([float("nan"), 1.0, 0.0]), ValueError, "finite"),
    ("sigmas-2d", X, SIGMAS[None], ValueError, "sigmas must be 1-D"),
    ("sigmas-integer", X, torch.tensor([10, 1, 0]), TypeError, "sigmas must be a floating-point"),
    ("x-nan", _with_nan(), SIGMAS, ValueError, "NaN or Inf"),
    ("x-inf", _with_inf(), SIGMAS, ValueError, "NaN or Inf"),
    ("x-integer", torch.ones(2, 8, dtype=torch.int64), SIGMAS, TypeError, "floating-point"),
    ("x-no-batch-dim", torch.randn(8), SIGMAS, ValueError, "batch dimension"),
    ("x-not-a-tensor", [[0.0] * 8], SIGMAS, TypeError, "torch tensors"),
]

# (id, thunk, exception, message fragment): construction, lookup, schedule and option errors.
OTHER_CASES = [
    ("steps-zero", lambda: _descriptor(0), ValueError, "steps must be >= 1"),
    ("steps-negative", lambda: _descriptor(-5), ValueError, "steps must be >= 1"),
    ("schedule-unknown", lambda: _descriptor(10, schedule="cosine"), ValueError, "schedule must be one of"),
    ("stop-rule-unknown", lambda: _descriptor(10, stop_rule="never"), ValueError, "stop_rule must be one of"),
    ("expert-unknown", lambda: get_expert("NoSuchExpert"), UnknownExpertError, "unknown expert 'NoSuchExpert'"),
    ("expert-path-like", lambda: get_expert("../BalancedMaster"), UnknownExpertError, "unknown expert"),
    ("denoise-zero", lambda: get_expert("BalancedMaster").sigmas(MODEL.schedule(), 0.0), ValueError,
     "denoise must be in (0, 1]"),
    ("denoise-negative", lambda: get_expert("SpeedDemon").sigmas(MODEL.schedule(), -0.5), ValueError,
     "denoise must be in (0, 1]"),
    ("denoise-above-one", lambda: get_expert("QualityMaster").sigmas(MODEL.schedule(), 1.5), ValueError,
     "denoise must be in (0, 1]"),
    ("2m-unknown-option", lambda: sample_dpmpp_2m(MODEL, X, SIGMAS, eta=1.0), TypeError, "unexpected keyword argument 'eta'"),
    ("3m-unknown-option", lambda: sample_dpmpp_3m(MODEL, X, SIGMAS, s_noise=1.0), TypeError, "unexpected keyword argument"),
    ("early-stop-tol-zero", lambda: sample_early_stop(MODEL, X, SIGMAS, tol=0.0), ValueError, "tol > 0"),
    ("early-stop-min-steps", lambda: sample_early_stop(MODEL, X, SIGMAS, min_steps=0), ValueError, "min_steps >= 1"),
    ("adaptive-rtol-zero", lambda: sample_noise_adaptive(MODEL, X, SIGMAS, rtol=0.0), ValueError, "rtol > 0"),
    ("adaptive-cap-zero", lambda: sample_noise_adaptive(MODEL, X, SIGMAS, max_nfe=0), ValueError, "max_nfe >= 1"),
    ("adaptive-unknown-option", lambda: sample_noise_adaptive(MODEL, X, SIGMAS, order=3), TypeError,
     "unexpected keyword argument 'order'"),
]


@pytest.mark.parametrize("expert", registered_experts(), ids=lambda e: e.name)
@pytest.mark.parametrize("x, sigmas, error, fragment", [c[1:] for c in CALL_CASES], ids=[c[0] for c in CALL_CASES])
def test_invalid_call(expert, x, sigmas, error, fragment):
    calls = []

    def model(x_, sigma, **kwargs):
        calls.append(sigma)
        return MODEL(x_, sigma, **kwargs)

    with pytest.raises(error, match=re.escape(fragment)):
        expert(model, x, sigmas, extra_args={"seed": 0})
    assert calls == [], "validation must happen before the first model call"


@pytest.mark.parametrize("thunk, error, fragment", [c[1:] for c in OTHER_CASES], ids=[c[0] for c in OTHER_CASES])
def test_invalid_other(thunk, error, fragment):
    with pytest.raises(error) as info:
        thunk()
    assert fragment in str(info.value)


def test_unknown_expert_lists_the_registered_ones():
    with pytest.raises(UnknownExpertError) as info:
        get_expert("Nope")
    assert all(e.name in str(info.value) for e in registered_experts())
    assert isinstance(info.value, KeyError)
