"""Stats store write throughput: rows per second committed by 1, 4 and 16 writer processes, per backend.

Each writer is its own process with its own :class:`~moe_sampler.stats.store.StatsStore`; after
a common start signal it calls ``record()`` (one transaction per run, the path a ComfyUI worker
takes, with a 64-float state) for ``--seconds`` and reports how many runs it committed. The
table gives committed rows per second summed over the writers, and checks that the database
holds exactly that many rows. Every configuration starts from an empty store (a new SQLite
file; a new PostgreSQL schema).

PostgreSQL: ``--database-url``, else ``$MOE_SAMPLER_TEST_DATABASE_URL``, else a throwaway local
server (``.ci/postgres.sh``, needs Debian's postgresql package); ``--backends sqlite`` skips it.

    OMP_NUM_THREADS=1 python bench/store.py --seconds 5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import BOOTSTRAP, ensure_moe_sampler  # noqa: E402

WRITER = BOOTSTRAP + """
import os, sys, time
from moe_sampler.stats.store import RunRecord, StatsStore
where, schema, go, seconds, worker = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
store = StatsStore(where, timeout=30.0, **({"schema": schema} if schema != "-" else {}))
store.check()
while not os.path.exists(go):
    time.sleep(0.001)
deadline, done, failed = time.monotonic() + seconds, 0, 0
while time.monotonic() < deadline:
    run = RunRecord(expert=f"E{done % 7}", router="bench", nfe=20, steps=20, seconds=1.0, success=True,
                    quality=0.8, confidence=0.5, state=[0.25] * 64, seed=worker * 10**9 + done)
    if store.record(run):
        done += 1
    else:
        failed += 1
store.close(timeout=0)
print(done, failed)
"""


def run_config(where: str, schema: str, writers: int, seconds: float, folder: Path) -> tuple[float, int, int]:
    """(rows per second, committed rows, failed calls) for ``writers`` processes."""
    go = folder / f"go-{writers}-{schema}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    children = [subprocess.Popen([sys.executable, "-c", WRITER, where, schema, str(go), str(seconds), str(w)],
                                 stdout=subprocess.PIPE, text=True, env=env) for w in range(writers)]
    time.sleep(1.0 + 0.15 * writers)  # every interpreter started and its store opened
    go.touch()
    committed = failed = 0
    for child in children:
        out, _ = child.communicate(timeout=seconds + 120)
        if child.returncode != 0:
            raise SystemExit(f"a writer failed (exit {child.returncode})")
        done, bad = map(int, out.split())
        committed, failed = committed + done, failed + bad
    return committed / seconds, committed, failed


def stored_rows(where: str, schema: str) -> int:
    from moe_sampler.stats.store import StatsStore

    with StatsStore(where, **({"schema": schema} if schema != "-" else {})) as store:
        return sum(entry.runs for entry in store.expert_stats())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="how long each configuration writes")
    parser.add_argument("--writers", default="1,4,16", help="comma-separated writer process counts")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--database-url", default=None, help="PostgreSQL server to use (a new schema per run)")
    args = parser.parse_args(argv)
    ensure_moe_sampler()
    counts = [int(n) for n in args.writers.split(",")]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    folder = Path(tempfile.mkdtemp(prefix="moe_store_bench."))
    url = None
    if "postgresql" in backends:
        url = args.database_url or os.environ.get("MOE_SAMPLER_TEST_DATABASE_URL")
        if not url:
            from helpers import postgres

            url = postgres.database_url()
    print(f"{'backend':<12}{'writers':>8}{'rows/s':>10}{'rows':>9}{'stored':>9}{'failed':>8}")
    for backend in backends:
        for writers in counts:
            if backend == "sqlite":
                where, schema = str(folder / f"stats-{writers}.sqlite3"), "-"
            else:
                from helpers import postgres

                where, schema = url, postgres.unique_schema()
            rate, committed, failed = run_config(where, schema, writers, args.seconds, folder)
            stored = stored_rows(where, schema)
            print(f"{backend:<12}{writers:>8}{rate:>10.0f}{committed:>9}{stored:>9}{failed:>8}", flush=True)
            if backend != "sqlite":
                postgres.drop_schema(url, schema)
            if stored != committed:
                raise SystemExit(f"{backend} with {writers} writers: {committed} runs committed, {stored} stored")


if __name__ == "__main__":
    main()
