"""Router versions in PostgreSQL (issue 12, item 2): adopt/load round trip, concurrent adopters
(only one wins), other workers following a new version without a restart, a worker that loses
the database keeping its last version, and the learning loop's wiring (a PostgreSQL stats store
selects this registry).

Against a real server: ``MOE_SAMPLER_TEST_DATABASE_URL`` or a throwaway cluster
(``tests/helpers/postgres.py``); each test gets a schema (or a database) of its own.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import types
import uuid
from pathlib import Path

import pytest
import torch

from helpers import import_node_module
from helpers import postgres as pg_helper

from moe_sampler.router.model import Router, RouterLoadError
from moe_sampler.router.pg_registry import LostRace, PostgresRegistry, RegistryUnavailable, shared_registry

NAME = "learned/eps-0123456789"
SLOW = 120.0  # seconds a polling wait allows (a loaded 2-core CI machine)


@pytest.fixture
def db():
    url = pg_helper.url_or_skip()
    schema = pg_helper.unique_schema()
    yield url, schema
    pg_helper.drop_schema(url, schema)


def make_router(seed: int = 0, model: str = "eps-0123456789") -> Router:
    router = Router.default()
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in router.scorer.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    router.name = NAME
    router.training = {**router.training, "model": model, "seed": seed}
    return router


def same_weights(a: Router, b: Router) -> bool:
    sa, sb = a.scorer.state_dict(), b.scorer.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def wait_until(predicate, timeout: float = SLOW, every: float = 0.05) -> float:
    """Poll ``predicate`` until true; the seconds it took (fails after ``timeout``)."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(every)
    return time.monotonic() - start


def test_adopt_and_load_round_trip(db, tmp_path):
    url, schema = db
    registry = PostgresRegistry(url, tmp_path / "a", schema=schema)
    assert registry.latest(NAME) is None and registry.versions(NAME) == []
    with pytest.raises(RouterLoadError, match="no adopted version"):
        registry.load(NAME)
    first = make_router(1)
    info = registry.publish(NAME, first)
    assert info.version == 1 and info.training["parent"] is None and info.training["model"] == "eps-0123456789"
    assert registry.latest(NAME).version == 1
    loaded = registry.load(NAME)
    assert same_weights(loaded, first) and loaded.training["version"] == 1
    # the adopted version is copied into the local cache in LocalRegistry's layout
    assert registry.followed_path(NAME).is_file() and registry.version_path(NAME, 1).is_file()
    assert Router.load(registry.followed_path(NAME)).training["version"] == 1

    second = registry.load(NAME)  # an update starts from the adopted version ...
    with torch.no_grad():
        next(second.scorer.parameters()).add_(1.0)
    info = registry.publish(NAME, second)  # ... and adopts the next one
    assert info.version == 2 and info.training["parent"] == 1
    assert [v.version for v in registry.versions(NAME)] == [1, 2]
    assert same_weights(registry.load(NAME, 1), first) and same_weights(registry.load(NAME), second)
    assert Router.load(registry.followed_path(NAME)).training["version"] == 2
    with pytest.raises(RouterLoadError, match="no version 7"):
        registry.load(NAME, 7)
    # another name is independent; rows of the database hold the bytes and who adopted them
    assert registry.publish("learned/other", make_router(3, "other")).version == 1
    assert registry.adopted() == {NAME: 2, "learned/other": 1}
    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute(f"SELECT version, parent, worker, model, length(data) FROM {schema}.router_versions "
                            "WHERE name = %s ORDER BY version", (NAME,)).fetchall()
    assert [(r[0], r[1]) for r in rows] == [(1, None), (2, 1)]
    assert all(r[2] == registry.worker and r[3] == "eps-0123456789" and r[4] > 1000 for r in rows)


@pytest.mark.parametrize("base", [0, 1])
def test_two_workers_adopting_at_once_only_one_wins(db, tmp_path, base):
    """8 workers (each its own registry, connection and cache) adopt a candidate fitted from the
    same version at the same moment: exactly one version is stored, the others lose the race."""
    url, schema = db
    if base:
        PostgresRegistry(url, tmp_path / "seed", schema=schema).publish(NAME, make_router(0))
    workers = [PostgresRegistry(url, tmp_path / f"w{i}", schema=schema, worker=f"w{i}") for i in range(8)]
    candidates = []
    for i, worker in enumerate(workers):
        candidate = worker.load(NAME) if base else make_router(100 + i)
        with torch.no_grad():
            next(candidate.scorer.parameters()).add_(float(i + 1))
        candidates.append(candidate)
    barrier = threading.Barrier(len(workers))
    results: list = [None] * len(workers)

    def adopt(i: int) -> None:
        barrier.wait(timeout=SLOW)
        try:
            results[i] = workers[i].publish(NAME, candidates[i])
        except Exception as exc:  # noqa: BLE001 - the test inspects what each worker got
            results[i] = exc

    threads = [threading.Thread(target=adopt, args=(i,)) for i in range(len(workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SLOW)
    winners = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1, results
    assert all(isinstance(r, LostRace) for r in losers), losers
    assert all(f"lost the race: v{base + 1} was adopted by another worker" in str(r) for r in losers)
    assert all(r.expected == base and r.current == base + 1 for r in losers)
    check = PostgresRegistry(url, tmp_path / "check", schema=schema)
    assert [v.version for v in check.versions(NAME)] == list(range(1, base + 2))
    assert same_weights(check.load(NAME), candidates[winners[0]])
    # a loser's next update starts from the winner and adopts the version after it
    loser = next(i for i in range(len(workers)) if i not in winners)
    assert workers[loser].publish(NAME, workers[loser].load(NAME)).version == base + 2


def test_another_worker_follows_a_new_version_without_a_restart(db, tmp_path):
    url, schema = db
    a = PostgresRegistry(url, tmp_path / "a", schema=schema, worker="a")
    b = PostgresRegistry(url, tmp_path / "b", schema=schema, poll=0.2, worker="b")
    copied: list = []
    b.listeners.append(lambda name, version: copied.append((name, version, time.time())))
    try:
        b.follow()
        wait_until(lambda: b.checks >= 1)
        assert b.online is True and not b.followed_path(NAME).exists()
        delays = []
        for version in (1, 2, 3):
            router = a.load(NAME) if version > 1 else make_router(5)
            with torch.no_grad():
                next(router.scorer.parameters()).add_(0.5)
            adopted_at = time.time()
            assert a.publish(NAME, router).version == version
            wait_until(lambda: copied and copied[-1][1] == version)
            delays.append(copied[-1][2] - adopted_at)
            # what the sampler loads on worker b is now the new version
            on_b = Router.load(b.followed_path(NAME))
            assert on_b.training["version"] == version and same_weights(on_b, a.load(NAME))
            assert b.version_path(NAME, version).is_file()
        logging.getLogger(__name__).warning("adoption on a -> copied on b (poll 0.2 s): %s s",
                                            ", ".join(f"{d:.3f}" for d in delays))
        checks = b.checks
        time.sleep(1.0)
        assert b.checks - checks <= 1.0 / 0.2 + 2  # at most one small query per interval
    finally:
        b.close()
    # a new worker starting later gets the adopted version on its first check
    c = PostgresRegistry(url, tmp_path / "c", schema=schema)
    assert c.sync() == [(NAME, 3)] and c.sync() == []
    assert Router.load(c.followed_path(NAME)).training["version"] == 3


def test_a_worker_that_loses_the_database_keeps_its_last_version(db, tmp_path, caplog):
    url, schema = db
    cache = tmp_path / "b"
    PostgresRegistry(url, tmp_path / "a", schema=schema).publish(NAME, make_router(9))
    b = PostgresRegistry(url, cache, schema=schema)
    assert b.sync() == [(NAME, 1)]
    # the same worker with its database gone (a port nothing listens on): reads fall back to the cache
    from helpers.comfy_server import free_port

    gone = PostgresRegistry(f"postgresql://moe@127.0.0.1:{free_port()}/moe_sampler_test", cache, schema=schema,
                            poll=0.1)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert gone.latest(NAME).version == 1
        assert gone.load(NAME).training["version"] == 1 and gone.load(NAME, 1).training["version"] == 1
        assert [v.version for v in gone.versions(NAME)] == [1]
    assert time.monotonic() - start < 30
    assert "using the local copy" in caplog.text
    with pytest.raises(RegistryUnavailable, match="router registry in"):
        gone.sync()
    with pytest.raises(RegistryUnavailable):
        gone.publish(NAME, gone.load(NAME))
    with pytest.raises(RouterLoadError, match="not cached here"):
        gone.load(NAME, 5)
    try:
        with caplog.at_level(logging.WARNING):
            gone.follow()
            wait_until(lambda: gone.online is False)
        assert "sampling goes on with the local copies" in caplog.text
        assert Router.load(gone.followed_path(NAME)).training["version"] == 1  # untouched
    finally:
        gone.close()


def test_the_follower_survives_a_server_restart(db, tmp_path):
    url, schema = db
    a = PostgresRegistry(url, tmp_path / "a", schema=schema)
    b = PostgresRegistry(url, tmp_path / "b", schema=schema, poll=0.2)
    a.publish(NAME, make_router(1))
    try:
        b.follow()
        wait_until(lambda: b.followed_path(NAME).is_file())
        try:
            pg_helper.restart_server()
        except pg_helper.Unavailable as exc:
            pytest.skip(str(exc))
        wait_until(lambda: b.online is True and b.checks > 0)
        assert Router.load(b.followed_path(NAME)).training["version"] == 1
        router = a.load(NAME)
        with torch.no_grad():
            next(router.scorer.parameters()).add_(0.25)
        a.publish(NAME, router)  # the follower reconnects and copies it
        wait_until(lambda: Router.load(b.followed_path(NAME)).training["version"] == 2)
    finally:
        b.close()


# ------------------------------------------------------------------------------ the learning loop's wiring


@pytest.fixture
def database():
    """A database of its own (the learning loop uses the default schema, as ComfyUI does)."""
    import psycopg

    url = pg_helper.url_or_skip()
    name = "moe_t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    head, _, _ = url.rpartition("/")
    yield f"{head}/{name}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def fake_folder_paths(root: Path, monkeypatch) -> None:
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(root / "models")
    fp.folder_names_and_paths = {}

    def add_model_folder_path(name, path, is_default=False):
        fp.folder_names_and_paths.setdefault(name, ([], set()))[0].insert(0, path)

    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])
    fp.get_filename_list = lambda name: []
    fp.get_system_user_directory = lambda name: str(root / "user" / f"__{name}")
    monkeypatch.setitem(sys.modules, "folder_paths", fp)


def test_learning_loop_uses_the_shared_registry_with_a_postgresql_store(database, tmp_path, monkeypatch):
    paths = import_node_module("paths")
    online = import_node_module("online_learning")
    from moe_sampler.router.versions import LocalRegistry

    fake_folder_paths(tmp_path, monkeypatch)
    assert isinstance(online.registry(), LocalRegistry)  # no URL configured: the routers folder
    monkeypatch.setenv(paths.DATABASE_URL_VARIABLE, database)
    monkeypatch.setenv("MOE_SAMPLER_ROUTER_POLL_SECONDS", "0.2")
    registry = online.registry()
    try:
        assert isinstance(registry, PostgresRegistry) and registry is online.registry()  # one per process
        assert registry.cache.folder == Path(paths._router_folders()[0])
        # another worker (its own cache) adopts a version of this model's router in the database
        key = "eps-0123456789"
        other = PostgresRegistry(database, tmp_path / "other_worker")
        other.publish(online.learned_router_name(key), make_router(4, key))
        # this worker's sampler follows it without a restart (the follower copies it into the folder)
        wait_until(lambda: registry.followed_path(online.learned_router_name(key)).is_file())
        paths._router_cache.clear()
        online._policies.clear()
        learned = online.learned_policy(key)
        assert learned.version == 1
    finally:
        registry.close()
        online_module_shared = sys.modules["moe_sampler.router.pg_registry"]._shared
        online_module_shared.clear()


def test_without_psycopg_the_registry_imports_and_serves_the_local_copy(tmp_path):
    """psycopg is optional: the module imports, reads fall back to the local copy and the follower
    says what to install (once), never a traceback per check."""
    import subprocess

    from helpers import BOOTSTRAP

    script = BOOTSTRAP + f"""
import logging, sys, time
sys.modules["psycopg"] = None  # import psycopg now raises ImportError
logging.basicConfig(level=logging.WARNING)
from moe_sampler.router.model import Router
from moe_sampler.router.versions import LocalRegistry
from moe_sampler.router.pg_registry import PostgresRegistry
LocalRegistry({str(tmp_path)!r}).publish("learned/x", Router.default())
registry = PostgresRegistry("postgresql://user:secret@127.0.0.1:1/farm", {str(tmp_path)!r}, poll=0.05)
assert registry.latest("learned/x").version == 1 and registry.load("learned/x").training["version"] == 1
registry.follow()
time.sleep(1.0)
registry.close()
print(registry.online, registry.checks)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "0"]
    assert "pip install 'moe-adaptive-sampler[postgres]'" in done.stderr
    assert "Traceback" not in done.stderr and "secret" not in done.stderr
    assert done.stderr.count("sampling goes on with the local copies") == 1


def test_an_update_that_loses_the_race_says_so_and_stores_nothing(db, tmp_path):
    """learn_now on worker B fits from 'no version'; worker A adopts v1 during B's fit: B's update
    reports the lost race, stores no version, and B's next update starts from A's v1."""
    import random as random_module

    from moe_sampler.experts import default_pool
    from moe_sampler.stats.store import RunRecord, StatsStore

    online = import_node_module("online_learning")
    url, schema = db
    key = "eps-0123456789"
    name = online.learned_router_name(key)
    pool = default_pool()
    store = StatsStore(tmp_path / "stats.sqlite3")
    rng = random_module.Random(0)
    for i in range(600):  # one expert clearly best: the update adopts its candidate
        expert = pool[i % len(pool)]
        quality = (0.2, 0.35, 0.5, 0.6, 0.95)[i % len(pool)] + 0.04 * rng.random()
        store.record(RunRecord(expert=expert.name, router=online.learned_label(key), nfe=20, steps=10, seconds=0.1,
                               success=True, quality=min(quality, 1.0), propensity=1 / len(pool), priority=0.5,
                               state=[0.1] * 64, seed=i, model=key, quality_source="audit"))
    a = PostgresRegistry(url, tmp_path / "a", schema=schema, worker="a")
    b = PostgresRegistry(url, tmp_path / "b", schema=schema, worker="b")
    raced = []

    def adopt_on_a_during_the_fit() -> bool:
        if not raced:
            raced.append(a.publish(name, make_router(7, key)).version)
        return False

    try:
        lost = online.learn_now(key, pool, store, registry_=b, should_stop=adopt_on_a_during_the_fit, steps=50)
        assert raced == [1] and lost.result is not None and lost.result.adopted, lost.summary
        assert lost.version is None
        assert lost.summary.startswith(f"router {name}: lost the race: v1 was adopted by another worker")
        assert [v.version for v in b.versions(name)] == [1] and b.versions(name)[0].training["seed"] == 7
        again = online.learn_now(key, pool, store, registry_=b, steps=50)
        if again.result.adopted:  # judged against A's v1 this time
            assert again.version == 2 and b.load(name).training["parent"] == 1
        else:
            assert again.version is None and b.latest(name).version == 1
    finally:
        store.close()


def test_the_sampling_path_never_waits_for_a_hanging_check(db, tmp_path):
    """The sampler calls shared_registry(...) (which starts the follower) on every run: it must not
    wait while the follower's check hangs on the network (here: holds the follower's lock)."""
    url, schema = db
    registry = shared_registry(url, tmp_path / "routers", schema=schema)
    try:
        wait_until(lambda: registry.checks >= 1)
        held, release = threading.Event(), threading.Event()

        def hanging_check() -> None:  # a check in progress that does not come back
            with registry._follow_lock:
                held.set()
                release.wait(60)

        def sampling_runs() -> None:
            for _ in range(100):
                assert shared_registry(url, tmp_path / "routers", schema=schema) is registry
                registry.followed_path(NAME).is_file()

        holder = threading.Thread(target=hanging_check, daemon=True)
        holder.start()
        assert held.wait(SLOW)
        sampler = threading.Thread(target=sampling_runs, daemon=True)
        start = time.monotonic()
        sampler.start()
        sampler.join(10.0)
        blocked = sampler.is_alive()
        release.set()
        assert not blocked, "the sampling path waited for the follower's check"
        assert time.monotonic() - start < 10.0
    finally:
        registry.close()
        sys.modules["moe_sampler.router.pg_registry"]._shared.clear()


def test_a_version_whose_bytes_do_not_match_their_checksum_is_not_copied(db, tmp_path, caplog):
    import psycopg

    url, schema = db
    a = PostgresRegistry(url, tmp_path / "a", schema=schema)
    a.publish(NAME, make_router(1))
    b = PostgresRegistry(url, tmp_path / "b", schema=schema)
    assert b.sync() == [(NAME, 1)]
    a.publish(NAME, a.load(NAME))
    with psycopg.connect(url, autocommit=True) as conn:  # damaged in the database (or written half by hand)
        conn.execute(f"UPDATE {schema}.router_versions SET data = substring(data from 1 for 100) WHERE version = 2")
    with caplog.at_level(logging.WARNING):
        assert b.sync() == [] and b.sync() == []
    assert caplog.text.count("does not match its checksum") == 1
    assert Router.load(b.followed_path(NAME)).training["version"] == 1  # the sampler keeps the last good one
