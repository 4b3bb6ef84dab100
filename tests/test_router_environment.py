"""The environments: AnalyticEnvironment's reproducible contexts, disjoint splits and outcomes
measured against the exact reference; the generic DenoiserEnvironment giving the same outcomes
on the analytic model, sharing img2img references on a start grid, and training a router on
any cond/uncond denoiser."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from moe_sampler.experts import get_expert
from moe_sampler.experts.analytic import REFERENCE_SIGMA_END
from moe_sampler.router.environment import (
    AnalyticEnvironment,
    Conditions,
    DenoiserEnvironment,
    DormandPrince,
    PromptContext,
    PromptContexts,
)
from moe_sampler.router.features import STATE_DIM

SMALL = Conditions(shapes=((64,),), img2img_fraction=0.5)


def test_contexts_are_reproducible_and_splits_differ():
    a = AnalyticEnvironment("train", seed=3, n_models=4, conditions=SMALL, pool_size=20)
    b = AnalyticEnvironment("train", seed=3, n_models=4, conditions=SMALL, pool_size=20)
    held = AnalyticEnvironment("heldout", seed=3, n_models=4, conditions=SMALL, pool_size=20)
    assert a.contexts == b.contexts
    assert {p.seed for m in a.models for p in m.prompts}.isdisjoint({p.seed for m in held.models for p in m.prompts})
    assert not {c.seed for c in a.contexts} & {c.seed for c in held.contexts}
    assert a.sample_context(random.Random(1)) == b.sample_context(random.Random(1))
    assert any(c.denoise < 1 for c in a.contexts) and any(c.cfg > 1 for c in a.contexts)
    state = a.state(a.contexts[0], priority=0.25)
    assert state.shape == (STATE_DIM,) and state.abs().max() < 2


def test_outcomes_follow_the_reference_and_are_cached():
    env = AnalyticEnvironment("train", seed=0, n_models=2, conditions=SMALL)
    context = dataclasses.replace(env.sample_context(random.Random(0)), cfg=3.0, denoise=1.0)
    cheap, dear = get_expert("SpeedDemon"), get_expert("QualityMaster")
    first = env.evaluate(context, [cheap, dear])
    assert [o.expert for o in first] == ["SpeedDemon", "QualityMaster"]
    assert all(o.success and 0 <= o.quality <= 1 and math.isfinite(o.relative_error) for o in first)
    assert first[0].nfe == 10 and first[1].nfe == 41
    assert first[1].relative_error < first[0].relative_error
    assert env.evaluate(context, [dear])[0] is first[1]  # cached, not re-run


def test_a_failing_expert_is_an_unsuccessful_outcome():
    def explode(model, x, sigmas, **_):
        raise RuntimeError("boom")

    base = get_expert("SpeedDemon")
    broken = dataclasses.replace(base, descriptor=dataclasses.replace(base.descriptor, name="Broken"), sampler=explode)
    env = AnalyticEnvironment("train", seed=0, n_models=1, conditions=SMALL)
    outcome = env.evaluate(env.sample_context(random.Random(2)), [broken])[0]
    assert not outcome.success and outcome.quality == 0.0 and outcome.nfe == 10


def test_img2img_starts_from_a_noised_data_sample():
    env = AnalyticEnvironment("train", seed=0, n_models=1, conditions=SMALL)
    context = dataclasses.replace(env.sample_context(random.Random(0)), denoise=0.5)
    x, reference = env.start(context, 2.0)
    noise_only = env.models[0].initial_noise(1, context.seed, 2.0)
    assert not torch.allclose(x, noise_only) and reference.shape == x.shape


# ------------------------------------------------------------------ the generic core, on any denoiser


class AnalyticSource:
    """The few lines a user writes to put a denoiser into the generic environment: here the
    analytic model's prompts, cfg, seeds and img2img starts, with the analytic context type."""

    def __init__(self, env: AnalyticEnvironment) -> None:
        self.env = env

    def sample_context(self, rng):
        return self.env.sample_context(rng)

    def state(self, context, priority):
        return self.env.state(context, priority)

    def latent_shape(self, context):
        return (context.batch, *self.env.models[context.model_index].shape)

    def extra_args(self, context):
        return {"cond": context.cond, "cfg": context.cfg}

    def clean_latent(self, context):
        if context.denoise >= 1:
            return None
        g = torch.Generator().manual_seed(context.seed + 1)
        return self.env.models[context.model_index].cond_mixtures[context.cond].sample(context.batch, g)

    def relative_error(self, context, x, reference):
        return self.env.models[context.model_index].relative_error(x, reference, cond=context.cond)


def test_the_generic_environment_gives_the_analytic_environments_outcomes():
    """Same contexts, same seeds: a DenoiserEnvironment on one analytic model (with a user-written
    source and the Dormand-Prince reference) measures exactly what AnalyticEnvironment does,
    img2img included."""
    analytic = AnalyticEnvironment("heldout", seed=4, n_models=1, conditions=SMALL, pool_size=6)
    assert any(c.denoise < 1 for c in analytic.contexts) and any(c.denoise == 1 for c in analytic.contexts)
    generic = DenoiserEnvironment(analytic.models[0], AnalyticSource(analytic),
                                  DormandPrince(analytic.rtol, sigma_end=REFERENCE_SIGMA_END))
    pool = [get_expert("SpeedDemon"), get_expert("BalancedMaster"), get_expert("NoiseAdaptive")]
    for context in analytic.contexts:
        assert torch.equal(generic.state(context, 0.3), analytic.state(context, 0.3))
        a, b = analytic.evaluate(context, pool), generic.evaluate(context, pool)
        assert [(o.relative_error, o.quality, o.nfe, o.success) for o in a] == \
               [(o.relative_error, o.quality, o.nfe, o.success) for o in b]
    assert generic.calls == analytic.calls and generic.calls["reference"] > 0


def test_references_are_counted_and_a_start_grid_shares_them():
    context = dataclasses.replace(AnalyticEnvironment("train", seed=0, n_models=1, conditions=SMALL)
                                  .sample_context(random.Random(0)), denoise=0.5)
    pool = [get_expert(name) for name in ("SpeedDemon", "BalancedMaster", "QualityMaster", "EarlyStopper")]
    exact = AnalyticEnvironment("train", seed=0, n_models=1, conditions=SMALL, start_grid=None)
    shared = AnalyticEnvironment("train", seed=0, n_models=1, conditions=SMALL, start_grid=4)
    exact.evaluate(context, pool)
    outcomes = shared.evaluate(context, pool)
    starts = {float(shared.expert_sigmas(context, e)[0]) for e in pool}
    assert len(exact._references) == len({float(e.sigmas(exact.schedule_for(context), 0.5)[0]) for e in pool}) > 1
    assert len(shared._references) == len(starts) < len(exact._references)
    assert all(abs(math.log10(s) * 4 - round(math.log10(s) * 4)) < 1e-5 for s in starts)  # on the grid (float32)
    assert shared.calls["reference"] < exact.calls["reference"]
    assert shared.calls["experts"] == sum(o.nfe for o in outcomes)
    assert 0 < shared.reference_share < exact.reference_share < 1
    # Text-to-image starts are never moved.
    t2i = dataclasses.replace(context, denoise=1.0)
    assert torch.equal(shared.expert_sigmas(t2i, pool[0]), pool[0].sigmas(shared.schedule_for(t2i)))


def _embedding_denoiser():
    """A denoiser that takes cond/uncond embeddings: a Gaussian data model whose mean is a fixed
    projection of the mean embedding, with classifier-free guidance."""
    g = torch.Generator().manual_seed(0)
    projection = torch.randn(16, 2 * 6 * 6, generator=g) * 0.3

    def denoiser(x, sigma, cond=None, uncond=None, cfg=1.0, **_):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)

        def d(c):
            mean = (c.mean(dim=(0, 1)).to(x.dtype) @ projection.to(x.dtype)).reshape(1, 2, 6, 6)
            return (x + sigma ** 2 * mean) / (1 + sigma ** 2)

        out = d(cond)
        return out if uncond is None or cfg == 1.0 else d(uncond) + cfg * (out - d(uncond))

    return denoiser


def test_prompt_contexts_train_a_router_on_any_denoiser():
    from moe_sampler.experts.base import ModelSchedule
    from moe_sampler.router.model import Router
    from moe_sampler.router.trainer import MoERLTrainer

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randn(1, 5, 16, generator=g) for _ in range(3)]
    images = torch.randn(4, 2, 6, 6, generator=g)
    source = PromptContexts(prompts, torch.zeros(1, 5, 16), (2, 6, 6), cfgs=(1.0, 4.0), img2img_fraction=0.5,
                            images=images)
    env = DenoiserEnvironment(_embedding_denoiser(), source, schedule=ModelSchedule(0.03, 14.6), start_grid=10)
    rng = random.Random(0)
    contexts = [env.sample_context(rng) for _ in range(6)]
    assert any(c.denoise < 1 for c in contexts) and any(c.denoise == 1 for c in contexts)
    state = env.state(contexts[0], 0.5)
    assert state.shape == (STATE_DIM,) and state[50] == 2 / 16 and state[38] == 1.0  # 2 channels, has negative
    outcomes = env.evaluate(contexts[0], [get_expert("SpeedDemon"), get_expert("QualityMaster")])
    assert all(o.success for o in outcomes) and outcomes[1].relative_error < outcomes[0].relative_error
    result = MoERLTrainer(env, Router.default(), [get_expert("SpeedDemon"), get_expert("BalancedMaster")],
                          seed=0).train(3)
    assert result.episodes == 3 and all(math.isfinite(r) for r in result.rewards)
    fixed = PromptContexts(prompts, None, (2, 6, 6), relative_error=lambda x, ref: torch.full((len(x),), 0.01))
    outcome = DenoiserEnvironment(_embedding_denoiser(), fixed, schedule=ModelSchedule(0.03, 14.6)).evaluate(
        PromptContext(0, 1.0, 5), [get_expert("SpeedDemon")])[0]
    assert outcome.relative_error == pytest.approx(0.01)  # the source's error measure is used
    with pytest.raises(ValueError, match="images"):
        PromptContexts(prompts, None, (2, 6, 6), img2img_fraction=0.5)
    with pytest.raises(ValueError, match="state_conditioning"):
        PromptContexts([0, 1], None, (2, 6, 6))  # labels need the tensors the state reads


def test_the_fixed_step_reference_agrees_with_dormand_prince():
    from moe_sampler.experts.base import CountingDenoiser
    from moe_sampler.router.environment import RungeKutta4

    env = AnalyticEnvironment("train", seed=0, n_models=1, conditions=SMALL)
    context = dataclasses.replace(env.sample_context(random.Random(3)), cfg=4.0, denoise=1.0)
    model, schedule = env.models[0], env.schedule_for(context)
    x = env.initial_latent(context, schedule.sigma_max)
    args = env.extra_args(context)
    counted = CountingDenoiser(model)
    rk4 = RungeKutta4(200, sigma_end=REFERENCE_SIGMA_END)(counted, x, schedule.sigma_max, args, schedule)
    exact = DormandPrince(1e-8, sigma_end=REFERENCE_SIGMA_END)(model, x, schedule.sigma_max, args, schedule)
    assert counted.calls == 4 * 200 + 1
    assert float(model.relative_error(rk4, exact, cond=context.cond)) < 1e-4
    with pytest.raises(ValueError, match="steps"):
        RungeKutta4(0)
