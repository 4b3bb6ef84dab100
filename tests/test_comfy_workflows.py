"""The pack inside a real ComfyUI server, driven over its HTTP API like a user's browser would.

One server per module (``main.py --cpu`` on a free loopback port, everything under a temporary
base directory, the tiny SD1.5-family checkpoint built once). Every example workflow is
converted from the UI format to an API prompt, shrunk to 64x64 and run; the outputs, the
stats store, the saved router, interruption and bad input are checked.

Run: ``COMFYUI_PATH=/work/comfyui /work/venv-comfy/bin/python -m pytest tests/test_comfy_workflows.py -q``
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest

from helpers.comfy_server import (
    TINY_CHECKPOINT_NAME,
    ComfyServer,
    PromptRejected,
    build_tiny_checkpoint,
    status_messages,
    workflow_to_prompt,
)

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "example_workflows"
BUILTIN_ROUTER = "(built-in default)"
# Cheap experts and a short reference keep a training context to a few seconds on a 2-core CPU.
CHEAP_POOL = {"QualityMaster": False, "EarlyStopper": False, "NoiseAdaptive": False}
SMALL_TRAINING = {"prompts": "a red apple on a table", "negative_prompt": "blurry", "sizes": "64x64",
                  "cfg_values": "5", "episodes": 3, "seeds_per_prompt": 1, "reference_steps": 24}


def declared_node_ids() -> set[str]:
    """Node ids the pack's node modules declare (read from the source, no ComfyUI import)."""
    ids = set()
    for module in sorted((ROOT / "nodes").rglob("*.py")):
        ids |= set(re.findall(r'node_id="(MoE\w+)"', module.read_text(encoding="utf-8")))
    return ids


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy = os.environ["COMFYUI_PATH"]
    checkpoints = tmp_path_factory.getbasetemp() / "moe_tiny_checkpoint"
    build_tiny_checkpoint(comfy, checkpoints)
    with ComfyServer(comfy, tmp_path_factory.mktemp("comfy_workflows"), checkpoint_dir=checkpoints) as running:
        yield running


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.object_info()


def store_path(server: ComfyServer) -> Path:
    return server.user_dir / "__moe_sampler" / "stats.sqlite3"


def store_rows(server: ComfyServer) -> list[dict]:
    """Every stored run (read-only connection; the server may be writing)."""
    path = store_path(server)
    if not path.exists():
        return []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("SELECT * FROM runs ORDER BY id")]


def store_integrity(server: ComfyServer) -> str:
    with sqlite3.connect(f"file:{store_path(server)}?mode=ro", uri=True) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


def wait_rows(server: ComfyServer, count: int, timeout: float = 15.0) -> list[dict]:
    """Rows once at least ``count`` exist (the sampler records off the hot path)."""
    deadline = time.monotonic() + timeout
    rows = store_rows(server)
    while len(rows) < count and time.monotonic() < deadline:
        time.sleep(0.2)
        rows = store_rows(server)
    return rows


def load_prompt(name: str, object_info: dict, overrides: dict[str, dict] | None = None) -> dict:
    """An example workflow as an API prompt: tiny checkpoint, 64x64 latents, ``overrides`` by node type."""
    workflow = json.loads((WORKFLOWS / name).read_text(encoding="utf-8"))
    prompt = workflow_to_prompt(workflow, object_info)
    small = {"CheckpointLoaderSimple": {"ckpt_name": TINY_CHECKPOINT_NAME},
             "EmptyLatentImage": {"width": 64, "height": 64, "batch_size": 1},
             "MoEExpert": {"steps": 4}}
    for node in prompt.values():
        node["inputs"].update(small.get(node["class_type"], {}))
        node["inputs"].update((overrides or {}).get(node["class_type"], {}))
    return prompt


def node_of(prompt: dict, class_type: str) -> str:
    return next(key for key, node in prompt.items() if node["class_type"] == class_type)


def run_ok(server: ComfyServer, prompt: dict, timeout: float = 600.0) -> dict:
    entry = server.wait_for(server.queue_prompt(prompt), timeout)
    messages = status_messages(entry)
    assert entry["status"]["status_str"] == "success", json.dumps(messages.get("execution_error"), indent=1)[:4000]
    return entry


def output_images(server: ComfyServer, entry: dict, node: str) -> list[Path]:
    images = entry["outputs"][node]["images"]
    folders = {"output": server.output_dir, "temp": server.base_dir / "temp"}
    return [folders[image["type"]] / image["subfolder"] / image["filename"] for image in images]


# ----------------------------------------------------------------------------------- loading


def test_pack_loads_without_import_failure(server):
    line = server.pack_import_line()
    assert line is not None, server.log_tail()
    assert "IMPORT FAILED" not in line, server.log_tail()


def test_object_info_lists_every_node_with_tooltips(object_info):
    declared = declared_node_ids()
    assert {"MoEAdaptiveSampler", "MoEExpert", "MoEExpertPool", "MoERouterTrainer", "MoEStats"} <= declared
    listed = {name for name in object_info if name.startswith("MoE")}
    assert listed == declared
    for name in declared:
        info = object_info[name]
        assert info["category"] == "sampling/moe"
        for section in ("required", "optional"):
            for input_name, spec in info["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_routes_answer(server):
    experts = server.get_json("/moe_sampler/experts")
    assert {"QualityMaster", "SpeedDemon", "BalancedMaster"} <= {e["name"] for e in experts}
    assert all("steps" in e and "solver" in e for e in experts)
    assert isinstance(server.get_json("/moe_sampler/routers"), list)
    stats = server.get_json("/moe_sampler/stats")
    assert stats["healthy"] is True and isinstance(stats["experts"], list)
    assert server.get_json("/api/moe_sampler/stats?router=(all)")["router"] is None


def test_labels_route_serves_the_one_definition_of_the_router_labels(server):
    from moe_sampler.stats.report import LABELS

    assert server.get_json("/moe_sampler/labels") == LABELS


def test_example_workflows_are_served_as_templates(server):
    templates = server.get_json("/api/workflow_templates")
    module, listed = next(iter((k, v) for k, v in templates.items() if "moe_sampler" in k))
    assert {f"{p.stem}" for p in WORKFLOWS.glob("*.json")} <= set(listed)
    # What the template browser fetches: the workflow and its thumbnail, <name>.jpg.
    for name in listed:
        base = f"/api/workflow_templates/{urllib.parse.quote(module)}/{urllib.parse.quote(name)}"
        assert "nodes" in server.get_json(base + ".json")
        assert server.get_bytes(base + ".jpg")[:3] == b"\xff\xd8\xff", f"{name}: no JPEG thumbnail"


# ------------------------------------------------------------------------- example workflows


def png_text(path: Path) -> dict:
    """The text chunks of a PNG (ComfyUI writes its metadata there)."""
    from PIL import Image

    with Image.open(path) as image:
        return dict(image.text)


def test_text_to_image_workflow(server, object_info):
    before = len(store_rows(server))
    prompt = load_prompt("MoE Text to Image.json", object_info, {"MoEAdaptiveSampler": {"seed": 11}})
    # As the browser sends it: extra_pnginfo carries the workflow; the sampler adds its run to it.
    entry = server.wait_for(server.queue_prompt(prompt, extra_data={"extra_pnginfo": {"workflow": {"nodes": []}}}))
    assert entry["status"]["status_str"] == "success", status_messages(entry)
    sampler = node_of(prompt, "MoEAdaptiveSampler")
    run = entry["outputs"][sampler]["moe_run"][0]
    # Why this expert: every pool expert's expected quality and model calls, the pick and its lead.
    why = run["why"]
    assert [e["expert"] for e in why["experts"]] == ["QualityMaster", "SpeedDemon", "BalancedMaster", "EarlyStopper",
                                                      "NoiseAdaptive"]
    assert all(0 <= e["expected_quality"] <= 1 and e["expected_calls"] >= 1 for e in why["experts"])
    assert [e["expert"] for e in why["experts"] if e["picked"]] == [run["expert"]]
    assert why["lead"] >= 0 and "expected quality" in why["summary"] and why["router"]["label"] == "default"
    assert why["settings"]["name"] == run["expert"] and "solver" in why["settings"]
    assert "model calls" in entry["outputs"][sampler]["text"][0]
    chart = output_images(server, entry, sampler)
    assert chart and chart[0].is_file(), "the why chart is the sampler's image output"
    # The saved image says what produced it.
    saved = png_text(output_images(server, entry, node_of(prompt, "SaveImage"))[0])
    (meta,) = json.loads(saved["moe_sampler"])
    assert meta["expert"] == run["expert"] and meta["node"] == sampler and meta["seed"] == 11
    assert meta["settings"]["name"] == run["expert"] and meta["router"]["label"] == "default"
    assert meta["priority"] == 0.5 and len(meta["expected"]) == 5
    # ... and so does its stats row.
    details = json.loads(wait_rows(server, before + 1)[-1]["details"])
    assert [e["expert"] for e in details["experts"]] == [e["expert"] for e in why["experts"]]
    assert details["settings"]["name"] == run["expert"]
    assert run["expert"] and run["nfe"] > 0 and run["seconds"] > 0 and 0 <= run["confidence"] <= 1
    assert run["router"] == "default" and run["fallback"] is False
    images = output_images(server, entry, node_of(prompt, "SaveImage"))
    assert images and all(p.is_file() and p.stat().st_size > 0 for p in images)
    rows = wait_rows(server, before + 1)
    newest = rows[-1]
    assert (newest["expert"], newest["source"], newest["router"], newest["success"]) == (
        run["expert"], "sampling", "default", 1)


def test_custom_expert_pool_workflow(server, object_info):
    before = len(store_rows(server))
    prompt = load_prompt("MoE Custom Expert Pool.json", object_info,
                         {"MoEAdaptiveSampler": {"seed": 12}, "MoEExpertPool": {"SpeedDemon": False,
                                                                                "BalancedMaster": False}})
    pool_names = {f"{n['inputs']['sampler_name']}/{n['inputs']['scheduler']}/{n['inputs']['steps']}"
                  for n in prompt.values() if n["class_type"] == "MoEExpert"}
    entry = run_ok(server, prompt)
    run = entry["outputs"][node_of(prompt, "MoEAdaptiveSampler")]["moe_run"][0]
    assert any(run["expert"].startswith(name) for name in pool_names), (run["expert"], pool_names)
    assert output_images(server, entry, node_of(prompt, "SaveImage"))[0].is_file()
    assert wait_rows(server, before + 1)[-1]["expert"] == run["expert"]


def test_ab_compare_workflow_matches_core_ksampler(server, object_info):
    prompt = load_prompt("MoE AB Compare with KSampler.json", object_info,
                         {"MoEABCompare": {"seed": 31, "baseline_steps": 6}})
    entry = run_ok(server, prompt)
    ab = node_of(prompt, "MoEABCompare")
    ui = entry["outputs"][ab]
    info = ui["moe_run"][0]
    text = ui["text"][0]
    assert info["ab"]["baseline"]["expert"] == "euler/normal/6" and info["ab"]["baseline"]["model_calls"] == 6
    assert info["ab"]["moe"]["expert"] == info["expert"] and info["ab"]["calls_change"] is not None
    assert "MoE pick" in text and "Baseline" in text and "model calls" in text
    saves = sorted(k for k, n in prompt.items() if n["class_type"] == "SaveImage")
    images = {prompt[k]["inputs"]["filename_prefix"]: output_images(server, entry, k)[0] for k in saves}
    assert set(images) == {"moe_ab/moe", "moe_ab/baseline"}

    # The baseline is exactly core KSampler with the same settings and seed.
    from PIL import Image

    core = json.loads(json.dumps(prompt))
    inputs = core[ab]["inputs"]
    core[ab] = {"class_type": "KSampler", "inputs": {
        "model": inputs["model"], "positive": inputs["positive"], "negative": inputs["negative"],
        "latent_image": inputs["latent_image"], "seed": 31, "steps": 6, "cfg": inputs["cfg"],
        "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    baseline_save = next(k for k in saves if prompt[k]["inputs"]["filename_prefix"] == "moe_ab/baseline")
    core = {k: v for k, v in core.items() if k != next(s for s in saves if s != baseline_save)}
    core[baseline_save]["inputs"]["filename_prefix"] = "moe_ab/core_ksampler"
    decode = core[baseline_save]["inputs"]["images"][0]
    core[decode]["inputs"]["samples"] = [ab, 0]
    core = {k: v for k, v in core.items() if k == ab or k == baseline_save or k == decode
            or v["class_type"] not in ("VAEDecode",)}
    reference = output_images(server, run_ok(server, core), baseline_save)[0]
    with Image.open(images["moe_ab/baseline"]) as a, Image.open(reference) as b:
        assert a.tobytes() == b.tobytes(), "the A/B baseline differs from core KSampler"


def test_router_training_workflow_saves_a_router_the_sampler_uses(server, object_info):
    from moe_sampler.router.model import Router

    before = len(store_rows(server))
    prompt = load_prompt("MoE Router Training (quick start).json", object_info, {
        "MoERouterTrainer": {**SMALL_TRAINING, "router_name": "trained_in_test", "resume": False},
        "MoEExpertPool": CHEAP_POOL})
    entry = run_ok(server, prompt)
    curve = output_images(server, entry, node_of(prompt, "PreviewImage"))
    assert curve and curve[0].is_file()
    report = entry["outputs"][node_of(prompt, "MoERouterTrainer")]["text"][0]
    assert "trained_in_test.safetensors" in report and "SpeedDemon" in report
    # one context, two experts: too few measured runs for a calibration, and the report says so
    assert "Calibration of the experts' own quality estimates: not fitted (8 measured runs" in report

    path = server.models_dir / "moe_routers" / "trained_in_test.safetensors"
    router = Router.load(path)
    assert router.training["contexts"] == SMALL_TRAINING["episodes"]
    assert not list(path.parent.glob("*.tmp"))
    rows = [r for r in wait_rows(server, before + 3)[before:] if r["source"] == "training"]
    # One context: the reference once, then each of the two experts once (repeats are cached).
    assert sorted(r["expert"] for r in rows) == ["BalancedMaster", "SpeedDemon"]
    assert {r["router"] for r in rows} == {"trained_in_test.safetensors"}
    assert all(r["success"] == 1 and 0 <= r["quality"] <= 1 for r in rows)
    # sweep rows are full information on this model, each with its calibration pair
    assert {r["model"] for r in rows} == {router.training["model"]} and {r["quality_source"] for r in rows} == {"sweep"}
    for r in rows:
        details = json.loads(r["details"])
        assert details["true_error"] > 0 and details["estimate"]["estimate"] == pytest.approx(r["error_estimate"])

    routers = server.get_json("/moe_sampler/routers")
    listed = next(r for r in routers if r["name"] == "trained_in_test.safetensors")
    assert listed["compatible"] is True and listed["training"]["contexts"] == SMALL_TRAINING["episodes"]

    sample = load_prompt("MoE Text to Image.json", server.object_info(),
                         {"MoEAdaptiveSampler": {"seed": 13, "router": "trained_in_test.safetensors"}})
    run = run_ok(server, sample)["outputs"][node_of(sample, "MoEAdaptiveSampler")]["moe_run"][0]
    assert run["router"] == "trained_in_test.safetensors"


def test_training_progress_counts_expert_runs_with_a_preview(server, object_info):
    """The bar moves per expert run inside an episode, and each run sends a preview image."""
    prompt = load_prompt("MoE Router Training (quick start).json", object_info, {
        "MoERouterTrainer": {**SMALL_TRAINING, "episodes": 2, "seeds_per_prompt": 2, "router_name": "progress_test",
                             "resume": False},
        "MoEExpertPool": CHEAP_POOL})
    trainer = node_of(prompt, "MoERouterTrainer")
    client = uuid.uuid4().hex
    progress, previews = [], 0
    with server.events(client) as events:
        prompt_id = server.queue_prompt(prompt, client_id=client, extra_data={"preview_method": "none"})
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                message = events.recv(max(deadline - time.monotonic(), 0.1))
            except TimeoutError:
                break
            if isinstance(message, bytes):
                previews += 1
                continue
            event = json.loads(message)
            if event["type"] == "progress" and event["data"].get("node") == trainer:
                progress.append((event["data"]["value"], event["data"]["max"]))
            if event["type"] in ("execution_success", "execution_error") and event["data"].get("prompt_id") == prompt_id:
                break
    assert server.wait_for(prompt_id)["status"]["status_str"] == "success"
    # Two episodes of a two-expert pool: 4 units. The first expert run of an episode is a step of
    # its own (1 of 4); a repeated context is cached and only moves the bar at its episode's end.
    assert {m for _, m in progress} == {4}, progress
    values = {v for v, _ in progress}
    assert {1, 2, 4} <= values and values <= {0, 1, 2, 3, 4}, progress
    assert previews >= 2, "each fresh expert run shows its image (latent preview)"


def test_stats_workflow_shows_the_recorded_runs(server, object_info):
    rows = store_rows(server)
    assert rows, "runs from the earlier workflows should be in the store"
    prompt = load_prompt("MoE Stats.json", object_info, {"MoEStats": {"source": "(all)"}})
    entry = run_ok(server, prompt)
    ui = entry["outputs"][node_of(prompt, "MoEStats")]
    table, payload = ui["text"][0], ui["moe_stats"][0]
    assert payload["runs"] == len(rows)
    # Every run of this module is 64x64: one size band, so no warning about mixed sizes.
    assert "Averaged over" in table and "all sources" in payload["averaged"] and "mixes" not in payload["averaged"]
    for expert in {r["expert"] for r in rows}:
        assert expert[:23] in table
    assert output_images(server, entry, node_of(prompt, "PreviewImage"))[0].is_file()

    # Re-queued unchanged after new runs, the node re-executes (its fingerprint follows the store).
    run_ok(server, load_prompt("MoE Text to Image.json", object_info, {"MoEAdaptiveSampler": {"seed": 14}}))
    wait_rows(server, len(rows) + 1)
    again = run_ok(server, prompt)["outputs"][node_of(prompt, "MoEStats")]["moe_stats"][0]
    assert again["runs"] == len(rows) + 1

    filtered = server.get_json("/moe_sampler/stats?router=trained_in_test.safetensors")
    assert filtered["router"] == "trained_in_test.safetensors"
    assert sum(e["runs"] for e in filtered["experts"]) == sum(
        1 for r in store_rows(server) if r["router"] == "trained_in_test.safetensors")

    # The node's default: sampling runs only; a size band; the model connected.
    sampling = run_ok(server, load_prompt("MoE Stats.json", object_info))["outputs"][node_of(prompt, "MoEStats")]
    assert sampling["moe_stats"][0]["runs"] == sum(1 for r in store_rows(server) if r["source"] == "sampling")
    assert sampling["moe_stats"][0]["filters"]["source"] == "sampling"
    small = server.get_json("/moe_sampler/stats?source=sampling&size=" + urllib.parse.quote("small (under 384 px)"))
    assert small["runs"] == sampling["moe_stats"][0]["runs"] and "small" in small["averaged"]  # every test run is tiny
    none = server.get_json("/moe_sampler/stats?size=" + urllib.parse.quote("about 1024 px (768-1535 px)"))
    assert none["runs"] == 0 and none["experts"] == []
    with_model = load_prompt("MoE Stats.json", object_info, {"MoEStats": {"source": "(all)"}})
    with_model["90"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_CHECKPOINT_NAME}}
    with_model[node_of(with_model, "MoEStats")]["inputs"]["model"] = ["90", 0]
    by_model = run_ok(server, with_model)["outputs"][node_of(with_model, "MoEStats")]["moe_stats"][0]
    fingerprinted = [r for r in store_rows(server) if r.get("model")]
    assert by_model["filters"]["model"] and by_model["runs"] == sum(
        1 for r in fingerprinted if r["model"] == by_model["filters"]["model"])


# ------------------------------------------------------------------------------ interruption


def _interrupt_when(server: ComfyServer, prompt: dict, condition, timeout: float = 300.0) -> dict:
    """Queue ``prompt`` on a fresh websocket client, POST /interrupt once ``condition(event)``."""
    client = uuid.uuid4().hex
    with server.events(client) as events:
        prompt_id = server.queue_prompt(prompt, client_id=client)
        assert events.wait_for(condition, timeout) is not None, "the run never reached the interrupt point"
        server.interrupt()
    entry = server.wait_for(prompt_id, timeout)
    assert "execution_interrupted" in status_messages(entry), status_messages(entry)
    return entry


def test_interrupted_training_keeps_the_store_and_resumes(server, object_info):
    from moe_sampler.router.model import Router

    before = store_rows(server)
    name = "interrupted_router"
    settings = {**SMALL_TRAINING, "seeds_per_prompt": 4, "episodes": 8, "router_name": name, "resume": True}
    prompt = load_prompt("MoE Router Training (quick start).json", object_info,
                         {"MoERouterTrainer": settings, "MoEExpertPool": CHEAP_POOL})
    trainer = node_of(prompt, "MoERouterTrainer")
    # After the first episode: its checkpoint is on disk, three fresh contexts are still to run.
    # The bar counts expert runs (2 per episode with the cheap pool); a full episode is max / episodes.
    _interrupt_when(server, prompt, lambda e: e["type"] == "progress" and e["data"].get("node") == trainer
                    and e["data"]["value"] >= e["data"]["max"] // settings["episodes"])

    assert store_integrity(server) == "ok"
    after = store_rows(server)
    assert after[:len(before)] == before, "earlier rows changed"
    folder = server.models_dir / "moe_routers"
    assert not (folder / f"{name}.safetensors").exists(), "an interrupted run must not save the router"
    assert not list(folder.glob("*.tmp")) and not list((server.user_dir / "__moe_sampler").rglob("*.tmp"))
    checkpoint = server.user_dir / "__moe_sampler" / "training" / f"{name}.checkpoint.safetensors"
    assert checkpoint.is_file()

    # Queued again with resume on, it continues from the checkpoint to the requested total.
    entry = run_ok(server, prompt)
    report = entry["outputs"][trainer]["text"][0]
    assert "resumed at" in report
    assert Router.load(folder / f"{name}.safetensors").training["contexts"] == settings["episodes"]
    assert store_integrity(server) == "ok"


def test_interrupted_sampling_records_the_run_as_failed(server, object_info):
    before = store_rows(server)
    prompt = load_prompt("MoE Custom Expert Pool.json", object_info, {
        "MoEAdaptiveSampler": {"seed": 15, "mode": "euler/karras/200"},
        "MoEExpert": {"steps": 200, "sampler_name": "euler", "scheduler": "karras", "stop_rule": "none"}})
    sampler = node_of(prompt, "MoEAdaptiveSampler")
    _interrupt_when(server, prompt, lambda e: e["type"] == "progress" and e["data"].get("node") == sampler
                    and e["data"]["value"] >= 2)
    rows = wait_rows(server, len(before) + 1)
    assert store_integrity(server) == "ok"
    assert rows[:len(before)] == before
    newest = rows[-1]
    assert newest["expert"] == "euler/karras/200" and newest["success"] == 0 and "interrupt" in newest["error"]


# -------------------------------------------------------------------------------- bad input


def _rejected(server: ComfyServer, prompt: dict) -> str:
    with pytest.raises(PromptRejected) as caught:
        server.queue_prompt(prompt)
    return json.dumps(caught.value.body)


@pytest.mark.parametrize(("node_type", "inputs", "named"), [
    ("MoEAdaptiveSampler", {"router": "../../secrets.safetensors"}, "router"),
    ("MoEAdaptiveSampler", {"router": "missing_router.safetensors"}, "router"),
    ("MoERouterTrainer", {"router_name": "../escape"}, "router_name"),
    ("MoERouterTrainer", {"sizes": "512by512"}, "sizes"),
    ("MoERouterTrainer", {"sizes": "500x512"}, "sizes"),
    ("MoERouterTrainer", {"cfg_values": "7, lots"}, "cfg_values"),
    ("MoERouterTrainer", {"prompts": "  \n \n"}, "prompts"),
    ("MoEStats", {"router": "../../x.safetensors"}, "router"),
    ("MoEStats", {"source": "everything"}, "source"),
    ("MoEStats", {"size": "huge"}, "size"),
])
def test_bad_input_is_rejected_naming_the_input(server, object_info, node_type, inputs, named):
    before = store_rows(server)
    workflow = {"MoEAdaptiveSampler": "MoE Text to Image.json", "MoERouterTrainer": "MoE Router Training (quick start).json",
                "MoEStats": "MoE Stats.json"}[node_type]
    body = _rejected(server, load_prompt(workflow, object_info, {node_type: inputs}))
    assert f"{named}:" in body or f'"{named}"' in body, body
    assert store_rows(server) == before


def test_forced_expert_outside_the_pool_fails_naming_mode(server, object_info):
    before = store_rows(server)
    prompt = load_prompt("MoE Custom Expert Pool.json", object_info,
                         {"MoEAdaptiveSampler": {"seed": 16, "mode": "SpeedDemon"},
                          "MoEExpertPool": {"SpeedDemon": False}})
    entry = server.wait_for(server.queue_prompt(prompt))
    error = status_messages(entry).get("execution_error")
    assert error is not None and "mode" in error["exception_message"] and "SpeedDemon" in error["exception_message"]
    assert store_integrity(server) == "ok"
    assert store_rows(server) == before
