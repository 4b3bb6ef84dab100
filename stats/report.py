"""What the stats look like to a user: the router labels, the JSON payload and the text table.

The labels are defined here once; the nodes, the HTTP routes and the web client (which gets
them from ``GET /moe_sampler/labels``) all use these. Pure Python: the caller passes the store.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from .store import StatsStore, StatsStoreError

ALL_ROUTERS = "(all)"  # the stats filter for every router
BUILTIN_ROUTER = "(built-in default)"  # the sampler's dropdown entry for Router.default()
DEFAULT_ROUTER = "default"  # how runs of the built-in router are labelled in the store
MANUAL_ROUTER = "manual"  # how runs whose expert was forced with ``mode`` are labelled
LABELS = {"all_routers": ALL_ROUTERS, "builtin_router": BUILTIN_ROUTER, "default_router": DEFAULT_ROUTER,
          "manual_router": MANUAL_ROUTER}


def router_label(router: str) -> str:
    """The store's label for a router the sampler ran: ``"default"`` for the built-in one, else its file name."""
    return DEFAULT_ROUTER if router == BUILTIN_ROUTER else router


def router_filter(value: str | None) -> str | None:
    """The store's router label for a user's stats filter: None for all routers, ``"default"`` for
    the built-in router, else the value itself."""
    value = (value or "").strip()
    if value in ("", ALL_ROUTERS):
        return None
    return router_label(value)


def is_label(value: Any) -> bool:
    """True for a filter that names no file: all routers, the built-in one, default, manual."""
    return value in (ALL_ROUTERS, BUILTIN_ROUTER, DEFAULT_ROUTER, MANUAL_ROUTER)


def stats_payload(store: StatsStore, router: str | None = None) -> dict[str, Any]:
    """Per-expert aggregates and the store's health as JSON-ready data; fast, never raises.

    ``{"router": name or None, "experts": [ExpertStats as dict, ...], "runs": total,
    "healthy": bool, "problem": text or None, "notice": text or None, "dropped": int,
    "waiting": int}``. ``healthy`` is False while the store is locked by another process or
    failing (``problem`` says why; the experts are still listed if they could be read);
    ``dropped`` counts runs this process could not record, ``waiting`` the runs held in memory
    for a retry; ``notice`` says what the store did (e.g. a damaged file moved aside). Texts
    name the store by file or database name, never by an absolute path.
    """
    name = router_filter(router)
    health_of = getattr(store, "health", None)
    try:
        stats = store.expert_stats(router=name)
    except (StatsStoreError, OSError) as exc:
        health = health_of(probe=False) if health_of else {}
        return {"router": name, "experts": [], "runs": 0, "healthy": False, "problem": _without_folders(exc),
                "notice": health.get("notice"), "dropped": health.get("dropped", 0),
                "waiting": health.get("waiting", 0)}
    health = health_of() if health_of else {"healthy": store.problem is None, "problem": store.problem}
    experts = [dataclasses.asdict(entry) for entry in stats]
    return {"router": name, "experts": experts, "runs": sum(e["runs"] for e in experts),
            "healthy": health["healthy"], "problem": health["problem"], "notice": health.get("notice"),
            "dropped": health.get("dropped", 0), "waiting": health.get("waiting", 0)}


def _store_lines(payload: dict[str, Any]) -> list[str]:
    """The store's state under the table: a problem, a notice, dropped runs (nothing when all is well)."""
    lines = []
    if not payload.get("healthy", True) and payload.get("experts"):
        lines.append(f"Stats store problem: {payload.get('problem')}")
    if payload.get("notice"):
        lines.append(f"Stats store notice: {payload['notice']}")
    dropped = payload.get("dropped") or 0
    if dropped:
        lines.append(f"{dropped} run{'s' if dropped != 1 else ''} could not be recorded (dropped); see the log")
    return lines


def _without_folders(exc: BaseException) -> str:
    """The error's text with every file it names cut to the file name (the payload goes out over HTTP)."""
    text = str(exc)
    for path in (getattr(exc, "filename", None), getattr(exc, "filename2", None)):
        if isinstance(path, (str, os.PathLike)) and str(path):
            text = text.replace(str(path), os.path.basename(str(path)))
    return text


def stats_text(payload: dict[str, Any]) -> str:
    """A :func:`stats_payload` as a fixed-width text table (what MoE Stats shows and outputs)."""
    scope = payload.get("router") or "all routers"
    experts = payload.get("experts", [])
    if not payload.get("healthy", True) and not experts:
        return "\n".join([f"MoE stats ({scope}): the stats store is unavailable: {payload.get('problem')}",
                          *_store_lines(payload)])
    if not experts:
        return "\n".join([f"MoE stats ({scope}): no runs recorded yet.", *_store_lines(payload)])

    def cell(value: Any, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    lines = [f"MoE stats ({scope}): {payload.get('runs', 0)} runs",
             f"{'expert':<24}{'runs':>6}{'quality':>9}{'speed':>7}{'effic.':>8}{'success':>9}{'conf.':>7}"
             f"{'NFE':>7}{'sec':>8}"]
    for e in experts:
        lines.append(f"{e['expert'][:23]:<24}{e['runs']:>6}{cell(e['quality_score'], '.2f'):>9}"
                     f"{cell(e['speed_score'], '.2f'):>7}{cell(e['efficiency_score'], '.2f'):>8}"
                     f"{cell(e['success_rate'], '.0%'):>9}{cell(e['mean_confidence'], '.0%'):>7}"
                     f"{cell(e['mean_nfe'], '.1f'):>7}{cell(e['mean_seconds'], '.2f'):>8}")
    return "\n".join(lines + _store_lines(payload))
