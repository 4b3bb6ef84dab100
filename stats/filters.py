"""Stats over comparable runs: filters by source, model and image size, and what was averaged.

:func:`stats_payload` is :func:`.report.stats_payload` with three more filters:

- ``source``: ``"sampling"`` (the sampler's runs), ``"training"``, ``"audit"``, ``"benchmark"``,
  or ``"(all)"``;
- ``model``: a model fingerprint (``online_learning.model_fingerprint``, the store's ``model``
  column), or None for every model;
- ``size``: a band of the image size, read from the run's router state (latent elements and
  channels, so the band is the pixel side of a square image of the same area at ComfyUI's 8x VAE
  scale: a 512x768 run is "about 512 px"); ``"(all sizes)"`` for every size.

and an ``averaged`` sentence that says over what the numbers were averaged, with a warning when
the runs mix image sizes (time and speed then compare unlike runs). Pure Python; the caller
passes the store.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from . import report
from .records import score_experts

ALL_SOURCES = "(all)"
SOURCE_CHOICES = (ALL_SOURCES, "sampling", "training", "audit", "benchmark")
ALL_SIZES = "(all sizes)"
SIZE_BANDS: dict[str, tuple[float, float]] = {
    "small (under 384 px)": (0.0, 384.0),
    "about 512 px (384-767 px)": (384.0, 768.0),
    "about 1024 px (768-1535 px)": (768.0, 1536.0),
    "large (1536 px and up)": (1536.0, math.inf),
}
SIZE_CHOICES = (ALL_SIZES, *SIZE_BANDS)
ELEMENTS_SLOT, CHANNELS_SLOT = 48, 50  # router/features.py: (log2(n) - 12) / 6 and channels / 16
VAE_SCALE = 8
SIZE_SAMPLE = 2000  # newest runs read for the mixed-sizes warning when no size filter is set


def check_source(value: str | None, input_name: str = "source") -> str | None:
    """The store's source for a filter value (None for all), or ValueError naming ``input_name``."""
    if value in (None, "", ALL_SOURCES):
        return None
    if value not in SOURCE_CHOICES:
        raise ValueError(f"{input_name}: one of {', '.join(SOURCE_CHOICES)}, got {value!r}")
    return value


def check_size(value: str | None, input_name: str = "size") -> str | None:
    """The band name for a filter value (None for all sizes), or ValueError naming ``input_name``."""
    if value in (None, "", ALL_SIZES):
        return None
    if value not in SIZE_BANDS:
        raise ValueError(f"{input_name}: one of {', '.join(SIZE_CHOICES)}, got {value!r}")
    return value


def image_side(state: Sequence[float] | None) -> float | None:
    """Pixel side of a square image with the run's area (8x VAE scale), from its router state."""
    if state is None or len(state) <= CHANNELS_SLOT:
        return None
    channels = float(state[CHANNELS_SLOT]) * 16.0
    if not channels >= 1.0:  # 1-D latents (the analytic model) have no image size
        return None
    elements = 2.0 ** (float(state[ELEMENTS_SLOT]) * 6.0 + 12.0)
    return math.sqrt(elements / channels) * VAE_SCALE


def size_band(state: Sequence[float] | None) -> str | None:
    side = image_side(state)
    if side is None:
        return None
    return next(name for name, (low, high) in SIZE_BANDS.items() if low <= side < high)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate(runs: Sequence[Any]) -> list:
    """Per-expert :class:`~.records.ExpertStats` of ``runs`` (RunRecords), as the store's SQL does."""
    by_expert: dict[str, list[Any]] = {}
    for run in runs:
        by_expert.setdefault(run.expert, []).append(run)
    rows = []
    for expert in sorted(by_expert):
        group = by_expert[expert]
        ok = [r for r in group if r.success]
        rows.append((expert, len(group), _mean([1.0 if r.success else 0.0 for r in group]),
                     _mean([r.quality for r in ok if r.quality is not None]),
                     _mean([r.confidence for r in group if r.confidence is not None]),
                     _mean([float(r.nfe) for r in ok]), _mean([r.seconds for r in ok])))
    return score_experts(rows)


def describe(router: str | None, source: str | None, model: str | None, size: str | None, runs: int,
             sizes: set[str]) -> str:
    """What the numbers average: ``"12 runs: sampling, all routers, all models, about 512 px"``."""
    parts = [source or "all sources", f"router {router}" if router else "all routers",
             f"model {model}" if model else "all models", size or "all sizes"]
    text = f"{runs} run{'s' if runs != 1 else ''}: {', '.join(parts)}"
    if size is None and len(sizes) > 1:
        text += f" (mixes {len(sizes)} image sizes: time and speed compare unlike runs; pick a size)"
    return text


def stats_payload(store: Any, router: str | None = None, source: str | None = None, model: str | None = None,
                  size: str | None = None) -> dict[str, Any]:
    """:func:`.report.stats_payload` over the runs matching every filter, plus ``filters`` and
    ``averaged``; never raises for a store problem (the payload says it), ValueError naming
    ``source`` or ``size`` for a value that is not a choice.

    Without a model or size filter the aggregates come from the store's SQL (fast on any size);
    the image sizes for the "mixes" warning are then read from the newest :data:`SIZE_SAMPLE`
    runs. With one, the matching runs are read and aggregated here.
    """
    source, size = check_source(source), check_size(size)
    payload = report.stats_payload(store, router)
    name = payload["router"]
    try:
        if model is None and size is None:
            experts = [dataclasses.asdict(e) for e in store.expert_stats(router=name, source=source)]
            runs = store.runs(router=name, source=source, limit=SIZE_SAMPLE)
        else:
            runs = store.runs(router=name, source=source)
            if model is not None:
                runs = [r for r in runs if getattr(r, "model", None) == model]
            experts = None
    except Exception as exc:  # the store's health is in the payload already
        payload.update(experts=[], runs=0, healthy=False, problem=payload.get("problem") or str(exc))
        runs, experts = [], []
    bands = {size_band(r.state) for r in runs} - {None}
    if experts is None:
        if size is not None:
            runs = [r for r in runs if size_band(r.state) == size]
        experts = [dataclasses.asdict(entry) for entry in aggregate(runs)]
    payload["experts"], payload["runs"] = experts, sum(e["runs"] for e in experts)
    payload["filters"] = {"router": name, "source": source, "model": model, "size": size}
    payload["averaged"] = describe(name, source, model, size, payload["runs"], bands)
    return payload
