"""From predicted quality and cost to a pick: utility, temperature, propensity, confidence.

- **Cost** of a run is ``cost_from_nfe(nfe) = log2(max(nfe, 1)) / 10``: 1 model call costs 0,
  10 calls 0.33, 100 calls 0.66, 1000 calls 1.0. Doubling the model calls costs 0.1.
- **Priority** p in [0, 1] (0 = speed, 1 = quality) sets the price of cost,
  ``lambda(p) = LAMBDA_SPEED ** (1 - p) * LAMBDA_QUALITY ** p``, geometric from 8 at p = 0
  to 0.25 at p = 1 (``lambda(0.25) = 3.36``, ``lambda(0.5) = 1.41``, ``lambda(0.75) = 0.59``).
- **Utility** = quality - lambda(p) * cost. Quality is the documented score in [0, 1] (one
  third per decade of relative error), so at p = 0.5 doubling the model calls must buy 0.14
  quality (0.42 decades, 2.7x less error) to pay off; a second-order solver in its asymptotic
  range buys 4x per doubling, so the middle priority sits where the experts really compete.
- **Selection**: probabilities ``softmax(utility / temperature)``; temperature 0 is greedy
  (argmax, first on ties, propensity 1). Draws come from a ``torch.Generator`` seeded with
  ``seed``, never from the global RNG.
- **Confidence** is the probability of the pick at ``REFERENCE_TEMPERATURE`` whatever the
  temperature actually used, so a greedy pick still reports how clear the choice was.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

LAMBDA_SPEED = 8.0
LAMBDA_QUALITY = 0.25
REFERENCE_TEMPERATURE = 0.05


@dataclass(frozen=True)
class Selection:
    """One routing decision.

    ``probabilities`` is the distribution the pick was drawn from (one-hot when greedy), so
    ``propensity == probabilities[index]``; ``confidence`` is the pick's probability at
    ``REFERENCE_TEMPERATURE``. Per-expert tuples follow the pool's order.
    """

    expert: str
    index: int
    propensity: float
    confidence: float
    probabilities: tuple[float, ...]
    utilities: tuple[float, ...]
    predicted_quality: tuple[float, ...]
    predicted_cost: tuple[float, ...]
    decision_seconds: float


def check_priority(priority: float) -> float:
    """Return ``priority`` as a float, or raise ValueError outside [0, 1]."""
    p = float(priority)
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"priority must be in [0, 1] (0 = speed, 1 = quality), got {priority}")
    return p


def lambda_from_priority(priority: float) -> float:
    """The price of one unit of cost for a priority in [0, 1]."""
    p = check_priority(priority)
    return LAMBDA_SPEED ** (1.0 - p) * LAMBDA_QUALITY ** p


def cost_from_nfe(nfe: float | Tensor) -> float | Tensor:
    """Normalised cost ``log2(max(nfe, 1)) / 10`` of a run with ``nfe`` model calls."""
    if isinstance(nfe, Tensor):
        return torch.log2(nfe.double().clamp_min(1.0)) / 10.0
    return math.log2(max(float(nfe), 1.0)) / 10.0


def utilities(quality: Tensor, cost: Tensor, priority: float) -> Tensor:
    """Utility ``quality - lambda(priority) * cost``; quality, cost [N] -> [N]."""
    return quality - lambda_from_priority(priority) * cost


def probabilities(utility: Tensor, temperature: float) -> Tensor:
    """Selection probabilities [N] float64 from utilities [N]; temperature 0 is one-hot argmax."""
    if not (temperature >= 0.0) or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    u = utility.detach().double().reshape(-1)
    if u.numel() == 0:
        raise ValueError("expert pool is empty: nothing to select from")
    if temperature == 0.0:
        probs = torch.zeros_like(u)
        probs[int(torch.argmax(u))] = 1.0
        return probs
    return torch.softmax(u / temperature, dim=0)


def draw(probs: Tensor, seed: int | None) -> int:
    """Draw an index from ``probs`` [N] with a generator seeded by ``seed`` (fresh entropy when None)."""
    if int((probs > 0).sum()) == 1:
        return int(torch.argmax(probs))
    g = torch.Generator().manual_seed(int(seed) if seed is not None else int.from_bytes(os.urandom(7), "little"))
    u = float(torch.rand((), generator=g, dtype=torch.float64))
    cumulative = torch.cumsum(probs.double(), 0)
    index = int(torch.searchsorted(cumulative, torch.tensor([u * float(cumulative[-1])], dtype=torch.float64)))
    index = min(index, probs.numel() - 1)
    while float(probs[index]) == 0.0:  # never land on a zero-probability expert through rounding
        index -= 1
    return index


def choose(quality: Tensor, cost: Tensor, names: list[str], priority: float, temperature: float,
           seed: int | None, decision_seconds: float = 0.0) -> Selection:
    """Utility, probabilities and a draw; quality, cost [N] -> :class:`Selection`."""
    util = utilities(quality.double(), cost.double(), priority)
    probs = probabilities(util, temperature)
    index = draw(probs, seed)
    confidence = float(probabilities(util, REFERENCE_TEMPERATURE)[index])
    return Selection(
        expert=names[index],
        index=index,
        propensity=float(probs[index]),
        confidence=confidence,
        probabilities=tuple(float(v) for v in probs),
        utilities=tuple(float(v) for v in util),
        predicted_quality=tuple(float(v) for v in quality),
        predicted_cost=tuple(float(v) for v in cost),
        decision_seconds=decision_seconds,
    )
