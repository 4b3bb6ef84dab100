"""Training spread over a farm (issue 12, item 3): workers sweep a job's contexts into the shared
store, one update learns from all rows; no context swept twice, no row lost when a worker dies.

Every test runs on both backends: a SQLite file (several processes on one machine) and a real
PostgreSQL server (``MOE_SAMPLER_TEST_DATABASE_URL`` or a throwaway one, ``tests/helpers/postgres.py``;
each test gets a schema of its own). The sweeps run on the analytic model (cheap).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import BOOTSTRAP
from helpers import postgres as pg_helper

from moe_sampler.experts import get_expert
from moe_sampler.router.environment import AnalyticEnvironment
from moe_sampler.router import farm as farm_module
from moe_sampler.router.farm import (
    UPDATES_PER_EPISODE,
    ClaimLost,
    adopt,
    context_priority,
    run_farm_worker,
    sweep_context,
    train_from_runs,
)
from moe_sampler.router.versions import LocalRegistry
from moe_sampler.stats.claims import FarmJob, job_key
from moe_sampler.stats.store import RunRecord, StatsStore

POOL = ("SpeedDemon", "BalancedMaster")
NAME = "farm_router"
SLOW = 240.0  # seconds the multi-process test may take at most on a loaded 2-core machine


@pytest.fixture(params=["sqlite", "postgresql"])
def farm(request, tmp_path):
    """``{"kind", "where", "schema", "folder"}``: one shared store (and registry) for the test's workers."""
    if request.param == "sqlite":
        yield {"kind": "sqlite", "where": str(tmp_path / "stats.sqlite3"), "schema": None, "folder": str(tmp_path)}
        return
    url = pg_helper.url_or_skip()
    schema = pg_helper.unique_schema()
    yield {"kind": "postgresql", "where": url, "schema": schema, "folder": str(tmp_path)}
    pg_helper.drop_schema(url, schema)


def open_store(farm: dict) -> StatsStore:
    kwargs = {"schema": farm["schema"]} if farm["schema"] else {}
    return StatsStore(farm["where"], **kwargs)


def open_registry(farm: dict, worker: str):
    """The router registry every worker adopts through: the routers folder (SQLite), the database (PostgreSQL)."""
    if farm["kind"] == "sqlite":
        return LocalRegistry(Path(farm["folder"]) / "routers")
    from moe_sampler.router.pg_registry import PostgresRegistry

    return PostgresRegistry(farm["where"], Path(farm["folder"]) / f"routers_{worker}", schema=farm["schema"])


def pool():
    return [get_expert(name) for name in POOL]


def spec(contexts: int) -> dict:
    return {"test": "farm", "contexts": contexts, "pool": list(POOL), "analytic_seed": 0}


def make_worker(farm: dict, contexts: int, worker: str, lease: float = 2.0, update_lease: float = 3.0,
                die_after_runs: int | None = None, on_run=None):
    """(job, sweep, update, registry) of one worker on the analytic model."""
    store = open_store(farm)
    registry = open_registry(farm, worker)
    environment = AnalyticEnvironment(pool_size=contexts, seed=0)
    experts = pool()
    key = job_key(spec(contexts))
    job = FarmJob(store, key, contexts, spec(contexts), worker=worker, lease=lease, update_lease=update_lease)
    runs_done = [0]

    def after_run(renew):
        def call():
            runs_done[0] += 1
            if on_run is not None:
                on_run(runs_done[0])
            if die_after_runs is not None and runs_done[0] >= die_after_runs:
                os.kill(os.getpid(), signal.SIGKILL)  # mid-episode: the claim is held, nothing of it written
            renew()
        return call

    def sweep(index, renew):
        return sweep_context(environment, environment.contexts[index], experts, context_priority(key, index),
                             job=key, index=index, router_label=NAME + ".safetensors", model="analytic-test",
                             after_run=after_run(renew))

    def update(runs, renew):
        router = train_from_runs(runs, experts, steps=UPDATES_PER_EPISODE * contexts, between=renew)
        router.name = NAME
        return adopt(registry, NAME, router, key)

    return job, sweep, update, registry, store


def worker_main(farm: dict, contexts: int, worker: str, out: str, die_after_runs: int | None, slow: float) -> None:
    """One worker process: sweep until the job is done; its FarmResult as JSON in ``out``."""
    job, sweep, update, registry, store = make_worker(
        farm, contexts, worker, die_after_runs=die_after_runs, on_run=lambda n: time.sleep(slow))
    result = run_farm_worker(job, sweep, update, poll=0.1)
    Path(out).write_text(json.dumps(result.__dict__))
    job.close()
    store.close()


WORKER = BOOTSTRAP + "import json, sys; import test_farm_sweeps as t; t.worker_main(**json.loads(sys.argv[1]))\n"


def start_worker(farm, contexts, worker, tmp_path, die_after_runs=None, slow=0.0) -> subprocess.Popen:
    args = dict(farm=farm, contexts=contexts, worker=worker, out=str(tmp_path / f"{worker}.json"),
                die_after_runs=die_after_runs, slow=slow)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(args)], env=env, cwd=str(tmp_path),
                            stderr=subprocess.PIPE, text=True)


def pairs(runs: list[RunRecord]) -> list[tuple[int, str]]:
    return [((r.details_dict() or {})["farm"]["context"], r.expert) for r in runs]


def same_weights(a, b) -> bool:
    sa, sb = a.scorer.state_dict(), b.scorer.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------ the claims


def test_each_context_is_handed_out_once_to_concurrent_claimers(farm):
    contexts = 40
    store = open_store(farm)
    key = job_key(spec(contexts))
    claimed: list[tuple[str, int]] = []
    lock = threading.Lock()

    def claimer(name: str) -> None:
        with FarmJob(store, key, contexts, spec(contexts), worker=name) as job:
            while (claim := job.claim()) is not None:
                with lock:
                    claimed.append((name, claim.context))
                assert job.complete(claim, [])

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    numbers = sorted(context for _, context in claimed)
    assert numbers == list(range(contexts)), "a context was handed out twice or never"
    with FarmJob(store, key, contexts) as job:
        progress = job.progress()
        assert (progress.done, progress.claimed, progress.expired, progress.state) == (contexts, 0, 0, "sweeping")
    store.close()


def test_a_retaken_claim_cannot_write_its_rows(farm):
    """A slow worker whose lease ran out: another worker retakes the context, the slow one's rows are refused."""
    store = open_store(farm)
    key = job_key(spec(3))
    row = RunRecord(expert="SpeedDemon", router="r", nfe=8, steps=8, seconds=0.1, success=True, quality=0.5)
    with FarmJob(store, key, 3, worker="slow", lease=0.3) as slow, FarmJob(store, key, 3, worker="quick") as quick:
        first = slow.claim()
        assert first.context == 0 and first.attempt == 1
        assert quick.claim().context == 1  # a live claim is never retaken
        time.sleep(0.5)
        again = quick.claim()
        assert (again.context, again.attempt) == (0, 2), "the expired claim was not retaken"
        assert not slow.renew(first)
        assert not slow.complete(first, [row, row])
        assert quick.complete(again, [row])
        assert quick.complete(again, [row]), "a repeated complete (a retry after a dropped connection) is a success"
        rows = quick.runs()
        assert len(rows) == 1 and rows[0].job == key
        assert quick.contexts_done() == {0: ("quick", 2, 1)}
    store.close()


def test_the_final_update_runs_once_and_is_retaken_when_its_worker_dies(farm):
    store = open_store(farm)
    key = job_key(spec(2))
    with FarmJob(store, key, 2, worker="a", update_lease=0.3) as a, FarmJob(store, key, 2, worker="b") as b:
        claims = [a.claim(), a.claim()]
        assert a.take_update() is None  # contexts still claimed
        assert a.complete(claims[0], []) and a.take_update() is None
        assert a.complete(claims[1], [])
        token = a.take_update()
        assert token is not None and b.take_update() is None and b.progress().state == "training"
        time.sleep(0.5)  # a died while fitting: its update lease runs out
        other = b.take_update()
        assert other is not None and not a.finish_update(token, 1)
        b.release_update(other)  # b's fit failed: the update is free again at once
        assert a.take_update() is not None and not b.finish_update(other, 7)
        time.sleep(0.5)
        other = b.take_update()
        assert other is not None and b.finish_update(other, 7)
        progress = b.progress()
        assert (progress.state, progress.version, progress.worker) == ("done", 7, "b")
        assert a.take_update() is None
    store.close()


def test_a_released_claim_is_taken_at_once(farm):
    store = open_store(farm)
    key = job_key(spec(1))
    with FarmJob(store, key, 1, worker="a", lease=600) as a, FarmJob(store, key, 1, worker="b") as b:
        claim = a.claim()
        assert b.claim() is None
        a.release(claim)  # interrupted: no need to wait 600 s
        retaken = b.claim()
        assert retaken is not None and (retaken.context, retaken.attempt) == (0, 2)
    store.close()


def test_the_update_depends_on_the_rows_not_on_their_order(farm):
    job, sweep, update, registry, store = make_worker(farm, 4, "solo")
    result = run_farm_worker(job, sweep, update, poll=0.05)
    assert (result.swept, result.lost, result.done, result.ran_update, result.version) == (4, 0, 4, True, 1)
    runs = job.runs()
    shuffled = list(runs)
    random.Random(1).shuffle(shuffled)
    a = train_from_runs(runs, pool(), steps=16)
    b = train_from_runs(shuffled, pool(), steps=16)
    assert same_weights(a, b)
    # every swept row is a calibration pair, and the router keeps the job's calibration
    paired = [r for r in runs if r.success and "true_error" in (r.details_dict() or {})]
    assert paired and len(paired) == sum(r.success for r in runs)
    assert all(r.details_dict()["estimate"]["estimate"] > 0 for r in paired)
    assert a.training["calibration"]["experts"]["*"]["pairs"] == len(paired)
    with pytest.raises(ClaimLost):
        def lose():
            raise ClaimLost("gone")
        sweep(0, lose)
    # Asked again, the job is done: nothing swept, the same version, no second adoption.
    again = run_farm_worker(job, sweep, update, poll=0.05)
    assert (again.swept, again.ran_update, again.version, again.state) == (0, False, 1, "done")
    assert [v.version for v in registry.versions(NAME)] == [1]
    job.close()
    store.close()


def test_a_final_update_taken_over_while_fitting_stops_and_adopts_nothing(farm, monkeypatch):
    """The fit renews the update's lease between chunks; once another worker took the update
    over, this worker stops fitting (ClaimLost), publishes nothing and waits for the other."""
    monkeypatch.setattr(farm_module, "FIT_CHUNK", 2)
    job, sweep, _, registry, store = make_worker(farm, 4, "solo")
    other = FarmJob(open_store(farm), job.key, 4, spec(4), worker="other", update_lease=60.0)
    fits = []

    def update(runs, renew):
        def between():
            fits.append(len(fits))
            if len(fits) == 2:  # this worker's lease ran out while it fitted; the other took it
                assert other.take_update() is None  # still this worker's lease
                job._retry(lambda conn: job._count(  # its lease runs out (a loaded machine, a long fit)
                    conn, "UPDATE {schema}.farm_jobs SET lease = {now} - 1 WHERE job = ?", (job.key,)))
                token = other.take_update()
                assert token is not None and other.finish_update(token, 9)
            renew()
        train_from_runs(runs, pool(), steps=UPDATES_PER_EPISODE * 4, between=between)
        raise AssertionError("the fit must stop once the update was retaken")

    result = run_farm_worker(job, sweep, update, poll=0.05)
    assert len(fits) == 2 and not result.ran_update and result.state == "done" and result.version == 9
    assert registry.versions(NAME) == []  # this worker adopted nothing
    steps = UPDATES_PER_EPISODE * 4
    runs = job.runs()
    assert same_weights(train_from_runs(runs, pool(), steps=steps),
                        train_from_runs(runs, pool(), steps=steps, between=lambda: None))  # chunks change nothing
    for opened in (job, other):
        opened.close()
    store.close()
    other.store.close()


# ------------------------------------------------------------------------------ worker processes


def test_workers_killed_mid_episode_lose_no_row_and_sweep_no_context_twice(farm, tmp_path):
    """4 worker processes on one job: one kills itself mid-episode (holding a claim), one is killed
    by SIGKILL at a random moment; the other two finish. Every context is done exactly once, its
    rows are all there without duplicates, and one update adopted one version trained on all rows."""
    contexts = 12
    started = time.monotonic()
    workers = {
        "dies": start_worker(farm, contexts, "dies", tmp_path, die_after_runs=3, slow=0.05),
        "killed": start_worker(farm, contexts, "killed", tmp_path, slow=0.1),
        "a": start_worker(farm, contexts, "a", tmp_path, slow=0.05),
        "b": start_worker(farm, contexts, "b", tmp_path, slow=0.05),
    }
    store = open_store(farm)
    key = job_key(spec(contexts))
    watcher = FarmJob(store, key, contexts, worker="watcher")
    kill_at = random.Random().randint(2, 6)
    killed_at = None
    while time.monotonic() - started < SLOW:
        try:
            done = watcher.progress().done
        except Exception:  # the job or its tables are not there yet
            done = 0
        if killed_at is None and done >= kill_at:
            workers["killed"].send_signal(signal.SIGKILL)
            killed_at = done
        if all(worker.poll() is not None for worker in workers.values()):
            break
        time.sleep(0.05)
    for name, worker in workers.items():
        if worker.poll() is None:
            worker.kill()
            pytest.fail(f"worker {name} did not finish in {SLOW} s: {worker.stderr.read()[-2000:]}")
    codes = {name: worker.returncode for name, worker in workers.items()}
    assert codes["dies"] == -signal.SIGKILL
    assert codes["a"] == 0 and codes["b"] == 0, {n: w.stderr.read()[-2000:] for n, w in workers.items()}
    results = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("a", "b")}
    if codes["killed"] == 0:  # it finished before the signal arrived
        results["killed"] = json.loads((tmp_path / "killed.json").read_text())

    # Every context done exactly once, by a worker that held its claim.
    progress = watcher.progress()
    assert (progress.done, progress.claimed, progress.expired, progress.state) == (contexts, 0, 0, "done")
    done = watcher.contexts_done()
    assert sorted(done) == list(range(contexts))
    assert all(rows == len(POOL) for _, _, rows in done.values())
    assert any(attempts >= 2 for _, attempts, _ in done.values()), "the context of the dead worker was not retaken"
    # "dies" wrote its first context (2 runs) and died in the first run of its second one.
    assert [worker for worker, _, _ in done.values()].count("dies") == 1

    # Its rows: all there, none twice.
    runs = watcher.runs()
    expected = sorted((c, e) for c in range(contexts) for e in POOL)
    assert sorted(pairs(runs)) == expected
    assert all(r.job == key and r.source == "training" and r.quality_source == "sweep" for r in runs)

    # One update, one adopted version, trained on all rows (the same weights as a fit of them here).
    assert all(r["state"] == "done" and r["version"] == 1 for r in results.values())
    assert sum(r["ran_update"] for r in results.values()) <= 1
    assert sum(r["swept"] for r in results.values()) <= contexts
    registry = open_registry(farm, "checker")
    versions = registry.versions(NAME)
    assert [v.version for v in versions] == [1]
    adopted = registry.load(NAME, 1)
    assert adopted.training["farm_job"] == key
    assert (adopted.training["contexts"], adopted.training["runs"]) == (contexts, contexts * len(POOL))
    assert same_weights(adopted, train_from_runs(runs, pool(), steps=UPDATES_PER_EPISODE * contexts))
    watcher.close()
    store.close()


def test_a_worker_rides_out_a_server_restart(tmp_path):
    """PostgreSQL restarted while a worker sweeps: its connection is dropped, it reconnects, and the
    job ends with every context done once and every row there once."""
    url = pg_helper.url_or_skip()
    farm = {"kind": "postgresql", "where": url, "schema": pg_helper.unique_schema(), "folder": str(tmp_path)}
    restarted = []

    def restart(runs_done: int) -> None:
        if runs_done == 3 and not restarted:  # mid-episode: after the first expert of the second context
            try:
                pg_helper.restart_server()
            except pg_helper.Unavailable as exc:
                pytest.skip(str(exc))
            restarted.append(True)

    try:
        job, sweep, update, registry, store = make_worker(farm, 4, "solo", on_run=restart)
        result = run_farm_worker(job, sweep, update, poll=0.05)
        assert restarted
        assert (result.swept, result.lost, result.done, result.rows, result.version) == (4, 0, 4, 8, 1)
        assert sorted(pairs(job.runs())) == sorted((c, e) for c in range(4) for e in POOL)
        job.close()
        store.close()
    finally:
        pg_helper.drop_schema(url, farm["schema"])
