"""A small SD1.5-family checkpoint with seeded random weights that ComfyUI loads as SD1.5.

ComfyUI detects the model from key names and shapes (``comfy/model_detection.py``), and
``supported_models.SD15`` only pins ``model_channels=320``, ``context_dim=768``, non-linear
transformer projections and no ADM input. So the UNet here is an SD1.5 UNet with two levels
of one res block each and a single transformer (32 M parameters instead of 860 M). The text
encoder cannot shrink (ComfyUI always builds the full SD1 CLIP-L, 124 M). Both are stored in
fp16 (320 MB in all; ComfyUI upcasts to its compute dtype). The VAE is a TAESD under
``first_stage_model.*``, which ComfyUI accepts in the checkpoint's VAE slot.

Key names and shapes are taken from ComfyUI's own modules (``UNetModel``, ``CLIPTextModel``,
``TAESD``) built on the meta device, so they always match the ComfyUI that loads the file.
Needs ComfyUI importable (see :mod:`tests.helpers.comfy_env`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."
VAE_PREFIX = "first_stage_model."

# What ComfyUI's detection would derive for the file (``detect_unet_config``), plus SD15's
# ``unet_extra_config``. ``transformer_depth_output`` is consumed with ``pop()``, so it lists
# the output blocks from last to first.
TINY_UNET_CONFIG = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 1],
    "transformer_depth": [1, 0],
    "transformer_depth_output": [1, 1, 0, 0],
    "transformer_depth_middle": -1,
    "context_dim": 768,
    "use_linear_in_transformer": False,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_heads": 8,
    "num_head_channels": -1,
    "adm_in_channels": None,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

# The real SD1.5 UNet layout (860 M parameters), for GPU overhead benchmarks.
SD15_UNET_CONFIG = {
    **TINY_UNET_CONFIG,
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1] * 9 + [0] * 3,
    "transformer_depth_middle": 1,
}

SD15_VAE_SCALE = 0.18215


def _meta_state_dict(module_factory) -> dict[str, torch.Size]:
    with torch.device("meta"):
        module = module_factory()
    return {k: v.shape for k, v in module.state_dict().items()}


def unet_shapes(config: dict) -> dict[str, torch.Size]:
    """Key -> shape of ComfyUI's ``UNetModel`` for ``config`` (no prefix)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return _meta_state_dict(lambda: UNetModel(**config, operations=comfy.ops.disable_weight_init))


def clip_shapes() -> dict[str, torch.Size]:
    """Key -> shape of ComfyUI's SD1 ``CLIPTextModel`` (no prefix)."""
    import json

    import comfy.clip_model
    import comfy.ops
    import comfy.sd1_clip

    config_path = Path(comfy.sd1_clip.__file__).with_name("sd1_clip_config.json")
    config = json.loads(config_path.read_text())
    return _meta_state_dict(
        lambda: comfy.clip_model.CLIPTextModel(config, torch.float32, None, comfy.ops.disable_weight_init)
    )


def taesd_shapes() -> dict[str, torch.Size]:
    """Key -> shape of ComfyUI's ``TAESD`` (no prefix; includes ``vae_scale``/``vae_shift``)."""
    import comfy.taesd.taesd

    return _meta_state_dict(lambda: comfy.taesd.taesd.TAESD(latent_channels=4))


def _random_tensor(key: str, shape: torch.Size, generator: torch.Generator, gain: float = 1.0) -> torch.Tensor:
    """A value at the scale a trained network has, so activations stay O(1), on the CPU.

    Matrices and kernels: N(0, gain^2 / fan_in) (LeCun); normalisation weights 1; biases
    small; embeddings N(0, 0.02^2) as CLIP initialises them. Drawn on ``generator``'s device.
    """
    device = generator.device
    if len(shape) >= 2:
        if "embedding" in key:
            value = torch.randn(shape, generator=generator, device=device) * 0.02
        else:
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=generator, device=device) * (gain / math.sqrt(fan_in))
        return value.cpu()
    if key.endswith("bias"):
        return (torch.randn(shape, generator=generator, device=device) * 0.01).cpu()
    if key.endswith("weight"):
        return torch.ones(shape)
    return torch.zeros(shape)


def build_state_dict(seed: int = 0, unet_config: dict | None = None, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The whole checkpoint as a flat state dict, deterministic in ``seed`` (and ``device``: the
    full-size UNet's 860 M values are drawn on the GPU when there is one, minutes faster)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, shape in sorted(unet_shapes(unet_config or TINY_UNET_CONFIG).items()):
        sd[UNET_PREFIX + key] = _random_tensor(key, shape, generator).half()
    for key, shape in sorted(clip_shapes().items()):
        if key == "text_projection.weight":
            value = torch.eye(shape[0])  # only feeds the pooled output, unused by SD1.5
        elif "position_ids" in key:
            value = torch.arange(shape[-1]).reshape(shape).float()
        else:
            value = _random_tensor(key, shape, generator)
        sd[CLIP_PREFIX + key] = value.half()
    for key, shape in sorted(taesd_shapes().items()):
        if key == "vae_scale":
            value = torch.tensor(SD15_VAE_SCALE)
        elif key == "vae_shift":
            value = torch.tensor(0.0)
        else:
            # ReLU nets keep their variance with gain sqrt(2) (He).
            value = _random_tensor(key, shape, generator, gain=math.sqrt(2.0))
        sd[VAE_PREFIX + key] = value.float()
    return sd


def make_tiny_sd15_checkpoint(path: str | Path, seed: int = 0, *, sd15_size: bool = False) -> Path:
    """Write the checkpoint to ``path`` (``.safetensors``) and return the path.

    ``sd15_size=True`` writes a full-size SD1.5 UNet instead of the tiny one (1.7 GB in
    fp16; for GPU benchmarks; its values are drawn on the GPU when there is one). Needs ComfyUI
    on ``sys.path``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = SD15_UNET_CONFIG if sd15_size else TINY_UNET_CONFIG
    device = "cuda" if sd15_size and torch.cuda.is_available() else "cpu"  # the tiny one: the same weights anywhere
    sd = build_state_dict(seed, config, device)
    metadata = {"moe_sampler_test_checkpoint": "sd15-size" if sd15_size else "tiny", "seed": str(seed)}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path
