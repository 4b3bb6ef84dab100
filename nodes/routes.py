"""The pack's read-only HTTP routes, all under ``/moe_sampler/`` (ComfyUI also serves them under ``/api``).

========================================  ==========================================================
``GET /moe_sampler/stats?router=NAME``    per-expert aggregates from the stats store (all routers
                                          when ``router`` is absent, empty or ``(all)``); also
                                          ``source``, ``size`` and ``model`` (stats/filters.py)
``GET /moe_sampler/routers``              saved routers in ``models/moe_routers`` with their metadata
``GET /moe_sampler/experts``              the built-in experts with their descriptors
``GET /moe_sampler/labels``               the router labels the stats use (``(all)``, ``manual``, ...)
========================================  ==========================================================

``GET /moe_sampler/labels`` gives the router labels of :mod:`moe_sampler.stats.report` to the web
client, so that they are defined once. Nothing here writes. The stats payload and table live in
:mod:`moe_sampler.stats.report`; the handlers run the payload builders in a worker thread so a
slow disk never stalls ComfyUI's event loop.
Responses carry file names, never absolute paths. ``web/moe_sampler.js`` has the one JS client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..stats import report

logger = logging.getLogger(__name__)

PREFIX = "/moe_sampler"
_registered = False


def _router_metadata(path: str | os.PathLike, name: str) -> dict[str, Any]:
    """Header metadata of a router file without loading its weights (at most
    :data:`~moe_sampler.router.model.MAX_HEADER_BYTES` of header are read); errors name the file
    by ``name``, never by its path."""
    from ..router.features import FEATURE_VERSION
    from ..router.model import FORMAT, RouterLoadError, read_header

    try:
        meta = read_header(Path(path), what="router", label=name).metadata
    except RouterLoadError as exc:
        return {"error": str(exc)}
    if meta.get("format") != FORMAT:
        return {"error": "not a MoE router file (no router metadata)"}
    try:
        version = int(meta.get("feature_version", -1))
    except ValueError:
        return {"error": f"metadata feature_version is {meta.get('feature_version')!r}, not a whole number"}
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


# The listing's header metadata per file, kept while the file's size and mtime are unchanged.
_listing: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}
_listing_lock = threading.Lock()


def _public_error(exc: Exception, path: Any, name: str) -> str:
    """An exception's text with the file's path replaced by its name (responses carry no paths)."""
    text = str(exc.strerror or exc) if isinstance(exc, OSError) else str(exc)
    return f"{type(exc).__name__}: {text.replace(str(path), name) if path else text}"


def routers_payload() -> list[dict[str, Any]]:
    """Every saved router file: ``name``, ``size_bytes``, ``modified`` and its header metadata.

    A file that cannot be read is listed with an ``error`` field rather than left out. Headers
    are read once per file version (cached by size and mtime) and at most
    :data:`~moe_sampler.router.model.MAX_HEADER_BYTES` each; concurrent requests wait for one
    listing and share its cache instead of all reading the files.
    """
    from . import paths

    routers = []
    with _listing_lock:
        seen = set()
        for name in paths.router_names():
            if name == paths.BUILTIN_ROUTER:
                continue
            entry: dict[str, Any] = {"name": name}
            path = None
            try:
                path = paths.resolve_router(name)
                status = os.stat(path)
                key = (status.st_size, status.st_mtime_ns)
                seen.add(str(path))
                cached = _listing.get(str(path))
                if cached is None or cached[0] != key:
                    cached = _listing[str(path)] = (key, _router_metadata(path, name))
                entry.update(size_bytes=status.st_size,
                             modified=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(status.st_mtime)))
                entry.update(cached[1])
            except Exception as exc:  # one bad file must not hide the others
                entry["error"] = _public_error(exc, path, name)
            routers.append(entry)
        for gone in set(_listing) - seen:
            del _listing[gone]
    return routers


def stats_for_router(router: str | None, source: str | None = None, size: str | None = None,
                     model: str | None = None) -> dict[str, Any]:
    """The stats payload of the process-wide store for a router filter and the source, size and
    model filters (see :func:`moe_sampler.stats.filters.stats_payload`)."""
    from ..stats import filters
    from . import paths

    return filters.stats_payload(paths.stats_store(), router, source, model, size)


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
            logger.exception("MoE route %s failed", builder.__name__)  # the details (and paths) stay in the log
            return web.json_response({"error": f"{type(exc).__name__}; see the server log"}, status=500)

    @routes.get(f"{PREFIX}/stats")
    async def get_stats(request: web.Request) -> web.Response:
        return await answer(stats_for_router, request.query.get("router"), request.query.get("source"),
                            request.query.get("size"), request.query.get("model"))

    @routes.get(f"{PREFIX}/routers")
    async def get_routers(request: web.Request) -> web.Response:
        return await answer(routers_payload)

    @routes.get(f"{PREFIX}/experts")
    async def get_experts(request: web.Request) -> web.Response:
        return await answer(experts_payload)

    @routes.get(f"{PREFIX}/labels")
    async def get_labels(request: web.Request) -> web.Response:
        return web.json_response(report.LABELS)

    _registered = True
    return True
