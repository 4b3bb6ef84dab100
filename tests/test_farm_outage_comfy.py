"""The farm's PostgreSQL server stopped and started again while a real ComfyUI server samples
(issue 12, item 4): sampling never fails, the rows of the runs made while the database was gone
arrive once it is back (each exactly once) without restarting ComfyUI, and the router follower
(router/pg_registry.py) survives the outage and picks up a version adopted afterwards.

The database server is the tests' own (``MOE_SAMPLER_TEST_DATABASE_URL`` with
``MOE_SAMPLER_PG_DIR``, as ``.ci/run`` starts it, or the throwaway cluster of
tests/helpers/postgres.py): ``.ci/postgres.sh halt`` stops it keeping its files, ``resume``
starts it again on the same port; the test always resumes it (later tests use it). The ComfyUI
server stores its stats in a database of its own on that server (``MOE_SAMPLER_DATABASE_URL``);
background updates are off (``MOE_SAMPLER_LEARNING=0``): the one version is adopted by the test.

Run: ``COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/test_farm_outage_comfy.py -q``
"""

from __future__ import annotations

import logging
import os
import time

import pytest

from helpers import postgres as pg_helper
from helpers.comfy_server import ComfyServer, finished, shared_tiny_checkpoint, tiny_text_to_image

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

LEARNED_ROUTER = "(learned for this model)"
POLL = 0.5
logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def database():
    try:
        pg_helper.control_server("url")  # this test must be able to halt and resume the server
        with pg_helper.scratch_database("moe_outage_") as url:
            yield url
            pg_helper.resume_server()  # in case the test left it halted
    except pg_helper.Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def server(tmp_path_factory, database):
    checkpoints = shared_tiny_checkpoint(tmp_path_factory)
    with pg_helper.environment(MOE_SAMPLER_DATABASE_URL=database, MOE_SAMPLER_ROUTER_POLL_SECONDS=str(POLL),
                               MOE_SAMPLER_LEARNING="0"):
        with ComfyServer(os.environ["COMFYUI_PATH"], tmp_path_factory.mktemp("outage"),
                         checkpoint_dir=checkpoints) as running:
            yield running


def sample(server: ComfyServer, seed: int) -> dict:
    """One MoE Adaptive Sampler run (learned router, no audit, speed priority) that must succeed:
    its badge info, plus ``images`` (the Save Image files) and ``wall`` (queueing to its end)."""
    prompt = tiny_text_to_image(server, {"seed": seed, "router": LEARNED_ROUTER, "audit_rate": 0.0, "priority": 0.0})
    ids = {node["class_type"]: i for i, node in prompt.items()}
    start = time.monotonic()
    entry, messages = finished(server, prompt)  # asserts status "success": no execution error
    assert "execution_error" not in messages and "execution_interrupted" not in messages
    images = entry["outputs"][ids["SaveImage"]]["images"]
    return {**entry["outputs"][ids["MoEAdaptiveSampler"]]["moe_run"][0], "images": images,
            "wall": time.monotonic() - start}


def stats_payload(server: ComfyServer) -> tuple[dict, dict, float]:
    """The MoE Stats node's payload (plus ``table``: its text), ``GET /moe_sampler/stats`` and the
    node prompt's wall seconds."""
    start = time.monotonic()
    entry, _ = finished(server, {"1": {"class_type": "MoEStats", "inputs": {"router": "(all)"}}})
    seconds = time.monotonic() - start
    outputs = entry["outputs"]["1"]
    return {**outputs["moe_stats"][0], "table": outputs["text"][0]}, server.get_json("/moe_sampler/stats"), seconds


def stored_seeds(database: str) -> list[str]:
    import psycopg

    with psycopg.connect(database, connect_timeout=5) as conn:
        return [row[0] for row in conn.execute("SELECT seed FROM moe_sampler.runs ORDER BY id").fetchall()]


def wait_for(condition, timeout: float, what: str, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s"
        time.sleep(step)


def test_database_stopped_and_restarted_while_sampling(server, database):
    from moe_sampler.router.model import Router
    from moe_sampler.router.pg_registry import PostgresRegistry

    pid = server.process.pid
    before = [sample(server, seed) for seed in (1, 2)]
    key = before[0]["model"]
    assert all(run["learning"]["version"] == 0 for run in before)
    wait_for(lambda: len(stored_seeds(database)) == 2, 60, "the first two rows did not arrive")
    payload, route, _ = stats_payload(server)
    assert payload["healthy"] is True and route["healthy"] is True and payload["runs"] == 2

    outage = ["3", "4", "5"]
    halted_at = time.monotonic()
    pg_helper.halt_server()
    try:
        during = [sample(server, int(seed)) for seed in outage]  # sampling goes on
        for run in during:
            assert run["images"] and run["learning"]["version"] == 0  # its image saved, the last version used
            for image in run["images"]:
                assert (server.output_dir / image["subfolder"] / image["filename"]).is_file()
        payload, route, node_seconds = stats_payload(server)
        for answer in (payload, route):
            assert answer["healthy"] is False, answer
            # "cannot reach PostgreSQL database 'moe_outage_...'" (+ "; 3 runs kept in memory, retried" once
            # the writer has given up its first write, after the store's 5 s timeout)
            assert "cannot reach" in answer["problem"] and "moe_outage_" in answer["problem"], answer["problem"]
            assert answer["waiting"] == len(outage) and answer["dropped"] == 0, answer
        assert "the stats store is unavailable: cannot reach" in payload["table"]  # no rows to show
        # the router follower noticed (and keeps the local copy)
        wait_for(lambda: "sampling goes on with the local copies of the routers" in server.log_text(), 30,
                 "the router follower did not notice the database was gone")
        outage_seconds = time.monotonic() - halted_at
    finally:
        pg_helper.resume_server()
    resumed_at = time.monotonic()

    # every row arrives, each once, without restarting ComfyUI
    wait_for(lambda: len(stored_seeds(database)) >= 5, 60, "the rows kept in memory did not arrive")
    arrived = time.monotonic() - resumed_at
    time.sleep(1.0)  # a duplicate written late would show now
    seeds = stored_seeds(database)
    assert sorted(seeds) == ["1", "2", "3", "4", "5"], seeds
    route = wait_for(lambda: (lambda r: r if r["healthy"] else None)(server.get_json("/moe_sampler/stats")), 30,
                     "the store did not report healthy again")
    assert route["waiting"] == 0 and route["dropped"] == 0 and route["runs"] == 5
    wait_for(lambda: "the database is back; following adopted versions again" in server.log_text(), 30,
             "the router follower did not reconnect")

    # a version adopted after the outage reaches the server through its follower thread
    registry = PostgresRegistry(database, server.base_dir / "test_registry_cache")
    router = Router.default()
    router.training = {**router.training, "model": key}
    data = registry.publish(f"learned/{key}", router).path.read_bytes()
    adopted_at = time.monotonic()
    copy = server.models_dir / "moe_routers" / "learned" / f"{key}.safetensors"
    wait_for(lambda: copy.is_file() and copy.read_bytes() == data, 30,
             "the server's follower did not copy the version adopted after the outage", step=0.05)
    copied = time.monotonic() - adopted_at
    after = sample(server, 6)
    assert after["learning"]["version"] == 1, after["learning"]
    wait_for(lambda: len(stored_seeds(database)) == 6, 30, "the run after the outage was not stored")
    assert server.process.pid == pid and server.process.poll() is None  # the same ComfyUI process throughout
    walls = lambda runs: ", ".join(f"{run['wall']:.2f}" for run in runs)  # noqa: E731
    message = (f"database halted for {outage_seconds:.1f} s while {len(outage)} runs sampled ({walls(during)} s "
               f"each, queueing to end; before: {walls(before)} s); MoE Stats while it was gone: {node_seconds:.2f} s; "
               f"the kept rows arrived {arrived:.1f} s after it was back; a version adopted afterwards was copied "
               f"{copied:.2f} s later (poll {POLL} s) and used by the next run")
    logger.warning(message)
    print(message)
