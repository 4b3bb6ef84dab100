"""MoE Stats over comparable runs: source, model and image-size filters and what was averaged
(stats/filters.py), on a real SQLite store; no ComfyUI."""

from __future__ import annotations

import math

import pytest
import torch

from moe_sampler.router.features import state_from_conditioning
from moe_sampler.stats import filters
from moe_sampler.stats.records import RunRecord
from moe_sampler.stats.store import StatsStore


def _state(width: int, height: int, channels: int = 4) -> tuple[float, ...]:
    conditioning = [[torch.ones(1, 77, 768), {"pooled_output": None}]]
    shape = (1, channels, height // 8, width // 8)
    return tuple(float(v) for v in state_from_conditioning(conditioning, conditioning, shape, 7.0, 1.0, "eps", 0.5,
                                                           "interactive"))


@pytest.mark.parametrize(("width", "height", "band"), [
    (64, 64, "small (under 384 px)"), (512, 512, "about 512 px (384-767 px)"),
    (512, 768, "about 512 px (384-767 px)"), (1024, 1024, "about 1024 px (768-1535 px)"),
    (2048, 2048, "large (1536 px and up)")])
def test_the_size_band_comes_from_the_router_state(width, height, band):
    side = filters.image_side(_state(width, height))
    assert side == pytest.approx(math.sqrt(width * height), rel=0.02)
    assert filters.size_band(_state(width, height)) == band


def test_a_state_without_an_image_has_no_band():
    assert filters.size_band(None) is None and filters.image_side([0.0] * 64) is None


def _run(expert: str, seconds: float, size: tuple[int, int], source: str = "sampling", model: str | None = "sd15-a",
         router: str = "default") -> RunRecord:
    return RunRecord(expert=expert, router=router, nfe=20, steps=20, seconds=seconds, success=True, source=source,
                     quality=0.5, state=_state(*size), model=model)


@pytest.fixture()
def store(tmp_path):
    with StatsStore(tmp_path / "stats.sqlite3") as store:
        for run in [_run("A", 4.0, (512, 512)), _run("A", 0.1, (64, 64)), _run("B", 2.0, (512, 512)),
                    _run("A", 9.0, (512, 512), source="training", router="mine.safetensors"),
                    _run("B", 6.0, (1024, 1024), model="sdxl-b")]:
            assert store.record(run)
        yield store


def test_filters_keep_unlike_runs_apart(store):
    everything = filters.stats_payload(store)
    assert everything["runs"] == 5 and "mixes 3 image sizes" in everything["averaged"]
    small = filters.stats_payload(store, size="small (under 384 px)")
    assert small["runs"] == 1 and small["experts"][0]["mean_seconds"] == pytest.approx(0.1)
    sampling_512 = filters.stats_payload(store, source="sampling", size="about 512 px (384-767 px)")
    by_expert = {e["expert"]: e for e in sampling_512["experts"]}
    assert by_expert["A"]["runs"] == 1 and by_expert["A"]["mean_seconds"] == pytest.approx(4.0)
    assert sampling_512["averaged"].startswith("2 runs: sampling, all routers, all models, about 512 px")
    assert "mixes" not in sampling_512["averaged"]
    sdxl = filters.stats_payload(store, model="sdxl-b")
    assert [e["expert"] for e in sdxl["experts"]] == ["B"] and "model sdxl-b" in sdxl["averaged"]
    training = filters.stats_payload(store, router="mine.safetensors", source="training")
    assert training["runs"] == 1 and training["filters"]["source"] == "training"


def test_bad_filter_values_name_the_input(store):
    with pytest.raises(ValueError, match="^source:"):
        filters.stats_payload(store, source="everything")
    with pytest.raises(ValueError, match="^size:"):
        filters.stats_payload(store, size="huge")


def test_episode_axis_has_whole_numbers_only(monkeypatch):
    """x runs over episodes 1-3, y over -0.5 ... 0.1, so ticks above 0.5 are the x axis's."""
    from moe_sampler.stats import charts

    seen = []
    original = charts._tick_label
    monkeypatch.setattr(charts, "_tick_label", lambda value, step: seen.append(value) or original(value, step))
    series = {"pick": ([1, 2, 3], [-0.5, -0.2, 0.1])}
    charts.line_chart(series, xlabel="episode", integer_x=True)
    x_ticks = sorted({v for v in seen if v > 0.5})
    assert x_ticks == [1.0, 2.0, 3.0], x_ticks
    seen.clear()
    charts.line_chart(series, xlabel="episode")
    assert any(v != int(v) for v in seen if v > 0.5), "without integer_x the ticks of 3 episodes are fractional"
