"""Selection: valid propensities, temperature, the priority slider, unseen experts, the
untrained router's sensible default, and a table of invalid inputs."""

from __future__ import annotations

import math

import pytest
import torch

from moe_sampler.experts import default_pool
from moe_sampler.experts.analytic import AnalyticModel, PromptSpec
from moe_sampler.experts.base import ExpertDescriptor
from moe_sampler.router.features import STATE_DIM, state_from_analytic
from moe_sampler.router.model import Router
from moe_sampler.router.policy import REFERENCE_TEMPERATURE, choose, cost_from_nfe, lambda_from_priority

MODEL = AnalyticModel([PromptSpec(seed=3)])
STATE = state_from_analytic(MODEL, 0, cfg=5.0, batch=1, priority=0.5)


def desc(name: str, steps: int, order: float = 2, solver: str = "dpmpp_2m", schedule: str = "karras",
         stop_rule: str = "none", max_nfe: int = 0) -> ExpertDescriptor:
    return ExpertDescriptor(name=name, solver=solver, order=order, calls_per_step=1, steps=steps, schedule=schedule,
                            stochastic=False, stop_rule=stop_rule, max_nfe=max_nfe)


POOL = [desc("fast", 6), desc("mid", 16), desc("slow", 40, order=3), desc("huge", 200, order=3)]


def test_probabilities_and_propensities_are_valid():
    router = Router.default()
    for temperature in (0.0, 0.02, 0.1, 1.0):
        for seed in range(5):
            sel = router.select(STATE, POOL, priority=0.5, temperature=temperature, seed=seed)
            assert math.isclose(sum(sel.probabilities), 1.0, abs_tol=1e-9)
            assert all(0.0 <= p <= 1.0 for p in sel.probabilities)
            assert 0.0 < sel.propensity <= 1.0 and sel.propensity == sel.probabilities[sel.index]
            assert 0.0 < sel.confidence <= 1.0 and sel.expert == POOL[sel.index].name
            assert len(sel.utilities) == len(sel.predicted_quality) == len(sel.predicted_cost) == len(POOL)


def test_greedy_has_propensity_one_and_a_meaningful_confidence():
    sel = Router.default().select(STATE, POOL, priority=0.5, temperature=0.0)
    assert sel.propensity == 1.0 and sel.index == max(range(len(POOL)), key=sel.utilities.__getitem__)
    assert sel.confidence < 1.0
    reference = torch.softmax(torch.tensor(sel.utilities, dtype=torch.float64) / REFERENCE_TEMPERATURE, 0)
    assert sel.confidence == pytest.approx(float(reference[sel.index]))


def test_empirical_pick_frequencies_match_the_probabilities():
    quality = torch.tensor([0.5, 0.6, 0.7])
    cost = torch.tensor([0.3, 0.4, 0.6])
    n = 4000
    counts = [0, 0, 0]
    for seed in range(n):
        sel = choose(quality, cost, ["a", "b", "c"], priority=0.5, temperature=0.05, seed=seed)
        counts[sel.index] += 1
    for k, p in enumerate(sel.probabilities):
        assert abs(counts[k] / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3


def test_draws_are_seeded_and_never_touch_the_global_rng():
    router = Router.default()
    before = torch.random.get_rng_state()
    picks = [router.select(STATE, POOL, temperature=0.5, seed=s).index for s in range(20)]
    assert torch.equal(torch.random.get_rng_state(), before)
    assert picks == [router.select(STATE, POOL, temperature=0.5, seed=s).index for s in range(20)]
    assert len(set(picks)) > 1


def test_temperature_zero_is_greedy_and_high_temperature_near_uniform():
    router = Router.default()
    greedy = router.select(STATE, POOL, temperature=0.0)
    assert sorted(greedy.probabilities) == [0.0, 0.0, 0.0, 1.0]
    hot = router.select(STATE, POOL, temperature=1000.0, seed=0)
    assert max(hot.probabilities) - min(hot.probabilities) < 0.01


def test_priority_slider_changes_the_choice_without_retraining():
    router = Router.default()
    speed = router.select(STATE, POOL, priority=0.0)
    quality = router.select(STATE, POOL, priority=1.0)
    assert speed.expert == "fast"
    assert POOL[quality.index].max_nfe > POOL[router.select(STATE, POOL, priority=0.5).index].max_nfe or \
        quality.index == router.select(STATE, POOL, priority=0.5).index
    assert POOL[quality.index].max_nfe >= 40
    assert lambda_from_priority(0.0) > lambda_from_priority(0.5) > lambda_from_priority(1.0) > 0
    assert cost_from_nfe(1) == 0.0 and cost_from_nfe(1024) == pytest.approx(1.0)


def test_untrained_router_picks_the_minimax_regret_expert_per_priority():
    # PRIOR_INIT is fitted (bench.routing.fit_prior) so that with no data the pick is the expert
    # with the smallest worst-case regret over both yardsticks: QualityMaster at priority 0.5
    # (the best fixed expert there on the analytic and the learned model), BalancedMaster only
    # in a narrow band below it, SpeedDemon for speed.
    pool = default_pool()
    names = [e.name for e in pool]
    assert {"QualityMaster", "SpeedDemon", "BalancedMaster", "EarlyStopper", "NoiseAdaptive"} <= set(names)
    router = Router.default()
    for cfg in (1.0, 5.0, 9.0):
        state = state_from_analytic(MODEL, 0, cfg=cfg, batch=1, priority=0.5)
        assert router.select(state, pool, priority=0.5).expert == "QualityMaster"
    expected = {0.0: "SpeedDemon", 0.25: "SpeedDemon", 0.4: "SpeedDemon", 0.44: "BalancedMaster",
                0.5: "QualityMaster", 0.75: "QualityMaster", 1.0: "QualityMaster"}
    assert {p: router.select(STATE, pool, priority=p).expert for p in expected} == expected


def test_an_unseen_expert_is_scored_from_its_descriptor():
    router = Router.default()
    unseen = [desc("new-euler-10", 10, order=1, solver="euler"), desc("new-3m-60", 60, order=3, solver="dpmpp_3m"),
              desc("new-stopper", 60, stop_rule="converged")]
    quality, cost = router.predict(STATE, unseen)
    assert quality[1] > quality[0] and cost[1] > cost[0]
    assert cost[2] < cost_from_nfe(60)  # a stop rule is expected to save calls
    assert ((quality >= 0) & (quality <= 1)).all()


@pytest.mark.parametrize("state, pool, kwargs, error, match", [
    (STATE, [], {}, ValueError, "expert pool is empty"),
    (torch.zeros(STATE_DIM - 1), POOL, {}, ValueError, r"state must have shape \[64\]"),
    (torch.full((STATE_DIM,), float("nan")), POOL, {}, ValueError, "NaN"),
    ([0.0] * STATE_DIM, POOL, {}, TypeError, "state must be a tensor"),
    (STATE, POOL, {"temperature": -0.1}, ValueError, "temperature must be"),
    (STATE, POOL, {"temperature": float("inf")}, ValueError, "temperature must be"),
    (STATE, POOL, {"priority": 1.1}, ValueError, r"priority must be in \[0, 1\]"),
    (STATE, POOL, {"priority": -0.5}, ValueError, r"priority must be in \[0, 1\]"),
    (STATE, ["BalancedMaster"], {}, TypeError, "Expert or ExpertDescriptor"),
])
def test_invalid_selection_inputs(state, pool, kwargs, error, match):
    with pytest.raises(error, match=match):
        Router.default().select(state, pool, **kwargs)


def test_default_routers_are_identical_and_leave_the_global_rng_alone():
    before = torch.random.get_rng_state()
    a, b = Router.default(), Router.default()
    assert torch.equal(torch.random.get_rng_state(), before)
    for (name, x), y in zip(a.scorer.state_dict().items(), b.scorer.state_dict().values()):
        assert torch.equal(x, y), name
