"""The "why this expert" data, text, chart and badge payload (nodes/why.py), without ComfyUI."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import import_node_module

why = import_node_module("why")
bridge = import_node_module("bridge")

from moe_sampler.experts import default_pool  # noqa: E402
from moe_sampler.router.model import Router  # noqa: E402
from moe_sampler.router.policy import choose  # noqa: E402


def _selection(priority: float = 0.5, temperature: float = 0.0, seed: int = 0):
    quality = torch.tensor([0.9, 0.5, 0.8])
    cost = torch.tensor([0.6, 0.3, 0.45])  # 64, 8, 22.6 model calls
    return choose(quality, cost, ["QualityMaster", "SpeedDemon", "BalancedMaster"], priority, temperature, seed)


def _report(nfe: int = 20, seconds: float = 2.0):
    attempt = bridge.Attempt(expert="BalancedMaster", outcome="ok", nfe=nfe, steps=nfe, seconds=seconds)
    return bridge.SamplingReport((attempt,), scheduled_steps=nfe, wall_seconds=seconds)


def test_explain_lists_every_pool_expert_with_expected_quality_calls_and_time():
    pool = [e for e in default_pool() if e.name in ("QualityMaster", "SpeedDemon", "BalancedMaster")]
    pool.sort(key=lambda e: ["QualityMaster", "SpeedDemon", "BalancedMaster"].index(e.name))
    selection = _selection()
    data = why.explain(selection, pool, 0.5, _report())
    assert [e["expert"] for e in data["experts"]] == ["QualityMaster", "SpeedDemon", "BalancedMaster"]
    assert [e["expected_calls"] for e in data["experts"]] == [64, 8, 23]
    assert [e["expected_quality"] for e in data["experts"]] == [0.9, 0.5, 0.8]
    # This run's speed (0.1 s per call) times the expected calls.
    assert data["experts"][0]["expected_seconds"] == pytest.approx(6.4)
    assert sum(e["picked"] for e in data["experts"]) == 1
    picked = next(e for e in data["experts"] if e["picked"])
    assert picked["expert"] == selection.expert
    assert data["lead"] > 0 and data["runner_up"] != selection.expert
    assert "expected quality" in data["summary"] and "model calls" in data["summary"]
    assert data["priority_words"] == "balanced"
    json.dumps(data)  # goes into ui, /history and PNG metadata


def test_priority_changes_the_pick_and_the_words():
    fast, slow = _selection(priority=0.0), _selection(priority=1.0)
    assert fast.expert == "SpeedDemon" and slow.expert == "QualityMaster"
    assert why.explain(fast, ["QualityMaster", "SpeedDemon", "BalancedMaster"], 0.0)["priority_words"] == "speed first"


def test_lead_words_and_exploration():
    assert why.lead_words(0.001) == "a near tie" and why.lead_words(0.05) == "a close call"
    assert why.lead_words(0.3) == "a clear lead" and why.lead_words(None).startswith("the only")
    # A high temperature can draw an expert that scored lower: the summary says so.
    for seed in range(40):
        selection = _selection(priority=0.5, temperature=5.0, seed=seed)
        data = why.explain(selection, ["QualityMaster", "SpeedDemon", "BalancedMaster"], 0.5)
        if data["lead"] < 0:
            assert "exploration" in data["summary"]
            break
    else:
        pytest.fail("no exploratory draw in 40 seeds")


def test_forced_run_has_no_ranking():
    data = why.explain(None, ["SpeedDemon"], 0.5, _report())
    assert data["forced"] and data["experts"] == [] and "forced" in data["summary"]


def test_settings_reproduce_the_expert():
    expert = next(e for e in default_pool() if e.name == "BalancedMaster")
    settings = why.settings(expert)
    assert settings["name"] == "BalancedMaster" and settings["steps"] == 20 and "solver" in settings
    assert "ksampler" not in settings


def test_router_info_names_version_and_learning_state():
    info = why.router_info(Router.default(), "default")
    assert info["label"] == "default" and "untrained" in info["learning"] and info["feature_version"] >= 1
    trained = Router(name="mine", training={"contexts": 12, "runs": 60})
    info = why.router_info(trained, "mine.safetensors")
    assert info["training"] == {"contexts": 12, "runs": 60} and "12 contexts" in info["learning"]


def test_chart_and_text():
    selection = _selection()
    data = why.explain(selection, ["QualityMaster", "SpeedDemon", "BalancedMaster"], 0.5, _report())
    run = {"expert": selection.expert, "nfe": 20, "seconds": 2.0, "router": "default", "fallback": False}
    image = why.why_chart(data, run)
    assert image.mode == "RGB" and image.width == 520 and 120 < image.height < 400
    lines = why.text_lines(data, run)
    assert len(lines) == 2 + 3 + 1 and lines[-1].startswith("ran:")
    forced = why.why_chart(why.explain(None, ["SpeedDemon"], 0.5), run)
    assert forced.height > 50


def test_badge_carries_why_and_the_table():
    selection = _selection()
    data = why.explain(selection, ["QualityMaster", "SpeedDemon", "BalancedMaster"], 0.5, _report())
    ui = bridge.badge(_report(), selection, "default", why=data)
    assert ui["moe_run"][0]["why"] is data
    text = ui["text"][0]
    assert "model calls" in text and "QualityMaster" in text and "SpeedDemon" in text


def test_the_stats_row_of_the_pick_carries_the_why():
    pool = [e for e in default_pool() if e.name in ("QualityMaster", "SpeedDemon", "BalancedMaster")]
    selection = Router.default().select(torch.zeros(64), pool, priority=0.5)
    picked = pool[selection.index]
    details = why.record_details(selection, pool, 0.5, why.router_info(Router.default(), "default"), picked)
    attempts = [bridge.Attempt(expert="NaNExpert", outcome="non_finite", nfe=3, steps=3, seconds=0.1),
                bridge.Attempt(expert="BalancedMaster", outcome="ok", nfe=20, steps=20, seconds=1.0)]
    first, fallback = bridge.run_records(attempts, state=None, selection=selection, router="default", priority=0.5,
                                         seed=3, details=details)
    stored = first.details_dict()
    assert [e["expert"] for e in stored["experts"]] == [e.name for e in pool]
    assert stored["settings"]["name"] == picked.name and stored["router"]["label"] == "default"
    assert fallback.details is None  # the fallback run was not the router's choice
