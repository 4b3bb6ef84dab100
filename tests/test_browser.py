"""The pack's frontend in a real browser: headless Chromium on the ComfyUI page with the pack loaded.

Every test runs twice, with the classic canvas renderer and with "Nodes 2.0" (the setting
``Comfy.VueNodes.Enabled``). Checks that the page imports ``web/moe_sampler.js`` without console
errors; that after a run of the example workflows the sampler's why panel (every pool expert's
expected quality and model calls), its chart, the A/B comparison, the stats table and the
training report are on the page; that the why panel survives a workflow tab switch and a page
reload and is marked stale after a cancelled run; that a newly trained router is offered without
a refresh and ``mode`` offers the connected pool's experts. Screenshots go outside the repository
(``MOE_SCREENSHOT_DIR``, default ``<tmp>/moe_screens/<renderer>_<step>.png``).

Needs ComfyUI (``COMFYUI_PATH``) and Debian's ``chromium`` (``apt-get install chromium``);
skipped with the reason otherwise. Chromium is driven over the DevTools protocol with the
websocket client of ``helpers.comfy_server`` (aiohttp); nothing is downloaded.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from helpers.comfy_server import (
    PACK_LINK_NAME,
    TINY_CHECKPOINT_NAME,
    ComfyServer,
    WebSocket,
    build_tiny_checkpoint,
    widget_names,
)

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "example_workflows"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
                  "--remote-debugging-port=0", "--window-size=1600,1000", "--hide-scrollbars"]


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, binary: str, user_data_dir: Path) -> None:
        self.process = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        stdin=subprocess.DEVNULL)
        port_file = user_data_dir / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("Chromium did not open its DevTools port")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            pages = [t for t in json.load(response) if t.get("type") == "page"]
        self.ws = WebSocket.connect(pages[0]["webSocketDebuggerUrl"], timeout=30)
        self.next_id = 0
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def call(self, method: str, timeout: float = 60.0, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(max(deadline - time.monotonic(), 0.01)))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def evaluate(self, expression: str, timeout: float = 60.0):
        """Evaluate JS (awaiting a promise) and return its JSON value; raise on a JS exception."""
        result = self.call("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True,
                           returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error: {json.dumps(result['exceptionDetails'])[:2000]}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, what: str = ""):
        """Poll ``expression`` until truthy. An error while polling (the page is navigating, the
        app is not there yet) is retried; the last one is reported on timeout."""
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError as exc:
                value, last_error = None, exc
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"timed out waiting for {what or expression}" + (f" (last error: {last_error})"
                                                                              if last_error else ""))

    def drain(self) -> None:
        """Collect pending DevTools events (console messages, exceptions)."""
        self.call("Runtime.evaluate", expression="0")

    def errors(self) -> list[str]:
        """Console errors and uncaught exceptions seen so far, as text."""
        out = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                out.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')} "
                           f"at {details.get('url', '')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                out.append("console.error: " + " ".join(str(a.get("value", a.get("description", "")))
                                                        for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                out.append(f"log: {entry.get('text')} {entry.get('url', '')}")
        return out

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = chromium_binary()
    if binary is None:
        pytest.skip("needs Debian's chromium for the browser test (apt-get install chromium); not installed")
    return binary


@pytest.fixture(scope="module")
def server(chromium, tmp_path_factory):
    comfy = os.environ["COMFYUI_PATH"]
    checkpoints = tmp_path_factory.getbasetemp() / "moe_tiny_checkpoint"
    build_tiny_checkpoint(comfy, checkpoints)
    with ComfyServer(comfy, tmp_path_factory.mktemp("comfy_browser"), checkpoint_dir=checkpoints) as running:
        yield running


RENDERERS = ("classic", "nodes2")
VUE_SETTING = "Comfy.VueNodes.Enabled"  # frontend 1.35: the "Nodes 2.0" renderer


def open_app(session: Browser, url: str) -> None:
    session.call("Page.navigate", url=url)
    wait_for_app(session)


def wait_for_app(session: Browser) -> None:
    session.wait_for("!!(window.comfyAPI?.app?.app?.graph && window.comfyAPI.app.app.extensionManager)",
                     timeout=180, what="the ComfyUI app")
    session.wait_for("window.comfyAPI?.app?.app?.extensions?.some?.(e => e.name === 'moe_sampler.ui') ?? "
                     "!!window[Symbol.for('moe_sampler.ui.loaded')]", timeout=60, what="the pack's extension")
    # Node types are registered after the extensions load: a graph loaded earlier has placeholders.
    session.wait_for("['MoEAdaptiveSampler', 'MoEABCompare', 'MoEStats', 'Note'].every(t => "
                     "(window.LiteGraph ?? window.comfyAPI?.litegraph?.LiteGraph)?.registered_node_types?.[t])",
                     timeout=60, what="the node types")


@pytest.fixture(scope="module", params=RENDERERS)
def browser(request, chromium, server, tmp_path_factory):
    renderer = request.param
    # A new user would get the template browser over the canvas; this user has seen it.
    server.request("POST", "/settings/Comfy.TutorialCompleted", True)
    server.request("POST", f"/settings/{VUE_SETTING}", renderer == "nodes2")
    session = Browser(chromium, tmp_path_factory.mktemp(f"chromium_{renderer}"))
    session.renderer = renderer
    try:
        open_app(session, server.url)
        enabled = session.evaluate(f"window.comfyAPI.app.app.extensionManager.setting.get({json.dumps(VUE_SETTING)})")
        assert bool(enabled) == (renderer == "nodes2"), f"{VUE_SETTING} is {enabled!r}"
        yield session
    finally:
        session.close()


def _small_workflow(name: str, object_info: dict, overrides: dict[str, dict] | None = None) -> dict:
    """An example workflow in UI format with the tiny checkpoint, 64x64 latents and ``overrides``
    (widget values by node type and input name)."""
    workflow = json.loads((WORKFLOWS / name).read_text(encoding="utf-8"))
    values = {"CheckpointLoaderSimple": {"ckpt_name": TINY_CHECKPOINT_NAME},
              "EmptyLatentImage": {"width": 64, "height": 64}}
    for node_type, changes in (overrides or {}).items():
        values.setdefault(node_type, {}).update(changes)
    for node in workflow["nodes"]:
        if node["type"] not in object_info:
            continue  # notes
        changes = values.get(node["type"], {})
        for index, name in enumerate(widget_names(object_info[node["type"]])):
            if name in changes:
                if index >= len(node["widgets_values"]):  # saved before the input existed: the frontend's default
                    node["widgets_values"] += [None] * (index + 1 - len(node["widgets_values"]))
                node["widgets_values"][index] = changes[name]
    return workflow


def screenshot_path(name: str) -> Path:
    """Where screenshots go: ``MOE_SCREENSHOT_DIR`` or ``<tmp>/moe_screens``, never the repository."""
    folder = Path(os.environ.get("MOE_SCREENSHOT_DIR") or Path(tempfile.gettempdir()) / "moe_screens")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.png"
    assert not str(target.resolve()).startswith(str(ROOT)), "screenshots stay out of the repository"
    return target


def shot(browser: Browser, name: str) -> Path:
    target = browser.screenshot(screenshot_path(f"{browser.renderer}_{name}"))
    assert target.stat().st_size > 10_000
    return target


def show_node(browser: Browser, node_type: str, scale: float, left: float, top: float) -> None:
    """Pan and zoom the canvas so that the first ``node_type`` node sits at (left, top) on screen."""
    browser.evaluate(
        f"(() => {{ const app = window.comfyAPI.app.app; "
        f"const n = app.graph._nodes.find(n => n.type === {json.dumps(node_type)}); const ds = app.canvas.ds; "
        f"ds.scale = {scale}; ds.offset[0] = -n.pos[0] + {left} / ds.scale; ds.offset[1] = -n.pos[1] + {top} / ds.scale; "
        "app.canvas.setDirty(true, true); app.canvas.draw(true, true); return true; })()")
    time.sleep(1.5)


def run_in_browser(browser: Browser, workflow: dict) -> None:
    browser.evaluate(f"window.comfyAPI.app.app.loadGraphData({json.dumps(workflow)}).then(() => true)")
    browser.evaluate("window.comfyAPI.app.app.queuePrompt(0, 1).then(() => true)")


def panel_state(browser: Browser, node_type: str, element: str = "moeRunElement") -> dict | None:
    """What the pack's panel on the first ``node_type`` node shows and whether it is on screen."""
    return browser.evaluate(
        f"(() => {{ const n = window.comfyAPI.app.app.graph._nodes.find(n => n.type === {json.dumps(node_type)}); "
        f"const el = n?.{element}; if (!el) return null; const r = el.getBoundingClientRect(); "
        "const style = getComputedStyle(el); "
        "return {text: el.textContent, connected: el.isConnected, width: r.width, height: r.height, "
        "visible: style.display !== 'none' && style.visibility !== 'hidden' && r.width > 50 && r.height > 20, "
        "stale: el.classList.contains('moe-is-stale'), properties: n.properties}; })()")


def wait_panel(browser: Browser, node_type: str, needle: str, element: str = "moeRunElement",
               timeout: float = 300.0) -> dict:
    expression = (
        f"(() => {{ const n = window.comfyAPI.app.app.graph._nodes.find(n => n.type === {json.dumps(node_type)}); "
        f"const el = n?.{element}; return !!el && el.isConnected && el.textContent.includes({json.dumps(needle)}); }})()")
    browser.wait_for(expression, timeout=timeout, what=f"{needle!r} in the {node_type} panel")
    return panel_state(browser, node_type, element)


def image_shown(browser: Browser, node_id: int) -> bool:
    """The node's image output (core's preview) is in the output store and on the page."""
    return bool(browser.evaluate(
        f"(() => {{ const out = window.comfyAPI.app.app.nodeOutputs?.[{json.dumps(str(node_id))}]; "
        "const names = (out?.images ?? []).map(i => i.filename); "
        "return names.length > 0; })()"))


def our_errors(browser: Browser) -> list[str]:
    browser.drain()
    return [e for e in browser.errors() if "moe" in e.lower()]


def test_pack_script_is_served_and_loaded_without_errors(server, browser):
    listed = server.get_json("/extensions")
    assert f"/extensions/{PACK_LINK_NAME}/moe_sampler.js" in listed
    loaded = browser.evaluate(
        "performance.getEntriesByType('resource').map(e => e.name).filter(n => n.includes('moe_sampler.js'))")
    assert loaded, "the page never requested moe_sampler.js"
    assert not our_errors(browser)


def test_why_panel_survives_a_tab_switch_and_a_reload(server, browser):
    object_info = server.object_info()
    seed = 7 if browser.renderer == "classic" else 8
    workflow = _small_workflow("MoE Text to Image.json", object_info, {"MoEAdaptiveSampler": {"seed": seed}})
    sampler_id = next(n["id"] for n in workflow["nodes"] if n["type"] == "MoEAdaptiveSampler")
    run_in_browser(browser, workflow)
    state = wait_panel(browser, "MoEAdaptiveSampler", "Expected quality")
    run = state["properties"]["moe_last_run"]["runs"][0]
    assert run["expert"] and run["nfe"] > 0 and run["seconds"] > 0
    # Every pool expert is listed with its expected quality and model calls, the pick marked.
    experts = [e["expert"] for e in run["why"]["experts"]]
    assert len(experts) == 5 and all(name in state["text"] for name in experts)
    assert "model calls" in state["text"] and "Why:" in state["text"] and state["visible"], state
    # the run's own fidelity estimate, as its stats row records it (no calibration for this model yet)
    assert run["estimate"]["calibrated"] is False
    assert f"Estimated quality of this run: {run['estimate']['quality']:.2f} (raw estimate" in state["text"], state
    assert not state["stale"]
    browser.wait_for(f"(window.comfyAPI.app.app.nodeOutputs?.[{json.dumps(str(sampler_id))}]?.images ?? []).length > 0",
                     timeout=30, what="the why chart as the sampler's image output")
    show_node(browser, "MoEAdaptiveSampler", 1.0, 80, 60)
    shot(browser, "1_why_panel")
    for state in panel_after_tab_switch_and_reload(browser, "Expected quality", ("2_after_tab_switch",
                                                                                "3_after_reload")):
        assert run["expert"] in state["text"] and state["visible"], state
    assert not our_errors(browser)


def panel_after_tab_switch_and_reload(browser: Browser, needle: str, shots: tuple[str, str]) -> list[dict]:
    """The sampler's panel (waited for ``needle``) after another workflow tab and back, then after a
    page reload: both times rebuilt from the node's saved properties; a screenshot of each."""
    states = []
    browser.evaluate("window.comfyAPI.app.app.extensionManager.command.execute('Comfy.NewBlankWorkflow').then(() => true)")
    browser.wait_for("!window.comfyAPI.app.app.graph._nodes.some(n => n.type === 'MoEAdaptiveSampler')", timeout=30,
                     what="the blank workflow tab")
    browser.evaluate(
        "window.comfyAPI.app.app.extensionManager.command.execute('Workspace.PreviousOpenedWorkflow').then(() => true)")
    states.append(wait_panel(browser, "MoEAdaptiveSampler", needle, timeout=30))
    show_node(browser, "MoEAdaptiveSampler", 1.0, 80, 60)
    shot(browser, shots[0])
    browser.evaluate("window.__moeOldPage = true")
    browser.call("Page.reload")
    browser.wait_for("document.readyState === 'complete' && !window.__moeOldPage", timeout=60,
                     what="the reloaded page")
    wait_for_app(browser)
    states.append(wait_panel(browser, "MoEAdaptiveSampler", needle, timeout=60))
    show_node(browser, "MoEAdaptiveSampler", 1.0, 80, 60)
    shot(browser, shots[1])
    return states


def test_the_learning_phase_says_what_holds_it_back(server, browser):
    """With '(learned for this model)' and no calibrated estimate yet, the panel says that the best
    fixed expert is in use, why, and how a sweep speeds it up (long text: it must wrap, not clip)."""
    object_info = server.object_info()
    seed = 21 if browser.renderer == "classic" else 22
    workflow = _small_workflow("MoE Text to Image.json", object_info, {
        "MoEAdaptiveSampler": {"seed": seed, "router": "(learned for this model)", "audit_rate": 0.0}})
    run_in_browser(browser, workflow)
    state = wait_panel(browser, "MoEAdaptiveSampler", "Learning: using the best fixed expert")
    run = state["properties"]["moe_last_run"]["runs"][0]
    assert run["learning"]["phase"] == "learning" and run["learning"]["calibrated"] == []
    assert "no expert's estimate is calibrated yet" in state["text"] and "MoE Router Trainer sweep" in state["text"]
    assert state["visible"], state
    fits = browser.evaluate(
        "(() => { const n = window.comfyAPI.app.app.graph._nodes.find(n => n.type === 'MoEAdaptiveSampler'); "
        "const note = [...n.moeRunElement.querySelectorAll('.moe-note')].find(e => e.textContent.startsWith('Learning:')); "
        "const r = note.getBoundingClientRect(), p = n.moeRunElement.getBoundingClientRect(); "
        "return {wraps: r.height > 20, inside: r.right <= p.right + 1 && r.left >= p.left - 1}; })()")
    assert fits["wraps"] and fits["inside"], fits  # several lines, within the panel
    show_node(browser, "MoEAdaptiveSampler", 1.0, 80, 60)
    shot(browser, "8_learning_phase")
    for state in panel_after_tab_switch_and_reload(browser, "Learning: using the best fixed expert",
                                                   ("9_learning_after_tab_switch", "10_learning_after_reload")):
        assert "no expert's estimate is calibrated yet" in state["text"] and state["visible"], state
    assert not our_errors(browser)


def test_cancelled_run_marks_the_result_stale(server, browser):
    object_info = server.object_info()
    seed = 21 if browser.renderer == "classic" else 22
    workflow = _small_workflow("MoE Custom Expert Pool.json", object_info,
                               {"MoEAdaptiveSampler": {"seed": seed, "mode": "auto"},
                                "MoEExpert": {"steps": 3}})
    run_in_browser(browser, workflow)
    wait_panel(browser, "MoEAdaptiveSampler", "Expected quality")
    # The same graph with a long forced expert, cancelled while it samples.
    long_run = _small_workflow("MoE Custom Expert Pool.json", object_info,
                               {"MoEAdaptiveSampler": {"seed": seed + 100, "mode": "euler/karras/400"},
                                "MoEExpert": {"steps": 400, "sampler_name": "euler", "scheduler": "karras",
                                              "stop_rule": "none"}})
    # Keep the shown result: change widgets in place instead of loading a new graph.
    browser.evaluate(
        "(() => { const app = window.comfyAPI.app.app; const g = app.graph;"
        f"const wanted = {json.dumps({str(n['id']): n['widgets_values'] for n in long_run['nodes'] if n['type'] in ('MoEAdaptiveSampler', 'MoEExpert')})};"
        "for (const [id, values] of Object.entries(wanted)) { const n = g.getNodeById(Number(id));"
        "  n.widgets.forEach((w, i) => { if (i < values.length) w.value = values[i]; }); }"
        "return true; })()")
    sampler_id = next(n["id"] for n in long_run["nodes"] if n["type"] == "MoEAdaptiveSampler")
    browser.evaluate(
        "(() => { window.__moeProgress = 0; window.comfyAPI.api.api.addEventListener('progress', ({ detail }) => {"
        f"  if (String(detail?.node) === {json.dumps(str(sampler_id))}) window.__moeProgress = detail.value; }});"
        "return true; })()")
    browser.evaluate("window.comfyAPI.app.app.queuePrompt(0, 1).then(() => true)")
    browser.wait_for("window.__moeProgress >= 2", timeout=120, what="the long run to start sampling")
    browser.evaluate("window.comfyAPI.api.api.interrupt().then(() => true)")
    state = browser.wait_for(
        "(() => { const n = window.comfyAPI.app.app.graph._nodes.find(n => n.type === 'MoEAdaptiveSampler');"
        "return n?.properties?.moe_last_run?.status === 'stale' ? n.moeRunElement.textContent : null; })()",
        timeout=120, what="the stale mark after the cancel")
    assert "Stale" in state and "cancelled" in state
    show_node(browser, "MoEAdaptiveSampler", 1.0, 80, 60)
    shot(browser, "4_stale_after_cancel")
    assert not our_errors(browser)


def test_stats_table_after_a_run(server, browser):
    object_info = server.object_info()
    run_in_browser(browser, _small_workflow("MoE Stats.json", object_info))
    rows = browser.wait_for(
        "(() => { const n = window.comfyAPI.app.app.graph._nodes.find(n => n.type === 'MoEStats'); "
        "const rows = n?.moeStatsElement?.querySelectorAll('tbody tr'); return rows?.length || 0; })()",
        timeout=120, what="the stats table")
    assert rows >= 1
    state = panel_state(browser, "MoEStats", "moeStatsElement")
    assert state["visible"] and "Model calls" in state["text"] and "averaged: " in state["text"], state
    show_node(browser, "MoEStats", 1.0, 80, 120)
    shot(browser, "5_stats")
    assert not our_errors(browser)


def test_training_report_and_new_router_in_the_dropdown(server, browser):
    name = f"browser_router_{browser.renderer}"
    workflow = _small_workflow("MoE Router Training (quick start).json", server.object_info(), {
        "MoERouterTrainer": {"prompts": "a red apple", "sizes": "64x64", "cfg_values": "5", "episodes": 2,
                             "seeds_per_prompt": 1, "reference_steps": 16, "router_name": name,
                             "resume": False},
        "MoEExpertPool": {"QualityMaster": False, "EarlyStopper": False, "NoiseAdaptive": False}})
    run_in_browser(browser, workflow)
    state = wait_panel(browser, "MoERouterTrainer", "Picks at priority", element="moeReportElement")
    assert f"{name}.safetensors" in state["text"] and state["visible"], state
    show_node(browser, "MoERouterTrainer", 0.9, 80, 130)
    shot(browser, "6_training_report")

    # The new router is offered by a sampler without a manual refresh.
    object_info = server.object_info()
    browser.evaluate(f"window.comfyAPI.app.app.loadGraphData("
                     f"{json.dumps(_small_workflow('MoE Text to Image.json', object_info))}).then(() => true)")
    browser.wait_for(
        "(() => { const n = window.comfyAPI.app.app.graph._nodes.find(n => n.type === 'MoEAdaptiveSampler');"
        f"return n?.widgets?.find(w => w.name === 'router')?.options?.values?.includes({json.dumps(name + '.safetensors')}); }})()",
        timeout=30, what="the new router in the sampler's router dropdown")
    assert not our_errors(browser)


def test_mode_offers_what_the_connected_pool_holds(server, browser):
    object_info = server.object_info()
    workflow = _small_workflow("MoE Custom Expert Pool.json", object_info, {"MoEExpert": {"steps": 4}})
    browser.evaluate(f"window.comfyAPI.app.app.loadGraphData({json.dumps(workflow)}).then(() => true)")
    expected = ["auto"] + [name for name, on in zip(
        ["QualityMaster", "SpeedDemon", "BalancedMaster"], [False, True, True]) if on]
    values = browser.wait_for(
        "(() => { const n = window.comfyAPI.app.app.graph._nodes.find(n => n.type === 'MoEAdaptiveSampler');"
        "const v = n?.widgets?.find(w => w.name === 'mode')?.options?.values;"
        "return Array.isArray(v) && v.some(x => x.includes('/')) ? v : null; })()",
        timeout=30, what="pool-aware mode choices")
    assert values[:3] == expected, values
    assert "euler/karras/4" in values and "dpmpp_2m/normal/4/converged" in values, values
    assert "QualityMaster" not in values and "FastSampler" not in values, values
    assert not our_errors(browser)


def test_ab_compare_shows_both_runs(server, browser):
    object_info = server.object_info()
    seed = 41 if browser.renderer == "classic" else 42
    workflow = _small_workflow("MoE AB Compare with KSampler.json", object_info,
                               {"MoEABCompare": {"seed": seed, "baseline_steps": 8}})
    ab_id = next(n["id"] for n in workflow["nodes"] if n["type"] == "MoEABCompare")
    run_in_browser(browser, workflow)
    state = wait_panel(browser, "MoEABCompare", "Baseline")
    assert "euler/normal/8" in state["text"] and "model calls" in state["text"] and "MoE vs baseline" in state["text"]
    assert state["visible"], state
    saves = [n["id"] for n in workflow["nodes"] if n["type"] == "SaveImage"]
    for node_id in saves:
        browser.wait_for(f"(window.comfyAPI.app.app.nodeOutputs?.[{json.dumps(str(node_id))}]?.images ?? []).length > 0",
                         timeout=60, what=f"the image of Save Image {node_id}")
    assert image_shown(browser, ab_id)
    show_node(browser, "MoEABCompare", 0.75, 80, 40)
    shot(browser, "7_ab_compare")
    assert not our_errors(browser)
