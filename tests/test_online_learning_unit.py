"""The learning loop's ComfyUI-free parts (nodes/online_learning.py): background updates never
block the caller, an on-demand update publishes a version only when adopted, the sampler's rows
get the model, audit and exploration fields, the badge says what phase the router is in, and a
router trained on another model is flagged. Runs without ComfyUI (a stand-in ``folder_paths``)."""

from __future__ import annotations

import math
import random
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch

from helpers import import_node_module

paths = import_node_module("paths")
online = import_node_module("online_learning")
bridge = import_node_module("bridge")

from moe_sampler.experts import default_pool  # noqa: E402
from moe_sampler.router.model import Router  # noqa: E402
from moe_sampler.router.policy import cost_from_nfe  # noqa: E402
from moe_sampler.stats.store import RunRecord, StatsStore  # noqa: E402

POOL = default_pool()
KEY = "eps-0123456789"


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """A stand-in folder_paths with the routers folder under tmp_path."""
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    fp.folder_names_and_paths = {}

    def add_model_folder_path(name, path, is_default=False):
        fp.folder_names_and_paths.setdefault(name, ([], set()))[0].insert(0, path)

    def get_filename_list(name):
        folders, extensions = fp.folder_names_and_paths[name]
        found = []
        for folder in folders:
            for p in Path(folder).rglob("*"):
                if p.is_file() and (not extensions or p.suffix in extensions):
                    found.append(p.relative_to(folder).as_posix())
        return sorted(found)

    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])
    fp.get_filename_list = get_filename_list
    fp.get_system_user_directory = lambda name: str(tmp_path / "user" / f"__{name}")
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    paths.register_folders()
    paths._router_cache.clear()
    online._policies.clear()
    return tmp_path


# ------------------------------------------------------------------------------ background updates


def test_background_updates_never_block_the_sampling_path():
    started, release = threading.Event(), threading.Event()
    calls = []

    def slow_learn(key, experts, store):
        calls.append(key)
        started.set()
        release.wait(10)  # a learner far slower than a run
        return online.LearnOutcome(key, None, None, "fake update", 0)

    learner = online.OnlineLearner(every=3, learn=slow_learn)
    durations = []
    for i in range(30):
        start = time.perf_counter()
        learner.note_run(KEY, POOL, store=None)
        durations.append(time.perf_counter() - start)
        if i == 2:
            assert started.wait(5), "the update did not start"
    assert max(durations) < 0.05, durations  # the learner was busy the whole time
    status = learner.status(KEY)
    assert status["updating"] and status["runs_logged"] == 30
    release.set()
    assert learner.wait(10)
    assert calls == [KEY]  # one update was running; the others coalesced instead of piling up
    assert learner.status(KEY)["last_update"] == "fake update"
    queued = [learner.note_run(KEY, POOL, store=None) for _ in range(3)]
    assert queued == [False, False, True]  # the 33rd run queues the next one
    assert learner.wait(10) and calls == [KEY, KEY]


def test_a_failing_update_does_not_kill_the_learner():
    outcomes = iter([RuntimeError("disk full"), "ok"])

    def flaky(key, experts, store):
        item = next(outcomes)
        if isinstance(item, Exception):
            raise item
        return online.LearnOutcome(key, None, None, item, 0)

    learner = online.OnlineLearner(every=1, learn=flaky)
    learner.note_run(KEY, POOL, None)
    assert learner.wait(5)
    assert "disk full" in learner.status(KEY)["last_update"]
    learner.note_run(KEY, POOL, None)
    assert learner.wait(5) and learner.status(KEY)["last_update"] == "ok"


def test_a_background_update_waits_while_a_sampling_run_is_in_progress():
    """The default learner's checkpoints (``background_pause``) hold the update while a sampling run
    holds the bridge's gate, and let it finish once the run is over."""
    steps = []

    def learn(key, experts, store):  # a fit of 30 steps with the background's checkpoint after each
        for _ in range(30):
            steps.append(time.monotonic())
            online.background_pause()
        return online.LearnOutcome(key, None, None, "done", 0)

    gate = bridge.SAMPLING
    learner = online.OnlineLearner(every=1, learn=learn)
    with gate.running():
        assert gate.active == 1
        learner.note_run(KEY, POOL, None)
        time.sleep(0.4)
        assert len(steps) == 1  # the first step ran, then the update waited for the run to end
        assert learner.status(KEY)["updating"]
    released = time.monotonic()
    assert learner.wait(10) and learner.status(KEY)["last_update"] == "done"
    assert len(steps) == 30 and steps[1] >= released - 0.01
    assert gate.active == 0


def test_the_gate_waits_until_idle_a_timeout_or_a_stop():
    gate = bridge.SamplingGate()
    assert gate.wait_idle(timeout=0.01)  # nothing is running
    with gate.running():
        start = time.monotonic()
        assert not gate.wait_idle(timeout=0.1) and time.monotonic() - start >= 0.09
        assert not gate.wait_idle(should_stop=lambda: True)
        done = []
        waiter = threading.Thread(target=lambda: done.append(gate.wait_idle()))
        waiter.start()
        time.sleep(0.05)
        assert not done  # still waiting for the run
    waiter.join(5)
    assert done == [True]
    with pytest.raises(RuntimeError), gate.running():  # a failing run still leaves the gate
        raise RuntimeError("sampling failed")
    assert gate.active == 0


def test_a_fit_calls_a_callable_pause_after_every_step():
    from moe_sampler.router.online import fit_candidate, rows_from_records

    rows = rows_from_records(_synthetic_records(40, KEY), model=KEY)
    calls = []
    fit_candidate(Router.default(), rows, {e.name: e.descriptor for e in POOL}, steps=25,
                  pause=lambda: calls.append(1))
    assert len(calls) == 25


def test_learning_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(online.LEARNING_ENV, "0")
    assert online.learner() is None


# ------------------------------------------------------------------------------ on-demand update and versions


def _synthetic_records(n: int, model: str, seed: int = 0) -> list[RunRecord]:
    """Rows whose best expert depends on state slot 41 (as a real model's would on the prompt)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        state = [0.0] * 64
        state[41] = rng.uniform(-1, 1)
        expert = POOL[rng.randrange(len(POOL))]
        quality = min(1.0, max(0.0, 0.5 + 0.3 * state[41] * (1 if expert.name == "QualityMaster" else -1)
                               + rng.gauss(0, 0.03)))
        out.append(RunRecord(expert=expert.name, router=online.learned_label(model), nfe=expert.descriptor.max_nfe,
                             steps=10, seconds=0.1, success=True, quality=quality, propensity=1 / len(POOL),
                             priority=rng.random(), state=state, seed=i, created=1000.0 + i, model=model,
                             quality_source="audit"))
    return out


def test_learn_now_publishes_a_version_only_when_adopted(folders, tmp_path):
    store = StatsStore(tmp_path / "stats.sqlite3")
    try:
        empty = online.learn_now(KEY, POOL, store)
        assert empty.version is None and "no logged runs" in empty.summary
        for record in [*_synthetic_records(160, KEY), *_synthetic_records(40, "eps-other", seed=1)]:
            store.record(record)
        outcome = online.learn_now(KEY, POOL, store)
        assert outcome.rows == 160  # the other model's rows are not used
        registry = online.registry()
        name = online.learned_router_name(KEY)
        if outcome.result.adopted:
            assert outcome.version == 1 and registry.latest(name).version == 1
            assert registry.load(name).training["model"] == KEY
            # the followed file and the pinned version are both in the sampler's dropdown
            options = online.router_options(paths.router_names())
            assert options[:2] == [paths.BUILTIN_ROUTER, online.LEARNED_ROUTER]
            assert f"learned/{KEY}.safetensors" in options and f"learned/{KEY}.versions/v0001.safetensors" in options
            learned = online.learned_policy(KEY)
            assert learned.version == 1 and learned.label == f"learned/{KEY}.safetensors"
        else:
            assert outcome.version is None and registry.latest(name) is None
        assert outcome.result.heldout_rows > 0
    finally:
        store.close()


def test_before_any_version_the_learned_router_is_in_its_learning_phase(folders):
    learned = online.learned_policy(KEY)
    assert learned.version == 0
    choice = learned.policy.select(torch.zeros(64), POOL, 0.5, seed=0, epsilon=0.0)
    assert choice.phase == "learning" and choice.selection.expert == "SpeedDemon"  # a zero state: denoise 0.5, img2img
    info = online.learning_info(choice, learned, online.OnlineLearner(every=25, learn=lambda *a: None), KEY,
                                online.router_calibration(learned.policy.router))
    assert info["phase"] == "learning" and info["text"].startswith("using the best fixed expert (SpeedDemon)")
    assert info["next_update_in"] == 25
    # what holds it back: no calibration yet, and how to get one
    assert info["calibrated"] == [] and "no expert's estimate is calibrated yet" in info["text"]
    assert "MoE Router Trainer sweep" in info["text"]
    # a version whose calibration fits two experts names them
    from moe_sampler.router.calibration import Calibration

    pairs = [(name, {"estimate": 10 ** -(1 + (i % 7) / 5), "sigma_start": 14.6}, 10 ** -(1.2 + (i % 7) / 5))
             for name in ("SpeedDemon", "BalancedMaster") for i in range(8)]
    learned.policy.router.training = {**learned.policy.router.training,
                                      "calibration": Calibration.fit(pairs).to_dict()}
    info = online.learning_info(choice, learned, None, KEY, online.router_calibration(learned.policy.router))
    assert info["calibrated"] == ["BalancedMaster", "SpeedDemon"]
    assert "calibrated estimates for BalancedMaster, SpeedDemon" in info["text"]


# ------------------------------------------------------------------------------ rows, badge, warnings


def _record(**kw) -> RunRecord:
    base = dict(expert="BalancedMaster", router="learned/x.safetensors", nfe=20, steps=20, seconds=1.0, success=True,
                propensity=0.96, priority=0.5, details={"why": "kept"})
    return RunRecord(**{**base, **kw})


def test_rows_get_the_model_the_audit_and_the_exploration():
    audit = online.Audit(quality=0.71, relative_error=0.0075, nfe=100, seconds=2.5)
    fallback = _record(expert="QualityMaster", propensity=None, details=None)
    rows = online.annotate([_record(), fallback], model=KEY, audit=audit,
                           details={"learning": {"phase": "learning", "explored": False}})
    first, second = rows
    assert first.model == second.model == KEY
    assert first.quality == 0.71 and first.quality_source == "audit" and first.audit_seconds == 2.5
    assert first.details_dict() == {"why": "kept", "learning": {"phase": "learning", "explored": False},
                                    "true_error": 0.0075}  # the audit's calibration pair
    assert second.quality is None and second.audit_seconds is None
    failed = online.annotate([_record(success=False, error="x")], model=KEY, audit=audit)[0]
    assert failed.quality is None  # an audit never gives a failed run a quality


def test_audit_rate_is_checked_and_drawn():
    with pytest.raises(ValueError, match="audit_rate"):
        online.draw_audit(1.5)
    with pytest.raises(ValueError, match="audit_rate"):
        online.draw_audit(math.nan)
    assert not any(online.draw_audit(0.0) for _ in range(1000))
    assert all(online.draw_audit(1.0) for _ in range(100))
    rng = random.Random(0)
    share = sum(online.draw_audit(0.02, rng) for _ in range(20000)) / 20000
    assert 0.015 < share < 0.025


def test_badge_shows_phase_audit_and_warning():
    ui = {"moe_run": [{"expert": "BalancedMaster"}], "text": ["BalancedMaster: 20 model calls"]}
    learning = {"phase": "learning", "text": "using the best fixed expert (BalancedMaster) ..."}
    audit = online.Audit(0.71, 0.0075, 100, 2.5)
    out = online.badge_extras(ui, KEY, learning, audit, "router x was trained on another model")
    info = out["moe_run"][0]
    assert info["learning"]["phase"] == "learning" and info["audited"] and info["audit_seconds"] == 2.5
    lines = out["text"][0].splitlines()
    assert lines[1].startswith("learning: using the best fixed expert")
    assert lines[2] == "audited: quality 0.71, +2.50 s for the 100-call reference"
    assert lines[3].startswith("warning: router x")
    plain = online.badge_extras({"moe_run": [{}], "text": ["t"]}, KEY, None, None, None)
    assert plain["text"] == ["t"] and plain["moe_run"][0]["audit_seconds"] is None


def test_the_audit_budget_decides_from_earlier_runs_and_the_row_keeps_it():
    from moe_sampler.experts.reference import AuditBudget

    budget = AuditBudget(0.04)
    attempt = types.SimpleNamespace(nfe=20)
    first = online.decide_audit(KEY, 1.0, budget=budget)
    assert first.audit and first.probability == 1.0 and first.share == 0.0 and not first.skipped
    info = online.note_calls(KEY, [attempt], online.Audit(0.7, 0.01, 100, 2.0), first, 1.0, budget=budget)
    assert info == {"rate": 1.0, "probability": 1.0, "skipped": False, "nfe": 100, "share": pytest.approx(100 / 120),
                    "budget": 0.04}
    second = online.decide_audit(KEY, 1.0, budget=budget)  # 100 of 120 calls: over budget
    assert not second.audit and second.skipped and second.probability == 0.0
    info = online.note_calls(KEY, [attempt, attempt], None, second, 1.0, budget=budget)  # a fallback: 2 attempts
    assert info["skipped"] and info["nfe"] is None and info["share"] == pytest.approx(100 / 160)
    assert budget.calls(KEY) == (60, 100, 1)
    assert online.decide_audit("other-model", 1.0, budget=budget).audit  # one ledger per model
    off = online.decide_audit(KEY, 0.0, budget=budget)
    assert not off.audit and not off.skipped
    assert online.note_calls(KEY, [attempt], None, off, 0.0, budget=budget) is None  # audits off: nothing kept
    with pytest.raises(ValueError, match="^audit_rate"):
        online.decide_audit(KEY, 2.0, budget=budget)


def test_the_audit_budget_is_set_by_the_environment(monkeypatch, caplog):
    for text, share in (("", 0.04), ("none", None), ("0.1", 0.1), ("1.5", 0.04), ("lots", 0.04)):
        monkeypatch.setattr(online, "_budget", None)
        monkeypatch.setenv(online.AUDIT_SHARE_ENV, text)
        assert online.audit_budget().share == share, text
        assert online.audit_budget().first_cost == 400  # a model's first audit counted at the cap
    assert "MOE_SAMPLER_AUDIT_SHARE='lots' is not a share" in caplog.text
    assert online.audit_budget() is online.audit_budget()


def test_the_audit_budget_remembers_earlier_processes_through_the_store(tmp_path, monkeypatch):
    """A ComfyUI restart must not forget a model's calls and audits: its first run in a process
    starts the ledger from the stored runs (else, with the first audit counted at the 400-call cap,
    a user who restarts daily would never be audited, or would be audited again at once)."""
    monkeypatch.delenv(online.AUDIT_SHARE_ENV, raising=False)
    audited = {"audit": {"rate": 0.02, "probability": 0.02, "skipped": False, "nfe": 300}}
    with StatsStore(tmp_path / "stats.sqlite3") as store:
        for record in (_record(model=KEY, nfe=6000), _record(model=KEY, nfe=4000),
                       _record(model=KEY, nfe=30, audit_seconds=1.5, details=audited),
                       _record(model=KEY, nfe=30, audit_seconds=1.0, details={"why": "an older row"}),
                       _record(model="other", nfe=50_000), _record(model=KEY, nfe=9999, source="training")):
            assert store.record(record)
        assert store.model_calls(KEY, audit_cost=400) == (10_060, 700, 2)
        assert store.model_calls("unknown") == (0, 0, 0)

        monkeypatch.setattr(online, "_budget", None)  # a fresh process
        draw = online.decide_audit(KEY, 1.0, store=store)
        assert online.audit_budget().calls(KEY) == (10_060, 700, 2)
        assert not draw.audit and draw.skipped  # 700 of 10,760 calls: already over 4%
        fresh = online.decide_audit("other", 1.0, store=store)  # 50,000 calls and no audit yet
        assert fresh.audit and online.audit_budget().calls("other") == (50_000, 0, 0)

    class Unreadable:
        def model_calls(self, *args, **kwargs):
            raise OSError("the disk is gone")

    monkeypatch.setattr(online, "_budget", None)
    draw = online.decide_audit(KEY, 1.0, store=Unreadable())  # sampling goes on; counts from now
    assert not draw.audit and online.audit_budget().calls(KEY) == (0, 0, 0)


def test_badge_shows_the_audit_share_and_a_skipped_audit():
    audit = online.Audit(0.71, 0.0075, 100, 2.5)
    info = {"rate": 0.02, "probability": 0.02, "skipped": False, "nfe": 100, "share": 0.031, "budget": 0.04}
    out = online.badge_extras({"moe_run": [{}], "text": ["t"]}, KEY, None, audit, None, info)
    assert out["text"][0].splitlines()[1] == ("audited: quality 0.71, +2.50 s for the 100-call reference; audits are "
                                              "3.1% of this model's calls (budget 4%)")
    assert out["moe_run"][0]["audit_share"] == 0.031 and not out["moe_run"][0]["audit_skipped"]
    skipped = {**info, "probability": 0.0, "skipped": True, "nfe": None, "share": 0.043}
    out = online.badge_extras({"moe_run": [{}], "text": ["t"]}, KEY, None, None, None, skipped)
    assert out["text"][0].splitlines()[1] == "audit skipped by the budget; audits are 4.3% of this model's calls (budget 4%)"
    assert out["moe_run"][0]["audit_skipped"] and not out["moe_run"][0]["audited"]
    quiet = online.badge_extras({"moe_run": [{}], "text": ["t"]}, KEY, None, None, None, {**info, "nfe": None})
    assert quiet["text"] == ["t"]  # not drawn: nothing to say


def test_a_router_of_another_model_is_flagged():
    router = Router.default()
    router.training["model"] = "eps-aaaaaaaaaa"
    assert "trained on another model (eps-aaaaaaaaaa" in online.model_warning(router, KEY, "r.safetensors")
    router.training["model"] = KEY
    assert online.model_warning(router, KEY, "r.safetensors") is None
    del router.training["model"]
    assert "does not record which model" in online.model_warning(router, KEY, "r.safetensors")


def test_model_fingerprint_is_cached_per_network(monkeypatch):
    from moe_sampler.router import online as router_online

    net = torch.nn.Linear(3, 3)
    model = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=net))
    calls = []
    real = router_online.fingerprint_tensors
    monkeypatch.setattr(router_online, "fingerprint_tensors", lambda named: calls.append(1) or real(named))
    first = online.model_fingerprint(model)
    assert online.model_fingerprint(model) == first and len(calls) == 1
    other = torch.nn.Linear(3, 3)
    assert online.model_fingerprint(types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=other))) != first
