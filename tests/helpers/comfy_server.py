"""Start a real ComfyUI server with this pack loaded, drive it over HTTP and websocket, stop it.

HTTP with the standard library, the websocket with aiohttp's client (a ComfyUI requirement,
imported only when a websocket is opened); nothing is imported from ComfyUI: the server is a
subprocess (``main.py --cpu``) listening on a free loopback port. Everything it writes goes
under one temporary base directory (``--base-directory``: models, custom_nodes, input, output,
temp, user; an in-memory app database), the pack is a symlink in ``<base>/custom_nodes`` and
the checkpoints folder comes from an ``--extra-model-paths-config`` YAML, the way ComfyUI's own
``tests/execution`` loads its testing pack.

    with ComfyServer(comfy_path, base_dir, checkpoint_dir=ckpt_dir) as server:
        prompt_id = server.queue_prompt(api_graph)
        entry = server.wait_for(prompt_id)
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

PACK_ROOT = Path(__file__).resolve().parents[2]
PACK_LINK_NAME = "moe_sampler_pack"
TINY_CHECKPOINT_NAME = "tiny_sd15.safetensors"


class ComfyServerError(RuntimeError):
    """The server did not start, died, or answered in an unexpected way; carries the log tail."""


class PromptRejected(ComfyServerError):
    """``POST /prompt`` answered 400: ``body`` holds ComfyUI's ``error`` and ``node_errors``."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"prompt rejected with HTTP {status}: {json.dumps(body)[:2000]}")
        self.status = status
        self.body = body


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_tiny_checkpoint(comfy_path: str | os.PathLike, directory: str | os.PathLike,
                          python: str = sys.executable, timeout: float = 600) -> Path:
    """Write ``tiny_sd15.safetensors`` into ``directory`` (once) in a child process; return its path.

    A child process keeps ComfyUI's modules out of the test process.
    """
    target = Path(directory) / TINY_CHECKPOINT_NAME
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from helpers.comfy_env import import_comfy; import_comfy(sys.argv[2]); "
        "from helpers.tiny_checkpoint import make_tiny_sd15_checkpoint; "
        "make_tiny_sd15_checkpoint(sys.argv[3])"
    )
    partial = target.with_name(target.name + ".partial.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run([python, "-c", code, str(PACK_ROOT / "tests"), str(comfy_path), str(partial)],
                            capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise ComfyServerError(f"building the tiny checkpoint failed:\n{result.stderr[-4000:]}")
    os.replace(partial, target)
    return target


class ComfyServer:
    """One ComfyUI process with the pack loaded.

    Args:
        comfy_path: the ComfyUI checkout (its ``main.py`` is run with ``python``).
        base_dir: ComfyUI's base directory for this server (created; everything it writes).
        checkpoint_dir: a folder listed as ``checkpoints`` in the extra model paths YAML.
        pack_dir: the pack to load (this repository by default), linked into custom_nodes.
        python: the interpreter of ComfyUI's venv (the current one by default).
        extra_args: more ``main.py`` arguments.
    """

    def __init__(self, comfy_path: str | os.PathLike, base_dir: str | os.PathLike,
                 checkpoint_dir: str | os.PathLike | None = None, pack_dir: str | os.PathLike = PACK_ROOT,
                 python: str = sys.executable, extra_args: Iterable[str] = ()) -> None:
        self.comfy_path = Path(comfy_path).resolve()
        self.base_dir = Path(base_dir).resolve()
        self.checkpoint_dir = Path(checkpoint_dir).resolve() if checkpoint_dir is not None else None
        self.pack_dir = Path(pack_dir).resolve()
        self.python = python
        self.extra_args = list(extra_args)
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.log_path = self.base_dir / "comfyui.log"
        self.client_id = uuid.uuid4().hex

    # ----------------------------------------------------------------------------------- life cycle

    @property
    def url(self) -> str:
        if self.port is None:
            raise ComfyServerError("the server is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def user_dir(self) -> Path:
        return self.base_dir / "user"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    def _prepare(self) -> list[str]:
        custom_nodes = self.base_dir / "custom_nodes"
        custom_nodes.mkdir(parents=True, exist_ok=True)
        for sub in ("user", "output", "input", "temp", "models"):
            (self.base_dir / sub).mkdir(exist_ok=True)
        link = custom_nodes / PACK_LINK_NAME
        if not link.exists():
            link.symlink_to(self.pack_dir, target_is_directory=True)
        args = [
            self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base_dir), "--database-url", "sqlite:///:memory:",
            "--disable-auto-launch",
        ]
        if self.checkpoint_dir is not None:
            yaml_path = self.base_dir / "extra_model_paths.yaml"
            # JSON strings are valid YAML scalars: paths with spaces or colons stay intact.
            yaml_path.write_text(
                "moe_sampler_tests:\n"
                f"    checkpoints: {json.dumps(str(self.checkpoint_dir))}\n"
                f"    custom_nodes: {json.dumps(str(custom_nodes))}\n",
                encoding="utf-8",
            )
            args += ["--extra-model-paths-config", str(yaml_path)]
        return args + self.extra_args

    def start(self, timeout: float = 240.0) -> "ComfyServer":
        """Start ``main.py`` and wait until it answers ``/system_stats``; raises with the log tail."""
        if self.process is not None:
            raise ComfyServerError("already started")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            self.port = free_port()
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                   "PYTHONUNBUFFERED": "1"}
            log = open(self.log_path, "ab")
            try:
                self.process = subprocess.Popen(self._prepare(), cwd=self.comfy_path, stdout=log,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            finally:
                log.close()
            atexit.register(self.stop)  # even if the test session dies without its teardown
            try:
                self._wait_ready(timeout)
                return self
            except ComfyServerError:
                in_use = "address already in use" in self.log_text().lower()
                self.stop()
                if not in_use or attempt == 2:
                    raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ComfyServerError(f"ComfyUI exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise ComfyServerError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after ``timeout``); idempotent."""
        process, self.process = self.process, None
        atexit.unregister(self.stop)
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    def pack_import_line(self) -> str | None:
        """The pack's line in ComfyUI's "Import times for custom nodes" table, or None."""
        for line in self.log_text().splitlines():
            if "seconds" in line and line.rstrip().endswith(PACK_LINK_NAME):
                return line.strip()
        return None

    # ---------------------------------------------------------------------------------------- HTTP

    def request(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
        """``(status, decoded JSON or text)``; HTTP errors are returned, not raised."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        text = raw.decode("utf-8", errors="replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ComfyServerError(f"GET {path} -> HTTP {status}: {str(body)[:2000]}")
        return body

    def get_bytes(self, path: str, timeout: float = 30.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return response.read()

    def object_info(self, node: str | None = None) -> dict:
        return self.get_json("/object_info" + (f"/{urllib.parse.quote(node)}" if node else ""))

    def queue_prompt(self, prompt: dict, client_id: str | None = None, extra_data: dict | None = None) -> str:
        """``POST /prompt``; returns the prompt id or raises :class:`PromptRejected`."""
        body = {"prompt": prompt, "client_id": client_id or self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        status, answer = self.request("POST", "/prompt", body)
        if status != 200:
            raise PromptRejected(status, answer)
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def wait_for(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Poll ``/history`` until the prompt finished (success, error or interrupt); its entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise ComfyServerError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            entry = self.history(prompt_id)
            if entry and entry.get("status"):  # ComfyUI writes history only when the prompt is done
                return entry
            time.sleep(0.25)
        raise ComfyServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def interrupt(self) -> None:
        status, body = self.request("POST", "/interrupt", {})
        if status != 200:
            raise ComfyServerError(f"POST /interrupt -> HTTP {status}: {body}")

    def free(self) -> None:
        """Drop ComfyUI's cached outputs so the next prompt runs every node again."""
        self.request("POST", "/free", {"unload_models": False, "free_memory": True})

    def events(self, client_id: str | None = None, timeout: float = 10.0) -> "WebSocket":
        """A websocket on ``/ws`` for ``client_id`` (this server's default client id)."""
        return WebSocket.connect(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id or self.client_id}", timeout)


def status_messages(entry: dict) -> dict[str, dict]:
    """``{event name: data}`` of a ``/history`` entry's status messages."""
    return {name: data for name, data in entry.get("status", {}).get("messages", [])}


def finished(server: ComfyServer, prompt: dict, timeout: float = 600) -> tuple[dict, dict[str, dict]]:
    """Queue ``prompt`` and wait for it; assert that it succeeded (ComfyUI's execution error is the
    failure message). Returns its ``/history`` entry and that entry's :func:`status_messages`."""
    entry = server.wait_for(server.queue_prompt(prompt), timeout)
    messages = status_messages(entry)
    assert entry["status"]["status_str"] == "success", json.dumps(messages.get("execution_error"))[:3000]
    return entry, messages


def shared_tiny_checkpoint(tmp_path_factory: Any) -> Path:
    """The folder holding the tiny checkpoint (built once per test session for ``COMFYUI_PATH``),
    shared by every test module that starts a server: pass it as ``checkpoint_dir``."""
    checkpoints = tmp_path_factory.getbasetemp() / "moe_tiny_checkpoint"
    build_tiny_checkpoint(os.environ["COMFYUI_PATH"], checkpoints)
    return checkpoints


def tiny_text_to_image(server: ComfyServer, sampler: dict[str, Any]) -> dict:
    """The example workflow "MoE Text to Image" as an API prompt for ``server``, on the tiny checkpoint
    and a 64x64 latent, with the ``sampler`` widget values set on its MoE Adaptive Sampler."""
    path = PACK_ROOT / "example_workflows" / "MoE Text to Image.json"
    prompt = workflow_to_prompt(json.loads(path.read_text(encoding="utf-8")), server.object_info())
    small = {"CheckpointLoaderSimple": {"ckpt_name": TINY_CHECKPOINT_NAME},
             "EmptyLatentImage": {"width": 64, "height": 64, "batch_size": 1},
             "MoEAdaptiveSampler": sampler}
    for node in prompt.values():
        node["inputs"].update(small.get(node["class_type"], {}))
    return prompt


# ------------------------------------------------------------------------------- websocket client


class WebSocket:
    """A blocking websocket client: aiohttp's client (a ComfyUI requirement) on a private event loop.

    Enough for ComfyUI's ``/ws`` event stream and Chromium's DevTools protocol: text and binary
    messages of any size; pings are answered by aiohttp. aiohttp is imported on connect, so this
    module imports without it (the plain test venv).
    """

    def __init__(self, loop, session, ws) -> None:
        self._loop = loop
        self._session = session
        self._ws = ws

    @classmethod
    def connect(cls, url: str, timeout: float = 10.0) -> "WebSocket":
        import asyncio

        import aiohttp

        async def open_connection():
            session = aiohttp.ClientSession()
            try:
                return session, await session.ws_connect(url, max_msg_size=0)
            except BaseException:
                await session.close()
                raise

        loop = asyncio.new_event_loop()
        try:
            session, ws = loop.run_until_complete(asyncio.wait_for(open_connection(), timeout))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            loop.close()
            raise ComfyServerError(f"websocket handshake to {url} failed: {exc!r}") from exc
        return cls(loop, session, ws)

    def _run(self, coroutine, timeout: float | None = None):
        import asyncio

        if timeout is not None:
            coroutine = asyncio.wait_for(coroutine, max(timeout, 0.001))
        return self._loop.run_until_complete(coroutine)

    def send(self, text: str) -> None:
        self._run(self._ws.send_str(text))

    async def _receive(self) -> str | bytes:
        from aiohttp import WSMsgType

        message = await self._ws.receive()
        if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            return message.data
        if message.type == WSMsgType.ERROR:
            raise ConnectionError(f"websocket error: {self._ws.exception()!r}")
        raise ConnectionError("websocket closed by the peer")

    def recv(self, timeout: float = 30.0) -> str | bytes:
        """The next whole message: ``str`` for text, ``bytes`` for binary. Raises TimeoutError."""
        return self._run(self._receive(), timeout)

    def recv_json(self, timeout: float = 30.0) -> dict | None:
        """The next text message decoded, skipping binary frames (previews); None at timeout."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                message = self.recv(remaining)
            except TimeoutError:
                return None
            if isinstance(message, str):
                return json.loads(message)

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 60.0) -> dict | None:
        """The first JSON event satisfying ``predicate`` within ``timeout``, else None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event = self.recv_json(deadline - time.monotonic())
            if event is not None and predicate(event):
                return event
        return None

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._run(self._ws.close(), timeout=5.0)
        with contextlib.suppress(Exception):
            self._run(self._session.close(), timeout=5.0)
        self._loop.close()

    def __enter__(self) -> "WebSocket":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ------------------------------------------------------------------- UI workflow -> API prompt

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _input_spec_order(info: dict) -> list[tuple[str, list]]:
    """``(name, spec)`` of a node's inputs in the order the frontend creates its widgets."""
    inputs = info.get("input", {})
    order = info.get("input_order") or {section: list(inputs.get(section, {})) for section in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = inputs.get(section, {}).get(name)
            if spec is not None:
                out.append((name, spec))
    return out


def widget_names(info: dict) -> list[str | None]:
    """Names matching a saved node's ``widgets_values`` slots (None for control_after_generate).

    Mirrors comfyui-frontend 1.35: one widget per INT/FLOAT/STRING/BOOLEAN/COMBO input not
    marked ``forceInput``; an INT with ``control_after_generate`` (default: named seed or
    noise_seed), or a FLOAT/COMBO with it set, is followed by its control widget's value.
    """
    names: list[str | None] = []
    for name, spec in _input_spec_order(info):
        kind = "COMBO" if isinstance(spec[0], list) else spec[0]
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if kind not in WIDGET_TYPES or options.get("forceInput"):
            continue
        names.append(name)
        control = options.get("control_after_generate")
        if control is None and kind == "INT":
            control = name in ("seed", "noise_seed")
        if control:
            names.append(None)
    return names


def workflow_to_prompt(workflow: dict, object_info: dict) -> dict:
    """Turn a UI workflow (as the frontend saves it) into an API prompt for ``POST /prompt``.

    Muted/bypassed nodes and frontend-only nodes (notes, reroutes) are left out; links are
    resolved from the workflow's ``links`` table.
    """
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] not in object_info:
            continue
        info = object_info[node["type"]]
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values") or []
        if isinstance(values, dict):  # some frontends save widgets by name
            inputs.update({k: v for k, v in values.items() if k in dict(_input_spec_order(info))})
        else:
            for name, value in zip(widget_names(info), values):
                if name is not None:
                    inputs[name] = value
        for slot in node.get("inputs", []):
            link_id = slot.get("link")
            if link_id is None:
                continue
            _, origin, origin_slot, _, _, _ = links[link_id][:6]
            inputs[(slot.get("widget") or {}).get("name", slot["name"])] = [str(origin), origin_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title", node["type"])}}
    return prompt
