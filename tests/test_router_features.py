"""The 64-value state: any conditioning width fits, every slot is scaled and keeps values beyond
its range distinct and ordered, it is deterministic across processes, and bad inputs get clear
errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_sampler.experts.analytic import AnalyticModel, PromptSpec
from moe_sampler.router.features import (
    ANALYTIC_FLAG_SLOT,
    PRIORITY_SLOT,
    PROMPT_STAT_SLOTS,
    STATE_DIM,
    soft,
    state_from_analytic,
    state_from_conditioning,
    with_priority,
)

ROOT = Path(__file__).resolve().parent.parent


def conditioning(width: int, seed: int = 0, tokens: int = 77, pooled: int | None = None, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    options = {"pooled_output": torch.randn(batch, pooled, generator=g) if pooled else None}
    return [[torch.randn(batch, tokens, width, generator=g), options]]


@pytest.mark.parametrize("width, pooled, latent, family", [
    (768, None, (1, 4, 64, 64), "eps"),
    (2048, 1280, (2, 4, 128, 96), "eps"),
    (4096, 768, (1, 16, 128, 128), "flow"),
])
def test_any_width_gives_a_bounded_64_value_state(width, pooled, latent, family):
    state = state_from_conditioning(conditioning(width, pooled=pooled), conditioning(width, seed=1), latent,
                                    cfg=7.0, denoise=1.0, model_family=family, priority=0.5)
    assert state.shape == (STATE_DIM,) and state.dtype == torch.float32
    assert torch.isfinite(state).all() and state.abs().max() < 2.0
    assert state[:20].abs().sum() > 1.0  # the projection carries the conditioning
    assert (state[20:28].abs().sum() > 0) == (pooled is not None)
    again = state_from_conditioning(conditioning(width, pooled=pooled), conditioning(width, seed=1), latent,
                                    cfg=7.0, denoise=1.0, model_family=family, priority=0.5)
    assert torch.equal(state, again)


def test_state_is_identical_in_a_fresh_process():
    code = (
        "import torch, sys; sys.path.insert(0, 'tests'); import conftest; "
        "from test_router_features import conditioning; "
        "from moe_sampler.router.features import state_from_conditioning as f; "
        "print(repr(f(conditioning(2048, pooled=1280), None, (1, 4, 128, 128), 5.0, 1.0, 'eps', 0.3).tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    here = state_from_conditioning(conditioning(2048, pooled=1280), None, (1, 4, 128, 128), 5.0, 1.0, "eps", 0.3)
    assert eval(out.stdout.strip()) == here.tolist()


def test_different_prompts_and_settings_give_different_states():
    base = dict(latent_shape=(1, 4, 64, 64), cfg=7.0, denoise=1.0, model_family="eps", priority=0.5)
    a = state_from_conditioning(conditioning(768, seed=0), None, **base)
    b = state_from_conditioning(conditioning(768, seed=5), None, **base)
    assert not torch.allclose(a[:20], b[:20])
    c = state_from_conditioning(conditioning(768, seed=0), None, **{**base, "cfg": 2.0, "model_family": "v"})
    assert torch.equal(a[:40], c[:40]) and not torch.equal(a[53:58], c[53:58])


def test_latent_as_tensor_or_comfy_dict_and_empty_negative():
    latent = torch.zeros(1, 4, 32, 48)
    a = state_from_conditioning(conditioning(768), [], latent, 7.0, 1.0, "eps", 0.5)
    b = state_from_conditioning(conditioning(768), None, {"samples": latent}, 7.0, 1.0, "eps", 0.5)
    assert torch.equal(a, b) and a[38] == 0.0
    assert a[49] > 0  # wider than tall


def test_analytic_state_sees_prompt_difficulty():
    model = AnalyticModel([PromptSpec(seed=1, n_modes=1, anisotropy=1.0),
                           PromptSpec(seed=2, n_modes=16, anisotropy=30.0)])
    easy = state_from_analytic(model, 0, cfg=3.0, batch=1, priority=0.2)
    hard = state_from_analytic(model, 1, cfg=3.0, batch=1, priority=0.2)
    assert easy[ANALYTIC_FLAG_SLOT] == 1.0 and easy[:40].abs().sum() == 0
    assert hard[PROMPT_STAT_SLOTS][0] > easy[PROMPT_STAT_SLOTS][0]
    assert hard[PROMPT_STAT_SLOTS][4] > easy[PROMPT_STAT_SLOTS][4]
    assert easy.abs().max() <= 1.0 and easy[PRIORITY_SLOT] == pytest.approx(-0.6)
    assert with_priority(easy, 1.0)[PRIORITY_SLOT] == 1.0


def test_soft_scaling_is_the_identity_inside_and_strictly_increasing_beyond():
    z = torch.tensor([-1e6, -100.0, -3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 3.0, 100.0, 1e3, 1e5], dtype=torch.float64)
    out = soft(z)
    assert torch.equal(out[3:8], z[3:8])
    assert (out.diff() > 0).all() and out.abs().max() < 2.0
    assert (soft(z.float()).diff() > 0).all()  # distinct in float32 too, up to 1e6


def _slots(**setup):
    args = dict(latent_shape=(1, 4, 64, 64), cfg=7.0, denoise=1.0, model_family="eps", priority=0.5)
    args.update(setup)
    return state_from_conditioning(conditioning(768), None, **args)


@pytest.mark.parametrize("setting, values, slots", [
    ("cfg", [12.0, 16.0, 20.0, 30.0, 50.0, 100.0], [53, 54]),  # version 1 clamped cfg > 12 (slot 54)
    ("latent_shape", [(1, 16, 128, 128), (1, 32, 128, 128), (1, 64, 128, 128), (1, 128, 128, 128)], [50]),
    ("latent_shape", [(1, 4, 256, 256), (1, 4, 512, 512), (1, 4, 1024, 1024)], [48]),  # > 2^18 elements
    ("latent_shape", [(1, 4, 64, 256), (1, 4, 64, 512), (1, 4, 64, 2048)], [49]),  # aspect beyond 4:1
    ("latent_shape", [(16, 4, 64, 64), (64, 4, 64, 64), (256, 4, 64, 64)], [52]),  # batch beyond 16
])
def test_values_beyond_the_old_clamp_stay_distinct_and_ordered(setting, values, slots):
    states = torch.stack([_slots(**{setting: v}) for v in values])
    for slot in slots:
        column = states[:, slot]
        assert (column.diff() > 0).all(), f"slot {slot}: {column.tolist()}"
        assert column.abs().max() < 2.0
    assert states[-1, slots[0]] > 1.0  # beyond the range, where version 1 said 1.0


def test_conditioning_beyond_the_range_stays_distinct():
    base = conditioning(4096, tokens=256)
    long = [[torch.randn(1, 512, 4096, generator=torch.Generator().manual_seed(0)), {}]]
    wide = [[torch.randn(1, 77, 8192, generator=torch.Generator().manual_seed(0)), {}]]
    loud = [[base[0][0] * 1e4, {}]]
    a, b, c, d = (state_from_conditioning(p, None, (1, 4, 64, 64), 7.0, 1.0, "eps", 0.5)
                  for p in (base, long, wide, loud))
    assert 1.0 == a[35] < b[35] < 2.0  # 256 -> 512 tokens (T5's), clamped to 1 in version 1
    assert 1.0 == a[39] < c[39] < 2.0  # width 4096 -> 8192
    assert 1.0 < d[34] < 2.0 and d[34] > a[34]  # rms 1 -> 1e4


def test_analytic_prompt_statistics_beyond_the_range_stay_distinct():
    specs = [PromptSpec(seed=1, n_modes=16, anisotropy=30.0), PromptSpec(seed=1, n_modes=64, anisotropy=100.0),
             PromptSpec(seed=1, n_modes=256, anisotropy=1000.0)]
    model = AnalyticModel(specs)
    states = torch.stack([state_from_analytic(model, i, cfg=3.0, batch=1, priority=0.5) for i in range(3)])
    modes, anisotropy = states[:, PROMPT_STAT_SLOTS.start], states[:, PROMPT_STAT_SLOTS.start + 4]
    assert (modes.diff() > 0).all() and (anisotropy.diff() > 0).all() and anisotropy.max() < 2.0


@pytest.mark.parametrize("kwargs, error, match", [
    ({"priority": 1.5}, ValueError, "priority must be in"),
    ({"denoise": 0.0}, ValueError, "denoise must be in"),
    ({"cfg": float("nan")}, ValueError, "cfg must be"),
    ({"model_family": "sd3"}, ValueError, "model_family must be one of"),
    ({"source": "batch"}, ValueError, "source must be one of"),
    ({"positive": []}, ValueError, "positive conditioning is empty"),
    ({"positive": [[torch.zeros(77, 768), {}]]}, ValueError, r"\[B, tokens, width\]"),
    ({"positive": torch.zeros(1, 77, 768)}, TypeError, "conditioning list"),
    ({"latent_shape": (4,)}, ValueError, "latent shape"),
])
def test_invalid_inputs(kwargs, error, match):
    args = dict(positive=conditioning(768), negative=None, latent_shape=(1, 4, 64, 64), cfg=7.0, denoise=1.0,
                model_family="eps", priority=0.5)
    with pytest.raises(error, match=match):
        state_from_conditioning(**{**args, **kwargs})
