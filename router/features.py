"""The router's state: a fixed 64-value vector describing one generation.

Each slot is first scaled to a raw value ``z`` that is linear in what it measures and spans
[-1, 1] over the documented range below (the range the benchmark and the default training
cover); then every slot goes through :func:`soft`, the identity on [-1, 1] and
``sign(z) (2 - 1 / |z|)`` beyond, so the state lies in (-2, 2) and a value beyond the range
stays distinct from the range's edge and ordered (cfg 30 < cfg 100, 64 < 128 channels) where
feature version 1 clamped it to +-1. Conditioning of any width (768 for SD1.5, 2048 for SDXL,
4096 for flow models) is pooled and projected to a fixed size with a FIXED random projection
per input width, seeded from the width alone, so the same conditioning gives the same state in
every process.

Slot table (``FEATURE_VERSION = 2``; "linear for" is the range where ``|z| <= 1``):

========  ==============================================  ==================================
slots     meaning, raw value ``z``                        linear for
========  ==============================================  ==================================
0-19      positive conditioning: token-and-batch mean,    ``|p| <= 2`` (p ~ N(0, 1))
          standardised, projected to ``p``, ``p / 2``
20-27     positive ``pooled_output`` (same); 0 if absent  ``|p| <= 2``
28-33     negative conditioning: projection as 0-5        ``|p| <= 2``
34        rms of the positive conditioning, log10 / 2     rms 0.01 ... 100
35        token count, ``log2(tokens) / 8``               1 ... 256 tokens
36        cosine of pooled positive and negative          [-1, 1] (0 when no negative)
37        has ``pooled_output`` (1/0)                     -
38        has a negative conditioning (1/0)               -
39        conditioning width, ``(log2(width) - 10) / 2``  256 ... 4096
40-46     prompt statistics (analytic model only; 0 for   modes 1 ... 16, separation 0 ... 3,
          real models, see                                scale 1/4 ... 4, spread 0 ... 1,
          :func:`analytic_prompt_statistics`)             anisotropy 1 ... 30, smallest std
                                                          0.01 ... 100, guidance gap 0 ... 1
47        analytic model (1/0)                            -
48        latent elements per sample,                     2^6 ... 2^18
          ``(log2(n) - 12) / 6``
49        aspect, ``log2(width / height) / 2``            1:4 ... 4:1 (0 for 1-D latents)
50        latent channels / 16 (0 for 1-D latents)        0 ... 16 channels
51        spatial rank, ``(ndim - 2) / 3``                vector 0, image 0.67, video 1
52        batch, ``log2(batch) / 4``                      1 ... 16
53        cfg, ``log(cfg) / log(16)``                     1/16 ... 16
54        cfg, ``(cfg - 6) / 6``                          0 ... 12
55        denoise, ``2 * denoise - 1``                    (0, 1]
56-58     model family one-hot: eps, v, flow              -
59        the user's priority, ``2 * priority - 1``       [0, 1] (0 speed ... 1 quality)
60-61     source one-hot: interactive, training           -
62        conditioning entries, ``log2(n) / 3``           1 ... 8
63        extra conditioning keys present (1/0)           -
========  ==============================================  ==================================

Version 1 used the same raw values with ``tanh(0.6 p)`` for the projections and a clamp to
[-1, 1] elsewhere; routers saved for it are refused by ``Router.load`` with a message to
retrain (inside the ranges most slots keep their values; the projections, the guidance gap,
formerly ``tanh(gap)``, and everything beyond the ranges do not).

The router's scorer does not read slot 59 (see :mod:`.model`): priority enters through the
utility only, so moving the slider never needs retraining.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Sequence

import torch
from torch import Tensor

from .policy import check_priority

STATE_DIM = 64
FEATURE_VERSION = 2
FAMILIES = ("eps", "v", "flow")
SOURCES = ("interactive", "training")

POSITIVE_SLOTS = slice(0, 20)
POOLED_SLOTS = slice(20, 28)
NEGATIVE_SLOTS = slice(28, 34)
PROMPT_STAT_SLOTS = slice(40, 47)
ANALYTIC_FLAG_SLOT = 47
CFG_LOG_SLOT = 53
DENOISE_SLOT = 55
FAMILY_SLOTS = slice(56, 59)
PRIORITY_SLOT = 59
SOURCE_SLOTS = slice(60, 62)
_BASE_KEYS = frozenset({"pooled_output"})
_PROJECTION_SEED = 0x5EED_0001


@lru_cache(maxsize=32)
def projection(width: int, rows: int) -> Tensor:
    """The fixed projection for inputs of ``width``, shape [rows, width], entries N(0, 1/width).

    Seeded from the width only, so it is identical in every process and on every machine.
    """
    g = torch.Generator().manual_seed(_PROJECTION_SEED + 7919 * int(width) + int(rows))
    return torch.randn(rows, width, generator=g, dtype=torch.float64) / math.sqrt(width)


def soft(z: Tensor) -> Tensor:
    """The identity on [-1, 1], ``sign(z) (2 - 1 / |z|)`` beyond: strictly increasing, continuous
    with its slope, bounded by 2 in size; applied to every slot (see the module docstring)."""
    magnitude = z.abs()
    return torch.where(magnitude <= 1.0, z, z.sign() * (2.0 - 1.0 / magnitude.clamp_min(1.0)))


def _project(vector: Tensor, rows: int) -> Tensor:
    """Standardise a pooled vector [width] and project it to ``rows`` raw values ``p / 2``."""
    v = vector.double()
    v = (v - v.mean()) / (v.std(unbiased=False) + 1e-8)
    return 0.5 * (projection(v.numel(), rows) @ v)


def _entries(conditioning: Any) -> list[tuple[Tensor, dict]]:
    if conditioning is None:
        return []
    if not isinstance(conditioning, (list, tuple)):
        raise TypeError("conditioning must be a ComfyUI conditioning list [[tensor, dict], ...]")
    out = []
    for i, entry in enumerate(conditioning):
        if not isinstance(entry, (list, tuple)) or len(entry) < 1 or not isinstance(entry[0], Tensor):
            raise TypeError(f"conditioning entry {i} must be [tensor [B, tokens, width], dict]")
        if entry[0].dim() != 3:
            raise ValueError(f"conditioning entry {i}: tensor must be [B, tokens, width], got {tuple(entry[0].shape)}")
        out.append((entry[0], dict(entry[1]) if len(entry) > 1 and entry[1] is not None else {}))
    return out


def _pool(entries: list[tuple[Tensor, dict]]) -> tuple[Tensor, Tensor | None, int]:
    """Mean over entries, batch and tokens -> [width]; mean pooled_output or None; token count."""
    widths = {t.shape[-1] for t, _ in entries}
    if len(widths) != 1:
        raise ValueError(f"conditioning entries have different widths {sorted(widths)}")
    mean = torch.stack([t.detach().float().mean(dim=(0, 1)).cpu() for t, _ in entries]).mean(0)
    pooled = [o["pooled_output"] for _, o in entries if isinstance(o.get("pooled_output"), Tensor)]
    pooled_mean = torch.stack([p.detach().float().reshape(-1, p.shape[-1]).mean(0).cpu() for p in pooled]).mean(0) \
        if pooled and len({p.shape[-1] for p in pooled}) == 1 else None
    tokens = max(t.shape[1] for t, _ in entries)
    return mean, pooled_mean, tokens


def _setup_slots(state: Tensor, latent_shape: Sequence[int], cfg: float, denoise: float,
                 model_family: str, priority: float, source: str) -> None:
    if len(latent_shape) < 2:
        raise ValueError(f"latent shape must be [B, ...], got {tuple(latent_shape)}")
    check_priority(priority)
    if not (0.0 < denoise <= 1.0):
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    if not math.isfinite(cfg) or cfg <= 0:
        raise ValueError(f"cfg must be a positive finite number, got {cfg}")
    if model_family not in FAMILIES:
        raise ValueError(f"model_family must be one of {FAMILIES}, got {model_family!r}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    batch, dims = int(latent_shape[0]), [int(s) for s in latent_shape[1:]]
    elements = math.prod(dims)
    spatial = len(dims) >= 3
    state[48] = (math.log2(max(elements, 1)) - 12) / 6
    state[49] = math.log2(dims[-1] / dims[-2]) / 2 if spatial else 0.0
    state[50] = dims[0] / 16 if spatial else 0.0
    state[51] = (len(latent_shape) - 2) / 3
    state[52] = math.log2(max(batch, 1)) / 4
    state[CFG_LOG_SLOT] = math.log(cfg) / math.log(16)
    state[54] = (cfg - 6) / 6
    state[DENOISE_SLOT] = 2 * denoise - 1
    state[56 + FAMILIES.index(model_family)] = 1.0
    state[PRIORITY_SLOT] = 2 * priority - 1
    state[60 + SOURCES.index(source)] = 1.0


def state_from_conditioning(positive: Any, negative: Any, latent_shape: Any, cfg: float, denoise: float,
                            model_family: str, priority: float, source: str = "interactive") -> Tensor:
    """State of a real-model generation, shape [STATE_DIM] float32.

    Args:
        positive, negative: ComfyUI conditioning ``[[tensor [B, tokens, width], {"pooled_output":
            tensor [B, w] or None, ...}], ...]``; ``negative`` may be None or empty.
        latent_shape: the latent's shape ``[B, C, H, W]`` (or ``[B, C, T, H, W]``), a latent
            tensor, or a ComfyUI LATENT dict with ``"samples"``.
        cfg, denoise, model_family ("eps" | "v" | "flow"), priority in [0, 1], source
            ("interactive" | "training").
    """
    if isinstance(latent_shape, dict):
        latent_shape = latent_shape["samples"]
    if isinstance(latent_shape, Tensor):
        latent_shape = tuple(latent_shape.shape)
    pos = _entries(positive)
    if not pos:
        raise ValueError("positive conditioning is empty")
    neg = _entries(negative)
    state = torch.zeros(STATE_DIM, dtype=torch.float64)
    mean, pooled, tokens = _pool(pos)
    width = mean.numel()
    state[POSITIVE_SLOTS] = _project(mean, 20)
    if pooled is not None:
        state[POOLED_SLOTS] = _project(pooled, 8)
        state[37] = 1.0
    state[34] = math.log10(float(mean.square().mean().sqrt()) + 1e-8) / 2
    state[35] = math.log2(max(tokens, 1)) / 8
    state[39] = (math.log2(width) - 10) / 2
    if neg:
        neg_mean, _, _ = _pool(neg)
        if neg_mean.numel() == width:
            state[NEGATIVE_SLOTS] = _project(neg_mean, 20)[:6]
            state[36] = float(torch.nn.functional.cosine_similarity(mean, neg_mean, dim=0))
        state[38] = 1.0
    state[62] = math.log2(len(pos)) / 3
    state[63] = float(any(set(o) - _BASE_KEYS for _, o in pos))
    _setup_slots(state, latent_shape, cfg, denoise, model_family, priority, source)
    return soft(state).float()


def analytic_prompt_statistics(model: Any, cond: int) -> list[float]:
    """Seven raw prompt-difficulty statistics of an analytic prompt (slots 40-46).

    Knobs of the :class:`PromptSpec` (modes, separation, scale, spread, anisotropy), the smallest
    component std ``log10(min std) / 2`` (fine detail that needs small final steps) and the
    guidance gap ``rms(E_c[x0] - E_u[x0]) / data_rms`` (how strongly cfg bends the ODE).
    """
    spec = model.prompts[cond]
    cond_mix, uncond_mix = model.cond_mixtures[cond], model.uncond_mixture
    mean_c = (cond_mix.log_weights.exp()[:, None] * cond_mix.means).sum(0)
    mean_u = (uncond_mix.log_weights.exp()[:, None] * uncond_mix.means).sum(0)
    gap = float((mean_c - mean_u).square().mean().sqrt()) / model.data_rms(cond)
    return [
        math.log2(spec.n_modes) / 4,
        spec.separation / 1.5 - 1,
        math.log2(spec.scale) / 2,
        2 * spec.scale_spread - 1,
        2 * math.log(spec.anisotropy) / math.log(30) - 1,
        math.log10(float(cond_mix.stds.min())) / 2,
        gap,
    ]


def state_from_analytic(model: Any, cond: int, cfg: float, batch: int, priority: float, denoise: float = 1.0,
                        source: str = "training") -> Tensor:
    """State of a generation on an :class:`~moe_sampler.experts.analytic.AnalyticModel`, shape [STATE_DIM].

    The analytic model has no text embedding: slots 0-39 stay 0 and slots 40-46 carry the
    prompt's difficulty statistics instead (a real model's router sees only the embedding).
    The analytic model is a k-diffusion denoiser in sigma, family ``"eps"``.
    """
    if not (0 <= cond < len(model.prompts)):
        raise ValueError(f"cond must index one of the model's {len(model.prompts)} prompts, got {cond}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    state = torch.zeros(STATE_DIM, dtype=torch.float64)
    state[PROMPT_STAT_SLOTS] = torch.tensor(analytic_prompt_statistics(model, cond), dtype=torch.float64)
    state[ANALYTIC_FLAG_SLOT] = 1.0
    _setup_slots(state, (batch, *model.shape), cfg, denoise, "eps", priority, source)
    return soft(state).float()


def with_priority(state: Tensor, priority: float) -> Tensor:
    """A copy of ``state`` [..., STATE_DIM] with the priority slot set to ``priority``."""
    check_priority(priority)
    out = state.clone()
    out[..., PRIORITY_SLOT] = 2 * priority - 1
    return out
