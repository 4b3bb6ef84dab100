"""``python -m moe_sampler demo`` and ``experts`` run, write the store, chart and router, exit 0."""

from __future__ import annotations

from PIL import Image

from moe_sampler.cli import main
from moe_sampler.router.model import Router
from moe_sampler.stats.store import StatsStore


def test_demo_trains_routes_and_writes_store_and_chart(tmp_path, capsys):
    assert main(["demo", "--episodes", "2", "--contexts", "2", "--home", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "chosen expert" in out and "best fixed expert" in out and "training router [" in err
    store_path, chart_path = tmp_path / "stats.sqlite3", tmp_path / "demo_expert_stats.png"
    assert f"stats store: {store_path}" in out and f"chart:       {chart_path}" in out
    with Image.open(chart_path) as chart:
        assert chart.size[0] > 100
    store = StatsStore(store_path)
    runs = store.runs()
    store.close()
    assert sum(r.source == "training" for r in runs) == 2 * 5
    routed = [r for r in runs if r.source == "sampling"]
    assert len(routed) == 2 and all(r.confidence is not None and r.propensity == 1.0 for r in routed)
    assert Router.load(tmp_path / "routers" / "demo.safetensors").training["contexts"] == 2


def test_experts_command_lists_the_registry(capsys):
    assert main(["experts"]) == 0
    out = capsys.readouterr().out
    for name in ("QualityMaster", "SpeedDemon", "BalancedMaster", "EarlyStopper", "NoiseAdaptive", "FastSampler"):
        assert name in out
