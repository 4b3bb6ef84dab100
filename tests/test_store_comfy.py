"""The stats store inside a real ComfyUI server (issue 9, defect 3): with another process holding the
store's write lock for 30 s, the MoE Stats node and ``GET /moe_sampler/stats`` answer in well under a
second and say the store is locked, a generation still succeeds, and its row arrives once the lock
is gone (nothing dropped).

Run: ``COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/test_store_comfy.py -q``
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.comfy_server import ComfyServer, finished, shared_tiny_checkpoint, tiny_text_to_image

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

LOCK_SECONDS = 30.0
logger = logging.getLogger(__name__)

HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ComfyServer(os.environ["COMFYUI_PATH"], tmp_path_factory.mktemp("comfy_store"),
                     checkpoint_dir=shared_tiny_checkpoint(tmp_path_factory)) as running:
        yield running


def run(server: ComfyServer, prompt: dict) -> tuple[dict, float]:
    """The finished history entry and the prompt's execution time from ComfyUI's own timestamps."""
    entry, messages = finished(server, prompt)
    seconds = (messages["execution_success"]["timestamp"] - messages["execution_start"]["timestamp"]) / 1000
    return entry, seconds


def text_to_image(server: ComfyServer, seed: int) -> dict:
    return tiny_text_to_image(server, {"seed": seed})


def rows(path: Path) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        count = conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    conn.close()
    return count


def test_defect3_stats_node_and_route_under_a_30s_foreign_write_lock(server):
    store = server.user_dir / "__moe_sampler" / "stats.sqlite3"
    stats_prompt = {"1": {"class_type": "MoEStats", "inputs": {"router": "(all)"}}}
    run(server, text_to_image(server, 1))
    deadline = time.monotonic() + 15
    while (not store.exists() or rows(store) < 1) and time.monotonic() < deadline:
        time.sleep(0.2)
    before = rows(store)
    entry, _ = run(server, stats_prompt)
    assert entry["outputs"]["1"]["moe_stats"][0]["healthy"] is True

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(store), str(LOCK_SECONDS)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        locked_at = time.monotonic()
        entry, node_seconds = run(server, stats_prompt)
        payload = entry["outputs"]["1"]["moe_stats"][0]
        start = time.monotonic()
        route = server.get_json("/moe_sampler/stats")
        route_seconds = time.monotonic() - start
        logger.warning("under a %.0f s foreign write lock: MoE Stats prompt %.3f s, /moe_sampler/stats %.3f s",
                       LOCK_SECONDS, node_seconds, route_seconds)
        assert node_seconds < 1.0 and route_seconds < 1.0
        for answer in (payload, route):
            assert answer["healthy"] is False and "stats.sqlite3 is locked by another process" in answer["problem"]
            assert str(server.base_dir) not in json.dumps(answer)
            assert answer["runs"] == before  # the table is still shown
        assert "Stats store problem" in entry["outputs"]["1"]["text"][0]

        _, sample_seconds = run(server, text_to_image(server, 2))  # sampling goes on
        assert time.monotonic() - locked_at < LOCK_SECONDS - 2, "the lock ended before the checks"
        assert rows(store) == before  # not written yet: held in memory
    finally:
        holder.wait(timeout=LOCK_SECONDS + 30)
    deadline = time.monotonic() + 30
    while rows(store) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.25)
    assert rows(store) == before + 1  # written once the lock was gone
    route = server.get_json("/moe_sampler/stats")
    assert route["healthy"] is True and route["dropped"] == 0 and route["waiting"] == 0
