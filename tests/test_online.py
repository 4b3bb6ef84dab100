"""Learning from logged runs (router/online.py) and router versions (router/versions.py), on the
analytic model with rows from a real stats store: versions are written atomically and stay
loadable; the guarded policy uses the best fixed expert without data and deviates only with
evidence; a candidate that is worse on held-out rows is not adopted."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import threading

import pytest
import torch

from moe_sampler.experts import default_pool
from moe_sampler.router.environment import AnalyticEnvironment, Conditions
from moe_sampler.router.model import Router, RouterLoadError
from moe_sampler.router.features import DENOISE_SLOT
from moe_sampler.router.online import (
    MIN_GROUP_ROWS,
    PRIOR_FIXED,
    Evidence,
    ExpertEvidence,
    GuardedPolicy,
    best_fixed,
    fingerprint_tensors,
    is_heldout,
    model_key,
    rows_from_records,
    update,
)
from moe_sampler.router.policy import cost_from_nfe, lambda_from_priority
from moe_sampler.router.versions import LocalRegistry, check_registry_name
from moe_sampler.stats.store import RunRecord, StatsStore

POOL = default_pool()
NAMES = [e.name for e in POOL]
MODEL = "analytic-test"
SMALL = Conditions(shapes=((16,),), img2img_fraction=0.2)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ versions


def test_versions_are_numbered_atomic_and_old_ones_stay_loadable(tmp_path):
    registry = LocalRegistry(tmp_path)
    name = "learned/eps-0123456789"
    assert registry.latest(name) is None
    with pytest.raises(RouterLoadError, match="no adopted version yet"):
        registry.load(name)
    routers = []
    for k in range(3):
        router = Router.default()
        with torch.no_grad():
            router.scorer.prior[1] += 0.1 * (k + 1)  # three distinguishable routers
        info = registry.publish(name, router)
        assert info.version == k + 1
        routers.append(router)
    hashes = [sha(registry.version_path(name, v)) for v in (1, 2, 3)]
    assert [v.version for v in registry.versions(name)] == [1, 2, 3]
    assert registry.latest(name).version == 3
    assert registry.latest(name).training["parent"] == 2
    followed = registry.load(name)
    assert torch.equal(followed.scorer.prior, routers[2].scorer.prior)
    for v in (1, 2, 3):  # every version loads with its own weights
        assert torch.equal(registry.load(name, v).scorer.prior, routers[v - 1].scorer.prior)
    registry.publish(name, Router.default())
    assert [sha(registry.version_path(name, v)) for v in (1, 2, 3)] == hashes  # never rewritten
    # no temp file is left behind, and nothing but version files is in the versions folder
    assert sorted(p.name for p in registry.versions_folder(name).iterdir()) == [f"v000{v}.safetensors"
                                                                                for v in (1, 2, 3, 4)]
    assert sorted(p.name for p in (tmp_path / "learned").iterdir()) == ["eps-0123456789.safetensors",
                                                                        "eps-0123456789.versions"]


def test_a_crashed_write_leaves_no_version_and_concurrent_writers_get_distinct_numbers(tmp_path):
    registry = LocalRegistry(tmp_path)
    name = "m"
    registry.publish(name, Router.default())
    # a writer killed before its link: a partial file in the folder, no version, followed file intact
    (registry.versions_folder(name) / ".deadbeef.partial").write_bytes(b"\x00" * 10)
    before = sha(registry.followed_path(name))
    assert [v.version for v in registry.versions(name)] == [1]
    assert sha(registry.followed_path(name)) == before
    errors = []

    def writer():
        try:
            registry.publish(name, Router.default())
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [v.version for v in registry.versions(name)] == list(range(1, 8))
    Router.load(registry.followed_path(name))


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/../b", "x.safetensors", "", "a//b", ".hidden"])
def test_registry_names_cannot_leave_the_folder(bad):
    with pytest.raises(ValueError):
        check_registry_name(bad)


# ------------------------------------------------------------------------------ fingerprints


def test_fingerprint_follows_the_weights():
    a = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    b = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    b.load_state_dict(a.state_dict())
    fa = fingerprint_tensors(a.named_parameters())
    assert fa == fingerprint_tensors(b.named_parameters())
    with torch.no_grad():
        b[1].bias += 1e-3
    assert fa != fingerprint_tensors(b.named_parameters())
    assert model_key("eps", fa) == f"eps-{fa}" and len(fa) == 10


# ------------------------------------------------------------------------------ logged rows on the analytic model


@pytest.fixture(scope="module")
def sweep_rows(tmp_path_factory):
    """Every pool expert on 48 analytic contexts, stored as sweep rows in a real stats store
    (priorities drawn per context), read back as RunRecords."""
    torch.set_num_threads(1)
    env = AnalyticEnvironment("train", seed=3, n_models=6, pool_size=48, conditions=SMALL)
    rng = random.Random(0)
    store = StatsStore(tmp_path_factory.mktemp("store") / "stats.sqlite3")
    for i, context in enumerate(env.contexts):
        priority = rng.random()
        state = env.state(context, priority)
        for outcome in env.evaluate(context, POOL):
            store.record(RunRecord(expert=outcome.expert, router="sweep", nfe=outcome.nfe, steps=1, seconds=0.0,
                                   success=outcome.success, source="training", quality=outcome.quality,
                                   priority=priority, state=state, seed=context.seed, created=1000.0 + i,
                                   model=MODEL, quality_source="sweep"))
    records = store.runs()
    store.close()
    assert len(records) == 48 * len(POOL)
    return records


def test_rows_of_another_model_are_not_used(sweep_rows):
    assert len(rows_from_records(sweep_rows, model=MODEL)) == len(sweep_rows)
    assert rows_from_records(sweep_rows, model="eps-other") == []
    other = [dataclasses.replace(r, model="eps-other") for r in sweep_rows[:5]]
    assert len(rows_from_records([*sweep_rows, *other], model=MODEL)) == len(sweep_rows)


def test_a_context_of_a_sweep_lands_on_one_side_of_the_split(sweep_rows):
    rows = rows_from_records(sweep_rows, model=MODEL)
    sides = {}
    for row in rows:
        sides.setdefault(row.key.split("|")[0], set()).add(is_heldout(row))
    assert all(len(s) == 1 for s in sides.values())
    assert 0 < sum(next(iter(s)) for s in sides.values()) < len(sides)


def test_no_adoption_when_the_candidate_is_worse_on_heldout_rows(sweep_rows):
    rows = rows_from_records(sweep_rows, model=MODEL)
    good = update(Router.default(), rows, POOL, model=MODEL, min_rows=10, seed=0)
    # the same rows with the training share's qualities turned upside down: the candidate learns
    # to prefer the worst expert, and the held-out rows (left true) show it
    poisoned = [r if is_heldout(r) else dataclasses.replace(r, quality=1.0 - r.quality) for r in rows]
    bad = update(good.candidate, poisoned, POOL, model=MODEL, min_rows=10, seed=0)
    values = bad.values["values"]
    assert values["candidate"] < values["current"], bad.summary()
    assert not bad.adopted and "worse than the current" in bad.reason
    # the control: trained on the true rows, the candidate is adopted over the untrained router
    assert good.adopted, good.summary()
    assert good.candidate.training["model"] == MODEL
    assert good.candidate.training["online"]["heldout_rows"] == good.heldout_rows > 0


def test_too_few_heldout_rows_is_no_adoption(sweep_rows):
    rows = rows_from_records(sweep_rows, model=MODEL)[:8]
    result = update(Router.default(), rows, POOL, model=MODEL)
    assert not result.adopted and "held-out rows" in result.reason


# ------------------------------------------------------------------------------ the guarded policy


class StubRouter:
    """A router whose predictions are given: quality per expert (same for every state), cost from NFE."""

    def __init__(self, quality: dict[str, float]):
        self.quality = quality
        self.training = {}

    def predict(self, state, experts):
        q = torch.tensor([self.quality[e.name] for e in experts])
        c = torch.tensor([float(cost_from_nfe(e.descriptor.max_nfe)) for e in experts])
        return q, c


def _state(denoise: float = 1.0) -> torch.Tensor:
    state = torch.zeros(64)
    state[DENOISE_SLOT] = 2 * denoise - 1  # text-to-image by default
    return state


@pytest.mark.parametrize("priority,expected", [(0.0, "SpeedDemon"), (0.44, "BalancedMaster"), (0.5, "QualityMaster"),
                                               (1.0, "QualityMaster")])
def test_without_data_the_guard_uses_the_priors_best_fixed_expert(priority, expected):
    assert best_fixed(Evidence(), POOL, priority) == NAMES.index(expected)  # pooled: the untrained router's pick
    # even a router that is sure another expert is far better does not move it without data
    sure = StubRouter({n: (0.99 if n == "NoiseAdaptive" else 0.1) for n in NAMES})
    choice = GuardedPolicy(sure, Evidence(), epsilon=0.0).select(_state(), POOL, priority, seed=1)
    assert choice.phase == "learning"
    t2i = [name for start, name in PRIOR_FIXED["text-to-image"] if priority >= start][-1]  # its group's
    assert choice.selection.expert == t2i and choice.fixed_expert == t2i
    assert choice.selection.propensity == 1.0


@pytest.mark.parametrize("priority,t2i,img2img", [(0.0, "SpeedDemon", "SpeedDemon"),
                                                  (0.5, "QualityMaster", "SpeedDemon"),
                                                  (0.6, "QualityMaster", "BalancedMaster"),
                                                  (1.0, "QualityMaster", "QualityMaster")])
def test_without_data_the_fixed_expert_is_the_groups(priority, t2i, img2img):
    # img2img runs a share of the steps: its best fixed expert is cheaper up to a higher priority
    policy = GuardedPolicy(Router.default(), Evidence(), epsilon=0.0)
    states = torch.stack([_state(1.0), _state(0.5), _state(0.2)])
    picks = policy.greedy_batch(states, POOL, [priority] * 3)[0].tolist()
    assert [NAMES[i] for i in picks] == [t2i, img2img, img2img]
    assert NAMES[best_fixed(Evidence(), POOL, priority, _state(0.5))] == img2img
    # a pool without the table's expert falls back to the untrained router's pick
    without = [e for e in POOL if e.name != img2img]
    pick = without[int(policy.greedy_batch(states[1:2], without, [priority])[0][0])].name
    assert pick == without[Router.default().select(_state(0.5), without, priority).index].name


def test_a_groups_own_rows_move_its_fixed_expert_and_too_few_fall_back_to_the_pooled():
    priority = 0.5
    pooled = {e.name: ExpertEvidence(40, 0.95 if e.name == "QualityMaster" else 0.5,
                                     float(cost_from_nfe(e.descriptor.max_nfe))) for e in POOL}

    def evidence(group_rows):
        group = {e.name: ExpertEvidence(group_rows, 0.3, float(cost_from_nfe(e.descriptor.max_nfe))) for e in POOL}
        group["NoiseAdaptive"] = dataclasses.replace(group["NoiseAdaptive"], quality=0.95)
        return Evidence(200, True, pooled, groups={"img2img": group})

    img2img = _state(0.5)
    # 40 img2img rows of each expert: NoiseAdaptive is clearly the best there, not on text-to-image
    assert NAMES[best_fixed(evidence(40), POOL, priority, img2img)] == "NoiseAdaptive"
    assert NAMES[best_fixed(evidence(40), POOL, priority, _state())] == "QualityMaster"
    # 2 rows each: below MIN_GROUP_ROWS, the pooled rows decide (QualityMaster, clearly above the
    # table's SpeedDemon there); without any rows the table's pick stays
    assert 2 < MIN_GROUP_ROWS
    assert NAMES[best_fixed(evidence(2), POOL, priority, img2img)] == "QualityMaster"
    assert NAMES[best_fixed(Evidence(), POOL, priority, img2img)] == "SpeedDemon"
    # the evidence, groups included, travels with the router file
    assert Evidence.from_json(json.loads(json.dumps(evidence(40).to_json()))) == evidence(40)


def test_the_guard_deviates_only_in_groups_where_the_router_beat_the_fixed_expert():
    priority = 0.5
    nfe = {e.name: e.descriptor.max_nfe for e in POOL}
    lam = lambda_from_priority(priority)
    extra = float(cost_from_nfe(nfe["NoiseAdaptive"])) - float(cost_from_nfe(nfe["QualityMaster"]))
    q_noise = 0.75 + 0.2 + lam * extra
    router = StubRouter({n: (q_noise if n == "NoiseAdaptive" else (0.75 if n == "QualityMaster" else 0.2))
                         for n in NAMES})
    trusted = _evidence(200)
    both = GuardedPolicy(router, trusted, epsilon=0.0, min_rows=10)
    assert both.select(_state(), POOL, priority).selection.expert == "NoiseAdaptive"
    only_img2img = dataclasses.replace(trusted, trusted_groups={"text-to-image": False, "img2img": True})
    policy = GuardedPolicy(router, only_img2img, epsilon=0.0, min_rows=10)
    assert policy.phase == "guarded"
    assert policy.select(_state(), POOL, priority).selection.expert == "QualityMaster"  # the fixed expert
    assert policy.select(_state(0.5), POOL, priority).selection.expert == "NoiseAdaptive"
    assert Evidence.from_json(only_img2img.to_json()).trusted_groups == only_img2img.trusted_groups
    assert GuardedPolicy(router, dataclasses.replace(trusted, trusted=False, trusted_groups={"img2img": False}),
                         epsilon=0.0, min_rows=10).phase == "learning"


def _evidence(rows_per_expert: int, sd: float = 0.1, best: str = "QualityMaster") -> Evidence:
    experts = {e.name: ExpertEvidence(rows_per_expert, 0.3, float(cost_from_nfe(e.descriptor.max_nfe)), sd)
               for e in POOL}
    experts[best] = dataclasses.replace(experts[best], quality=0.75)
    return Evidence(rows=rows_per_expert * len(POOL), trusted=True, experts=experts)


def test_the_guard_deviates_only_when_the_bound_on_the_gain_is_positive():
    priority = 0.5
    gain = 0.05  # predicted utility gain of NoiseAdaptive over the fixed expert (QualityMaster)
    nfe = {e.name: e.descriptor.max_nfe for e in POOL}
    lam = lambda_from_priority(priority)
    q_fixed = 0.75
    extra = float(cost_from_nfe(nfe["NoiseAdaptive"])) - float(cost_from_nfe(nfe["QualityMaster"]))
    q_noise = q_fixed + gain + lam * extra
    router = StubRouter({n: (q_noise if n == "NoiseAdaptive" else (q_fixed if n == "QualityMaster" else 0.2))
                         for n in NAMES})
    # few rows: sd 0.1, 5 rows each -> bound 0.05 - 1.64 * 0.063 < 0: stays with the fixed expert
    few = GuardedPolicy(router, _evidence(5), epsilon=0.0, min_rows=10).select(_state(), POOL, priority)
    assert few.phase == "guarded" and few.fixed_expert == "QualityMaster"
    assert few.selection.expert == "QualityMaster"
    assert few.gain_bounds[NAMES.index("NoiseAdaptive")] < 0
    # many rows: 200 each -> bound 0.05 - 1.64 * 0.01 > 0: deviates
    many = GuardedPolicy(router, _evidence(200), epsilon=0.0, min_rows=10).select(_state(), POOL, priority)
    assert many.selection.expert == "NoiseAdaptive"
    assert many.gain_bounds[NAMES.index("NoiseAdaptive")] > 0
    # not trusted (it did not beat the best fixed expert on held-out rows): learning phase
    untrusted = dataclasses.replace(_evidence(200), trusted=False)
    assert GuardedPolicy(router, untrusted, epsilon=0.0).select(_state(), POOL, priority).selection.expert == \
        "QualityMaster"


def test_exploration_is_epsilon_greedy_with_logged_propensities():
    policy = GuardedPolicy(Router.default(), Evidence(), epsilon=0.1)
    picks = [policy.select(_state(), POOL, 0.5, seed=s) for s in range(400)]
    greedy = [c for c in picks if not c.explored]
    assert all(c.selection.propensity == pytest.approx(0.9 + 0.1 / len(POOL)) for c in greedy)
    explored = [c for c in picks if c.explored]
    assert all(c.selection.propensity == pytest.approx(0.1 / len(POOL)) for c in explored)
    assert 0.03 < len(explored) / len(picks) < 0.15  # 0.1 * 4/5 = 8% expected
    assert all(abs(sum(c.selection.probabilities) - 1) < 1e-9 for c in picks)


def test_after_an_update_on_enough_rows_the_guard_leaves_the_learning_phase(sweep_rows):
    rows = rows_from_records(sweep_rows, model=MODEL)
    result = update(Router.default(), rows, POOL, model=MODEL, min_rows=10, seed=0)
    policy = GuardedPolicy.for_router(result.candidate, epsilon=0.0, min_rows=10)
    evidence = policy.evidence
    assert evidence.rows == result.train_rows
    assert set(evidence.experts) == set(NAMES)
    assert policy.phase == ("guarded" if evidence.trusted else "learning")
    # the evidence travels with the router file
    assert Evidence.from_json(result.candidate.training["guard"]) == evidence


def test_logged_rows_move_the_best_fixed_expert_only_when_they_separate_it_from_the_prior():
    priority = 0.5  # the prior's pick: QualityMaster
    better = "BalancedMaster"

    def evidence(rows):
        experts = {e.name: ExpertEvidence(rows, 0.5, float(cost_from_nfe(e.descriptor.max_nfe))) for e in POOL}
        experts[better] = dataclasses.replace(experts[better], quality=0.95)
        return Evidence(rows * len(POOL), True, experts)

    # BalancedMaster's logged mean utility beats QualityMaster's by about 0.6; 2 rows each cannot show it
    assert NAMES[best_fixed(evidence(2), POOL, priority)] == "QualityMaster"
    assert NAMES[best_fixed(evidence(40), POOL, priority)] == better


def test_the_guard_keeps_the_fixed_expert_on_a_context_unlike_any_logged_one():
    priority = 0.5
    nfe = {e.name: e.descriptor.max_nfe for e in POOL}
    lam = lambda_from_priority(priority)
    q_noise = 0.75 + 0.2 + lam * (float(cost_from_nfe(nfe["NoiseAdaptive"])) - float(cost_from_nfe(nfe["BalancedMaster"])))
    router = StubRouter({n: (q_noise if n == "NoiseAdaptive" else (0.75 if n == "BalancedMaster" else 0.2))
                         for n in NAMES})
    logged = dataclasses.replace(_evidence(200, best="BalancedMaster"), state_low=(0.0,) * 64, state_high=(0.5,) * 64)
    policy = GuardedPolicy(router, logged, epsilon=0.0, min_rows=10)
    inside = torch.full((64,), 0.25)
    outside = inside.clone()
    outside[48] = 1.5  # e.g. a latent size never logged for this model
    assert policy.select(inside, POOL, priority).selection.expert == "NoiseAdaptive"
    assert policy.select(outside, POOL, priority).selection.expert == "BalancedMaster"
    assert Evidence.from_json(logged.to_json()).known(torch.stack([inside, outside])).tolist() == [True, False]


def test_an_update_works_inside_inference_mode(sweep_rows, tmp_path):
    """ComfyUI executes nodes under torch.inference_mode(): a router loaded there and an update
    run there must still train (the candidate is a fresh, trainable copy)."""
    rows = rows_from_records(sweep_rows, model=MODEL)
    Router.default().save(tmp_path / "r.safetensors")
    with torch.inference_mode():
        current = Router.load(tmp_path / "r.safetensors")
        result = update(current, rows, POOL, model=MODEL, min_rows=10, steps=20)
    assert result.heldout_rows > 0
    assert not torch.equal(result.candidate.scorer.prior, current.scorer.prior)  # it trained
