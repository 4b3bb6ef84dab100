"""Helpers shared by the tests and benchmarks.

- :func:`ensure_moe_sampler`: this checkout imported as the package ``moe_sampler``, the one way
  the tests, the benchmarks and their child processes load it (:data:`BOOTSTRAP` for ``-c`` code).
- :func:`forget_repository_root`: keeps the repository root itself off ``sys.path``, so its
  top-level folders (``nodes/``, ``router/``...) never shadow ComfyUI's ``nodes.py`` & co.
- :func:`import_bench`: a benchmark module (``bench/<name>.py``) without the root on the path.
- :func:`run_unprivileged`: a function run as an unprivileged user when the tests run as root.
- :mod:`.tiny_checkpoint`: a small SD1.5-family checkpoint with random weights that ComfyUI loads.
- :mod:`.tiny_unet`: a small random-weight diffusers UNet.
- :mod:`.comfy_env`: a real ComfyUI in-process (``COMFYUI_PATH``), its folders in a temp dir.
- :mod:`.comfy_server`: a real ComfyUI server process, driven over HTTP and websocket.
- :func:`import_node_module`: the ComfyUI-free modules of ``nodes/`` without ComfyUI.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import sys
import types
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"

#: Python code that imports this checkout as ``moe_sampler`` in a child process (``python -c``),
#: whatever its working directory and whatever is pip-installed.
BOOTSTRAP = (
    f"import sys; sys.path.insert(0, {str(TESTS)!r}); "
    "from helpers import ensure_moe_sampler; ensure_moe_sampler()\n"
)


def _is_root(entry: str) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == ROOT
    except OSError:
        return False


def forget_repository_root() -> None:
    """Remove the repository root (``''`` or ``.`` when it is the working directory) from ``sys.path``.

    ``python -m pytest`` run from the root puts it first on ``sys.path``; the pack's own
    ``nodes/`` package would then be found as ``nodes`` ahead of ComfyUI's ``nodes.py`` (and
    ``router``, ``stats``, ``experts`` as top-level packages). The package is loaded by path as
    ``moe_sampler`` instead (:func:`ensure_moe_sampler`), so nothing needs the root on the path.
    """
    sys.path[:] = [entry for entry in sys.path if not _is_root(entry)]


def ensure_moe_sampler() -> types.ModuleType:
    """Import this checkout as the package ``moe_sampler`` and return it.

    The pack's folder can have any name (a ComfyUI ``custom_nodes`` clone), so the root's
    ``__init__.py`` is loaded by path under the package name, whether or not the pack is
    pip-installed. Idempotent; the repository root is taken off ``sys.path`` first.
    """
    forget_repository_root()
    existing = sys.modules.get("moe_sampler")
    if existing is not None:
        return existing
    spec = importlib.util.spec_from_file_location(
        "moe_sampler", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["moe_sampler"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["moe_sampler"]
        raise
    return module


def import_bench(name: str) -> types.ModuleType:
    """``bench/<name>.py`` as ``bench.<name>`` (the package ``bench`` is loaded by path)."""
    ensure_moe_sampler()
    if "bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "bench", ROOT / "bench" / "__init__.py", submodule_search_locations=[str(ROOT / "bench")]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules["bench"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"bench.{name}")


def import_node_module(name: str) -> types.ModuleType:
    """Import ``moe_sampler.nodes.<name>`` (``paths``, ``bridge``), with or without ComfyUI.

    ``nodes/__init__.py`` imports ``comfy_api`` (it defines the ComfyUI extension), so without
    ComfyUI the package is stood in for by a bare package object pointing at the same folder;
    the pure modules then import as usual. With ``COMFYUI_PATH`` set, ComfyUI is made importable
    first and the real package is used.
    """
    full = f"moe_sampler.nodes.{name}"
    if full in sys.modules:
        return sys.modules[full]
    ensure_moe_sampler()
    from .comfy_env import comfy_path, import_comfy

    if comfy_path() is not None:
        import_comfy()
    if "moe_sampler.nodes" not in sys.modules:
        try:
            importlib.import_module("moe_sampler.nodes")
        except ImportError:
            package = types.ModuleType("moe_sampler.nodes")
            package.__path__ = [str(ROOT / "nodes")]
            package.__package__ = "moe_sampler.nodes"
            sys.modules["moe_sampler.nodes"] = package
    return importlib.import_module(full)


UNPRIVILEGED_UID = 65534  # "nobody" on Debian and most Linux systems


def run_unprivileged(func: Callable[[], Any], uid: int = UNPRIVILEGED_UID) -> Any:
    """``func()``, run as user ``uid`` in a forked child when this process is root; its result.

    Root ignores file permissions, so a test of what happens on a read-only folder would test
    nothing as root (CI runs as root). The child inherits everything imported here; the result
    (or the exception) comes back pickled. As a non-root user ``func`` simply runs here.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return func()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, run, report, exit without running the parent's cleanup
        status = 0
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                payload = pickle.dumps((True, func()))
            except BaseException as exc:  # noqa: BLE001  (re-raised in the parent)
                payload = pickle.dumps((False, exc))
            with os.fdopen(write, "wb") as out:
                out.write(payload)
        except BaseException:  # noqa: BLE001
            status = 1
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as source:
        data = source.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise RuntimeError(f"the unprivileged child (uid {uid}) failed before reporting (status {status})")
    ok, value = pickle.loads(data)
    if not ok:
        raise value
    return value
