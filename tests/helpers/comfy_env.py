"""Run a real ComfyUI in-process for tests and benchmarks.

``COMFYUI_PATH`` names the ComfyUI checkout. :func:`import_comfy` puts it first on
``sys.path`` and selects CPU torch *before* ``comfy.model_management`` is imported (that
module picks the device at import time); pass ``cpu=False`` on a GPU machine.
:func:`use_temp_dirs` points every ComfyUI folder a test could write to (models, user,
output, input, temp) at a temporary directory, and :func:`load_tiny_checkpoint` builds and
loads the tiny SD1.5-family checkpoint of :mod:`tests.helpers.tiny_checkpoint`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

TINY_CHECKPOINT_NAME = "tiny_sd15.safetensors"


def comfy_path() -> Path | None:
    """The ComfyUI checkout named by ``COMFYUI_PATH``, or None when it is unset or empty."""
    value = os.environ.get("COMFYUI_PATH", "").strip()
    return Path(value).resolve() if value else None


def import_comfy(path: str | Path | None = None, cpu: bool = True):
    """Make ComfyUI importable and return its ``folder_paths`` module.

    Raises RuntimeError when no path is given and ``COMFYUI_PATH`` is unset.
    """
    root = Path(path).resolve() if path is not None else comfy_path()
    if root is None:
        raise RuntimeError("COMFYUI_PATH is not set; point it at a ComfyUI checkout")
    if not (root / "comfy").is_dir():
        raise RuntimeError(f"COMFYUI_PATH={root} does not look like a ComfyUI checkout (no comfy/ folder)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if "comfy.model_management" not in sys.modules:
        from comfy.cli_args import args

        args.cpu = cpu
    import comfy.model_management  # noqa: F401  (device chosen now, from args)
    import folder_paths

    nodes = sys.modules.get("nodes")
    spec = nodes.__spec__ if nodes is not None else importlib.util.find_spec("nodes")
    origin = getattr(spec, "origin", None)
    if origin is None or Path(origin).resolve() != root / "nodes.py":
        raise RuntimeError(f"`import nodes` finds {origin}, not ComfyUI's {root / 'nodes.py'}: another folder "
                           "is ahead of ComfyUI on sys.path (the tests never put the repository root there)")
    return folder_paths


def use_temp_dirs(root: str | Path) -> Path:
    """Point ComfyUI's models, user, output, input and temp folders at ``root``.

    Model folders the pack reads (checkpoints, moe_routers) are put first; ComfyUI's own
    folders stay listed after them, so nothing a test writes lands in the checkout.
    """
    import folder_paths

    root = Path(root)
    for sub in ("models/checkpoints", "models/moe_routers", "user", "output", "input", "temp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    folder_paths.models_dir = str(root / "models")
    folder_paths.add_model_folder_path("checkpoints", str(root / "models" / "checkpoints"), is_default=True)
    folder_paths.folder_names_and_paths["moe_routers"] = ([str(root / "models" / "moe_routers")], {".safetensors"})
    folder_paths.filename_list_cache.clear()
    folder_paths.set_user_directory(str(root / "user"))
    folder_paths.set_output_directory(str(root / "output"))
    folder_paths.set_input_directory(str(root / "input"))
    folder_paths.set_temp_directory(str(root / "temp"))
    return root


def load_tiny_checkpoint(root: str | Path, seed: int = 0, sd15_size: bool = False,
                         model_options: dict | None = None):
    """Build (once per ``root``) and load the tiny checkpoint; returns ``(model, clip, vae)``.

    ``root`` becomes ComfyUI's models/user/output folder (see :func:`use_temp_dirs`).
    ``sd15_size`` builds a full-size SD1.5 UNet instead; ``model_options`` go to
    ``comfy.sd.load_checkpoint_guess_config`` (e.g. ``{"dtype": torch.float16}``).
    """
    import comfy.sd

    from .tiny_checkpoint import make_tiny_sd15_checkpoint

    root = use_temp_dirs(root)
    name = TINY_CHECKPOINT_NAME if not sd15_size else "sd15_size_random.safetensors"
    path = root / "models" / "checkpoints" / name
    if not path.exists():
        make_tiny_sd15_checkpoint(path, seed=seed, sd15_size=sd15_size)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(path), output_vae=True, output_clip=True, embedding_directory=None, model_options=model_options or {}
    )
    return model, clip, vae


def encode_prompt(clip, text: str):
    """CONDITIONING for ``text``, as core's CLIPTextEncode node builds it."""
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)
