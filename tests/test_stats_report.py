"""What users see of the stats: the text table, the router labels and the stats filter check.

Moved from the training-node tests when the stats got their own package (``stats/report.py``)
and the filter check went to ``nodes/paths.py`` beside the other name checks.
"""

from __future__ import annotations

import pytest

from helpers import import_node_module

from moe_sampler.stats import report  # noqa: E402

paths = import_node_module("paths")


def _entry(name, runs=3, **values):
    fields = dict(quality_score=0.5, speed_score=1.0, efficiency_score=0.5, success_rate=1.0, mean_confidence=0.8,
                  mean_nfe=20.0, mean_seconds=1.5)
    fields.update(values)
    return {"expert": name, "runs": runs, **fields}


def test_stats_text_table():
    payload = {"router": None, "runs": 5, "healthy": True, "problem": None,
               "experts": [_entry("BalancedMaster"), _entry("euler/karras/24", runs=2, quality_score=None,
                                                           mean_confidence=None)]}
    text = report.stats_text(payload)
    lines = text.splitlines()
    assert lines[0] == "MoE stats (all routers): 5 runs"
    assert lines[2].split() == ["BalancedMaster", "3", "0.50", "1.00", "0.50", "100%", "80%", "20.0", "1.50"]
    assert lines[3].split()[:3] == ["euler/karras/24", "2", "n/a"] and "n/a" in lines[3].split()[6]
    assert "no runs recorded yet" in report.stats_text({"router": "x.safetensors", "experts": [], "healthy": True})
    unhealthy = report.stats_text({"router": None, "experts": [], "healthy": False, "problem": "disk on fire"})
    assert "unavailable" in unhealthy and "disk on fire" in unhealthy


@pytest.mark.parametrize("value", ["(all)", "(built-in default)", "default", "manual", "my_router.safetensors",
                                   "sub/my_router.safetensors"])
def test_stats_router_filter_accepts(value):
    assert paths.check_router_filter(value) == value


@pytest.mark.parametrize("value", ["../x.safetensors", "/etc/x.safetensors", "a\\b.safetensors", "x.pt", "", None])
def test_stats_router_filter_refuses_paths(value):
    with pytest.raises(ValueError, match="^router:"):
        paths.check_router_filter(value)


def test_router_filter_maps_the_dropdown_to_store_labels():
    assert report.router_filter(None) is None and report.router_filter("(all)") is None
    assert report.router_filter("(built-in default)") == "default"
    assert report.router_filter("x.safetensors") == "x.safetensors"


def test_stats_payload_problem_names_no_folder():
    # issue 9, defect 7: the stats payload goes out over HTTP; an OSError names the store by its path
    class Unreadable:
        problem = None

        def expert_stats(self, router=None):
            raise PermissionError(13, "Permission denied", "/srv/comfy/user/__moe_sampler/stats.sqlite3")

    payload = report.stats_payload(Unreadable())
    assert payload["healthy"] is False
    assert "stats.sqlite3" in payload["problem"] and "/srv/comfy" not in payload["problem"]
