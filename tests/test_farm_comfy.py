"""Two real ComfyUI servers on one PostgreSQL database learn as one farm (issue 12, item 4): both
sample through the MoE Adaptive Sampler with the learning loop on, server A's background update
learns from the real rows of both servers, and the version it adopts is used by server B without
a restart (the time from adoption to use is measured); then MoE Learn From Runs, queued on server B,
learns on demand from every row of both servers again.

Each server has its own base directory (its own routers folder): the version reaches server B
only through the database. Server A updates its model's router after every ``LEARN_EVERY`` of its
own runs (``MOE_SAMPLER_LEARN_EVERY``); server B's learning loop is on too (its runs use the
learned router's guarded policy and are counted) but its own update would come after 1000 runs,
so the test knows which server learns and from which rows. An update is judged on the held-out
quarter of the rows and needs ``MIN_HELDOUT`` (10) of them, so B samples until the stored rows hold
that many before A's ``LEARN_EVERY``-th run starts the update. Server B checks for new versions
every 0.5 s (``MOE_SAMPLER_ROUTER_POLL_SECONDS``).

Run: ``COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/test_farm_comfy.py -q``
(PostgreSQL: ``MOE_SAMPLER_TEST_DATABASE_URL`` or a throwaway cluster, see tests/helpers/postgres.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time

import pytest

from helpers import postgres as pg_helper
from helpers.comfy_server import (
    TINY_CHECKPOINT_NAME,
    ComfyServer,
    finished,
    shared_tiny_checkpoint,
    status_messages,
    tiny_text_to_image,
)

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

LEARNED_ROUTER = "(learned for this model)"
POLL = 0.5
LEARN_EVERY = 20  # server A: its background update starts at its 20th run
FIRST_B_RUNS = 22  # server B's runs while A makes its first 19; then more in fours until the held-out rows suffice
logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def database():
    yield from pg_helper.scratch_database_or_skip("moe_farm_")


@pytest.fixture(scope="module")
def servers(tmp_path_factory, database):
    checkpoints = shared_tiny_checkpoint(tmp_path_factory)
    shared = pg_helper.environment(MOE_SAMPLER_DATABASE_URL=database, MOE_SAMPLER_ROUTER_POLL_SECONDS=str(POLL),
                                   MOE_SAMPLER_LEARNING="1")
    with shared, contextlib.ExitStack() as stack:
        running = []
        for name, every in (("farm_a", LEARN_EVERY), ("farm_b", 1000)):  # a server reads the variable at start
            with pg_helper.environment(MOE_SAMPLER_LEARN_EVERY=str(every)):
                server = ComfyServer(os.environ["COMFYUI_PATH"], tmp_path_factory.mktemp(name),
                                     checkpoint_dir=checkpoints)
                running.append(stack.enter_context(server))
        yield tuple(running)


def queue_runs(server: ComfyServer, seeds) -> list[tuple[str, str]]:
    """Queue one MoE Adaptive Sampler run per seed (learned router, no audit, speed priority: the
    fastest expert) all at once, so ComfyUI runs them back to back; ``(prompt id, sampler node id)``."""
    queued = []
    for seed in seeds:
        prompt = tiny_text_to_image(server, {"seed": seed, "router": LEARNED_ROUTER, "audit_rate": 0.0,
                                             "priority": 0.0})
        sampler = next(i for i, node in prompt.items() if node["class_type"] == "MoEAdaptiveSampler")
        queued.append((server.queue_prompt(prompt), sampler))
    return queued


def wait_runs(server: ComfyServer, queued: list[tuple[str, str]]) -> list[dict]:
    """The badge info of each queued run, which must have succeeded."""
    infos = []
    for prompt_id, sampler in queued:
        entry = server.wait_for(prompt_id, timeout=600)
        assert entry["status"]["status_str"] == "success", json.dumps(status_messages(entry).get("execution_error"))
        infos.append(entry["outputs"][sampler]["moe_run"][0])
    return infos


def sample(server: ComfyServer, seed: int) -> dict:
    """One run as :func:`queue_runs`: its badge info plus ``wall`` (seconds from queueing to its end)."""
    start = time.monotonic()
    info = wait_runs(server, queue_runs(server, [seed]))[0]
    return {**info, "wall": time.monotonic() - start}


def stored(database: str, key: str) -> tuple[list, list]:
    """The runs in the shared store and the rows an update of model ``key`` learns from (as ``learn_now``
    selects them: :func:`moe_sampler.router.online.rows_from_records` over the default pool)."""
    from moe_sampler.experts import default_pool
    from moe_sampler.router.online import rows_from_records
    from moe_sampler.stats.store import StatsStore

    store = StatsStore(database, timeout=10.0)
    try:
        records = store.runs()
    finally:
        store.close()
    return records, rows_from_records(records, model=key, experts=[e.descriptor.name for e in default_pool()])


def wait_stored(database: str, key: str, count: int) -> tuple[list, list]:
    deadline = time.monotonic() + 60
    while True:
        records, rows = stored(database, key)
        if len(records) >= count:
            assert len(records) == count, f"{len(records)} rows stored for {count} runs"
            return records, rows
        assert time.monotonic() < deadline, f"{len(records)} of {count} runs reached the shared store"
        time.sleep(0.2)


def test_a_farm_learns_from_both_servers_and_the_other_server_uses_the_version(servers, database):
    import psycopg

    from moe_sampler.router.online import MIN_HELDOUT, split_rows

    a, b = servers
    started = time.monotonic()
    # both servers sample at once: A its first LEARN_EVERY - 1 runs (even seeds), B its first runs (odd seeds)
    queued_a = queue_runs(a, range(2, 2 * LEARN_EVERY, 2))
    queued_b = queue_runs(b, range(1, 2 * FIRST_B_RUNS, 2))
    runs_a, runs_b = wait_runs(a, queued_a), wait_runs(b, queued_b)
    key = runs_a[0]["model"]
    for run in runs_a + runs_b:
        assert run["model"] == key and run["learning"]["version"] == 0 and run["learning"]["phase"] == "learning"
    assert runs_a[-1]["learning"]["runs_logged"] == LEARN_EVERY - 2  # counted before its own row (A's learner)
    assert runs_a[-1]["learning"]["next_update_in"] == 2 and runs_a[-1]["learning"]["last_update"] is None
    records, rows = wait_stored(database, key, len(runs_a) + len(runs_b))
    next_b = 2 * FIRST_B_RUNS + 1
    while len(split_rows(rows)[1]) < MIN_HELDOUT:  # the update must have enough held-out rows to adopt
        runs_b += wait_runs(b, queue_runs(b, range(next_b, next_b + 8, 2)))
        next_b += 8
        records, rows = wait_stored(database, key, len(runs_a) + len(runs_b))
    sampled, first = time.monotonic() - started, len(runs_a) + len(runs_b)

    # A's LEARN_EVERY-th run starts its background update, which reads every row of both servers
    trigger = sample(a, 2 * LEARN_EVERY)
    assert trigger["learning"]["next_update_in"] == 1
    runs_a.append(trigger)
    name = f"learned/{key}"
    deadline = time.monotonic() + 180
    with psycopg.connect(database, autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT created, worker, training, data FROM moe_sampler.router_versions "
                               "WHERE name = %s AND version = 1", (name,)).fetchone()
            if row is not None:
                break
            updates = [line for line in a.log_text().splitlines() if "MoE online update:" in line]
            assert all(": v1 adopted" in line for line in updates), f"server A's update did not adopt: {updates}"
            assert time.monotonic() < deadline, "server A's update did not finish"
            time.sleep(0.1)
    adopted_at, worker, training, data = row[0], row[1], json.loads(row[2]), bytes(row[3])
    learned = time.monotonic() - started - sampled
    assert worker.endswith(f":{a.process.pid}"), worker  # adopted by server A's learner

    records, rows = wait_stored(database, key, len(runs_a) + len(runs_b))
    online = training["online"]
    assert online["adopted"] is True
    # every run of both servers was learnable, and the update learnt from all of them
    assert len(rows) == len(records) == len(runs_a) + len(runs_b)
    assert online["train_rows"] + online["heldout_rows"] == len(rows) and training["runs"] == online["train_rows"]
    seeds = sorted(int(r.seed) for r in records)
    assert [s for s in seeds if s % 2 == 0] == list(range(2, 2 * LEARN_EVERY + 1, 2))  # A's runs, once each
    assert [s for s in seeds if s % 2 == 1] == list(range(1, next_b, 2))  # B's runs, once each
    assert online["train_rows"] + online["heldout_rows"] > len(runs_a)  # more than A alone ever made

    # server B: its follower copies v1 into B's own routers folder ...
    copy = b.models_dir / "moe_routers" / "learned" / f"{key}.safetensors"
    deadline = time.monotonic() + 120
    while not (copy.is_file() and copy.read_bytes() == data):
        assert time.monotonic() < deadline, "server B did not copy the adopted version"
        time.sleep(0.05)
    copied_after = copy.stat().st_mtime - adopted_at
    # ... and its next run uses it (the node re-runs: its fingerprint follows the file)
    seed, used = next_b, None
    deadline = time.monotonic() + 300  # a generation takes seconds on a loaded 2-core machine
    while used is None or used["learning"]["version"] != 1:
        assert time.monotonic() < deadline, f"server B still runs v{used['learning']['version']}"
        used = sample(b, seed=seed)
        runs_b.append(used)
        seed += 2
    used_after = time.time() - adopted_at
    assert used["model"] == key and used["learning"]["version"] == 1
    assert (a.models_dir / "moe_routers" / "learned" / f"{key}.versions" / "v0001.safetensors").is_file()
    assert (b.models_dir / "moe_routers" / "learned" / f"{key}.versions" / "v0001.safetensors").is_file()
    # on demand on server B (MoE Learn From Runs, queued alone: an output node): again every row of both servers
    learn = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_CHECKPOINT_NAME}},
             "2": {"class_type": "MoELearnFromRuns", "inputs": {"model": ["1", 0]}}}
    report = finished(b, learn)[0]["outputs"]["2"]["text"][0]
    records, rows = wait_stored(database, key, len(runs_a) + len(runs_b))
    counts = re.search(r"; (\d+) training rows, (\d+) held-out;", report)
    assert report.startswith(f"{name}: ") and counts, report
    assert int(counts[1]) + int(counts[2]) == len(rows) == len(records), report

    a_update = next(line for line in a.log_text().splitlines() if "MoE online update:" in line)
    a_update = a_update.split("MoE online update: ")[-1][:160]
    message = (f"{len(runs_a)} runs on server A and {len(runs_b)} on B, the {first} before A's update in "
               f"{sampled:.1f} s; A's update learnt from {online['train_rows']} + {online['heldout_rows']} held-out "
               f"rows of both and adopted v1 {learned:.1f} s after its trigger was queued ({a_update}); "
               f"copied into server B's routers folder {copied_after:.2f} s after adoption, first run on B with v1 "
               f"finished {used_after:.2f} s after adoption (that run took {used['wall']:.2f} s from queueing to its "
               f"end; poll {POLL} s; 2 shared CPU cores); MoE Learn From Runs on B: {report[:120]}")
    logger.warning(message)
    print(message)
