"""The pack's frontend in a real browser: headless Chromium on the ComfyUI page with the pack loaded.

Checks that ComfyUI serves and the page imports ``web/moe_sampler.js`` without console errors,
that a graph with the MoE nodes loads from the example workflows, runs, and that the badge
(expert, confidence, NFE, time) and the stats table appear; a screenshot of the badge is saved
outside the repository (``MOE_BADGE_SCREENSHOT``, default ``<tmp>/moe_badge.png``).

Needs ComfyUI (``COMFYUI_PATH``) and Debian's ``chromium`` (``apt-get install chromium``);
skipped with the reason otherwise. Chromium is driven over the DevTools protocol with the
stdlib websocket client of ``helpers.comfy_server``; nothing is downloaded.
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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"timed out waiting for {what or expression}")

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


@pytest.fixture(scope="module")
def browser(chromium, server, tmp_path_factory):
    # A new user would get the template browser over the canvas; this user has seen it.
    server.request("POST", "/settings/Comfy.TutorialCompleted", True)
    session = Browser(chromium, tmp_path_factory.mktemp("chromium_profile"))
    try:
        session.call("Page.navigate", url=server.url)
        session.wait_for("!!(window.comfyAPI?.app?.app?.graph && window.comfyAPI.app.app.extensionManager)",
                         timeout=180, what="the ComfyUI app")
        session.wait_for("window.comfyAPI.app.app.extensions?.some?.(e => e.name === 'moe_sampler.ui') ?? "
                         "!!window[Symbol.for('moe_sampler.ui.loaded')]", timeout=60, what="the pack's extension")
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
        changes = values.get(node["type"], {})
        for index, name in enumerate(widget_names(object_info[node["type"]])):
            if name in changes:
                node["widgets_values"][index] = changes[name]
    return workflow


def test_pack_script_is_served_and_loaded_without_errors(server, browser):
    listed = server.get_json("/extensions")
    assert f"/extensions/{PACK_LINK_NAME}/moe_sampler.js" in listed
    loaded = browser.evaluate(
        "performance.getEntriesByType('resource').map(e => e.name).filter(n => n.includes('moe_sampler.js'))")
    assert loaded, "the page never requested moe_sampler.js"
    browser.drain()
    ours = [e for e in browser.errors() if "moe" in e.lower()]
    assert not ours, ours


def screenshot_path(suffix: str = "") -> Path:
    """Where screenshots go: ``MOE_BADGE_SCREENSHOT`` or ``<tmp>/moe_badge.png``, never the repository."""
    target = Path(os.environ.get("MOE_BADGE_SCREENSHOT") or Path(tempfile.gettempdir()) / "moe_badge.png")
    target = target.with_name(target.stem + suffix + target.suffix)
    assert not str(target.resolve()).startswith(str(ROOT)), "screenshots stay out of the repository"
    return target


def show_node(browser: Browser, node_type: str, scale: float, left: float, top: float) -> None:
    """Pan and zoom the canvas so that the first ``node_type`` node sits at (left, top) on screen."""
    browser.evaluate(
        f"(() => {{ const app = window.comfyAPI.app.app; "
        f"const n = app.graph._nodes.find(n => n.type === {json.dumps(node_type)}); const ds = app.canvas.ds; "
        f"ds.scale = {scale}; ds.offset[0] = -n.pos[0] + {left} / ds.scale; ds.offset[1] = -n.pos[1] + {top} / ds.scale; "
        "app.canvas.setDirty(true, true); app.canvas.draw(true, true); return true; })()")
    time.sleep(1.0)


def run_in_browser(browser: Browser, workflow: dict) -> None:
    browser.evaluate(f"window.comfyAPI.app.app.loadGraphData({json.dumps(workflow)}).then(() => true)")
    browser.evaluate("window.comfyAPI.app.app.queuePrompt(0, 1).then(() => true)")


def test_badge_and_stats_table_after_a_run(server, browser):
    object_info = server.object_info()
    workflow = _small_workflow("moe_text_to_image.json", object_info, {"MoEAdaptiveSampler": {"seed": 7}})
    sampler_id = next(n["id"] for n in workflow["nodes"] if n["type"] == "MoEAdaptiveSampler")
    run_in_browser(browser, workflow)
    badge = browser.wait_for(
        f"(() => {{ const n = window.comfyAPI.app.app.graph.getNodeById({sampler_id}); "
        "return n?.moeRuns?.length ? n.moeRuns[n.moeRuns.length - 1] : null; })()",
        timeout=300, what="the badge data after the run")
    assert badge["expert"] and badge["nfe"] > 0 and badge["seconds"] > 0
    assert 0.0 <= badge["confidence"] <= 1.0

    # Centre the sampler and zoom in so that the badge is readable in the screenshot.
    show_node(browser, "MoEAdaptiveSampler", 1.3, 600, 250)
    target = browser.screenshot(screenshot_path())
    assert target.stat().st_size > 10_000

    # The stats node renders its table from the run just recorded.
    run_in_browser(browser, _small_workflow("moe_stats.json", object_info))
    rows = browser.wait_for(
        "(() => { const n = window.comfyAPI.app.app.graph._nodes.find(n => n.type === 'MoEStats'); "
        "const rows = n?.moeStatsElement?.querySelectorAll('tbody tr'); return rows?.length || 0; })()",
        timeout=120, what="the stats table")
    assert rows >= 1
    show_node(browser, "MoEStats", 1.0, 80, 120)
    browser.screenshot(screenshot_path("_stats"))
    browser.drain()
    ours = [e for e in browser.errors() if "moe" in e.lower()]
    assert not ours, ours


def test_training_report_in_the_trainer_node(server, browser):
    workflow = _small_workflow("moe_router_training.json", server.object_info(), {
        "MoERouterTrainer": {"prompts": "a red apple", "sizes": "64x64", "cfg_values": "5", "episodes": 2,
                             "seeds_per_prompt": 1, "reference_steps": 16, "router_name": "browser_router",
                             "resume": False},
        "MoEExpertPool": {"QualityMaster": False, "EarlyStopper": False, "NoiseAdaptive": False}})
    run_in_browser(browser, workflow)
    report = browser.wait_for(
        "(() => { const n = window.comfyAPI.app.app.graph._nodes.find(n => n.type === 'MoERouterTrainer'); "
        "return n?.moeReportElement?.textContent || ''; })()", timeout=300, what="the training report")
    assert "browser_router.safetensors" in report and "Picks at priority" in report
    show_node(browser, "MoERouterTrainer", 0.9, 80, 130)
    browser.screenshot(screenshot_path("_training"))
    browser.drain()
    ours = [e for e in browser.errors() if "moe" in e.lower()]
    assert not ours, ours
