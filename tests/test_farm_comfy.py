"""Two real ComfyUI servers on one PostgreSQL database (issue 12, item 4): a router version adopted
through one server (MoE Learn From Runs) is used by the other's MoE Adaptive Sampler without a
restart, and the time from adoption to use is measured.

Each server has its own base directory (its own routers folder): the version reaches server B
only through the database. Background updates are off (``MOE_SAMPLER_LEARNING=0``) so the one
adoption is the node's; server B checks for new versions every 0.5 s
(``MOE_SAMPLER_ROUTER_POLL_SECONDS``).

Run: ``COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/test_farm_comfy.py -q``
(PostgreSQL: ``MOE_SAMPLER_TEST_DATABASE_URL`` or a throwaway cluster, see tests/helpers/postgres.py).
"""

from __future__ import annotations

import logging
import os
import random
import time
import uuid

import pytest

from helpers import postgres as pg_helper
from helpers.comfy_server import (
    TINY_CHECKPOINT_NAME,
    ComfyServer,
    finished,
    shared_tiny_checkpoint,
    tiny_text_to_image,
)

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

LEARNED_ROUTER = "(learned for this model)"
POLL = 0.5
logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def database():
    try:
        url = pg_helper.database_url()
    except pg_helper.Unavailable as exc:
        pytest.skip(str(exc))
    import psycopg

    name = "moe_farm_" + uuid.uuid4().hex[:10]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"{url.rpartition('/')[0]}/{name}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def servers(tmp_path_factory, database):
    checkpoints = shared_tiny_checkpoint(tmp_path_factory)
    saved = {k: os.environ.get(k) for k in ("MOE_SAMPLER_DATABASE_URL", "MOE_SAMPLER_ROUTER_POLL_SECONDS",
                                            "MOE_SAMPLER_LEARNING")}
    os.environ.update(MOE_SAMPLER_DATABASE_URL=database, MOE_SAMPLER_ROUTER_POLL_SECONDS=str(POLL),
                      MOE_SAMPLER_LEARNING="0")
    try:
        a = ComfyServer(os.environ["COMFYUI_PATH"], tmp_path_factory.mktemp("farm_a"), checkpoint_dir=checkpoints)
        b = ComfyServer(os.environ["COMFYUI_PATH"], tmp_path_factory.mktemp("farm_b"), checkpoint_dir=checkpoints)
        with a, b:
            yield a, b
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run(server: ComfyServer, prompt: dict) -> tuple[dict, float]:
    """The finished history entry and the wall time from queueing to its end."""
    start = time.monotonic()
    entry, _ = finished(server, prompt)
    return entry, time.monotonic() - start


def sample(server: ComfyServer, seed: int) -> dict:
    """One MoE Adaptive Sampler run with the learned router on the tiny checkpoint: its badge info
    (plus ``wall``: seconds from queueing to the end)."""
    prompt = tiny_text_to_image(server, {"seed": seed, "router": LEARNED_ROUTER, "audit_rate": 0.0})
    sampler = next(i for i, node in prompt.items() if node["class_type"] == "MoEAdaptiveSampler")
    entry, wall = run(server, prompt)
    return {**entry["outputs"][sampler]["moe_run"][0], "wall": wall}


def test_a_router_adopted_on_one_server_is_used_by_the_other(servers, database):
    from moe_sampler.experts import default_pool
    from moe_sampler.stats.store import RunRecord, StatsStore

    a, b = servers
    first = sample(a, seed=1)
    key = first["model"]
    assert first["learning"]["version"] == 0 and first["learning"]["phase"] == "learning"
    before_b = sample(b, seed=2)
    assert before_b["model"] == key and before_b["learning"]["version"] == 0

    # logged runs of this model in the shared store (as a farm's audits would leave them): one expert is best
    store = StatsStore(database, timeout=10.0)
    try:
        deadline = time.monotonic() + 120
        real = []
        while not real:
            assert time.monotonic() < deadline, "the servers' rows did not reach the shared store"
            real = [r for r in store.runs() if r.model == key and r.state is not None]
            time.sleep(0.2)
        assert {r.expert for r in real}  # both servers' runs are in the one database
        pool = [e.descriptor for e in default_pool()]
        rng = random.Random(0)
        for i in range(1500):
            expert = pool[i % len(pool)]
            quality = (0.2, 0.35, 0.5, 0.6, 0.95)[i % len(pool)] + 0.04 * rng.random()
            store.record_async(RunRecord(expert=expert.name, router=f"learned/{key}.safetensors", nfe=expert.max_nfe or 20,
                                         steps=10, seconds=0.1, success=True, quality=min(quality, 1.0),
                                         propensity=1 / len(pool), priority=0.5, state=real[0].state, seed=i,
                                         model=key, quality_source="audit"))
        assert store.flush(120)
    finally:
        store.close()

    # adopted through server A: the MoE Learn From Runs node
    learn = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_CHECKPOINT_NAME}},
             "2": {"class_type": "MoELearnFromRuns", "inputs": {"model": ["1", 0]}},
             "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}  # the node is not an output
    entry, _ = run(a, learn)
    report = entry["outputs"]["3"]["text"][0]
    assert report.startswith(f"learned/{key}: v1 adopted"), report

    import psycopg

    with psycopg.connect(database) as conn:
        adopted_at, worker, data = conn.execute(
            "SELECT created, worker, data FROM moe_sampler.router_versions WHERE name = %s AND version = 1",
            (f"learned/{key}",)).fetchone()
    # server B: its follower copies v1 into B's own routers folder ...
    copy = b.models_dir / "moe_routers" / "learned" / f"{key}.safetensors"
    deadline = time.monotonic() + 120
    while not (copy.is_file() and copy.read_bytes() == bytes(data)):
        assert time.monotonic() < deadline, "server B did not copy the adopted version"
        time.sleep(0.05)
    copied_after = copy.stat().st_mtime - adopted_at
    # ... and its next run uses it (the node re-runs: its fingerprint follows the file)
    seed, used = 3, None
    deadline = time.monotonic() + 300  # a generation takes seconds on a loaded 2-core machine
    while used is None or used["learning"]["version"] != 1:
        assert time.monotonic() < deadline, f"server B still runs v{used['learning']['version']}"
        used = sample(b, seed=seed)
        seed += 1
    used_after = time.time() - adopted_at
    assert used["model"] == key and "router v1" in used["learning"]["text"]
    assert (a.models_dir / "moe_routers" / "learned" / f"{key}.versions" / "v0001.safetensors").is_file()
    assert (b.models_dir / "moe_routers" / "learned" / f"{key}.versions" / "v0001.safetensors").is_file()
    message = (f"adopted on server A ({worker}); copied into server B's routers folder {copied_after:.2f} s later, "
               f"first run on B with v1 finished {used_after:.2f} s after adoption (that run took {used['wall']:.2f} s from "
               f"queueing to its end; poll {POLL} s; 2 shared CPU cores)")
    logger.warning(message)
    print(message)
