"""The pack on a CUDA GPU inside a real ComfyUI (``COMFYUI_PATH``), in-process, on the tiny
SD1.5-family checkpoint: every expert's sampling loop, parity with core KSampler, the learning
loop's estimate and audit, and the stats rows.

ComfyUI picks its device once per process, when ``comfy.model_management`` is imported, so these
tests run only with ``MOE_SAMPLER_DEVICE=cuda`` (conftest imports ComfyUI on the GPU then; without
it they are skipped, as on a machine without CUDA):

    MOE_SAMPLER_DEVICE=cuda COMFYUI_PATH=/path/to/ComfyUI python -m pytest -m gpu tests -q
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.comfyui]

CFG = 6.5


@pytest.fixture(scope="module")
def env(tiny_comfy):
    import comfy.model_management

    from moe_sampler.nodes import comfy_experts, online_learning, sampler_nodes

    device = comfy.model_management.get_torch_device()
    assert device.type == "cuda", f"ComfyUI runs on {device}; these tests need MOE_SAMPLER_DEVICE=cuda"
    return dict(tiny_comfy, comfy_experts=comfy_experts, online=online_learning, nodes=sampler_nodes)


def latent(batch: int = 1, size: int = 8) -> dict:
    return {"samples": torch.zeros(batch, 4, size, size)}


def adaptive(env, store, seed=7, **kw):
    return env["nodes"].run_adaptive(env["model"], env["positive"], env["negative"], kw.pop("latent", latent()),
                                     seed, CFG, store=store, preview=False, **kw)


def ksampler(env, sampler, scheduler, steps, seed=7):
    import nodes

    return nodes.common_ksampler(env["model"], seed, steps, CFG, sampler, scheduler, env["positive"],
                                 env["negative"], latent())[0]["samples"]


def test_the_model_runs_on_the_gpu(env):
    import comfy.model_management

    model = env["model"]
    comfy.model_management.load_models_gpu([model])
    assert model.load_device.type == "cuda"
    assert next(model.model.diffusion_model.parameters()).device.type == "cuda"


@pytest.mark.parametrize("name", ["QualityMaster", "SpeedDemon", "BalancedMaster", "EarlyStopper", "NoiseAdaptive",
                                  "DefaultAdaptiveSampler", "FastSampler", "QualitySampler"])
def test_every_expert_samples_on_the_gpu(env, store, name):
    from moe_sampler.experts import get_expert

    run = adaptive(env, store, mode=name, latent=latent(batch=2), expert_pool=(get_expert(name),))
    samples = run.latent["samples"]
    assert samples.shape == (2, 4, 8, 8)
    assert torch.isfinite(samples).all(), f"{name} returned non-finite values on the GPU"
    assert samples.abs().max().item() > 0
    assert not run.report.fallback, [a.expert for a in run.report.attempts]
    assert run.report.expert == name and run.report.nfe > 0
    store.flush(10)
    rows = store.runs()
    assert len(rows) == 1 and rows[0].expert == name and rows[0].nfe == run.report.nfe


def test_forced_custom_expert_equals_ksampler_on_the_gpu(env, store):
    expert = env["comfy_experts"].expert_from_comfy("euler", "normal", 5)
    run = adaptive(env, store, mode=expert.name, expert_pool=(expert,))
    assert torch.equal(run.latent["samples"], ksampler(env, "euler", "normal", 5))


def test_balanced_master_matches_ksampler_on_the_gpu(env, store):
    reference = ksampler(env, "dpmpp_2m", "karras", 20)
    run = adaptive(env, store, mode="BalancedMaster")
    difference = (run.latent["samples"] - reference).abs().max().item()
    # the same method and sigmas; the UNet runs in half precision on the GPU
    assert difference <= 2e-2 * reference.abs().max().item(), difference


def test_routed_run_with_an_audit_on_the_gpu(env, store, monkeypatch):
    from moe_sampler.experts.reference import AuditBudget

    monkeypatch.setattr(env["online"], "AUDIT_STEPS", 12)
    monkeypatch.setattr(env["online"], "_budget", AuditBudget(None))
    learner = env["online"].OnlineLearner(every=1000)
    first = adaptive(env, store, seed=3, router=env["online"].LEARNED_ROUTER, audit_rate=1.0, learner=learner)
    info = first.ui()["moe_run"][0]
    assert info["audited"] and info["audit"]["nfe"] >= 12 and 0 <= info["audit"]["quality"] <= 1
    assert 0 <= info["estimate"]["quality"] <= 1
    again = adaptive(env, store, seed=3, router=env["online"].LEARNED_ROUTER, audit_rate=0.0, learner=learner)
    assert torch.equal(first.latent["samples"], again.latent["samples"])  # the audit leaves the output alone
    store.flush(10)
    rows = store.runs()
    assert [r.quality_source for r in rows].count("audit") == 1
    audited = next(r for r in rows if r.quality_source == "audit")
    details = audited.details_dict()
    assert details["true_error"] > 0 and details["estimate"]["estimate"] == pytest.approx(audited.error_estimate,
                                                                                          rel=1e-5)
