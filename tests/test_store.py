"""The stats store: round trip, aggregates against hand computation, migration, faults, export."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sqlite3
import threading
import time

import numpy as np
import pytest

from moe_sampler.stats import records as records_module
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
FOREIGN_INSERT = """INSERT INTO runs (created, source, expert, router, nfe, steps, seconds, success)
    VALUES (1, ?, ?, 'x', 1, 1, 0.1, 1)"""


def make_run(**overrides) -> RunRecord:
    values = dict(expert="BalancedMaster", router="default@1", nfe=20, steps=10, seconds=1.5, success=True)
    values.update(overrides)
    return RunRecord(**values)


@pytest.fixture
def store(tmp_path):
    with StatsStore(tmp_path / "stats.sqlite3", timeout=2.0) as opened:
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


def test_migrates_a_v1_database_without_losing_rows(tmp_path):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(V1_SCHEMA)
        conn.executemany(
            "INSERT INTO runs (created, source, expert, router, nfe, steps, seconds, quality, success) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            [(1.0 + i, "sampling", "SpeedDemon", "v1", 8, 8, 0.5, 0.7, 1) for i in range(5)],
        )
        conn.execute("PRAGMA user_version = 1")
    conn.close()
    with StatsStore(path) as store:
        assert store.record(make_run(seed=42))
        runs = store.runs()
    assert [r.created for r in runs[:5]] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert all(r.seed is None and r.router == "v1" for r in runs[:5]) and runs[5].seed == 42
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(runs)")}
    conn.close()
    assert {"runs_by_expert", "runs_by_router", "runs_by_model"} <= indexes


def test_migrates_a_v2_database_to_v3_keeping_rows(tmp_path):
    path = tmp_path / "v2.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(V1_SCHEMA)
    for statement in store_module.MIGRATIONS[1]:
        conn.execute(statement)
    conn.execute(
        "INSERT INTO runs (created, source, expert, router, nfe, steps, seconds, success, seed) "
        "VALUES (1, 'sampling', 'A', 'r', 3, 3, 0.5, 1, '18446744073709551615')"
    )
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    with StatsStore(path) as store:
        old = store.runs()[0]
        assert old.seed == 2**64 - 1 and old.model is None and old.details is None and old.quality_source is None
        assert store.record(make_run(model="sd15:abc", quality_source="audit", error_estimate=0.02,
                                     details={"why": "cheap", "router_version": 3}, audit_seconds=4.5))
        new = store.runs()[1]
    assert (new.model, new.quality_source, new.error_estimate, new.audit_seconds) == ("sd15:abc", "audit", 0.02, 4.5)
    assert new.details_dict() == {"why": "cheap", "router_version": 3}


def test_corrupt_file_is_reported_and_never_touched(tmp_path, caplog):
    path = tmp_path / "stats.sqlite3"
    garbage = bytes(range(256)) * 64
    path.write_bytes(garbage)
    with StatsStore(path, timeout=0.5) as store, caplog.at_level(logging.WARNING):
        assert store.record(make_run()) is False
        assert store.record(make_run()) is False
        assert not store.healthy and str(path) in store.problem and "untouched" in store.problem
        assert not store.check()
        with pytest.raises(StatsStoreError, match="damaged"):
            store.runs()
        with pytest.raises(StatsStoreError):
            store.export_json(tmp_path / "export.json")
        assert store.dropped == 2
    assert path.read_bytes() == garbage
    assert not (tmp_path / "export.json").exists()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not recorded" in warnings[0].getMessage()


def test_locked_database_drops_quickly_and_loses_nothing(tmp_path, caplog):
    path = tmp_path / "stats.sqlite3"
    with StatsStore(path, timeout=0.3) as store:
        assert store.record(make_run(seed=1))
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute(FOREIGN_INSERT, ("sampling", "Other"))
        start = time.monotonic()
        with caplog.at_level(logging.WARNING):
            assert store.record(make_run(seed=2)) is False
        assert time.monotonic() - start < 2.0
        assert "locked" in caplog.text and store.healthy
        holder.execute("COMMIT")
        holder.close()
        assert store.record(make_run(seed=3))
        stored = [(r.expert, r.seed) for r in store.runs()]
        assert stored == [("BalancedMaster", 1), ("Other", None), ("BalancedMaster", 3)]


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
    with StatsStore(blocker / "stats.sqlite3") as store, caplog.at_level(logging.WARNING):
        assert store.record(make_run()) is False
        assert not store.healthy and "cannot use" in store.problem
        with pytest.raises(StatsStoreError):
            store.expert_stats()
    assert "not recorded" in caplog.text
    assert blocker.read_text() == "a file where the folder should be"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_returns_false(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with StatsStore(folder / "stats.sqlite3") as store:
            assert store.record(make_run()) is False and not store.healthy
    finally:
        folder.chmod(0o755)


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


def test_background_writer_drains_on_close(tmp_path):
    path = tmp_path / "stats.sqlite3"
    store = StatsStore(path)
    assert all(store.record_async(make_run(seed=i)) for i in range(300))
    store.close()
    assert store.record_async(make_run()) is False
    with StatsStore(path) as reopened:
        assert [r.seed for r in reopened.runs()] == list(range(300))


def test_flush_waits_and_a_full_queue_drops(tmp_path):
    with StatsStore(tmp_path / "stats.sqlite3", max_pending=2) as store:
        with store._lock:  # hold the writer back so the queue fills up
            results = [store.record_async(make_run(seed=i)) for i in range(3)]
            assert store.flush(timeout=0.1) is False
        assert results == [True, True, False]
        assert store.flush(timeout=5.0)
        assert [r.seed for r in store.runs()] == [0, 1] and store.dropped == 1


def test_foreign_rows_and_newer_schema_do_not_break_the_store(tmp_path, caplog):
    path = tmp_path / "stats.sqlite3"
    with StatsStore(path) as store:
        store.record(make_run(seed=1))
    with sqlite3.connect(path) as conn:
        conn.execute(FOREIGN_INSERT, ("elsewhere", "X"))
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with StatsStore(path) as store, caplog.at_level(logging.WARNING):
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
