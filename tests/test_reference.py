"""The reference that grades experts in ComfyUI (training and audits), without ComfyUI.

- :func:`moe_sampler.experts.reference.dormand_prince_sampler` (a k-diffusion sampler loop) is
  the generic :class:`~moe_sampler.router.environment.DormandPrince` reference: the same result
  on the analytic model, with fewer model calls (the last stage is reused);
- it never exceeds its call cap, and a capped run says so;
- the ComfyUI trainer and the sampler's audits build this reference, not a solver of the
  experts' family, and ``reference_steps`` sets its call budget;
- ``check_sizes_fit`` asks ComfyUI's memory estimate for the model's own latent (16 channels,
  another spatial factor), not a 4-channel SD1.5 latent.
"""

from __future__ import annotations

import math
import random
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from helpers import import_node_module

environment_module = import_node_module("comfy_environment")
online_learning = import_node_module("online_learning")

from moe_sampler.experts import default_pool  # noqa: E402
from moe_sampler.experts.analytic import AnalyticModel, PromptSpec  # noqa: E402
from moe_sampler.experts.base import CountingDenoiser  # noqa: E402
from moe_sampler.experts.reference import (AUDIT_SHARE, AuditBudget, audit_sigmas, dormand_prince_sampler,  # noqa: E402
                                           reference_expert)
from moe_sampler.router.environment import DormandPrince  # noqa: E402


@pytest.fixture(scope="module")
def analytic():
    model = AnalyticModel([PromptSpec(seed=3, n_modes=3, anisotropy=8.0)], shape=(4, 4, 4))
    schedule = model.schedule()
    return model, schedule


def test_the_sampler_loop_is_the_dormand_prince_reference(analytic):
    model, schedule = analytic
    notes: list = []
    expert = reference_expert(400, notes=notes)
    sigmas = expert.sigmas(schedule)
    assert float(sigmas[0]) == pytest.approx(schedule.sigma_max) and float(sigmas[-2]) == pytest.approx(schedule.sigma_min)
    args = {"cond": 0, "cfg": 5.0}
    x = model.initial_noise(1, 11, float(sigmas[0])).double()
    steps_seen = []
    out, run = expert.run(model, x.clone(), sigmas, extra_args={**args, "seed": 11},
                          callback=lambda info: steps_seen.append(info))
    counted = CountingDenoiser(model)
    generic = DormandPrince(1e-5)(counted, x, float(sigmas[0]), args, schedule)
    assert torch.allclose(out, generic, rtol=0, atol=1e-12), (out - generic).abs().max()
    assert run.nfe < counted.calls  # 6 calls per step instead of 7
    assert notes == [{"calls": run.nfe, "steps": len(steps_seen), "sigma_reached": pytest.approx(schedule.sigma_min),
                      "capped": False}]
    assert run.steps == len(steps_seen) > 5
    assert all(set(info) >= {"x", "i", "sigma", "denoised"} for info in steps_seen)
    assert [info["i"] for info in steps_seen] == list(range(len(steps_seen)))
    sigmas_seen = [float(info["sigma"]) for info in steps_seen]
    assert sigmas_seen == sorted(sigmas_seen, reverse=True)
    # Far more accurate than the best expert of the pool, against a tight solve.
    exact = DormandPrince(1e-10)(model, x, float(sigmas[0]), args, schedule)
    reference_error = float(model.relative_error(out, exact))
    best = min(float(model.relative_error(e.run(model, x.clone(), e.sigmas(schedule),
                                                extra_args={**args, "seed": 11})[0], exact))
               for e in default_pool())
    assert reference_error * 10 < best, (reference_error, best)


def test_float32_latents_call_the_model_in_float32(analytic):
    model, schedule = analytic
    dtypes = []

    def denoiser(x, sigma, **kw):
        dtypes.append((x.dtype, sigma.dtype))
        return model(x, sigma, **kw)

    expert = reference_expert(400)
    sigmas = expert.sigmas(schedule)
    x = model.initial_noise(1, 11, float(sigmas[0])).float()
    out = expert(denoiser, x, sigmas, extra_args={"cond": 0, "cfg": 5.0})
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert set(dtypes) == {(torch.float32, torch.float32)}


@pytest.mark.parametrize("max_calls", [2, 9, 40])
def test_the_call_cap_holds_and_a_capped_run_says_so(analytic, max_calls, caplog):
    model, schedule = analytic
    notes: list = []
    expert = reference_expert(max_calls, notes=notes)
    sigmas = expert.sigmas(schedule)
    x = model.initial_noise(1, 11, float(sigmas[0])).double()
    with caplog.at_level("WARNING"):
        out, run = expert.run(model, x, sigmas, extra_args={"cond": 0, "cfg": 5.0})
    assert run.nfe <= max_calls and run.finite
    assert notes[-1]["capped"] and notes[-1]["calls"] == run.nfe
    if max_calls >= 9:  # calls left for at least one equal step to the end
        assert notes[-1]["sigma_reached"] == schedule.sigma_min
    else:  # only the final denoise: from where step control stopped
        assert notes[-1]["sigma_reached"] > schedule.sigma_min
    assert "did not finish" in caplog.text


def test_a_direct_call_checks_its_budget(analytic):
    model, schedule = analytic
    with pytest.raises(ValueError, match="max_calls"):
        dormand_prince_sampler(model, torch.zeros(1, 4, 4, 4), torch.tensor([1.0, 0.1, 0.0]), max_calls=0)
    with pytest.raises(ValueError, match="max_calls"):
        reference_expert(1)


def test_trainer_and_audits_use_the_dormand_prince_reference():
    expert = environment_module.reference_expert(50)
    assert expert.descriptor.solver == "dopri5" and expert.sampler is dormand_prince_sampler
    assert expert.options["max_calls"] == 200 and expert.descriptor.steps == 50
    audit = online_learning._reference_expert(environment_module.REFERENCE_STEPS)
    assert audit.sampler is dormand_prince_sampler
    assert audit.options["max_calls"] == 4 * environment_module.REFERENCE_STEPS
    with pytest.raises(environment_module.TrainingInputError, match="^reference_steps"):
        environment_module.reference_expert(0)


def test_an_img2img_audit_starts_where_the_expert_started(analytic):
    """Each schedule truncates at its own level for img2img: the audit's reference must solve the
    expert's own initial value problem, or it grades the expert against another image."""
    model, schedule = analytic
    reference = reference_expert(400)
    starts = {float(e.sigmas(schedule, 0.6)[0]): e for e in default_pool()}
    expert = next(e for start, e in starts.items() if start != float(reference.sigmas(schedule, 0.6)[0]))
    for denoise in (1.0, 0.6, 0.3):
        own = expert.sigmas(schedule, denoise)
        sigmas = audit_sigmas(reference, own, schedule, denoise)
        assert float(sigmas[0]) == float(own[0]) and float(sigmas[-1]) == 0.0
        assert float(sigmas[sigmas > 0][-1]) == pytest.approx(schedule.sigma_min)
        assert bool((sigmas[1:] < sigmas[:-1]).all())
    x = model.initial_noise(1, 11, 1.0).double()
    own = expert.sigmas(schedule, 0.6)
    out, _ = reference.run(model, x * float(own[0]), audit_sigmas(reference, own, schedule, 0.6),
                           extra_args={"cond": 0, "cfg": 5.0})
    assert torch.isfinite(out).all()
    below = torch.tensor([schedule.sigma_min * 0.5, 0.0])  # an expert starting below the reference's end
    assert torch.equal(audit_sigmas(reference, below, schedule, 0.6), reference.sigmas(schedule, 0.6))


@pytest.mark.parametrize(("expert_calls", "audit_calls"), [(30, 400), (35, 90), (10, 400)])
def test_the_audit_budget_keeps_audits_within_their_share(expert_calls, audit_calls):
    """2% audits of a 400-call reference after 30-call runs would be 21% of the calls: the budget
    holds them at 4% (plus at most one audit) and, keeping skipped coins, close to it; without a
    budget the share is what the coin gives."""
    rng = random.Random(1)
    budgeted, free = AuditBudget(AUDIT_SHARE), AuditBudget(None)
    probabilities = []
    for _ in range(20_000):
        for budget in (budgeted, free):
            draw = budget.draw("m", 0.02, rng)
            assert draw.probability in (0.0, 0.02, 1.0) and draw.audit <= (draw.probability > 0)
            if budget is budgeted:
                probabilities.append(draw.probability)
            budget.note("m", expert_calls, audit_calls if draw.audit else None)
    expert, audits, n = budgeted.calls("m")
    assert audits / (expert + audits) <= AUDIT_SHARE + audit_calls / (expert + audits)
    assert budgeted.share_of("m") > 0.9 * min(AUDIT_SHARE, 0.02 * audit_calls / (expert_calls + 0.02 * audit_calls))
    uncapped = 0.02 * audit_calls / (expert_calls + 0.02 * audit_calls)
    assert free.share_of("m") == pytest.approx(uncapped, rel=0.2)
    assert n >= 1 and 0 < sum(probabilities) / len(probabilities) <= 0.02


def test_the_audit_budget_reads_only_history():
    budget = AuditBudget(0.04)
    first = budget.draw("m", 1.0)
    assert first.audit and first.share == 0.0  # the first audit's cost is unknown: allowed
    budget.note("m", 30, 400)
    assert not budget.allows("m") and budget.draw("m", 1.0).skipped
    budget.note("m", 9_600)  # 400 calls of audits in 10,030: room for one more 400-call audit? 800 > 4% of 10,430
    assert not budget.allows("m")
    budget.note("m", 10_000)  # 800 <= 4% of 20,430
    kept = budget.draw("m", 1e-12)  # the coin kept from the skipped run is due: probability 1
    assert kept.audit and kept.probability == 1.0 and not kept.skipped
    assert budget.draw("m", 1e-12) == kept  # no audit ran yet (a fallback, a failure, Cancel): still due
    budget.note("m", 30, 400)  # the audit ran: the kept coin is spent
    assert not budget.draw("m", 1e-12).audit
    assert budget.draw("m", 0.0) == budget.draw("m", 0.0)  # rate 0: never audited, nothing drawn
    with pytest.raises(ValueError, match="^audit_rate"):
        budget.draw("m", -0.1)
    with pytest.raises(ValueError, match="share"):
        AuditBudget(0.0)
    with pytest.raises(ValueError, match="first_cost"):
        AuditBudget(0.04, first_cost=-1)


def test_counted_at_the_cap_the_first_audit_never_overshoots():
    """The sampler counts a model's first audit at the reference's cap: it waits for cap / share
    of calls, and the share stays within the budget from the first run on."""
    budget = AuditBudget(0.04, first_cost=400)
    assert not budget.draw("m", 1.0).audit  # 0 calls so far: a 400-call audit would be all of them
    budget.note("m", 9_000)
    assert not budget.allows("m")
    budget.note("m", 600)  # 400 <= 4% of 10,000
    assert budget.draw("m", 1.0).audit  # the coin kept from the first run
    budget.note("m", 30, 90)  # the reference needed 90 calls: the next audits are counted at 90
    assert budget.share_of("m") <= 0.04
    rng = random.Random(3)
    for _ in range(5_000):
        draw = budget.draw("m", 0.02, rng)
        budget.note("m", 30, 90 if draw.audit else None)
        assert budget.share_of("m") <= 0.04 + 1e-9


def _fake_comfy(monkeypatch, free_bytes):
    mm = types.ModuleType("comfy.model_management")
    mm.get_free_memory = lambda device=None: free_bytes
    mm.get_total_memory = lambda device=None: free_bytes
    mm.get_torch_device = lambda: torch.device("cpu")
    comfy = types.ModuleType("comfy")
    comfy.model_management = mm
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)


class Flux2:  # the name is how latent_layout knows v0.8.0's 16x-downscaling formats
    latent_channels, latent_dimensions = 128, 2


class SD3:
    latent_channels, latent_dimensions = 16, 2


@pytest.mark.parametrize(("latent_format", "expected"), [
    (SD3(), [[1, 16, 64, 64], [1, 16, 96, 128]]),
    (Flux2(), [[1, 128, 32, 32], [1, 128, 48, 64]]),
    (None, [[1, 4, 64, 64], [1, 4, 96, 128]]),
])
def test_check_sizes_fit_estimates_the_models_own_latent(monkeypatch, latent_format, expected):
    _fake_comfy(monkeypatch, 8 * 2**30)
    shapes = []

    def memory_required(shape):
        shapes.append(shape)
        return math.prod(shape) * 1024  # bytes per latent element: channels count

    model = SimpleNamespace(model=SimpleNamespace(memory_required=memory_required), load_device=torch.device("cpu"),
                            get_model_object=lambda name: latent_format if name == "latent_format" else None)
    environment_module.check_sizes_fit(model, [(512, 512), (1024, 768)])
    assert shapes == expected
    # 16 channels need 4x what a 4-channel estimate would say: here that is what does not fit.
    if isinstance(latent_format, SD3):
        _fake_comfy(monkeypatch, 1024 * 64 * 64 * 8)  # twice a 4-channel 512x512, half a 16-channel one
        with pytest.raises(environment_module.TrainingInputError, match="^sizes: 512x512 needs"):
            environment_module.check_sizes_fit(model, [(512, 512)])
