"""Helpers shared by the tests and benchmarks.

- :mod:`.tiny_checkpoint`: a small SD1.5-family checkpoint with random weights that ComfyUI loads.
- :mod:`.comfy_env`: a real ComfyUI in-process (``COMFYUI_PATH``), its folders in a temp dir.
- :func:`import_node_module`: the ComfyUI-free modules of ``nodes/`` without ComfyUI.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def ensure_moe_sampler() -> types.ModuleType:
    """Import the repository as ``moe_sampler`` (as tests/conftest.py does), for scripts."""
    if "moe_sampler" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "moe_sampler", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["moe_sampler"] = module
        spec.loader.exec_module(module)
    return sys.modules["moe_sampler"]


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
