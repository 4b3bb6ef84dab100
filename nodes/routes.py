"""The pack's read-only HTTP routes, all under ``/moe_sampler/`` (ComfyUI also serves them under ``/api``).

========================================  ==========================================================
``GET /moe_sampler/stats?router=NAME``    per-expert aggregates from the stats store (all routers
                                          when ``router`` is absent, empty or ``(all)``)
``GET /moe_sampler/routers``              saved routers in ``models/moe_routers`` with their metadata
``GET /moe_sampler/experts``              the built-in experts with their descriptors
========================================  ==========================================================

Nothing here writes. The payload builders (:func:`stats_payload`, :func:`routers_payload`,
:func:`experts_payload`) are plain functions that the MoE Stats node and the tests use too;
the handlers run them in a worker thread so a slow disk never stalls ComfyUI's event loop.
Responses carry file names, never absolute paths. ``web/moe_sampler.js`` has the one JS client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any

logger = logging.getLogger(__name__)

PREFIX = "/moe_sampler"
ALL_ROUTERS = "(all)"
MANUAL_ROUTER = "manual"  # how MoE Adaptive Sampler labels runs whose expert was forced
_registered = False


def router_filter(value: str | None) -> str | None:
    """The store's router label for a user's choice: None for all routers, ``"default"`` for the
    built-in router (how MoE Adaptive Sampler records it), else the value itself."""
    from . import paths

    value = (value or "").strip()
    if value in ("", ALL_ROUTERS):
        return None
    return "default" if value == paths.BUILTIN_ROUTER else value


def stats_payload(router: str | None = None) -> dict[str, Any]:
    """Per-expert aggregates as JSON-ready data.

    ``{"router": name or None, "experts": [ExpertStats as dict, ...], "runs": total,
    "healthy": bool, "problem": text or None}``; a store that cannot be read gives an empty
    list with ``healthy`` False and the reason (never an exception).
    """
    from ..router.store import StatsStoreError
    from . import paths

    name = router_filter(router)
    try:
        store = paths.stats_store()
        stats = store.expert_stats(router=name)
        problem = store.problem
    except (StatsStoreError, OSError) as exc:
        return {"router": name, "experts": [], "runs": 0, "healthy": False, "problem": str(exc)}
    experts = [dataclasses.asdict(entry) for entry in stats]
    return {"router": name, "experts": experts, "runs": sum(e["runs"] for e in experts),
            "healthy": problem is None, "problem": problem}


def check_router_filter(router: Any, input_name: str = "router") -> str:
    """A stats filter a user may pass: ``(all)``, the built-in router, ``default``, ``manual`` or a
    router file name (checked like one, so no value can name a path outside the routers folder)."""
    from . import paths

    if router in (ALL_ROUTERS, paths.BUILTIN_ROUTER, "default", MANUAL_ROUTER):
        return router
    return paths.check_router_name(router, input_name)


def stats_text(payload: dict[str, Any]) -> str:
    """A :func:`stats_payload` as a fixed-width text table (what MoE Stats shows and outputs)."""
    scope = payload.get("router") or "all routers"
    if not payload.get("healthy", True):
        return f"MoE stats ({scope}): the stats store is unavailable: {payload.get('problem')}"
    experts = payload.get("experts", [])
    if not experts:
        return f"MoE stats ({scope}): no runs recorded yet."

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
    return "\n".join(lines)


def _router_metadata(path: str) -> dict[str, Any]:
    """Header metadata of a router file without loading its weights (safetensors header only)."""
    from safetensors import safe_open

    from ..router.features import FEATURE_VERSION

    with safe_open(path, framework="pt") as handle:
        meta = dict(handle.metadata() or {})
    if meta.get("format") != "moe_sampler.router":
        return {"error": "not a MoE router file (no router metadata)"}
    version = int(meta.get("feature_version", -1))
    try:
        training = json.loads(meta.get("training", "{}"))
        experts = [entry.get("name") for entry in json.loads(meta.get("experts", "[]"))]
    except (TypeError, ValueError, AttributeError):
        training, experts = {}, []
    info = {"created": meta.get("created"), "feature_version": version, "compatible": version == FEATURE_VERSION,
            "training": training, "experts": experts}
    if version != FEATURE_VERSION:
        info["error"] = f"trained for feature version {version}; this pack uses {FEATURE_VERSION}; retrain it"
    return info


def routers_payload() -> list[dict[str, Any]]:
    """Every saved router file: ``name``, ``size_bytes``, ``modified`` and its header metadata.

    A file that cannot be read is listed with an ``error`` field rather than left out.
    """
    from . import paths

    routers = []
    for name in paths.router_names():
        if name == paths.BUILTIN_ROUTER:
            continue
        entry: dict[str, Any] = {"name": name}
        try:
            path = str(paths.resolve_router(name))
            status = os.stat(path)
            entry.update(size_bytes=status.st_size,
                         modified=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(status.st_mtime)))
            entry.update(_router_metadata(path))
        except Exception as exc:  # one bad file must not hide the others
            entry["error"] = f"{type(exc).__name__}: {exc}"
        routers.append(entry)
    return routers


def experts_payload() -> list[dict[str, Any]]:
    """The registered experts: descriptor fields, ``compat`` and ``in_default_pool``."""
    from ..experts import default_pool, registered_experts

    default = {expert.name for expert in default_pool()}
    return [{**dataclasses.asdict(expert.descriptor), "compat": expert.compat, "in_default_pool": expert.name in default}
            for expert in registered_experts()]


def register() -> bool:
    """Add the routes to ComfyUI's server; True if added now.

    Does nothing outside a running ComfyUI (no ``server.PromptServer.instance``) and nothing
    the second time (also when another copy of the pack already added them).
    """
    global _registered
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if _registered or instance is None:
        return False
    from aiohttp import web

    routes = instance.routes
    if any(getattr(route, "path", "") == f"{PREFIX}/stats" for route in routes):
        _registered = True
        return False

    async def answer(builder, *args: Any) -> web.Response:
        try:
            return web.json_response(await asyncio.to_thread(builder, *args))
        except Exception as exc:  # a route must answer, never crash the request with a traceback page
            logger.exception("MoE route %s failed", builder.__name__)
            return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=500)

    @routes.get(f"{PREFIX}/stats")
    async def get_stats(request: web.Request) -> web.Response:
        return await answer(stats_payload, request.query.get("router"))

    @routes.get(f"{PREFIX}/routers")
    async def get_routers(request: web.Request) -> web.Response:
        return await answer(routers_payload)

    @routes.get(f"{PREFIX}/experts")
    async def get_experts(request: web.Request) -> web.Response:
        return await answer(experts_payload)

    _registered = True
    return True
