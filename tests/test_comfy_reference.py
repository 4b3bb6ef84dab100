"""The training and audit reference inside a real ComfyUI (``COMFYUI_PATH``), on the tiny
SD1.5-family checkpoint: the Dormand-Prince loop runs through the bridge (``KSAMPLER``, CFG,
ComfyUI's noise), stays within its call cap, converges to what core's samplers converge to,
lets the user interrupt it, and the sampler's audit uses it.

Run: ``COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/test_comfy_reference.py -q``
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfyui

CFG = 6.5
SEED = 7


@pytest.fixture(scope="module")
def env(tiny_comfy):
    from moe_sampler.nodes import bridge, comfy_environment, online_learning

    return dict(tiny_comfy, bridge=bridge, environment=comfy_environment, online=online_learning)


def _latent() -> dict:
    return {"samples": torch.zeros(1, 4, 8, 8)}


def _reference(env, reference_steps=25, notes=None, callback=None):
    expert = env["environment"].reference_expert(reference_steps, notes)
    with torch.inference_mode():
        return env["bridge"].sample_with_expert(env["model"], expert, env["positive"], env["negative"], _latent(),
                                                seed=SEED, cfg=CFG, preview=False, disable_pbar=True, fallback=None,
                                                callback=callback)


def _ksampler(env, steps: int) -> torch.Tensor:
    import nodes

    return nodes.common_ksampler(env["model"], SEED, steps, CFG, "dpmpp_2m", "karras", env["positive"],
                                 env["negative"], _latent())[0]["samples"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).square().mean().sqrt() / b.double().square().mean().sqrt())


def test_reference_runs_through_comfyui_within_its_budget_and_converges(env):
    notes: list = []
    latent, report = _reference(env, 25, notes)
    samples = latent["samples"]
    assert samples.shape == (1, 4, 8, 8) and torch.isfinite(samples).all()
    assert report.expert == "Reference" and 0 < report.nfe <= 100 and not report.fallback
    # The tiny checkpoint is a discrete-time model (ComfyUI rounds sigma to its trained levels), so
    # step control rarely finishes within the budget; the run still ends at sigma_min.
    (note,) = notes
    assert note["calls"] == report.nfe and note["steps"] == report.steps
    assert note["sigma_reached"] == pytest.approx(float(env["model"].get_model_object("model_sampling").sigma_min))
    # With the default budget (400 calls) the reference is closer to core's dpmpp_2m at 200 steps
    # than dpmpp_2m at 10 steps is. (This random tiny model's ODE is rough: its jumps between
    # trained levels are large, so 100 calls are too few here; 1,000 calls agree with 200 steps
    # of dpmpp_2m to 0.6%, measured once.)
    default, _ = _reference(env, env["environment"].REFERENCE_STEPS)
    fine, coarse = _ksampler(env, 200), _ksampler(env, 10)
    assert _rel(default["samples"], fine) < _rel(coarse, fine), (_rel(default["samples"], fine), _rel(coarse, fine))


def test_a_capped_reference_ends_early_and_says_so(env, caplog):
    notes: list = []
    with caplog.at_level("WARNING"):
        latent, report = _reference(env, 2, notes)  # at most 8 model calls
    assert report.nfe <= 8 and torch.isfinite(latent["samples"]).all()
    assert notes[-1]["capped"] and "did not finish" in caplog.text


def test_the_user_can_interrupt_the_reference(env):
    import comfy.model_management as mm

    def interrupt(i, x0, x, total):
        if i == 1:
            mm.interrupt_current_processing(True)

    try:
        with pytest.raises(mm.InterruptProcessingException):
            _reference(env, 25, callback=interrupt)
    finally:
        mm.interrupt_current_processing(False)


def test_the_audit_scores_against_the_dormand_prince_reference(env):
    reference, _ = _reference(env, env["environment"].REFERENCE_STEPS)
    with torch.inference_mode():
        audit = env["online"].run_audit(env["model"], env["positive"], env["negative"], _latent(), SEED, CFG, 1.0,
                                        reference["samples"])
    assert audit.error is None and 0 < audit.nfe <= 4 * env["environment"].REFERENCE_STEPS
    assert audit.relative_error < 1e-5 and audit.quality == 1.0
