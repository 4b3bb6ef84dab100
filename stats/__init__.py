"""The stats store and what users see of it: run records, scores, charts, labels and tables.

Standard library; Pillow, numpy and torch only in the charts module. No ComfyUI.

- :mod:`.records`: :class:`RunRecord` (one run), :class:`ExpertStats` (one expert's aggregates), the scores.
- :mod:`.store`: :class:`StatsStore` (one interface: migrations, background writer with retry,
  health, exports) over :mod:`.sqlite_store` (the default file) or :mod:`.postgres_store` (a
  shared server, by URL; psycopg 3 optional); :mod:`.backend` is what a backend provides.
- :mod:`.charts`: per-expert bar chart and line charts as PIL images.
- :mod:`.report`: the router labels, the stats payload and its text table.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RunRecord": ".records",
    "ExpertStats": ".records",
    "StatsStore": ".store",
    "StatsStoreError": ".store",
    "default_store_path": ".store",
    "expert_stats_chart": ".charts",
    "line_chart": ".charts",
    "stats_payload": ".report",
    "stats_text": ".report",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
