"""The stats store with real processes: concurrent writers, and a writer killed mid-write."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Load this checkout as ``moe_sampler`` the way tests/conftest.py does, whatever is installed.
PREAMBLE = f"""
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location(
    "moe_sampler", {str(ROOT / "__init__.py")!r}, submodule_search_locations=[{str(ROOT)!r}])
module = importlib.util.module_from_spec(spec)
sys.modules["moe_sampler"] = module
spec.loader.exec_module(module)
from moe_sampler.stats.store import RunRecord, StatsStore
"""

WRITER = PREAMBLE + """
path, go, worker, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
while not os.path.exists(go):
    time.sleep(0.001)
store = StatsStore(path, timeout=20.0)
failed = [i for i in range(count) if not store.record(RunRecord(
    expert=f"worker{worker}", router="concurrency", nfe=i, steps=1, seconds=0.01, success=True,
    state=[float(i)] * 64, seed=worker * 100000 + i))]
store.close()
sys.exit(f"worker {worker}: {len(failed)} records failed: {failed[:10]}" if failed else 0)
"""

LOOPING_WRITER = PREAMBLE + """
store = StatsStore(sys.argv[1], timeout=20.0)
base = int(sys.argv[2])
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


def test_four_processes_write_at_once_and_lose_nothing(tmp_path):
    path, go = tmp_path / "stats.sqlite3", tmp_path / "go"
    workers, count = 4, 200
    children = [
        _python(WRITER, path, go, worker, count, stderr=subprocess.PIPE, text=True) for worker in range(workers)
    ]
    time.sleep(0.5)  # let every interpreter start, so that the first opens (and migrations) collide too
    go.touch()
    for child in children:
        _, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT expert, seed FROM runs").fetchall()
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    assert len(rows) == workers * count
    assert sorted(int(seed) for _, seed in rows) == sorted(w * 100000 + i for w in range(workers) for i in range(count))


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_writer_killed_mid_write_loses_at_most_the_row_in_flight(tmp_path):
    path = tmp_path / "stats.sqlite3"
    rng = random.Random(os.getpid() ^ int(time.time()))
    reported: set[int] = set()
    for round_index in range(3):
        base = round_index * 10**7
        child = _python(LOOPING_WRITER, path, base, stdout=subprocess.PIPE, text=True)
        target = rng.randint(20, 400)
        seen = 0
        for line in child.stdout:
            reported.add(int(line))
            seen += 1
            if seen >= target:
                break
        time.sleep(rng.uniform(0.0, 0.02))  # land somewhere inside a later write
        child.send_signal(signal.SIGKILL)
        # Read through the same buffered reader: communicate() would skip lines it already holds.
        reported.update(int(line) for line in child.stdout.read().split())
        child.stdout.close()
        child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL, f"round {round_index}: the writer ended on its own"
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            stored = {int(seed) for (seed,) in conn.execute("SELECT seed FROM runs")}
        conn.close()
        assert reported <= stored, f"round {round_index}: committed rows lost: {sorted(reported - stored)[:10]}"
        assert len(stored - reported) <= round_index + 1, f"round {round_index}: more than one unreported row per kill"
