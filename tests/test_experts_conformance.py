"""The loop contract, checked on every registered expert with no per-expert branches.

Each test is parametrized over ``registered_experts()`` (compatibility experts included) and runs
the expert on its own schedule with a cheap analytic model (16 dims, 2 modes per prompt), so the
1000-step compatibility experts stay fast.
"""

from __future__ import annotations

import pytest
import torch

from moe_sampler.experts import CALLBACK_KEYS, DESCRIPTOR_DIM, registered_experts
from moe_sampler.experts.analytic import AnalyticModel, PromptSpec
from moe_sampler.experts.observer import run_observed

EXPERTS = registered_experts()
IDS = [e.name for e in EXPERTS]
PROMPTS = [PromptSpec(seed=11, n_modes=2), PromptSpec(seed=12, n_modes=1, anisotropy=8.0)]
BATCH = 2


class Counting:
    """Counts model calls made through it (independently of ``Expert``'s own counter)."""

    def __init__(self, model):
        self.model = model
        self.calls = 0

    def __call__(self, x, sigma, **extra_args):
        self.calls += 1
        return self.model(x, sigma, **extra_args)


@pytest.fixture(scope="module")
def flat_model() -> AnalyticModel:
    return AnalyticModel(PROMPTS, shape=(16,), background_modes=2)


@pytest.fixture(scope="module")
def latent_model() -> AnalyticModel:
    return AnalyticModel(PROMPTS, shape=(4, 8, 8), background_modes=2)


@pytest.fixture(params=EXPERTS, ids=IDS)
def expert(request):
    return request.param


def _start(model: AnalyticModel, expert, seed: int = 0, dtype=torch.float32, denoise: float = 1.0):
    sigmas = expert.sigmas(model.schedule(), denoise)
    return model.initial_noise(BATCH, seed, float(sigmas[0]), dtype), sigmas


def test_descriptor_matches_schedule(expert, flat_model):
    d = expert.descriptor
    assert len(expert.sigmas(flat_model.schedule())) == d.steps + 1
    assert d.max_nfe >= 1 and d.order > 0 and d.calls_per_step >= 1
    features = d.to_features()
    assert features.shape == (DESCRIPTOR_DIM,) and torch.isfinite(features).all()


@pytest.mark.parametrize(
    "dtype, latent", [(torch.float32, False), (torch.float64, False), (torch.float32, True)], ids=["f32", "f64", "4d"]
)
def test_contract(expert, flat_model, latent_model, dtype, latent):
    """Shape and dtype kept, finite, one standard callback per step, NFE within the descriptor's cap."""
    model = latent_model if latent else flat_model
    x, sigmas = _start(model, expert, dtype=dtype)
    events: list[dict] = []
    report: dict = {}
    out = expert(model, x, sigmas, extra_args={"seed": 5, "cond": 1, "cfg": 3.0}, callback=events.append,
                 report=report)
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert len(events) == report["steps"] >= 1
    assert [e["i"] for e in events] == list(range(len(events)))
    for event in events:
        assert set(event) == CALLBACK_KEYS
        assert event["x"].shape == x.shape and event["denoised"].shape == x.shape
    sigmas_seen = [float(e["sigma"]) for e in events]
    assert sigmas_seen == sorted(sigmas_seen, reverse=True) and sigmas_seen[0] == pytest.approx(float(sigmas[0]))
    assert 1 <= report["nfe"] <= expert.descriptor.max_nfe
    assert report["seconds"] >= 0


def test_img2img_schedule_respects_nfe(expert, flat_model):
    """With denoise < 1 the schedule starts lower, keeps the step budget, and the cap still holds."""
    x, sigmas = _start(flat_model, expert, denoise=0.5)
    full = expert.sigmas(flat_model.schedule())
    assert len(sigmas) == expert.descriptor.steps + 1 and float(sigmas[0]) < float(full[0])
    report: dict = {}
    out = expert(flat_model, x, sigmas, extra_args={"seed": 1}, report=report)
    assert torch.isfinite(out).all() and report["nfe"] <= expert.descriptor.max_nfe


@pytest.mark.parametrize("length", [0, 1])
def test_empty_schedule_is_a_no_op(expert, flat_model, length):
    x, sigmas = _start(flat_model, expert)
    counting = Counting(flat_model)
    report: dict = {}
    events: list[dict] = []
    out = expert(counting, x, sigmas[:length], callback=events.append, report=report)
    raw = run_observed(expert.sampler, counting, x, sigmas[:length], extra_args={}, callback=events.append,
                       stop=expert.stop, **expert.options)
    assert torch.equal(out, x) and torch.equal(raw, x)
    assert counting.calls == 0 and report["nfe"] == 0 and report["steps"] == 0 and events == []


def test_same_seed_same_output_and_honest_stochastic_flag(expert, flat_model):
    x, sigmas = _start(flat_model, expert)
    first = expert(flat_model, x, sigmas, extra_args={"seed": 7})
    again = expert(flat_model, x.clone(), sigmas, extra_args={"seed": 7})
    other = expert(flat_model, x.clone(), sigmas, extra_args={"seed": 8})
    assert torch.equal(first, again)
    # A deterministic expert ignores the seed; a stochastic one must actually use it.
    assert torch.equal(first, other) != expert.descriptor.stochastic


def test_does_not_touch_global_rng(expert, flat_model):
    x, sigmas = _start(flat_model, expert)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    expert(flat_model, x, sigmas, extra_args={"seed": 2})
    assert torch.equal(torch.rand(3), expected)


def test_plain_k_diffusion_call(expert, flat_model):
    """Called the way comfy.samplers.KSAMPLER calls a sampler function, with and without the wrapper."""
    x, sigmas = _start(flat_model, expert)
    seen: list[tuple[int, tuple]] = []

    def k_callback(info: dict) -> None:
        seen.append((info["i"], tuple(info["denoised"].shape)))

    wrapped = expert(flat_model, x, sigmas, extra_args=dict(seed=3), callback=k_callback, disable=True)
    # The loop alone (its stop rule, if any, acts through the callback: the observer applies it).
    raw = run_observed(expert.sampler, flat_model, x, sigmas, extra_args=dict(seed=3), callback=k_callback,
                       disable=True, stop=expert.stop, **expert.options)
    assert torch.equal(wrapped, raw)
    assert len(seen) % 2 == 0 and seen[: len(seen) // 2] == seen[len(seen) // 2:]
    assert not x.requires_grad and not wrapped.requires_grad


def test_input_not_modified(expert, flat_model):
    x, sigmas = _start(flat_model, expert)
    x_before, sigmas_before = x.clone(), sigmas.clone()
    expert(flat_model, x, sigmas, extra_args={"seed": 4})
    assert torch.equal(x, x_before) and torch.equal(sigmas, sigmas_before)
