"""The sampler nodes inside a real ComfyUI (``COMFYUI_PATH``), in-process, on the tiny SD1.5-family
checkpoint: parity with core KSampler, latents kept intact, eps/v/flow models, LoRA patches,
progress, interruption, bad inputs and the NaN fallback.

Run: ``COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/test_comfy_sampling.py -q``
"""

from __future__ import annotations

import math
import time

import pytest
import torch

pytestmark = pytest.mark.comfyui

STEPS = 5  # custom experts: enough steps to compare, few enough for a 2-core CPU
CFG = 6.5


@pytest.fixture(scope="module")
def env(tiny_comfy):
    """ComfyUI, the tiny checkpoint and prompts (conftest's ``tiny_comfy``) and the pack's node modules."""
    from moe_sampler.nodes import bridge, comfy_experts, paths, sampler_nodes

    return dict(tiny_comfy, bridge=bridge, comfy_experts=comfy_experts, paths=paths, nodes=sampler_nodes)


def empty_latent(batch: int = 1) -> dict:
    return {"samples": torch.zeros(batch, 4, 8, 8)}


def ksampler(env, sampler, scheduler, steps, latent, seed=7, denoise=1.0, model=None):
    import nodes

    out = nodes.common_ksampler(model or env["model"], seed, steps, CFG, sampler, scheduler, env["positive"],
                                env["negative"], latent, denoise=denoise)
    return out[0]


def adaptive(env, latent, seed=7, store=None, model=None, **kw):
    return env["nodes"].run_adaptive(model or env["model"], env["positive"], env["negative"], latent, seed, CFG,
                                     store=store, **kw)


def solver_tolerance(env) -> float:
    """How close two implementations of one method stay: 1e-4 in float32 (the CPU); in half
    precision (a GPU) the UNet's rounding of slightly different inputs reaches about 2e-3."""
    return 1e-4 if env["model"].model_dtype() == torch.float32 else 1e-2


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    scale = b.abs().max().item()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a - b).abs().max().item() <= rel * scale, f"max diff {(a - b).abs().max().item()} vs scale {scale}"


@pytest.fixture(scope="module")
def balanced_reference(env):
    """Core KSampler dpmpp_2m / karras / 20 steps, the configuration BalancedMaster re-implements."""
    return ksampler(env, "dpmpp_2m", "karras", 20, empty_latent())["samples"]


# ------------------------------------------------------------------------------ parity with core KSampler


def test_forced_custom_expert_equals_ksampler(env, store):
    expert = env["comfy_experts"].expert_from_comfy("euler", "normal", STEPS)
    run = adaptive(env, empty_latent(), store=store, mode=expert.name, expert_pool=(expert,))
    reference = ksampler(env, "euler", "normal", STEPS, empty_latent())["samples"]
    assert torch.equal(run.latent["samples"], reference)  # same sigmas, same sampler function, same noise
    assert run.forced and run.router == "manual"
    assert (run.report.nfe, run.report.steps) == (STEPS, STEPS)


def test_balanced_master_equals_ksampler_dpmpp_2m_karras(env, store, balanced_reference):
    from moe_sampler.experts import get_expert

    d = get_expert("BalancedMaster").descriptor
    assert (d.solver, d.steps, d.schedule) == ("dpmpp_2m", 20, "karras")
    run = adaptive(env, empty_latent(), store=store, mode="BalancedMaster")
    # Same method and sigmas; the pack's DPM-Solver++ computes its coefficients in float64.
    assert_close(run.latent["samples"], balanced_reference, rel=solver_tolerance(env))
    assert run.report.nfe == 20


@pytest.mark.parametrize("sampler, scheduler", [("dpm_2", "karras"), ("heun", "normal"), ("uni_pc", "simple")])
def test_custom_experts_follow_ksampler_schedules(env, sampler, scheduler):
    # dpm_2 and uni_pc drop the penultimate sigma in core KSampler; heun makes 2 calls per step.
    expert = env["comfy_experts"].expert_from_comfy(sampler, scheduler, 3)
    out, report = env["bridge"].sample_with_expert(env["model"], expert, env["positive"], env["negative"],
                                                   empty_latent(), 7, CFG)
    assert torch.equal(out["samples"], ksampler(env, sampler, scheduler, 3, empty_latent())["samples"])
    assert report.nfe <= expert.descriptor.max_nfe


def test_img2img_keeps_batch_index_and_noise_mask(env):
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, 4:] = 1.0
    latent = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)),
              "batch_index": [3, 7], "noise_mask": mask}
    expert = env["comfy_experts"].expert_from_comfy("ddim", "normal", 4)  # ddim: KSAMPLER inpaint option "random"
    out, report = env["bridge"].sample_with_expert(env["model"], expert, env["positive"], env["negative"], latent,
                                                   11, CFG, denoise=0.6)
    reference = ksampler(env, "ddim", "normal", 4, latent, seed=11, denoise=0.6)
    assert torch.equal(out["samples"], reference["samples"])
    assert out["batch_index"] == [3, 7] and out["noise_mask"] is mask
    assert set(latent) == {"samples", "batch_index", "noise_mask"}  # the input dict is untouched
    assert torch.allclose(out["samples"][..., :4], latent["samples"][..., :4])  # masked-out half kept
    assert not torch.allclose(out["samples"][..., 4:], latent["samples"][..., 4:])


def test_builtin_expert_img2img(env, store):
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))}
    run = adaptive(env, latent, store=store, mode="SpeedDemon", denoise=0.5)
    assert torch.isfinite(run.latent["samples"]).all()
    assert run.report.steps == get_descriptor("SpeedDemon").steps


def get_descriptor(name):
    from moe_sampler.experts import get_expert

    return get_expert(name).descriptor


# ------------------------------------------------------------------------------ model families and patches


@pytest.fixture(scope="module")
def family_models(env):
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete, ModelSamplingSD3

    model = env["model"]
    return {
        "eps": model,
        "v": ModelSamplingDiscrete().patch(model, "v_prediction", False)[0],
        "flow": ModelSamplingSD3().patch(model, 3.0)[0],
    }


@pytest.mark.parametrize("family", ["eps", "v", "flow"])
def test_model_families(env, store, family_models, family):
    model = family_models[family]
    bridge, comfy_experts = env["bridge"], env["comfy_experts"]
    assert comfy_experts.model_family(model) == family
    run = adaptive(env, empty_latent(), store=store, model=model, mode="SpeedDemon")
    assert torch.isfinite(run.latent["samples"]).all() and run.latent["samples"].abs().max() > 0
    expert = comfy_experts.expert_from_comfy("euler", "simple", 3)
    out, _ = bridge.sample_with_expert(model, expert, env["positive"], env["negative"], empty_latent(), 7, CFG)
    assert torch.equal(out["samples"], ksampler(env, "euler", "simple", 3, empty_latent(), model=model)["samples"])
    assert comfy_experts.model_family(env["model"]) == "eps"  # the patches cloned the model


def test_lora_patch_flows_through(env):
    import comfy.sd

    key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    g = torch.Generator().manual_seed(0)
    lora = {f"{key}.lora_up.weight": torch.randn(320, 4, generator=g) * 0.5,
            f"{key}.lora_down.weight": torch.randn(4, 768, generator=g) * 0.5,
            f"{key}.alpha": torch.tensor(4.0)}
    patched, _ = comfy.sd.load_lora_for_models(env["model"], None, lora, 1.0, 0.0)
    expert = env["comfy_experts"].expert_from_comfy("euler", "normal", 3)
    run = lambda m: env["bridge"].sample_with_expert(m, expert, env["positive"], env["negative"],  # noqa: E731
                                                     empty_latent(), 7, CFG)[0]["samples"]
    with_lora, without = run(patched), run(env["model"])
    assert not torch.allclose(with_lora, without)
    assert torch.equal(with_lora, ksampler(env, "euler", "normal", 3, empty_latent(), model=patched)["samples"])
    assert torch.equal(without, run(env["model"]))  # the base model was not modified


# ------------------------------------------------------------------------------ progress and interruption


def test_progress_fires_once_per_step(env):
    import comfy.utils

    updates, calls = [], []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
    try:
        expert = env["comfy_experts"].expert_from_comfy("heun", "karras", 4)
        env["bridge"].sample_with_expert(env["model"], expert, env["positive"], env["negative"], empty_latent(), 7,
                                         CFG, callback=lambda i, x0, x, total: calls.append((i, total)))
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert calls == [(i, 4) for i in range(4)]
    assert updates == [(i + 1, 4) for i in range(4)]


def test_interrupt_raises_and_leaves_the_store_intact(env, store):
    import comfy.model_management as mm

    expert = env["comfy_experts"].expert_from_comfy("euler", "normal", STEPS)
    for seed in (1, 2):
        adaptive(env, empty_latent(), seed=seed, store=store, expert_pool=(expert,))
    store.flush(10)
    before = store.runs()

    def interrupt(i, x0, x, total):
        if i == 1:
            mm.interrupt_current_processing(True)

    try:
        with pytest.raises(mm.InterruptProcessingException):
            adaptive(env, empty_latent(), seed=3, store=store, expert_pool=(expert,), callback=interrupt)
    finally:
        mm.interrupt_current_processing(False)
    store.flush(10)
    after = store.runs()
    assert store.healthy
    assert [r.seed for r in after[: len(before)]] == [1, 2] and after[: len(before)] == before
    (interrupted,) = after[len(before):]
    assert not interrupted.success and "interrupt" in interrupted.error and interrupted.seed == 3
    assert 1 <= interrupted.nfe < STEPS


# ------------------------------------------------------------------------------ faults and bad inputs


def test_nan_in_the_latent_names_latent_image(env, store):
    latent = empty_latent()
    latent["samples"][0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="^latent_image: "):
        adaptive(env, latent, store=store)
    store.flush(10)
    assert store.runs() == []


def test_nan_expert_falls_back_to_balanced_master(env, store, balanced_reference):
    from moe_sampler.experts.base import Expert, ExpertDescriptor
    from moe_sampler.experts.builtin import karras_schedule

    def nan_loop(model, x, sigmas, extra_args=None, callback=None, disable=None, report=None, **options):
        denoised = model(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
        if callback is not None:
            callback({"x": x, "i": 0, "sigma": sigmas[0], "sigma_hat": sigmas[0], "denoised": denoised})
        return x * math.nan

    broken = Expert(ExpertDescriptor(name="NaNExpert", solver="euler", order=1, calls_per_step=1, steps=2,
                                     schedule="karras", stochastic=False), nan_loop, karras_schedule)
    run = adaptive(env, empty_latent(), store=store, expert_pool=(broken,))
    assert run.report.fallback and run.report.expert == "BalancedMaster"
    assert torch.equal(run.latent["samples"], adaptive(env, empty_latent(), store=store, mode="BalancedMaster")
                       .latent["samples"])  # the rerun starts from the same noise
    assert_close(run.latent["samples"], balanced_reference, rel=solver_tolerance(env))
    ui = run.ui()["moe_run"][0]
    assert ui["fallback"] and ui["requested"] == "NaNExpert" and ui["expert"] == "BalancedMaster"
    store.flush(10)
    failed, fallback = store.runs()[:2]
    assert (failed.expert, failed.success, failed.nfe) == ("NaNExpert", False, 1) and "NaN" in failed.error
    assert failed.propensity == 1.0 and failed.confidence is not None
    assert (fallback.expert, fallback.success, fallback.propensity) == ("BalancedMaster", True, None)


def test_stats_store_failure_does_not_break_sampling(env, tmp_path):
    from moe_sampler.stats.store import StatsStore

    # A store that cannot be written at all (a file where its folder should be): sampling goes on,
    # the run is held in memory for a retry and counted as dropped when the store closes.
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the store's folder should be")
    broken = StatsStore(blocker / "stats.sqlite3", timeout=0.2)
    expert = env["comfy_experts"].expert_from_comfy("euler", "normal", 2)
    run = adaptive(env, empty_latent(), store=broken, expert_pool=(expert,))
    assert torch.isfinite(run.latent["samples"]).all()
    deadline = time.monotonic() + 10
    while broken.healthy and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not broken.healthy and broken.waiting >= 1
    broken.close()
    assert broken.dropped >= 1 and blocker.read_text() == "a file where the store's folder should be"
    # A file that is not a database (issue 9, defect 6): moved aside, a new store records the run.
    (tmp_path / "garbage.sqlite3").write_bytes(b"this is not a database" * 100)
    with StatsStore(tmp_path / "garbage.sqlite3") as replaced:
        adaptive(env, empty_latent(), store=replaced, expert_pool=(expert,))
        assert replaced.flush(10) and replaced.healthy and len(replaced.runs()) == 1
        assert "moved aside" in replaced.notice
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("garbage.sqlite3.damaged-")]
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not a database")


# ------------------------------------------------------------------------------ the nodes themselves


def test_sampler_node_execute(env):
    from moe_sampler.nodes.sampler_nodes import MoEAdaptiveSampler, MoEExpert, MoEExpertPool

    expert = MoEExpert.execute("euler", "karras", 3).args[0]
    pool = MoEExpertPool.execute(**{name: False for name in ("QualityMaster", "SpeedDemon")},
                                 expert_1=expert).args[0]
    assert [e.name for e in pool][-1] == "euler/karras/3" and "QualityMaster" not in [e.name for e in pool]
    out = MoEAdaptiveSampler.execute(env["model"], env["positive"], env["negative"], empty_latent(), 9, CFG, 0.0,
                                     env["paths"].BUILTIN_ROUTER, "euler/karras/3", 0.0, 1.0, pool)
    (info,) = out.ui["moe_run"]
    assert info["expert"] == "euler/karras/3" and info["forced"] and info["nfe"] == 3
    assert out.args[0]["samples"].shape == (1, 4, 8, 8)
    env["paths"].stats_store().flush(10)
    assert env["paths"].stats_store().runs(expert="euler/karras/3")


@pytest.mark.parametrize("kwargs, input_name", [
    (dict(mode="FastSampler"), "mode"),
    (dict(expert_pool=()), "expert_pool"),
    (dict(router="missing.safetensors"), "router"),
    (dict(router="../escape.safetensors"), "router"),
])
def test_sampler_errors_name_the_input(env, store, kwargs, input_name):
    with pytest.raises(ValueError, match=f"^{input_name}: "):
        adaptive(env, empty_latent(), store=store, **kwargs)


def test_corrupt_router_file_names_router(env, store):
    import folder_paths

    folder = folder_paths.get_folder_paths("moe_routers")[0]
    with open(f"{folder}/corrupt.safetensors", "wb") as f:
        f.write(b"\x00" * 32)
    from moe_sampler.router.model import RouterLoadError

    with pytest.raises(RouterLoadError, match="^router: "):
        adaptive(env, empty_latent(), store=store, router="corrupt.safetensors")


def test_trained_router_file_is_used_and_fingerprinted(env, store):
    import os

    import folder_paths
    from moe_sampler.nodes.sampler_nodes import MoEAdaptiveSampler
    from moe_sampler.router.model import Router

    path = os.path.join(folder_paths.get_folder_paths("moe_routers")[0], "mine.safetensors")
    Router(name="mine").save(path)
    assert "mine.safetensors" in env["paths"].router_names()
    expert = env["comfy_experts"].expert_from_comfy("euler", "normal", 2)
    run = adaptive(env, empty_latent(), store=store, router="mine.safetensors", expert_pool=(expert,))
    assert run.router == "mine.safetensors" and run.selection.propensity == 1.0
    before = MoEAdaptiveSampler.fingerprint_inputs(router="mine.safetensors")
    os.utime(path, (12345, 12345))
    assert MoEAdaptiveSampler.fingerprint_inputs(router="mine.safetensors") != before


def test_validate_inputs(env):
    from moe_sampler.nodes.sampler_nodes import MoEAdaptiveSampler

    # Only mode is checked here (router is checked by core against the dropdown: see
    # test_hardening.test_sampler_validation_messages_appear_once_under_their_input).
    assert MoEAdaptiveSampler.validate_inputs(mode="auto") is True
    assert MoEAdaptiveSampler.validate_inputs(mode="euler/normal/20") is True
    assert MoEAdaptiveSampler.validate_inputs(mode="../../x").startswith("mode: ")
    with pytest.raises(ValueError, match="^router: "):
        env["paths"].load_router("/etc/x.safetensors")


def test_expert_node_steps_zero_names_steps(env):
    from moe_sampler.nodes.sampler_nodes import MoEExpert

    with pytest.raises(ValueError, match="^steps: "):
        MoEExpert.execute("euler", "normal", 0)
    schema = MoEExpert.define_schema()
    assert next(i for i in schema.inputs if i.id == "steps").min == 1


def test_empty_pool_node_names_expert_pool(env):
    from moe_sampler.experts import expert_names
    from moe_sampler.nodes.sampler_nodes import MoEExpertPool

    with pytest.raises(ValueError, match="^expert_pool: "):
        MoEExpertPool.execute(**{name: False for name in expert_names(include_compat=True)})


def test_schemas(env):
    import comfy.samplers

    from moe_sampler.nodes import MoEExtension
    from moe_sampler.nodes.sampler_nodes import NODES

    ids = [node.define_schema().node_id for node in NODES]
    assert ids == ["MoEAdaptiveSampler", "MoEExpert", "MoEBuiltinExpert", "MoEExpertPool"]
    for node in NODES:
        schema = node.define_schema()
        assert schema.category == "sampling/moe" and schema.description
        missing = [i.id for i in schema.inputs if not i.tooltip]
        assert not missing, f"{schema.node_id}: inputs without a tooltip: {missing}"
        node.GET_SCHEMA()  # ComfyUI's own validation of the schema
    sampler = NODES[0].define_schema()
    assert next(i for i in sampler.inputs if i.id == "router").options[0] == "(built-in default)"
    assert set(comfy.samplers.SAMPLER_NAMES) <= set(env["comfy_experts"].COMFY_SOLVERS)
    assert issubclass(MoEExtension, object)


def test_converged_stop_rule_returns_a_prediction(env):
    expert = env["comfy_experts"].expert_from_comfy("euler", "karras", 12, "converged")
    out, report = env["bridge"].sample_with_expert(env["model"], expert, env["positive"], env["negative"],
                                                   empty_latent(), 7, CFG)
    assert torch.isfinite(out["samples"]).all()
    assert report.steps <= 12 and report.final.stop_rule == "converged"
    assert report.final.stopped_early == (report.steps < 12)
