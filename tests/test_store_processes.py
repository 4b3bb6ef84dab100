"""The stats store with real processes: concurrent writers, and writers killed mid-write (kill -9),
on both backends (SQLite file, PostgreSQL server; see tests/helpers/postgres.py)."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import pytest

from helpers import BOOTSTRAP
from helpers import postgres as pg_helper

# Load this checkout as ``moe_sampler`` the way tests/conftest.py does, whatever is installed.
PREAMBLE = BOOTSTRAP + """
import os, sys, time
from moe_sampler.stats.store import RunRecord, StatsStore

def open_store(where, schema):
    return StatsStore(where, timeout=20.0, **({"schema": schema} if schema != "-" else {}))
"""

WRITER = PREAMBLE + """
path, schema, go, worker, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
while not os.path.exists(go):
    time.sleep(0.001)
store = open_store(path, schema)
failed = [i for i in range(count) if not store.record(RunRecord(
    expert=f"worker{worker}", router="concurrency", nfe=i, steps=1, seconds=0.01, success=True,
    state=[float(i)] * 64, seed=worker * 100000 + i))]
store.close()
sys.exit(f"worker {worker}: {len(failed)} records failed: {failed[:10]}" if failed else 0)
"""

LOOPING_WRITER = PREAMBLE + """
store = open_store(sys.argv[1], sys.argv[2])
base = int(sys.argv[3])
for i in range(base, base + 10**7):
    run = RunRecord(expert="Victim", router="kill", nfe=i % 50, steps=1, seconds=0.01, success=True,
                    state=[0.5] * 64, seed=i, error="x" * (i % 300) or None)
    if store.record(run):
        sys.stdout.write(f"{i}\\n")
        sys.stdout.flush()
"""


def _python(script: str, *args: object, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=env, **kwargs)


class Where:
    """A store's location for child processes (``where``, ``schema`` arguments) and its rows for checks."""

    def __init__(self, kind, where, schema="-"):
        self.kind, self.where, self.schema = kind, str(where), schema

    def seeds(self) -> list[int]:
        """Every stored seed (duplicates kept); checks SQLite's integrity first."""
        if self.kind == "sqlite":
            with sqlite3.connect(self.where) as conn:
                assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
                rows = conn.execute("SELECT seed FROM runs").fetchall()
            conn.close()
        else:
            import psycopg

            with psycopg.connect(self.where) as conn:
                rows = conn.execute(f"SELECT seed FROM {self.schema}.runs").fetchall()
        return [int(seed) for (seed,) in rows]


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request, tmp_path):
    if request.param == "sqlite":
        yield Where("sqlite", tmp_path / "stats.sqlite3")
        return
    url = pg_helper.url_or_skip()
    schema = pg_helper.unique_schema()
    yield Where("postgresql", url, schema)
    pg_helper.drop_schema(url, schema)


def test_four_processes_write_at_once_and_lose_nothing(where, tmp_path):
    go = tmp_path / "go"
    workers, count = 4, 200
    children = [
        _python(WRITER, where.where, where.schema, go, worker, count, stderr=subprocess.PIPE, text=True)
        for worker in range(workers)
    ]
    time.sleep(0.5)  # let every interpreter start, so that the first opens (and migrations) collide too
    go.touch()
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
    seeds = where.seeds()
    assert sorted(seeds) == sorted(w * 100000 + i for w in range(workers) for i in range(count))


def _read_until(child: subprocess.Popen, reported: set[int], lines: int) -> None:
    for seen, line in enumerate(child.stdout, 1):
        reported.add(int(line))
        if seen >= lines:
            return


def _kill(child: subprocess.Popen, reported: set[int]) -> None:
    child.send_signal(signal.SIGKILL)
    # Read through the same buffered reader: communicate() would skip lines it already holds.
    reported.update(int(line) for line in child.stdout.read().split())
    child.stdout.close()
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, "the writer ended on its own"


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_writer_killed_mid_write_loses_at_most_the_row_in_flight(where):
    rng = random.Random(os.getpid() ^ int(time.time()))
    reported: set[int] = set()
    for round_index in range(3):
        child = _python(LOOPING_WRITER, where.where, where.schema, round_index * 10**7, stdout=subprocess.PIPE,
                        text=True)
        _read_until(child, reported, rng.randint(20, 400))
        time.sleep(rng.uniform(0.0, 0.02))  # land somewhere inside a later write
        _kill(child, reported)
        stored = set(where.seeds())
        assert reported <= stored, f"round {round_index}: committed rows lost: {sorted(reported - stored)[:10]}"
        assert len(stored - reported) <= round_index + 1, f"round {round_index}: more than one unreported row per kill"


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_four_writers_killed_at_random_moments_rows_equal_committed_runs(where):
    """Issue 12, item 4: 4 writer processes, each killed with SIGKILL at a random moment and restarted,
    2 rounds: every run a writer saw committed is stored, once; at most one more row per kill."""
    rng = random.Random(os.getpid() ^ int(time.time()))
    reported: set[int] = set()
    kills = 0
    for round_index in range(2):
        children = [
            _python(LOOPING_WRITER, where.where, where.schema, (round_index * 4 + w) * 10**7,
                    stdout=subprocess.PIPE, text=True)
            for w in range(4)
        ]
        for child in children:
            _read_until(child, reported, rng.randint(10, 150))
        for child in rng.sample(children, len(children)):
            time.sleep(rng.uniform(0.0, 0.05))
            _kill(child, reported)
            kills += 1
        seeds = where.seeds()
        assert len(seeds) == len(set(seeds)), f"round {round_index}: duplicate rows"
        stored = set(seeds)
        assert reported <= stored, f"round {round_index}: committed rows lost: {sorted(reported - stored)[:10]}"
        assert len(stored - reported) <= kills, f"round {round_index}: more unreported rows than kills"
