"""Time from adopting a router version on one worker to its use on another (PostgreSQL registry).

Worker B is its own process with a :class:`~moe_sampler.router.pg_registry.PostgresRegistry`
following the database every ``poll`` seconds; it prints when each new version has been copied
into its routers folder (from then on its sampler loads it: the followed file is what the
sampler reads). Worker A (this process, its own registry and folder) adopts ``--versions``
versions, each after a random pause (so adoptions fall at random points of B's polling cycle).
The delay of a version is B's copy time minus the adoption's commit time (the version row's
``created``, written in the adopting transaction). Same machine, same clock.

PostgreSQL: ``--database-url``, else ``$MOE_SAMPLER_TEST_DATABASE_URL``, else a throwaway local
server (``.ci/postgres.sh``). Each poll interval uses a new schema.

    OMP_NUM_THREADS=1 python bench/farm_adoption.py --polls 0.5,1,5 --versions 10
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import BOOTSTRAP, ensure_moe_sampler  # noqa: E402

FOLLOWER = BOOTSTRAP + """
import sys, time
from moe_sampler.router.pg_registry import PostgresRegistry
url, schema, folder, poll = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
registry = PostgresRegistry(url, folder, schema=schema, poll=poll, worker="b")
registry.listeners.append(lambda name, version: print(version, repr(time.time()), flush=True))
registry.follow()
print("ready", flush=True)
sys.stdin.read()  # until the bench closes our stdin
registry.close()
"""


def measure(url: str, schema: str, poll: float, versions: int, folder: Path) -> list[float]:
    import psycopg

    from moe_sampler.router.model import Router
    from moe_sampler.router.pg_registry import PostgresRegistry

    name = "learned/bench-0000000000"
    a = PostgresRegistry(url, folder / "a", schema=schema, worker="a")
    a._connect().close()  # the tables exist before B's first check
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    b = subprocess.Popen([sys.executable, "-c", FOLLOWER, url, schema, str(folder / "b"), str(poll)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    delays = []
    try:
        assert b.stdout.readline().strip() == "ready"
        rng = random.Random(0)
        router = Router.default()
        for version in range(1, versions + 1):
            time.sleep(poll * rng.uniform(0.3, 1.3))
            a.publish(name, router)  # sets router.training["version"]: the next one follows it
            line = b.stdout.readline().split()
            copied_version, copied_at = int(line[0]), float(line[1])
            assert copied_version == version, (copied_version, version)
            with psycopg.connect(url) as conn:
                created = conn.execute(f"SELECT created FROM {schema}.router_versions WHERE name = %s AND version = %s",
                                       (name, version)).fetchone()[0]
            delays.append(copied_at - created)
    finally:
        b.stdin.close()
        b.wait(timeout=60)
    return delays


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--polls", default="0.5,1,5", help="comma-separated poll intervals of worker B (seconds)")
    parser.add_argument("--versions", type=int, default=10, help="versions adopted per poll interval")
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args(argv)
    ensure_moe_sampler()
    from helpers import postgres

    url = args.database_url or os.environ.get("MOE_SAMPLER_TEST_DATABASE_URL") or postgres.database_url()
    folder = Path(tempfile.mkdtemp(prefix="moe_farm_bench."))
    print(f"{'poll s':>7}{'versions':>9}{'median s':>10}{'p90 s':>8}{'max s':>8}")
    for poll in (float(p) for p in args.polls.split(",")):
        schema = postgres.unique_schema()
        try:
            delays = sorted(measure(url, schema, poll, args.versions, folder / schema))
        finally:
            postgres.drop_schema(url, schema)
        p90 = delays[min(len(delays) - 1, int(round(0.9 * (len(delays) - 1))))]
        print(f"{poll:>7.2f}{len(delays):>9}{statistics.median(delays):>10.3f}{p90:>8.3f}{max(delays):>8.3f}",
              flush=True)


if __name__ == "__main__":
    main()
