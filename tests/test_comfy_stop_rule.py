"""One stop-rule mechanism inside a real ComfyUI (``COMFYUI_PATH``): EarlyStopper and the same solver
built through the MoE Expert node (ComfyUI's own ``sample_dpmpp_2m``, ``stop_rule="converged"``)
stop at the same step with the same report fields; through the sampling bridge on the tiny
checkpoint both carry the fidelity estimate into the run's attempt.

Run: ``COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/test_comfy_stop_rule.py -q``
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def env(tiny_comfy):
    from moe_sampler.nodes import bridge, sampler_nodes

    return dict(tiny_comfy, bridge=bridge, nodes=sampler_nodes)


def moe_expert_node(env, sampler_name: str, scheduler: str, steps: int, stop_rule: str):
    """The expert that the MoE Expert node outputs for these widget values."""
    return env["nodes"].MoEExpert.execute(sampler_name, scheduler, steps, stop_rule).result[0]


@pytest.mark.parametrize("cond, cfg", [(0, 1.0), (1, 5.0), (0, 9.0)])
def test_early_stopper_and_moe_expert_node_stop_at_the_same_step(env, cond, cfg):
    from moe_sampler.experts import get_expert
    from moe_sampler.experts.analytic import AnalyticModel, PromptSpec

    model = AnalyticModel([PromptSpec(seed=3, n_modes=4, separation=1.5), PromptSpec(seed=8, anisotropy=10.0)])
    early = get_expert("EarlyStopper")
    node_expert = moe_expert_node(env, "dpmpp_2m", "karras", early.descriptor.steps, "converged")
    sigmas = early.sigmas(model.schedule()).double()
    x = model.initial_noise(2, seed=1, sigma=float(sigmas[0]), dtype=torch.float64)
    reports, outs = [], []
    for expert in (early, node_expert):
        report: dict = {}
        outs.append(expert(model, x.clone(), sigmas, extra_args={"cond": cond, "cfg": cfg}, disable=True,
                           report=report))
        reports.append(report)
    a, b = reports
    assert a["stopped_early"] and b["stopped_early"]
    assert a["steps"] == b["steps"] == a["nfe"] == b["nfe"] < early.descriptor.steps
    assert set(a) == set(b)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-9)
    assert a["error_estimate"] == pytest.approx(b["error_estimate"], rel=1e-6)


def test_both_paths_carry_the_estimate_through_the_bridge(env):
    from moe_sampler.experts import get_expert

    early = get_expert("EarlyStopper")
    node_expert = moe_expert_node(env, "dpmpp_2m", "karras", early.descriptor.steps, "converged")
    attempts = []
    for expert in (early, node_expert):
        _, report = env["bridge"].sample_with_expert(env["model"], expert, env["positive"], env["negative"],
                                                     {"samples": torch.zeros(1, 4, 8, 8)}, 7, 6.5)
        attempts.append(report.final)
    a, b = attempts
    assert (a.steps, a.stopped_early, a.nfe) == (b.steps, b.stopped_early, b.nfe)
    # the same method from two implementations: equal to 1e-3 in float32, to 1e-2 in half precision (a GPU)
    rel = 1e-3 if env["model"].model_dtype() == torch.float32 else 1e-2
    assert a.error_estimate is not None and a.error_estimate == pytest.approx(b.error_estimate, rel=rel)
    assert a.estimate_inputs["cfg"] == b.estimate_inputs["cfg"] == 6.5
