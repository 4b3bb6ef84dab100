"""Make the repository importable as ``moe_sampler`` whether or not it is pip-installed.

The pack's folder can have any name (ComfyUI's custom_nodes clone), so the tests load the
root ``__init__.py`` under the package name ``moe_sampler`` themselves.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ensure_package() -> None:
    existing = sys.modules.get("moe_sampler")
    if existing is not None:
        return
    spec = importlib.util.spec_from_file_location(
        "moe_sampler", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["moe_sampler"] = module
    spec.loader.exec_module(module)


_ensure_package()


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is available here")
    skip_comfy = pytest.mark.skip(reason="needs a real ComfyUI checkout: set COMFYUI_PATH to run it")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "comfyui" in item.keywords and not os.environ.get("COMFYUI_PATH"):
            item.add_marker(skip_comfy)
