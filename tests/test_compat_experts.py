"""The DDPM compatibility experts: parity with diffusers' DDPMScheduler and the sampled distribution.

Parity drives both implementations with the same analytic model (wrapped as an eps-predictor on
diffusers' side), the same timesteps and the same noise stream. The distribution test uses that a
1-mode Gaussian has a linear exact denoiser, so the law of the whole DDPM chain is Gaussian with a
variance computed exactly by a scalar recursion: the samples must match that law (an implementation
check), and that law must approach the data distribution as steps grow (a method check).
"""

from __future__ import annotations

import math

import pytest
import torch

from moe_sampler.experts.analytic import AnalyticModel, PromptSpec
from moe_sampler.experts.base import ModelSchedule
from moe_sampler.experts.ddpm import compat_experts, ddpm_sigmas, sample_ddpm_ancestral

diffusers = pytest.importorskip("diffusers")

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
EXPERTS = {e.name: e for e in compat_experts()}


def _diffusers_ddpm(steps: int, float64_table: bool) -> tuple[object, torch.Tensor]:
    scheduler = diffusers.DDPMScheduler(**SD_BETAS, timestep_spacing="trailing", variance_type="fixed_small",
                                        clip_sample=False)
    if float64_table:
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.set_timesteps(steps)
    alphas_cumprod = scheduler.alphas_cumprod.double()
    return scheduler, ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def _run_both(steps: int, float64_table: bool) -> tuple[torch.Tensor, torch.Tensor]:
    model = AnalyticModel([PromptSpec(seed=3, n_modes=4)], shape=(2, 4, 4))
    scheduler, table = _diffusers_ddpm(steps, float64_table)
    sigmas = torch.cat([table[scheduler.timesteps], table.new_zeros(1)])

    def eps_model(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = table[t]
        x = x_vp * (1 + sigma**2).sqrt()
        return (x - model(x, sigma.expand(x.shape[0]))) / sigma

    x_vp = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    generator = torch.Generator().manual_seed(5)
    reference = x_vp.clone()
    for t in scheduler.timesteps:
        reference = scheduler.step(eps_model(reference, t), t, reference, generator=generator).prev_sample

    # diffusers draws randn_tensor(shape, generator, dtype=float64) once per step: replay that stream.
    ours_generator = torch.Generator().manual_seed(5)

    def noise_sampler(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return torch.randn(x_vp.shape, generator=ours_generator, dtype=torch.float64)

    x = x_vp * (1 + sigmas[0] ** 2).sqrt()
    ours = sample_ddpm_ancestral(model, x, sigmas, noise_sampler=noise_sampler)
    return ours, reference


@pytest.mark.parametrize("steps", [10, 100, 1000])
def test_parity_with_diffusers_ddpm_float64(steps: int) -> None:
    # Same float64 table on both sides: what remains is rounding, plus diffusers' last step, which
    # adds sqrt(clamp(0, min=1e-20)) * z = 1e-10 * z noise where the posterior variance is 0.
    ours, reference = _run_both(steps, float64_table=True)
    scale = reference.abs().max()
    assert (ours - reference).abs().max() <= 1e-8 * scale


def test_parity_with_diffusers_ddpm_default_float32_table() -> None:
    # diffusers' default float32 alphas_cumprod rounds each coefficient to ~6e-8 relative; over 100
    # steps that accumulates to ~5e-7 of the sample scale (measured), so allow 1e-5.
    ours, reference = _run_both(100, float64_table=False)
    assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max()


def _chain_variance(sigmas: torch.Tensor, data_var: torch.Tensor) -> torch.Tensor:
    """Exact per-dimension variance of the DDPM chain's output for N(mu, data_var) data started
    at N(mu, sigma_max^2): with D linear, x_next - mu = c (x - mu) + std z."""
    var = sigmas[0].double() ** 2 * torch.ones_like(data_var)
    for sigma, sigma_next in zip(sigmas[:-1].double(), sigmas[1:].double()):
        k = data_var / (data_var + sigma**2)
        if sigma_next == 0:
            return k**2 * var
        ratio_sq = (sigma_next / sigma) ** 2
        var = (k + ratio_sq * (1 - k)) ** 2 * var + sigma_next**2 * (1 - ratio_sq)
    return var


# Largest relative gap between the chain's std and the data std (over the 8 dims, data stds
# 0.58-1.98): DDPM's "fixed_small" variance drops the x0 posterior variance, a bias that shrinks
# with the step count (measured 5.1%, 1.4%, 0.8%; Bao et al. 2022, Analytic-DPM, arXiv 2201.06503).
STD_BIAS_BOUND = {"DefaultAdaptiveSampler": 0.06, "FastSampler": 0.02, "QualitySampler": 0.01}


@pytest.mark.parametrize("name", list(EXPERTS))
def test_samples_match_gaussian_data(name: str) -> None:
    expert = EXPERTS[name]
    model = AnalyticModel([PromptSpec(seed=7, n_modes=1, scale_spread=0.0, anisotropy=4.0)], shape=(8,))
    mean, std = model.cond_mixtures[0].means[0], model.cond_mixtures[0].stds[0]
    sigmas = expert.sigmas(model.schedule())
    n = 1024
    x = model.initial_noise(n, seed=1, sigma=float(sigmas[0]), dtype=torch.float64)
    out = expert(model, x, sigmas, extra_args={"seed": 2})

    chain_std = _chain_variance(sigmas, std**2).sqrt()
    z = (out - mean) / chain_std  # N(0, 1) in every element if the loop is right
    elements = out.numel()
    assert abs(float(z.mean())) < 4 / math.sqrt(elements)
    assert abs(float(z.std()) - 1) < 4 / math.sqrt(2 * elements)
    assert float((chain_std / std - 1).abs().max()) < STD_BIAS_BOUND[name]


def test_same_seed_same_output_different_seed_different_output() -> None:
    expert = EXPERTS["DefaultAdaptiveSampler"]
    model = AnalyticModel([PromptSpec(seed=1)], shape=(16,))
    sigmas = expert.sigmas(model.schedule())
    x = model.initial_noise(4, seed=0, sigma=float(sigmas[0]))
    first = expert(model, x, sigmas, extra_args={"seed": 11})
    again = expert(model, x, sigmas, extra_args={"seed": 11})
    other = expert(model, x, sigmas, extra_args={"seed": 12})
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-2


def test_callbacks_report_and_final_denoised() -> None:
    expert = EXPERTS["DefaultAdaptiveSampler"]
    model = AnalyticModel([PromptSpec(seed=1)], shape=(16,))
    sigmas = expert.sigmas(model.schedule())
    seen: list[dict] = []
    report: dict = {}
    out = expert(model, model.initial_noise(2, seed=0, sigma=float(sigmas[0])), sigmas, extra_args={"seed": 0},
                 callback=seen.append, report=report)
    assert [c["i"] for c in seen] == list(range(expert.descriptor.steps))
    assert all(set(c) == {"x", "i", "sigma", "sigma_hat", "denoised"} for c in seen)
    assert report["nfe"] == report["steps"] == expert.descriptor.steps
    assert torch.equal(out, seen[-1]["denoised"])


def test_descriptors_and_schedules() -> None:
    assert [(e.name, e.descriptor.steps) for e in compat_experts()] == [
        ("DefaultAdaptiveSampler", 100), ("FastSampler", 500), ("QualitySampler", 1000)]
    model = AnalyticModel([PromptSpec(seed=1)])
    for expert in compat_experts():
        d = expert.descriptor
        assert expert.compat and d.stochastic and d.order == 0.5 and d.calls_per_step == 1 and d.schedule == "discrete"
        sigmas = expert.sigmas(model.schedule())
        assert sigmas[0] == model.schedule().sigma_max and sigmas[-1] == 0
        img2img = expert.sigmas(model.schedule(), denoise=0.4)
        assert len(img2img) == d.steps + 1 and img2img[-1] == 0 and (img2img[1:] < img2img[:-1]).all()
        assert img2img[0] < 0.5 * sigmas[0]


def test_continuous_schedule_falls_back_to_log_uniform_table() -> None:
    sigmas = ddpm_sigmas(ModelSchedule(0.01, 100.0), 4)[:-1]
    # 1000 log-uniform levels, trailing timesteps 999, 749, 499, 249.
    expected = torch.tensor([999, 749, 499, 249], dtype=torch.float64) / 999 * math.log(1e4) + math.log(0.01)
    torch.testing.assert_close(sigmas.double().log(), expected, rtol=0, atol=1e-5)
