"""Static checks of the frontend and the example workflows; no ComfyUI, no browser.

- every ``web/*.js`` parses as an ES module (``node --check``; skipped without node) and takes
  ``app``/``api`` from ``window.comfyAPI`` rather than the legacy ``scripts/*.js`` shims;
- every example workflow is valid JSON in ComfyUI's UI format, uses only node types that exist
  (the pack's declared node ids plus the core nodes it needs) and has consistent links.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "web"
WORKFLOWS = ROOT / "example_workflows"
CORE_NODES = {"CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "VAEDecode", "SaveImage", "PreviewImage",
              "Note"}  # Note: the frontend's own note node (never sent to the server)
SCRIPTS = sorted(WEB.glob("**/*.js"))
EXAMPLES = sorted(WORKFLOWS.glob("*.json"))


def declared_node_ids() -> set[str]:
    ids = set()
    for path in (ROOT / "nodes").glob("*.py"):
        ids |= set(re.findall(r'node_id="(MoE\w+)"', path.read_text(encoding="utf-8")))
    return ids


def test_web_folder_has_the_extension():
    assert WEB / "moe_sampler.js" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_as_an_es_module(script, tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed; cannot syntax-check the frontend script")
    # node --check treats .mjs as an ES module regardless of package.json.
    module = tmp_path / (script.stem + ".mjs")
    module.write_text(script.read_text(encoding="utf-8"), encoding="utf-8")
    result = subprocess.run([node, "--check", str(module)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_uses_window_comfy_api_and_no_legacy_paths(script):
    source = script.read_text(encoding="utf-8")
    assert "window.comfyAPI" in source
    assert not re.search(r"""from\s+["'](\.\./)+scripts/""", source), "use window.comfyAPI, not scripts/*.js"
    assert not re.search(r"""import\(\s*["'](\.\./)+scripts/""", source)
    assert "console.log(" not in source, "no console noise in the shipped extension"


def test_script_speaks_the_pack_protocol():
    source = (WEB / "moe_sampler.js").read_text(encoding="utf-8")
    for needle in ('"moe_sampler.run"', "moe_run", "moe_stats", "/moe_sampler/", '"MoEAdaptiveSampler"', '"MoEStats"'):
        assert needle in source, needle
    routes = (ROOT / "nodes" / "routes.py").read_text(encoding="utf-8")
    for route in ("stats", "routers", "experts"):
        assert f'{{PREFIX}}/{route}"' in routes and f'"{route}"' in source, route


def test_there_is_an_example_for_each_feature():
    names = {path.stem for path in EXAMPLES}
    assert {"MoE Text to Image", "MoE Router Training (quick start)", "MoE Stats", "MoE Custom Expert Pool",
            "MoE AB Compare with KSampler"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_workflow_is_a_usable_template(path):
    """The template browser of ComfyUI 0.8.0 shows a custom node template's file name as its title
    and ``<name>.jpg`` next to it as its thumbnail; a note says which model the graph needs."""
    assert path.stem.startswith("MoE ") and " " in path.stem and "_" not in path.stem, "a readable title"
    thumbnail = path.with_suffix(".jpg")
    assert thumbnail.is_file(), f"{path.name}: no thumbnail {thumbnail.name}"
    head = thumbnail.read_bytes()[:3]
    assert head == b"\xff\xd8\xff", f"{thumbnail.name} is not a JPEG"
    workflow = json.loads(path.read_text(encoding="utf-8"))
    notes = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "Note"]
    assert notes, f"{path.name}: no note node"
    if any(n["type"] == "CheckpointLoaderSimple" for n in workflow["nodes"]):
        assert any("models/checkpoints" in text for text in notes), "the note names the model folder"
    else:
        assert any("no model" in text.lower() for text in notes)


def test_training_template_is_quick():
    """The training template's defaults stay small: 512x512 only, few episodes, a short reference."""
    workflow = json.loads((WORKFLOWS / "MoE Router Training (quick start).json").read_text(encoding="utf-8"))
    trainer = next(n for n in workflow["nodes"] if n["type"] == "MoERouterTrainer")
    prompts, _, sizes, cfgs, _, episodes, seeds, mode, *_rest, reference_steps = trainer["widgets_values"]
    contexts = len([p for p in prompts.splitlines() if p.strip()]) * len(sizes.split(",")) * len(cfgs.split(",")) * seeds
    assert sizes == "512x512" and episodes <= 10 and reference_steps <= 30 and contexts <= 4 and mode == "full sweep"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_workflow_is_a_consistent_ui_graph(path):
    workflow = json.loads(path.read_text(encoding="utf-8"))
    for key in ("nodes", "links", "last_node_id", "last_link_id", "version"):
        assert key in workflow, f"{path.name}: missing {key!r} (not ComfyUI's UI workflow format)"
    known = declared_node_ids() | CORE_NODES
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]), "duplicate node ids"
    assert max(nodes) <= workflow["last_node_id"]
    for node in nodes.values():
        assert node["type"] in known, f"{path.name}: unknown node type {node['type']!r}"
        assert isinstance(node.get("widgets_values", []), list)
    assert any(node["type"].startswith("MoE") for node in nodes.values())

    links = {}
    for link in workflow["links"]:
        link_id, origin, origin_slot, target, target_slot, kind = link[:6]
        links[link_id] = link
        assert origin in nodes and target in nodes, f"link {link_id} points at a missing node"
        output = nodes[origin]["outputs"][origin_slot]
        target_input = nodes[target]["inputs"][target_slot]
        assert link_id in (output.get("links") or []), f"link {link_id} missing from its output"
        assert target_input.get("link") == link_id, f"link {link_id} missing from its input"
        assert output["type"] == kind == target_input["type"], f"link {link_id}: type mismatch"
    assert len(links) == len(workflow["links"]) and (not links or max(links) <= workflow["last_link_id"])
    for node in nodes.values():
        for slot in node.get("inputs", []):
            assert slot.get("link") is None or slot["link"] in links, f"{node['type']}.{slot['name']}: dangling link"
        for slot in node.get("outputs", []):
            for link_id in slot.get("links") or []:
                assert links[link_id][1] == node["id"], f"{node['type']}.{slot['name']}: foreign link {link_id}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_workflow_uses_placeholder_checkpoints_only(path):
    workflow = json.loads(path.read_text(encoding="utf-8"))
    for node in workflow["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            assert node["widgets_values"][0].endswith(".safetensors")
            assert "/" not in node["widgets_values"][0] and "\\" not in node["widgets_values"][0]
