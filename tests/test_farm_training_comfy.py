"""The MoE Router Trainer as a farm job on two real ComfyUI servers sharing one PostgreSQL database
(issue 12, item 3): both queue the same training with ``farm_job`` on, each sweeps its share of the
contexts, server A is killed by SIGKILL while it holds a context, server B takes that context over
when its claim's lease runs out, finishes the job and adopts one router trained on all rows.

Each server has its own base directory (its own routers folder and user directory): they share
only the database. Claims live ``MOE_SAMPLER_FARM_LEASE_SECONDS`` (8 s here) between expert runs.

Run: ``COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/test_farm_training_comfy.py -q``
(PostgreSQL: ``MOE_SAMPLER_TEST_DATABASE_URL`` or a throwaway cluster, see tests/helpers/postgres.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from helpers import postgres as pg_helper
from helpers.comfy_server import TINY_CHECKPOINT_NAME, ComfyServer, shared_tiny_checkpoint, status_messages
from helpers.comfy_server import workflow_to_prompt

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
LEASE = 8.0
CHEAP_POOL = {"QualityMaster": False, "EarlyStopper": False, "NoiseAdaptive": False}  # SpeedDemon, BalancedMaster
TRAINING = {"prompts": "a red apple on a table\na blue boat on a lake", "negative_prompt": "blurry",
            "sizes": "64x64", "cfg_values": "5", "episodes": 6, "seeds_per_prompt": 3, "reference_steps": 24,
            "router_name": "farm_trained", "resume": True, "mode": "full sweep", "farm_job": True}
SLOW = 900.0


@pytest.fixture(scope="module")
def database():
    yield from pg_helper.scratch_database_or_skip("moe_farm_train_")


@pytest.fixture(scope="module")
def servers(tmp_path_factory, database):
    checkpoints = shared_tiny_checkpoint(tmp_path_factory)
    shared = pg_helper.environment(MOE_SAMPLER_DATABASE_URL=database, MOE_SAMPLER_ROUTER_POLL_SECONDS="0.5",
                                   MOE_SAMPLER_FARM_LEASE_SECONDS=str(LEASE), MOE_SAMPLER_LEARNING="0")
    with shared, contextlib.ExitStack() as stack:
        yield tuple(stack.enter_context(ComfyServer(os.environ["COMFYUI_PATH"], tmp_path_factory.mktemp(name),
                                                    checkpoint_dir=checkpoints))
                    for name in ("farm_train_a", "farm_train_b"))


def training_prompt(server: ComfyServer) -> dict:
    path = ROOT / "example_workflows" / "MoE Router Training (quick start).json"
    prompt = workflow_to_prompt(json.loads(path.read_text(encoding="utf-8")), server.object_info())
    overrides = {"CheckpointLoaderSimple": {"ckpt_name": TINY_CHECKPOINT_NAME}, "MoERouterTrainer": TRAINING,
                 "MoEExpertPool": CHEAP_POOL}
    for node in prompt.values():
        node["inputs"].update(overrides.get(node["class_type"], {}))
    return prompt


def claims(database: str) -> list[tuple]:
    """``(context, state, worker, attempts)`` of every context handed out (none before the tables exist)."""
    import psycopg

    with psycopg.connect(database, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('moe_sampler.farm_contexts')").fetchone()[0] is None:
            return []
        return conn.execute("SELECT context, state, worker, attempts FROM moe_sampler.farm_contexts "
                            "ORDER BY context").fetchall()


def test_two_servers_share_a_training_job_and_survive_one_killed_mid_episode(servers, database):
    from moe_sampler.router.model import Router
    from moe_sampler.stats.store import StatsStore

    a, b = servers
    worker_a = f"{socket.gethostname()}:{a.process.pid}"
    worker_b = f"{socket.gethostname()}:{b.process.pid}"
    prompts = {}
    for server in (a, b):
        prompt = training_prompt(server)
        trainer = next(key for key, node in prompt.items() if node["class_type"] == "MoERouterTrainer")
        prompts[server] = (server.queue_prompt(prompt), trainer)

    # Kill A (SIGKILL) once it has written a context and holds another one.
    start = time.monotonic()
    while True:
        rows = claims(database)
        done_by_a = [r for r in rows if r[2] == worker_a and r[1] == "done"]
        held_by_a = [r for r in rows if r[2] == worker_a and r[1] == "claimed"]
        if done_by_a and held_by_a:
            a.process.send_signal(signal.SIGKILL)
            a.process.wait(30)
            break
        assert a.process.poll() is None, "server A ended by itself"
        assert not (len(rows) == 6 and all(r[1] == "done" for r in rows)), f"A never held a second context: {rows}"
        assert time.monotonic() - start < SLOW, f"A never held a context after writing one: {rows}"
        time.sleep(0.05)
    killed_context = held_by_a[0][0]

    entry = b.wait_for(prompts[b][0], timeout=SLOW)
    assert entry["status"]["status_str"] == "success", json.dumps(status_messages(entry).get("execution_error"))
    report = entry["outputs"][prompts[b][1]]["text"][0]
    assert "the farm has done 6 of 6 (12 rows" in report, report
    assert "Final update: ran on this worker, trained on all 12 rows; router farm_trained.safetensors v1" in report

    # Every context done once; A's held context taken over by B; rows complete, none twice.
    rows = claims(database)
    assert [r[0] for r in rows] == list(range(6)) and all(r[1] == "done" for r in rows), rows
    assert {r[2] for r in rows} == {worker_a, worker_b}, rows
    taken_over = next(r for r in rows if r[0] == killed_context)
    assert taken_over[2] == worker_b and taken_over[3] >= 2, rows
    store = StatsStore(database)
    try:
        job_rows = [r for r in store.runs(source="training") if r.job is not None]
    finally:
        store.close()
    pairs = sorted((r.details_dict()["farm"]["context"], r.expert) for r in job_rows)
    assert pairs == sorted((c, e) for c in range(6) for e in ("BalancedMaster", "SpeedDemon")), pairs

    # One adopted version, in the database and in B's routers folder.
    import psycopg

    with psycopg.connect(database, autocommit=True) as conn:
        versions = conn.execute("SELECT version FROM moe_sampler.router_versions WHERE name = 'farm_trained'").fetchall()
    assert versions == [(1,)]
    router = Router.load(b.models_dir / "moe_routers" / "farm_trained.safetensors")
    assert router.training["version"] == 1 and (router.training["contexts"], router.training["runs"]) == (6, 12)
    assert router.training["farm_job"] == job_rows[0].job
