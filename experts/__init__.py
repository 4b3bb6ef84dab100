"""Sampling experts: pure torch, no ComfyUI import.

Importing this package registers the built-in experts (see :mod:`.builtin`).
"""

from __future__ import annotations

from .base import (
    CALLBACK_KEYS,
    DESCRIPTOR_DIM,
    Denoiser,
    Expert,
    ExpertDescriptor,
    ExpertRun,
    ModelSchedule,
    UnknownExpertError,
    default_pool,
    expert_names,
    features_of,
    get_expert,
    register,
    registered_experts,
)
from . import builtin  # noqa: F401  (registers the built-in experts)

__all__ = [
    "CALLBACK_KEYS",
    "DESCRIPTOR_DIM",
    "Denoiser",
    "Expert",
    "ExpertDescriptor",
    "ExpertRun",
    "ModelSchedule",
    "UnknownExpertError",
    "default_pool",
    "expert_names",
    "features_of",
    "get_expert",
    "register",
    "registered_experts",
]
