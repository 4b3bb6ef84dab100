"""The stats store on both backends (SQLite file, PostgreSQL server): round trip, aggregates against
hand computation, migration, faults, export; and the regression tests of issue 9's store defects.

Every test that takes the ``target`` or ``store`` fixture runs once per backend. The PostgreSQL
variant uses ``MOE_SAMPLER_TEST_DATABASE_URL`` or starts a throwaway server
(``tests/helpers/postgres.py``); each test gets a schema of its own.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import BOOTSTRAP, run_unprivileged
from helpers import postgres as pg_helper

from moe_sampler.stats import records as records_module
from moe_sampler.stats import report, sqlite_store
from moe_sampler.stats import store as store_module
from moe_sampler.stats.store import (
    SCHEMA_VERSION,
    RunRecord,
    StatsStore,
    StatsStoreError,
    default_store_path,
)

V1_SCHEMA = """CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL,
    source TEXT NOT NULL, expert TEXT NOT NULL, router TEXT NOT NULL, state BLOB, priority REAL,
    nfe INTEGER NOT NULL, steps INTEGER NOT NULL, seconds REAL NOT NULL, quality REAL,
    success INTEGER NOT NULL, confidence REAL, propensity REAL, error TEXT)"""
FOREIGN_INSERT = """INSERT INTO {table} (created, source, expert, router, nfe, steps, seconds, success)
    VALUES (1, ?, ?, 'x', 1, 1, 0.1, 1)"""


def make_run(**overrides) -> RunRecord:
    values = dict(expert="BalancedMaster", router="default@1", nfe=20, steps=10, seconds=1.5, success=True)
    values.update(overrides)
    return RunRecord(**values)


class Target:
    """Where a test's store lives, for either backend: open stores there, run raw SQL beside the store."""

    def __init__(self, kind: str, where: str | Path, schema: str | None = None) -> None:
        self.kind, self.where, self.schema = kind, where, schema

    def open(self, **kwargs) -> StatsStore:
        if self.kind == "postgresql":
            kwargs.setdefault("schema", self.schema)
        return StatsStore(self.where, **kwargs)

    @property
    def table(self) -> str:
        return "runs" if self.kind == "sqlite" else f"{self.schema}.runs"

    def execute(self, sql: str, params=()) -> list:
        """Raw SQL (``?`` placeholders, ``{table}``) as another program would run it; the rows it returns."""
        sql = sql.replace("{table}", self.table)
        if self.kind == "sqlite":
            conn = sqlite3.connect(self.where, isolation_level=None)
            try:
                return conn.execute(sql, params).fetchall()
            finally:
                conn.close()
        import psycopg

        with psycopg.connect(self.where, autocommit=True) as conn:
            cursor = conn.execute(sql.replace("?", "%s"), params)
            return cursor.fetchall() if cursor.description else []

    def set_version(self, version: int) -> None:
        if self.kind == "sqlite":
            self.execute(f"PRAGMA user_version = {version}")
        else:
            self.execute(f"UPDATE {self.schema}.meta SET value = '{version}' WHERE key = 'schema_version'")

    def create_at_version(self, version: int) -> None:
        """An empty database at an old schema version, made with that version's migration steps."""
        if self.kind == "sqlite":
            for step in store_module.MIGRATIONS[:version]:
                for statement in step:
                    self.execute(statement)
        else:
            from moe_sampler.stats import postgres_store

            self.execute(f"CREATE SCHEMA {self.schema}")
            self.execute(f"CREATE TABLE {self.schema}.meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.execute(f"INSERT INTO {self.schema}.meta VALUES ('schema_version', '0')")
            for step in postgres_store.MIGRATIONS[:version]:
                for statement in step:
                    self.execute(statement)
        self.set_version(version)


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    if request.param == "sqlite":
        yield Target("sqlite", tmp_path / "stats.sqlite3")
        return
    url = pg_helper.url_or_skip()
    schema = pg_helper.unique_schema()
    yield Target("postgresql", url, schema)
    pg_helper.drop_schema(url, schema)


@pytest.fixture
def store(target):
    with target.open(timeout=2.0) as opened:
        yield opened


def test_round_trip_keeps_every_field(store):
    runs = [
        make_run(
            expert="SpeedDemon", source="training", state=[i / 7 for i in range(64)], priority=0.25,
            quality=0.8, confidence=0.6, propensity=0.4, seed=2**64 - 1, created=1_700_000_000.5,
            quality_source="sweep", error_estimate=-1.25, model="sd15:0123abcd", audit_seconds=0.0,
            details={"why": {"priority": 0.25, "scores": [0.1, 0.9]}, "router_version": 4, "name": "é"},
        ),
        make_run(success=False, error="NaN in the latent", quality=None, seed=-3, nfe=0, steps=0, seconds=0.0),
    ]  # fmt: skip
    assert all(store.record(run) for run in runs)
    assert store.runs() == runs
    assert store.runs()[0].state[1] == pytest.approx(1 / 7, rel=1e-6)


def test_a_run_recorded_twice_is_stored_once(store):
    run, other = make_run(seed=1), make_run(seed=1)
    assert run.run_id != other.run_id and len(run.run_id) == 32
    assert store.record(run) and store.record(run) and store.record(other)
    assert [r.run_id for r in store.runs()] == [run.run_id, other.run_id]


def test_a_write_retried_after_its_commit_answer_was_lost_stores_the_run_once(target, monkeypatch):
    """The connection dies after the database committed but before the store heard back: the store
    cannot know, so it retries; the retry must not store the run a second time (issue 12)."""
    if target.kind == "postgresql":
        import psycopg

        lost = psycopg.OperationalError("server closed the connection unexpectedly")
    else:
        lost = sqlite3.OperationalError("database is locked")
        lost.sqlite_errorcode = 5  # SQLITE_BUSY: the kind of failure the store retries
    with target.open(timeout=2.0) as store:
        store.record(make_run(seed=0))  # opens and migrates
        real_insert, calls = store.backend.insert, []

        def insert_then_lose_the_answer(conn, sql, rows):
            real_insert(conn, sql, rows)
            calls.append(len(rows))
            if len(calls) == 1:
                raise lost

        monkeypatch.setattr(store.backend, "insert", insert_then_lose_the_answer)
        runs = [make_run(seed=1), make_run(seed=2)]
        assert store.record(runs[0])
        assert store.record_async(runs[1]) and store.flush(timeout=5)
        assert len(calls) >= 3  # the first write was retried
        assert sorted(r.seed for r in store.runs()) == [0, 1, 2]


def test_model_calls_sum_a_models_sampler_runs_and_their_audits(store):
    audited = {"audit": {"nfe": 300}}
    for run in (make_run(model="m", nfe=6000), make_run(model="m", nfe=30, audit_seconds=1.5, details=audited),
                make_run(model="m", nfe=30, audit_seconds=1.0), make_run(model="n", nfe=50),
                make_run(model="m", nfe=99, source="training")):
        assert store.record(run)
    assert store.model_calls("m", audit_cost=400) == (6060, 700, 2)
    assert store.model_calls("n") == (50, 0, 0) and store.model_calls("none") == (0, 0, 0)


def test_a_too_old_sqlite_is_named_and_sampling_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "MIN_SQLITE", (99, 0, 0))
    with StatsStore(tmp_path / "stats.sqlite3", timeout=0.5) as store:
        assert not store.record(make_run())  # not stored, no exception
        assert "needs SQLite 99.0.0 or newer" in (store.problem or "")


def test_expert_stats_match_a_hand_computation(store):
    rows = [
        # expert, nfe, seconds, success, quality, confidence
        ("Quality", 60, 6.0, True, 0.98, 0.9),
        ("Quality", 40, 4.0, True, 0.96, None),
        ("Quality", 5, 0.5, False, 0.10, 0.7),  # failed: not in quality, nfe or seconds
        ("Speed", 8, 0.8, True, 0.70, 0.5),
        ("Speed", 8, 1.2, True, None, 0.5),  # no estimate: not in the quality mean
        ("Broken", 3, 0.1, False, None, None),
    ]
    for expert, nfe, seconds, success, quality, confidence in rows:
        run = make_run(expert=expert, nfe=nfe, seconds=seconds, success=success, quality=quality, confidence=confidence)
        assert store.record(run)
    stats = {entry.expert: entry for entry in store.expert_stats()}
    assert list(stats) == ["Broken", "Quality", "Speed"]
    cost_quality = 50**0.8 * 5.0**0.2
    cost_speed = 8**0.8 * 1.0**0.2
    expected = {
        "Quality": dict(
            runs=3, quality_score=0.97, success_rate=2 / 3, mean_confidence=0.8, mean_nfe=50, mean_seconds=5.0,
            speed_score=cost_speed / cost_quality, efficiency_score=0.97 * cost_speed / cost_quality,
        ),
        "Speed": dict(
            runs=2, quality_score=0.70, success_rate=1.0, mean_confidence=0.5, mean_nfe=8, mean_seconds=1.0,
            speed_score=1.0, efficiency_score=0.70,
        ),
        "Broken": dict(
            runs=1, quality_score=None, success_rate=0.0, mean_confidence=None, mean_nfe=None, mean_seconds=None,
            speed_score=None, efficiency_score=None,
        ),
    }  # fmt: skip
    for expert, values in expected.items():
        for name, value in values.items():
            got = getattr(stats[expert], name)
            assert got == (None if value is None else pytest.approx(value)), (expert, name)


def test_expert_stats_follow_the_requested_pool(store):
    store.record(make_run(expert="A", nfe=10))
    store.record(make_run(expert="B", nfe=20))
    stats = store.expert_stats(experts=["B", "Unused", "A"])
    assert [s.expert for s in stats] == ["B", "Unused", "A"]
    assert stats[1].runs == 0 and stats[1].speed_score is None and stats[1].success_rate is None
    assert stats[2].speed_score == pytest.approx(1.0)
    assert [s.expert for s in store.expert_stats(experts=["B"])] == ["B"]
    assert store.expert_stats(experts=["B"])[0].speed_score == pytest.approx(1.0)  # relative to the pool shown


def test_filters_by_router_source_expert_and_limit(store):
    for index in range(6):
        source = "benchmark" if index < 2 else "sampling"
        store.record(make_run(expert=f"E{index % 2}", router=f"r{index % 3}", source=source, seed=index))
    assert [r.seed for r in store.runs(router="r0")] == [0, 3]
    assert [r.seed for r in store.runs(source="benchmark")] == [0, 1]
    assert [r.seed for r in store.runs(expert="E1", source="sampling")] == [3, 5]
    assert [r.seed for r in store.runs(limit=2)] == [4, 5]
    assert [s.runs for s in store.expert_stats(router="r1")] == [1, 1]
    assert [(s.expert, s.runs) for s in store.expert_stats(source="benchmark")] == [("E0", 1), ("E1", 1)]
    with pytest.raises(ValueError, match="limit"):
        store.runs(limit=-1)


def test_migrates_a_v1_database_without_losing_rows(target):
    target.create_at_version(1)
    for i in range(5):
        target.execute("INSERT INTO {table} (created, source, expert, router, nfe, steps, seconds, quality, success) "
                       "VALUES (?,?,?,?,?,?,?,?,?)", (1.0 + i, "sampling", "SpeedDemon", "v1", 8, 8, 0.5, 0.7, 1))
    with target.open() as store:
        assert store.record(make_run(seed=42))
        runs = store.runs()
    assert [r.created for r in runs[:5]] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert all(r.seed is None and r.router == "v1" for r in runs[:5]) and runs[5].seed == 42
    if target.kind == "sqlite":
        assert target.execute("PRAGMA user_version")[0][0] == SCHEMA_VERSION == 5
        indexes = {row[1] for row in target.execute("PRAGMA index_list(runs)")}
    else:
        assert target.execute(f"SELECT value FROM {target.schema}.meta")[0][0] == str(SCHEMA_VERSION)
        indexes = {row[0] for row in target.execute("SELECT indexname FROM pg_indexes WHERE schemaname = ?",
                                                    (target.schema,))}
    assert {"runs_by_expert", "runs_by_router", "runs_by_model", "runs_by_job", "runs_by_run_id"} <= indexes


def test_migrates_a_v2_database_to_v3_keeping_rows(target):
    target.create_at_version(2)
    target.execute("INSERT INTO {table} (created, source, expert, router, nfe, steps, seconds, success, seed) "
                   "VALUES (1, 'sampling', 'A', 'r', 3, 3, 0.5, 1, '18446744073709551615')")
    with target.open() as store:
        old = store.runs()[0]
        assert old.seed == 2**64 - 1 and old.model is None and old.details is None and old.quality_source is None
        assert store.record(make_run(model="sd15:abc", quality_source="audit", error_estimate=0.02,
                                     details={"why": "cheap", "router_version": 3}, audit_seconds=4.5))
        new = store.runs()[1]
    assert (new.model, new.quality_source, new.error_estimate, new.audit_seconds) == ("sd15:abc", "audit", 0.02, 4.5)
    assert new.details_dict() == {"why": "cheap", "router_version": 3}


DEFECT6_CASES = {
    "garbage": lambda good: bytes(range(256)) * 64,
    "cut_below_one_page": lambda good: good[:3000],
    "cut_of_the_last_100_bytes": lambda good: good[:-100],
}


@pytest.mark.parametrize("damage", sorted(DEFECT6_CASES))
def test_defect6_truncated_or_garbage_store_is_moved_aside_not_taken_over(tmp_path, damage, caplog):
    """Issue 9, defect 6: a file that is not a valid, complete store is kept aside, never written to."""
    path = tmp_path / "stats.sqlite3"
    with StatsStore(path) as store:
        for seed in range(200):  # several pages, so that a cut of 100 bytes leaves a plausible file
            store.record(make_run(seed=seed, error="x" * 100))
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    good = path.read_bytes()
    assert len(good) > 8192
    damaged = DEFECT6_CASES[damage](good)
    path.write_bytes(damaged)
    (tmp_path / "stats.sqlite3-wal").write_bytes(b"")  # an (empty) companion moves with it
    with StatsStore(path, timeout=0.5) as store, caplog.at_level(logging.WARNING):
        assert store.record(make_run(seed=999))
        assert [r.seed for r in store.runs()] == [999]  # a new store, not the damaged one
        payload = report.stats_payload(store)
        notice = store.notice
    aside = sorted(p.name for p in tmp_path.iterdir() if ".damaged-" in p.name)
    assert len(aside) == 2 and aside[0].startswith("stats.sqlite3.damaged-") and aside[1] == aside[0] + "-wal"
    assert (tmp_path / aside[0]).read_bytes() == damaged  # kept as it was, byte for byte
    assert "moved aside as " + aside[0] in notice and str(tmp_path) not in notice
    assert payload["notice"] == notice and payload["healthy"] is True
    assert notice in report.stats_text(payload)
    assert "moved aside" in caplog.text


def test_defect6_a_store_damaged_inside_is_found_by_quick_check(tmp_path):
    path = tmp_path / "stats.sqlite3"
    with StatsStore(path) as store:
        for seed in range(300):
            store.record(make_run(seed=seed, error="y" * 200))
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[3 * page : 3 * page + 200] = b"\xff" * 200  # a b-tree page overwritten; size and header intact
    path.write_bytes(bytes(data))
    sqlite_store._checked.clear()  # a new process would check again
    with StatsStore(path) as store:
        assert store.record(make_run(seed=1)) and [r.seed for r in store.runs()] == [1]
        assert "quick_check" in store.notice or "malformed" in store.notice
    assert len([p for p in tmp_path.iterdir() if ".damaged-" in p.name]) == 1


def test_locked_database_keeps_the_run_and_writes_it_later(tmp_path, caplog):
    path = tmp_path / "stats.sqlite3"
    with StatsStore(path, timeout=0.3) as store:
        assert store.record(make_run(seed=1))
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute(FOREIGN_INSERT.replace("{table}", "runs"), ("sampling", "Other"))
        start = time.monotonic()
        with caplog.at_level(logging.WARNING):
            assert store.record(make_run(seed=2)) is False  # not now: kept and retried
        assert time.monotonic() - start < 2.0
        assert "locked" in caplog.text and not store.healthy and store.waiting == 1
        assert "1 run kept in memory" in store.problem and str(tmp_path) not in store.problem
        holder.execute("COMMIT")
        holder.close()
        assert store.flush(timeout=10)
        assert store.record(make_run(seed=3)) and store.healthy and store.dropped == 0
        stored = [(r.expert, r.seed) for r in store.runs()]
        assert stored == [("BalancedMaster", 1), ("Other", None), ("BalancedMaster", 2), ("BalancedMaster", 3)]


HOLDER = BOOTSTRAP + """
import sys, time
kind, where, table, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
if kind == "sqlite":
    import sqlite3
    conn = sqlite3.connect(where, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
else:
    import psycopg
    conn = psycopg.connect(where)  # not autocommit: the lock lasts until the end of the transaction
    conn.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")  # blocks INSERTs, not SELECTs
print("locked", flush=True)
time.sleep(seconds)
conn.rollback() if kind != "sqlite" else conn.execute("ROLLBACK")
"""


def hold_write_lock(target, seconds: float) -> subprocess.Popen:
    """Another process that holds the store's write lock for ``seconds`` (returns once it holds it)."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, target.kind, str(target.where), target.table, str(seconds)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_defect3_locked_store_does_not_stall_readers_or_lose_runs(target):
    """Issue 9, defect 3: with another process holding the write lock, reads stay fast, the store is
    reported locked, and the runs that could not be written are kept and written afterwards."""
    with target.open(timeout=1.0) as store:
        assert store.record(make_run(expert="Before", seed=0))
        holder = hold_write_lock(target, 12.0)
        try:
            assert all(store.record_async(make_run(expert="During", seed=i)) for i in range(1, 4))
            deadline = time.monotonic() + 6
            while store.healthy and time.monotonic() < deadline:  # the writer tries, and fails after 1 s
                time.sleep(0.05)
            timings = []
            for _ in range(3):
                start = time.monotonic()
                payload = report.stats_payload(store)
                text = report.stats_text(payload)
                timings.append(time.monotonic() - start)
                assert payload["healthy"] is False and "locked by another process" in payload["problem"]
                assert payload["waiting"] == 3 and "3 runs kept in memory" in payload["problem"]
                assert [e["expert"] for e in payload["experts"]] == ["Before"]  # the table is still there
                assert "Stats store problem: " in text and "locked" in text
                assert str(target.where) not in json.dumps(payload)
            assert max(timings) < 1.0, timings
            start = time.monotonic()
            assert [r.expert for r in store.runs()] == ["Before"]
            assert time.monotonic() - start < 1.0
        finally:
            holder.wait(timeout=30)
        assert store.flush(timeout=20)
        payload = report.stats_payload(store)
        assert payload["healthy"] is True and payload["problem"] is None and payload["dropped"] == 0
        assert [r.seed for r in store.runs()] == [0, 1, 2, 3]


def test_defect3_an_idle_store_under_a_foreign_lock_is_reported_locked(target):
    with target.open() as store:
        assert store.record(make_run())
        holder = hold_write_lock(target, 4.0)
        try:
            start = time.monotonic()
            payload = report.stats_payload(store)
            assert time.monotonic() - start < 1.0
            assert payload["healthy"] is False and "locked by another process" in payload["problem"]
            assert payload["experts"][0]["runs"] == 1
        finally:
            holder.wait(timeout=30)
        assert report.stats_payload(store)["healthy"] is True


def test_defect3_runs_beyond_the_memory_bound_are_dropped_and_shown(target):
    with target.open(timeout=0.3, max_pending=2) as store:
        assert store.record(make_run(seed=0))
        holder = hold_write_lock(target, 4.0)
        try:
            results = [store.record_async(make_run(seed=i)) for i in range(1, 6)]
            assert results == [True, True, False, False, False]
            payload = report.stats_payload(store)
            assert payload["dropped"] == 3 and payload["waiting"] == 2
            assert "3 runs could not be recorded (dropped)" in report.stats_text(payload)
        finally:
            holder.wait(timeout=30)
        assert store.flush(timeout=20)
        assert [r.seed for r in store.runs()] == [0, 1, 2] and store.dropped == 3


def test_a_write_waits_for_a_short_lock(tmp_path):
    path = tmp_path / "stats.sqlite3"
    with StatsStore(path, timeout=5.0) as store:
        assert store.check()
        holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")
        release = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
        release.start()
        start = time.monotonic()
        assert store.record(make_run())
        assert time.monotonic() - start >= 0.25
        release.join()
        holder.close()


def test_missing_directory_is_created(tmp_path):
    with StatsStore(tmp_path / "a" / "b" / "stats.sqlite3") as store:
        assert store.record(make_run()) and store.healthy
        assert len(store.runs()) == 1


def test_unusable_directory_returns_false(tmp_path, caplog):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the folder should be")
    with StatsStore(blocker / "stats.sqlite3", timeout=0.2) as store, caplog.at_level(logging.WARNING):
        assert store.record(make_run()) is False
        assert not store.healthy and "cannot use stats.sqlite3" in store.problem
        assert str(tmp_path) not in store.problem  # never an absolute server path (issue 9, item 7)
        with pytest.raises(StatsStoreError) as raised:
            store.expert_stats()
        assert str(tmp_path) not in str(raised.value)
        payload = report.stats_payload(store)
        assert payload["healthy"] is False and str(tmp_path) not in json.dumps(payload)
    assert store.dropped == 1 and "not recorded" in caplog.text  # still unusable at close: lost, and counted
    assert blocker.read_text() == "a file where the folder should be"


def test_read_only_directory_returns_false():
    # Root ignores permissions, so as root (CI) an unprivileged child process opens the store; the
    # folder is then one it can reach (tmp_path's parents are private to root) but not write.
    base = Path(tempfile.mkdtemp(prefix="moe_ro_"))
    base.chmod(0o755)
    folder = base / "ro"
    folder.mkdir()
    folder.chmod(0o555)

    def attempt():
        with StatsStore(folder / "stats.sqlite3") as store:
            return os.access(folder, os.R_OK | os.X_OK), store.record(make_run()), store.healthy

    try:
        assert run_unprivileged(attempt) == (True, False, False)  # reachable, not written, unhealthy
        assert not (folder / "stats.sqlite3").exists()
    finally:
        folder.chmod(0o755)
        shutil.rmtree(base)


def test_export_json_and_csv(store, tmp_path):
    runs = [
        make_run(state=[0.1] * 64, quality=0.5, seed=7, details='{"why": "test"}', model="m1", quality_source="estimate"),
        make_run(expert="SpeedDemon", success=False, error="interrupted, by user"),
    ]
    for run in runs:
        store.record(run)
    assert store.export_json(tmp_path / "runs.json") == 2
    data = json.loads((tmp_path / "runs.json").read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    assert [entry["id"] for entry in data["runs"]] == [1, 2]
    first = data["runs"][0]
    assert first["state"] == [0.1] * 64 and first["seed"] == 7 and first["success"] is True
    assert first["details"] == {"why": "test"} and first["model"] == "m1" and first["quality_source"] == "estimate"
    assert data["runs"][1]["quality"] is None and data["runs"][1]["error"] == "interrupted, by user"
    assert store.export_csv(tmp_path / "runs.csv") == 2
    with open(tmp_path / "runs.csv", newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert table[0]["expert"] == "BalancedMaster" and json.loads(table[0]["state"]) == [0.1] * 64
    assert table[0]["success"] == "1" and table[1]["success"] == "0" and table[1]["quality"] == ""
    assert table[1]["error"] == "interrupted, by user" and float(table[0]["seconds"]) == 1.5
    assert json.loads(table[0]["details"]) == {"why": "test"} and table[1]["details"] == ""


def test_interrupted_export_leaves_the_old_file(store, tmp_path, monkeypatch):
    for seed in range(3):
        store.record(make_run(seed=seed))
    target = tmp_path / "runs.json"
    target.write_text("previous export")
    calls = []

    def failing_dumps(value):
        calls.append(value)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return json.JSONEncoder().encode(value)

    monkeypatch.setattr(store_module.json, "dumps", failing_dumps)
    with pytest.raises(RuntimeError, match="disk full"):
        store.export_json(target)
    assert target.read_text() == "previous export"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".runs")) == []


def test_background_writer_drains_on_close(target):
    store = target.open()
    assert all(store.record_async(make_run(seed=i)) for i in range(300))
    store.close()
    assert store.record_async(make_run()) is False
    with target.open() as reopened:
        assert [r.seed for r in reopened.runs()] == list(range(300))


def test_flush_waits_and_a_full_queue_drops(target):
    with target.open(max_pending=2) as store:
        with store._write_lock:  # hold the writer back so the queue fills up
            results = [store.record_async(make_run(seed=i)) for i in range(3)]
            assert store.flush(timeout=0.1) is False
        assert results == [True, True, False]
        assert store.flush(timeout=5.0)
        assert [r.seed for r in store.runs()] == [0, 1] and store.dropped == 1


def test_foreign_rows_and_newer_schema_do_not_break_the_store(target, tmp_path, caplog):
    with target.open() as store:
        store.record(make_run(seed=1))
    target.execute(FOREIGN_INSERT, ("elsewhere", "X"))
    target.set_version(99)
    with target.open() as store, caplog.at_level(logging.WARNING):
        assert store.record(make_run(seed=2))
        assert [r.seed for r in store.runs()] == [1, 2]
        assert store.export_json(tmp_path / "all.json") == 3
    assert "schema v99" in caplog.text and "skipping row 2" in caplog.text


INVALID = [
    ("source", "inference"), ("nfe", -1), ("nfe", 2.5), ("steps", -1), ("seconds", math.nan), ("seconds", -0.1),
    ("quality", 1.5), ("quality", "good"), ("confidence", -0.1), ("propensity", 0.0), ("propensity", 1.01),
    ("priority", 2.0), ("state", [0.0] * 63), ("state", [math.inf] * 64), ("success", 1), ("expert", ""),
    ("router", None), ("error", 3), ("seed", 1.5), ("created", math.inf), ("quality_source", "guess"),
    ("error_estimate", math.nan), ("error_estimate", "low"), ("model", ""), ("model", 3), ("details", [1, 2]),
    ("details", "not json"), ("details", {"x": math.nan}), ("details", {"x": "y" * 70_000}), ("audit_seconds", -1.0),
]  # fmt: skip


@pytest.mark.parametrize("field, value", INVALID)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"RunRecord\.{field} "):
        make_run(**{field: value})


def test_records_are_frozen_and_normalised():
    run = make_run(nfe=np.int64(3), state=np.arange(64), quality=1)
    assert type(run.nfe) is int and isinstance(run.quality, float) and run.state == tuple(float(i) for i in range(64))
    with pytest.raises(AttributeError):
        run.nfe = 4  # type: ignore[misc]


def test_default_store_path(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_SAMPLER_HOME", str(tmp_path))
    assert default_store_path() == tmp_path / "stats.sqlite3"
    monkeypatch.delenv("MOE_SAMPLER_HOME")
    path = default_store_path()
    assert path.name == "stats.sqlite3" and path.parent.name == "moe_sampler" and path.is_absolute()


def test_state_size_matches_the_features():
    features = pytest.importorskip("moe_sampler.router.features", reason="router/features.py not written yet")
    assert records_module.STATE_DIM == features.STATE_DIM


def test_the_pack_runs_without_psycopg(tmp_path):
    """psycopg is optional: without it the pack imports, SQLite works, a database URL says what to install."""
    script = BOOTSTRAP + f"""
import sys
sys.modules["psycopg"] = None  # import psycopg now raises ImportError
import moe_sampler
from moe_sampler.stats.store import RunRecord, StatsStore
from moe_sampler.stats import report
run = RunRecord(expert="A", router="r", nfe=1, steps=1, seconds=0.1, success=True)
with StatsStore({str(tmp_path / "stats.sqlite3")!r}) as store:
    assert store.record(run) and len(store.runs()) == 1
remote = StatsStore("postgresql://user:secret@127.0.0.1:1/farm", timeout=0.2)
assert remote.record(run) is False
payload = report.stats_payload(remote)
remote.close(timeout=2)
print(payload["healthy"], payload["problem"])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("False ") and "pip install 'moe-adaptive-sampler[postgres]'" in done.stdout
    assert "secret" not in done.stdout + done.stderr


def test_database_url_comes_from_the_environment_or_the_user_setting(tmp_path, monkeypatch):
    from helpers import import_node_module

    paths = import_node_module("paths")
    monkeypatch.setattr(paths, "stats_store_path", lambda: tmp_path / "__moe_sampler" / "stats.sqlite3")
    monkeypatch.delenv(paths.DATABASE_URL_VARIABLE, raising=False)
    assert paths.stats_store_target() == str(tmp_path / "__moe_sampler" / "stats.sqlite3")  # the default
    (tmp_path / "__moe_sampler").mkdir()
    setting = tmp_path / "__moe_sampler" / "database.json"
    setting.write_text(json.dumps({"url": "postgresql://farm@db.example:5432/moe"}))
    assert paths.stats_store_target() == "postgresql://farm@db.example:5432/moe"
    monkeypatch.setenv(paths.DATABASE_URL_VARIABLE, "postgresql://env@localhost/other")
    assert paths.stats_store_target() == "postgresql://env@localhost/other"
    monkeypatch.delenv(paths.DATABASE_URL_VARIABLE)
    setting.write_text("{not json")
    assert paths.stats_store_target().endswith("stats.sqlite3")


def test_postgres_unreachable_keeps_runs_and_says_so_quickly():
    pytest.importorskip("psycopg", reason="psycopg is not installed")
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = StatsStore(f"postgresql://moe:hunter2@127.0.0.1:{port}/farm", timeout=0.3)
    try:
        assert store.record(make_run()) is False and store.waiting == 1
        start = time.monotonic()
        payload = report.stats_payload(store)
        assert time.monotonic() - start < 1.0
        assert payload["healthy"] is False and "cannot reach PostgreSQL database 'farm'" in payload["problem"]
        assert "hunter2" not in json.dumps(payload)
    finally:
        store.close(timeout=5)
    assert store.dropped == 1


@pytest.fixture
def postgres_target():
    url = pg_helper.url_or_skip()
    schema = pg_helper.unique_schema()
    yield Target("postgresql", url, schema)
    pg_helper.drop_schema(url, schema)


def test_postgres_connection_dropped_by_the_server_is_reopened(postgres_target):
    target = postgres_target
    with target.open() as store:
        assert store.record(make_run(seed=1)) and store.runs()
        target.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        assert store.record(make_run(seed=2))
        assert store.flush(timeout=10)
        assert [r.seed for r in store.runs()] == [1, 2] and store.healthy and store.dropped == 0


def test_postgres_restarted_while_sampling_loses_no_run(postgres_target):
    """Issue 12: the database goes away and comes back during sampling; recording never fails the
    caller, and the runs written meanwhile arrive afterwards (held in memory, retried)."""
    target = postgres_target
    with target.open(timeout=0.5) as store:
        assert store.record(make_run(seed=0))
        stop = threading.Event()
        queued: list[bool] = []

        def sample():
            seed = 1
            while not stop.is_set():
                queued.append(store.record_async(make_run(seed=seed)))
                seed += 1
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            time.sleep(0.3)
            try:
                pg_helper.restart_server()
            except pg_helper.Unavailable as exc:
                pytest.skip(str(exc))
            time.sleep(0.3)
        finally:
            stop.set()
            sampler.join()
        assert all(queued) and len(queued) > 20
        assert store.flush(timeout=60)
        assert [r.seed for r in store.runs()] == list(range(len(queued) + 1))
        assert store.dropped == 0 and store.health()["healthy"]


def test_defect6_quick_check_runs_once_per_process_and_is_bounded(tmp_path, monkeypatch, caplog):
    path = tmp_path / "stats.sqlite3"
    with StatsStore(path) as store:
        for seed in range(3000):
            store.record_async(make_run(seed=seed, error="z" * 50))
    sqlite_store._checked.clear()
    calls = []
    real = sqlite_store._quick_check
    monkeypatch.setattr(sqlite_store, "_quick_check", lambda conn, budget: calls.append(budget) or real(conn, budget))
    for _ in range(3):
        with StatsStore(path) as store:
            assert len(store.runs(limit=5)) == 5
    assert calls == [sqlite_store.QUICK_CHECK_BUDGET]  # once per process and file, not per store
    conn = sqlite3.connect(path)
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger=sqlite_store.__name__):
        assert real(conn, 0.0) is None  # out of time: cut short and not judged (a big store is not moved aside)
    assert time.monotonic() - start < 1.0 and "cut short" in caplog.text
    assert real(conn, 5.0) is None  # in time: "ok"
    conn.close()
