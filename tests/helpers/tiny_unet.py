"""A small random-weight diffusers ``UNet2DConditionModel`` for tests and benchmarks (nothing downloaded).

Needs diffusers; used with :class:`moe_sampler.experts.diffusers_adapter.DiffusersDenoiser`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

TINY_UNET_CONFIG: Mapping[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}


def tiny_unet(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> "UNet2DConditionModel":
    """A random-weight ``UNet2DConditionModel`` (:data:`TINY_UNET_CONFIG`, ~0.8M parameters) in eval
    mode; seeded without touching the global RNG, nothing downloaded."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**{**TINY_UNET_CONFIG, **overrides})
    if dtype != unet.dtype:
        unet = unet.to(dtype)
    return unet.eval().requires_grad_(False)
