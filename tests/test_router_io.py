"""Routers save as .safetensors with metadata, load back identically, and bad files get
clear errors that name the file (pickles are refused, never unpickled)."""

from __future__ import annotations

import json
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from moe_sampler.experts.analytic import AnalyticModel, random_prompts
from moe_sampler.experts.base import ExpertDescriptor
from moe_sampler.router.features import FEATURE_VERSION, state_from_analytic
from moe_sampler.router.model import Router, RouterLoadError

POOL = [ExpertDescriptor(name=f"e{steps}", solver="dpmpp_2m", order=2, calls_per_step=1, steps=steps,
                         schedule="karras", stochastic=False) for steps in (5, 10, 20, 40)]


def _trained_router() -> Router:
    router = Router(name="unit", training={"contexts": 12, "runs": 48}, descriptors=POOL)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in router.scorer.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return router


def test_round_trip_gives_identical_selections_and_metadata(tmp_path):
    router = _trained_router()
    path = router.save(tmp_path / "routers" / "unit.safetensors")
    loaded = Router.load(path)
    assert loaded.name == "unit" and loaded.training == {"contexts": 12, "runs": 48}
    assert loaded.descriptors == tuple(POOL) and loaded.created == router.created
    model = AnalyticModel(random_prompts(4, 0))
    for cond in range(4):
        for priority in (0.0, 0.3, 0.7, 1.0):
            state = state_from_analytic(model, cond, cfg=4.0, batch=1, priority=priority)
            for temperature, seed in ((0.0, None), (0.2, cond)):
                a = router.select(state, POOL, priority, temperature, seed)
                b = loaded.select(state, POOL, priority, temperature, seed)
                assert (a.index, a.probabilities, a.utilities, a.confidence) == \
                       (b.index, b.probabilities, b.utilities, b.confidence)
    assert not list(path.parent.glob("*.tmp"))
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle


def test_missing_file(tmp_path):
    with pytest.raises(RouterLoadError, match=r"router file .*nope\.safetensors does not exist"):
        Router.load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("content", [b"", b"garbage bytes that are not a header", b"\xff" * 64])
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(RouterLoadError, match=r"bad\.safetensors is not a valid safetensors router file"):
        Router.load(path)


def test_truncated_file(tmp_path):
    path = _trained_router().save(tmp_path / "cut.safetensors")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(RouterLoadError, match="cut.safetensors is not a valid safetensors"):
        Router.load(path)


def test_other_feature_version(tmp_path):
    router = _trained_router()
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in router.scorer.state_dict().items()}, str(path),
              metadata={"format": "moe_sampler.router", "feature_version": str(FEATURE_VERSION + 41), "name": "old"})
    with pytest.raises(RouterLoadError) as info:
        Router.load(path)
    message = str(info.value)
    assert f"router 'old' ({path}) was trained for feature version {FEATURE_VERSION + 41}" in message
    assert f"this pack uses {FEATURE_VERSION}; retrain it" in message


def test_safetensors_that_is_not_a_router(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"ss_network_dim": "4"})
    with pytest.raises(RouterLoadError, match="lora.safetensors is a safetensors file but not a MoE router"):
        Router.load(path)


def test_router_with_foreign_weights(tmp_path):
    path = tmp_path / "wide.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "moe_sampler.router",
                                                          "feature_version": str(FEATURE_VERSION)})
    with pytest.raises(RouterLoadError, match="wide.safetensors: weights do not fit"):
        Router.load(path)


def test_pickles_are_refused_not_loaded(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "router.pt"
    # A pickle that would create a file if anything unpickled it.
    payload = pickle.dumps(_Evil(str(marker)))
    path.write_bytes(payload)
    with pytest.raises(RouterLoadError, match="router.pt looks like a pickle/torch.save file"):
        Router.load(path)
    zipped = tmp_path / "router.ckpt"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("archive/data.pkl", payload)
    with pytest.raises(RouterLoadError, match="router.ckpt looks like a pickle/torch.save file"):
        Router.load(zipped)
    assert not marker.exists()


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_metadata_is_plain_json(tmp_path):
    from safetensors import safe_open

    path = _trained_router().save(tmp_path / "r.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["feature_version"] == str(FEATURE_VERSION)
    assert [d["name"] for d in json.loads(meta["experts"])] == [d.name for d in POOL]
    assert json.loads(meta["training"]) == {"contexts": 12, "runs": 48}
