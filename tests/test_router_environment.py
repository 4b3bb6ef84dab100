"""AnalyticEnvironment: reproducible contexts, disjoint splits, and outcomes measured against
the exact reference."""

from __future__ import annotations

import dataclasses
import math
import random

import torch

from moe_sampler.experts import get_expert
from moe_sampler.router.environment import AnalyticEnvironment, Conditions
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
    assert state.shape == (STATE_DIM,) and state.abs().max() <= 1


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
