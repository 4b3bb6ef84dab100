"""MoERLTrainer learns a known synthetic reward (sweep and bandit), resumes bitwise, and
learns from logged runs."""

from __future__ import annotations

import random

import pytest
import torch

from moe_sampler.experts.base import Expert, ExpertDescriptor
from moe_sampler.router.environment import Outcome
from moe_sampler.router.features import STATE_DIM
from moe_sampler.router.model import Router
from moe_sampler.router.policy import cost_from_nfe, lambda_from_priority
from moe_sampler.router.trainer import MoERLTrainer

SLOT = 41  # a prompt-statistics slot; the best expert depends on it alone
PRIORITY = 0.5


def _expert(name: str, steps: int) -> Expert:
    descriptor = ExpertDescriptor(name=name, solver="synthetic", order=2, calls_per_step=1, steps=steps,
                                  schedule="karras", stochastic=False)
    return Expert(descriptor, lambda model, x, sigmas, **_: x, lambda schedule, n: torch.zeros(n + 1))


POOL = [_expert("cheap", 10), _expert("middle", 20), _expert("dear", 40)]


def best_index(value: float) -> int:
    """Region of the slot value: the expert that is good there is the only good one."""
    return 0 if value < -1 / 3 else (1 if value < 1 / 3 else 2)


class SyntheticEnvironment:
    """Context = one slot value in [-1, 1]; expert k has quality 0.9 in its region, else 0.3 + 0.1 k."""

    def sample_context(self, rng: random.Random) -> float:
        return rng.uniform(-1.0, 1.0)

    def state(self, context: float, priority: float) -> torch.Tensor:
        state = torch.zeros(STATE_DIM)
        state[SLOT] = context
        state[59] = 2 * priority - 1
        return state

    def evaluate(self, context: float, experts) -> list[Outcome]:
        out = []
        for expert in experts:
            k = [e.name for e in POOL].index(expert.name)
            quality = 0.9 if best_index(context) == k else 0.3 + 0.1 * k
            out.append(Outcome(expert.name, 10 ** (-3 * quality), quality, expert.descriptor.max_nfe, 0.0, True))
        return out


def _greedy_accuracy(router: Router, n: int = 300) -> float:
    env, rng = SyntheticEnvironment(), random.Random(12345)
    hits = 0
    for _ in range(n):
        value = rng.uniform(-1, 1)
        hits += router.select(env.state(value, PRIORITY), POOL, priority=PRIORITY).index == best_index(value)
    return hits / n


def test_synthetic_best_expert_is_the_utility_argmax():
    lam = lambda_from_priority(PRIORITY)
    env = SyntheticEnvironment()
    for value in (-0.9, 0.0, 0.9):
        utility = [o.quality - lam * cost_from_nfe(o.nfe) for o in env.evaluate(value, POOL)]
        assert max(range(3), key=utility.__getitem__) == best_index(value)


def test_sweep_training_learns_the_synthetic_reward():
    router = Router.default()
    before = _greedy_accuracy(router)
    trainer = MoERLTrainer(SyntheticEnvironment(), router, POOL, mode="sweep", seed=0, learning_rate=1e-2)
    result = trainer.train(400)
    assert result.episodes == 400 and len(result.losses) == 400
    assert _greedy_accuracy(router) > 0.9 > before
    assert sum(result.rewards[-100:]) > sum(result.rewards[:100])
    assert router.training["contexts"] == 400 and router.training["runs"] == 1200
    unseen = ExpertDescriptor(name="unseen-3m-80", solver="dpmpp_3m", order=3, calls_per_step=1, steps=80,
                              schedule="exponential", stochastic=False)
    quality, cost = router.predict(SyntheticEnvironment().state(0.0, PRIORITY), [unseen])
    assert 0.0 <= float(quality) <= 1.0 and abs(float(cost) - cost_from_nfe(80)) < 0.15


def test_bandit_training_with_propensity_weights_learns_the_synthetic_reward():
    router = Router.default()
    trainer = MoERLTrainer(SyntheticEnvironment(), router, POOL, mode="bandit", seed=1, learning_rate=1e-2,
                           temperature=0.15)
    result = trainer.train(1000)
    assert _greedy_accuracy(router) > 0.9
    assert router.training["runs"] == 1000
    weights = trainer.buffer["weight"]
    assert (weights >= 1.0).all() and (weights <= trainer.propensity_clip).all() and (weights > 1.0).any()
    assert all(r != r for r in result.oracle_rewards)  # NaN: bandit mode never sees the other experts


@pytest.mark.parametrize("mode", ["sweep", "bandit"])
def test_interrupted_training_resumes_bitwise(tmp_path, mode):
    straight = MoERLTrainer(SyntheticEnvironment(), Router.default(), POOL, mode=mode, seed=7)
    straight.train(6)

    path = tmp_path / "ckpt.safetensors"
    first = MoERLTrainer(SyntheticEnvironment(), Router.default(), POOL, mode=mode, seed=7, checkpoint_path=path)
    first.train(3)
    del first  # "crash": only the checkpoint survives
    resumed = MoERLTrainer(SyntheticEnvironment(), Router.default(), POOL, mode=mode, seed=7, checkpoint_path=path)
    assert resumed.episode == 3
    result = resumed.train(6)

    for (name, a), b in zip(straight.router.scorer.state_dict().items(), resumed.router.scorer.state_dict().values()):
        assert torch.equal(a, b), name
    assert result.rewards == straight.result().rewards
    assert resumed.router.training == straight.router.training
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_for_another_pool_is_refused(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    MoERLTrainer(SyntheticEnvironment(), Router.default(), POOL, seed=0, checkpoint_path=path).train(1)
    with pytest.raises(ValueError, match="checkpoint .* is for pool"):
        MoERLTrainer(SyntheticEnvironment(), Router.default(), POOL[:2], seed=0, checkpoint_path=path)


def test_progress_and_should_stop_are_called_between_episodes(tmp_path):
    calls = []
    trainer = MoERLTrainer(SyntheticEnvironment(), Router.default(), POOL, seed=0,
                           checkpoint_path=tmp_path / "c.safetensors")
    result = trainer.train(10, progress=lambda episode, total, info: calls.append((episode, total, info["expert"])),
                           should_stop=lambda: len(calls) >= 4)
    assert result.stopped and result.episodes == 4
    assert [c[:2] for c in calls] == [(1, 10), (2, 10), (3, 10), (4, 10)]
    assert MoERLTrainer(SyntheticEnvironment(), Router.default(), POOL, seed=0,
                        checkpoint_path=tmp_path / "c.safetensors").episode == 4


def test_learning_from_logged_runs_with_propensities():
    from moe_sampler.stats.store import RunRecord

    env, rng = SyntheticEnvironment(), random.Random(3)
    records = []
    for _ in range(600):
        value, k = rng.uniform(-1, 1), rng.randrange(3)
        outcome = env.evaluate(value, [POOL[k]])[0]
        records.append(RunRecord(expert=POOL[k].name, router="test", nfe=outcome.nfe, steps=outcome.nfe,
                                 seconds=0.01, success=True, quality=outcome.quality, propensity=1 / 3,
                                 state=tuple(env.state(value, PRIORITY).tolist())))
    records.append(RunRecord(expert="not-in-pool", router="test", nfe=1, steps=1, seconds=0.0, success=True))
    router = Router.default()
    trainer = MoERLTrainer(env, router, POOL, seed=0, learning_rate=1e-2)
    trainer.learn_from_records(records, steps=1500)
    assert len(trainer.buffer["quality"]) == 600
    assert _greedy_accuracy(router) > 0.9


def test_invalid_trainer_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        MoERLTrainer(SyntheticEnvironment(), Router.default(), POOL, mode="online")
    with pytest.raises(ValueError, match="expert pool is empty"):
        MoERLTrainer(SyntheticEnvironment(), Router.default(), [])
    with pytest.raises(TypeError, match="state_dim"):  # one signature: the original API's is in router.compat
        MoERLTrainer(SyntheticEnvironment(), Router.default(), POOL, state_dim=64)
