"""DiffusersDenoiser on a tiny random-weight UNet: parity with diffusers' own schedulers.

Both sides run the same float32 UNet with classifier-free guidance on the same sigmas. What can
differ is float32 rounding (c_in, the eps -> denoised -> derivative route, timesteps recovered from
sigmas by log interpolation to within ~1e-5) and, for DPM-Solver++, the timestep rounding that
diffusers applies to Karras sigmas. Measured gaps are in docs/DIFFUSERS.md.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from helpers import BOOTSTRAP, ROOT
from helpers.tiny_unet import tiny_unet
from moe_sampler.experts import registered_experts
from moe_sampler.experts.diffusers_adapter import DiffusersDenoiser, alphas_cumprod_from
from moe_sampler.experts.dpm_solver import sample_dpmpp_2m
from moe_sampler.experts.schedules import to_d

diffusers = pytest.importorskip("diffusers")

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
PREDICTIONS = ["epsilon", "v_prediction"]
# diffusers 0.42's schedulers call np.array(tensor, copy=False); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
CFG = 5.0
# float32 parity bound relative to the sample's max magnitude; measured 0.9e-6 to 2.1e-6.
FLOAT32_REL_TOL = 1e-5


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(seed=0)


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"cond": torch.randn(1, 7, 32, generator=g), "uncond": torch.randn(1, 7, 32, generator=g),
            "noise": torch.randn(1, 4, 16, 16, generator=g)}


def _diffusers_loop(unet, scheduler, x: torch.Tensor, inputs: dict) -> torch.Tensor:
    """The loop of diffusers' StableDiffusionPipeline: batched [uncond, cond], guidance on the output."""
    context = torch.cat([inputs["uncond"], inputs["cond"]])
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(torch.cat([x, x]), t), t, encoder_hidden_states=context).sample
            out_uncond, out_cond = out.chunk(2)
            x = scheduler.step(out_uncond + CFG * (out_cond - out_uncond), t, x).prev_sample
    return x


def _relative_gap(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_euler_parity_with_euler_discrete_scheduler(unet, inputs, prediction_type: str) -> None:
    scheduler = diffusers.EulerDiscreteScheduler(**SD_BETAS, prediction_type=prediction_type,
                                                 timestep_spacing="trailing")
    scheduler.set_timesteps(10)
    denoiser = DiffusersDenoiser(unet, scheduler)
    sigmas = scheduler.sigmas
    torch.testing.assert_close(denoiser.sigma_to_timestep(sigmas[:-1]).float(), scheduler.timesteps,
                               rtol=0, atol=1e-3)
    reference = _diffusers_loop(unet, scheduler, inputs["noise"] * scheduler.init_noise_sigma, inputs)

    x = inputs["noise"] * sigmas[0]
    extra = {"cond": inputs["cond"], "uncond": inputs["uncond"], "cfg": CFG}
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            x = x + to_d(x, sigma, denoiser(x, sigma[None], **extra)) * (sigma_next - sigma)
    assert _relative_gap(x, reference) < FLOAT32_REL_TOL


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_dpmpp_2m_karras_parity_with_dpm_solver_multistep(unet, inputs, prediction_type: str) -> None:
    scheduler = diffusers.DPMSolverMultistepScheduler(
        **SD_BETAS, prediction_type=prediction_type, algorithm_type="dpmsolver++", solver_order=2,
        use_karras_sigmas=True, final_sigmas_type="zero")
    scheduler.set_timesteps(10)
    # diffusers works on x / sqrt(sigma^2 + 1) with init_noise_sigma 1; start both from the same state.
    reference = _diffusers_loop(unet, scheduler, inputs["noise"].clone(), inputs)
    sigmas = scheduler.sigmas
    x = inputs["noise"] * (1 + sigmas[0] ** 2).sqrt()
    extra = {"cond": inputs["cond"], "uncond": inputs["uncond"], "cfg": CFG}

    rounded = DiffusersDenoiser(unet, scheduler, round_timesteps=True)
    torch.testing.assert_close(rounded.sigma_to_timestep(sigmas[:-1]).long(), scheduler.timesteps)
    assert _relative_gap(sample_dpmpp_2m(rounded, x, sigmas, extra_args=extra), reference) < FLOAT32_REL_TOL

    # k-diffusion/ComfyUI convention (fractional timesteps): the UNet sees timesteps up to 0.5 away
    # from diffusers' rounded ones; measured 0.05% to 0.2% of the sample scale.
    fractional = DiffusersDenoiser(unet, scheduler)
    assert _relative_gap(sample_dpmpp_2m(fractional, x, sigmas, extra_args=extra), reference) < 1e-2


def test_scheduler_config_and_object_give_the_same_table(unet) -> None:
    scheduler = diffusers.EulerDiscreteScheduler(**SD_BETAS, prediction_type="v_prediction")
    from_object, from_config = alphas_cumprod_from(scheduler), alphas_cumprod_from(scheduler.config)
    assert from_object[1] == from_config[1] == "v_prediction"
    torch.testing.assert_close(from_object[0], from_config[0])
    schedule = DiffusersDenoiser(unet, dict(scheduler.config)).schedule()
    assert len(schedule.discrete_sigmas) == 1000
    assert schedule.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert schedule.sigma_max == pytest.approx(14.6146, abs=1e-3)


def test_epsilon_and_v_prediction_differ_and_denoised_tends_to_x(unet, inputs) -> None:
    x = inputs["noise"] * 3.0
    eps = DiffusersDenoiser(unet, SD_BETAS, prediction_type="epsilon")
    v = DiffusersDenoiser(unet, SD_BETAS, prediction_type="v_prediction")
    with torch.no_grad():
        d_eps, d_v = eps(x, torch.tensor([3.0]), cond=inputs["cond"]), v(x, torch.tensor([3.0]), cond=inputs["cond"])
        assert torch.isfinite(d_eps).all() and torch.isfinite(d_v).all()
        assert (d_eps - d_v).abs().max() > 0.1 * x.abs().max()
        tiny = torch.tensor([1e-4])
        for denoiser in (eps, v):
            assert (denoiser(x, tiny, cond=inputs["cond"]) - x).abs().max() < 1e-3 * x.abs().max()


def test_guidance_is_batched_cond_uncond(unet, inputs) -> None:
    denoiser = DiffusersDenoiser(unet, SD_BETAS)
    x, sigma = inputs["noise"].repeat(2, 1, 1, 1) * 2.0, torch.tensor([2.0, 2.0])
    with torch.no_grad():
        d_cond = denoiser(x, sigma, cond=inputs["cond"])
        d_uncond = denoiser(x, sigma, cond=inputs["uncond"])
        guided_1 = denoiser(x, sigma, cond=inputs["cond"], uncond=inputs["uncond"], cfg=1.0)
        guided = denoiser(x, sigma, cond=inputs["cond"], uncond=inputs["uncond"], cfg=7.5)
    torch.testing.assert_close(guided_1, d_cond, rtol=0, atol=0)
    torch.testing.assert_close(guided, d_uncond + 7.5 * (d_cond - d_uncond), rtol=1e-4, atol=1e-4)
    assert (guided - d_cond).abs().max() > 1e-2


def test_invalid_configuration_is_named(unet) -> None:
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusersDenoiser(unet, SD_BETAS, prediction_type="flow")
    with pytest.raises(ValueError, match="scheduler"):
        DiffusersDenoiser(unet)
    with pytest.raises(ValueError, match="cond"):
        DiffusersDenoiser(unet, SD_BETAS)(torch.zeros(1, 4, 16, 16), torch.tensor([1.0]))


def test_experts_package_imports_without_diffusers() -> None:
    # The checkout loaded as the tests load it (not pip-installed), in a fresh process.
    code = BOOTSTRAP + (
        "import moe_sampler.experts, moe_sampler.experts.diffusers_adapter\n"
        "assert 'diffusers' not in sys.modules, 'diffusers imported eagerly'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT.parent)


EXPERT_NAMES = [e.name for e in registered_experts(include_compat=False)]


def test_there_are_experts_to_run() -> None:
    assert EXPERT_NAMES, "no main experts registered (moe_sampler.experts.builtin)"


@pytest.mark.parametrize("name", EXPERT_NAMES)
def test_every_expert_runs_on_the_unet(unet, inputs, name: str) -> None:
    expert = next(e for e in registered_experts(include_compat=False) if e.name == name)
    denoiser = DiffusersDenoiser(unet, SD_BETAS)
    sigmas = expert.sigmas(denoiser.schedule())
    out, run = expert.run(denoiser, inputs["noise"] * sigmas[0], sigmas,
                          extra_args={"cond": inputs["cond"], "seed": 0})
    assert out.shape == inputs["noise"].shape and out.dtype == inputs["noise"].dtype
    assert run.finite and run.nfe >= 1
