"""The stats node (V3): MoE Stats, per-expert statistics from the stats store as a chart and a table.

The node id is frozen (saved workflows refer to it). The work is in :func:`stats_report`, which
tests call directly; the labels, payload and table are :mod:`moe_sampler.stats.report`'s.
"""

from __future__ import annotations

import os
import time
from typing import Any

from comfy_api.latest import io

from ..stats import filters, report
from . import paths, routes

CATEGORY = "sampling/moe"
ROUTER_TOOLTIP = ("Which runs to summarise: '(all)', the built-in default router, a saved router file, or "
                  "'manual' (runs whose expert was forced).")
SOURCE_TOOLTIP = ("Which kind of runs: 'sampling' (your generations), 'training' (MoE Router Trainer), 'audit' "
                  "(reference runs that measured a generation's quality), 'benchmark', or '(all)'. Kinds differ "
                  "in size and settings, so their times do not compare.")
SIZE_TOOLTIP = ("Only runs of this image size (the side of a square of the same area: 512x768 counts as about "
                "512 px). Time and speed only compare between runs of similar size.")
MODEL_TOOLTIP = "Connect a MODEL to summarise only the runs made with that model (any LoRA on top counts as it)."


def stats_filter_options() -> list[str]:
    """MoE Stats dropdown: all, the built-in router, every saved router, forced runs."""
    return [report.ALL_ROUTERS, *paths.router_names(), report.MANUAL_ROUTER]


def stats_report(router: str = report.ALL_ROUTERS, source: str | None = None, size: str | None = None,
                 model: str | None = None) -> tuple[Any, str, dict]:
    """``(chart PIL image, text table, JSON payload)`` for the filters (:mod:`moe_sampler.stats.filters`);
    the table ends with what was averaged."""
    from ..stats.charts import expert_stats_chart
    from ..stats.records import ExpertStats

    payload = routes.stats_for_router(router, source, size, model)
    stats = [ExpertStats(**entry) for entry in payload["experts"]]
    title = f"MoE experts: {payload['averaged']}"
    return expert_stats_chart(stats, title=title), f"{report.stats_text(payload)}\nAveraged over {payload['averaged']}", payload


def _store_fingerprint() -> Any:
    target = paths.stats_store_target()
    if target != str(paths.stats_store_path()):  # a database server: no file tells when it changed
        return ("database", time.time())
    # Its health changes without the files changing (another process's lock, runs held in memory);
    # health() takes ~1 ms, or 0.25 s while the store is locked.
    store = paths.stats_store()
    path = paths.stats_store_path()
    stamps = [tuple(store.health().values())]
    for candidate in (path, path.with_name(path.name + "-wal")):
        try:
            stat = os.stat(candidate)
            stamps.append((stat.st_mtime_ns, stat.st_size))
        except OSError:
            stamps.append(None)
    return tuple(stamps)


class MoEStats(io.ComfyNode):
    """Per-expert statistics from the stats store, as a chart and a table."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MoEStats",
            display_name="MoE Stats",
            category=CATEGORY,
            description="Shows how each expert has done so far (quality, speed, efficiency, success rate, router "
                        "confidence, model calls, time) from the runs recorded in the stats store.",
            inputs=[io.Combo.Input("router", options=stats_filter_options(), default=report.ALL_ROUTERS,
                                   tooltip=ROUTER_TOOLTIP),
                    # Optional, so that API prompts written before these filters still run.
                    io.Combo.Input("source", options=list(filters.SOURCE_CHOICES), default="sampling",
                                   optional=True, tooltip=SOURCE_TOOLTIP),
                    io.Combo.Input("size", options=list(filters.SIZE_CHOICES), default=filters.ALL_SIZES,
                                   optional=True, tooltip=SIZE_TOOLTIP),
                    io.Model.Input("model", optional=True, tooltip=MODEL_TOOLTIP)],
            outputs=[io.Image.Output("chart", tooltip="Bar chart of the per-expert scores."),
                     io.String.Output("table", tooltip="The same numbers as a text table.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, router=None, source=None, size=None) -> bool | str:
        # Named here, the router skips the dropdown check: API prompts may name any recorded router.
        try:
            if router is not None:
                paths.check_router_filter(router)
            filters.check_source(source)
            filters.check_size(size)
        except ValueError as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, router=None, source=None, size=None, **kwargs) -> Any:
        # The store changes under the same inputs: re-run whenever its files changed.
        return (router, source, size, _store_fingerprint())

    @classmethod
    def execute(cls, router, source="sampling", size=filters.ALL_SIZES, model=None) -> io.NodeOutput:
        from ..stats.charts import image_to_comfy_tensor
        from .online_learning import model_fingerprint

        key = None if model is None else model_fingerprint(model)
        chart, table, payload = stats_report(paths.check_router_filter(router), source, size, key)
        return io.NodeOutput(image_to_comfy_tensor(chart), table, ui={"text": [table], "moe_stats": [payload]})


NODES: list[type[io.ComfyNode]] = [MoEStats]
