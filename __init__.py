"""MoE Adaptive Sampler: a ComfyUI node pack whose router learns which sampling expert suits
each generation.

Works two ways: cloned into ``ComfyUI/custom_nodes/<any name>`` (ComfyUI imports this file by
path and calls :func:`comfy_entrypoint`), or installed with pip as ``moe_sampler``. Nothing
here imports ComfyUI or needs a GPU at import time.
"""

from __future__ import annotations

__version__ = "0.1.0"

WEB_DIRECTORY = "./web"

_PUBLIC_API = {
    "AdvancedExpertSelector": ".router.compat",
    "MixtureOfExperts": ".router.compat",
    "ExpertRouter": ".router.compat",
    "MoERLTrainer": ".router.compat",  # the original API's signature; the core trainer is router.trainer's
}


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: return the pack's ``ComfyExtension``."""
    from .nodes import MoEExtension

    return MoEExtension()


def __getattr__(name: str):
    # Lazy so that ``import moe_sampler`` stays cheap and ComfyUI-free.
    if name in _PUBLIC_API:
        import importlib

        module = importlib.import_module(_PUBLIC_API[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint", "__version__", *_PUBLIC_API]
