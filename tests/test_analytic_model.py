"""The yardstick itself: the analytic denoiser, its reference solutions and the quality score.

Every check compares against something computed another way: Tweedie's formula through autograd
of the closed-form mixture density, importance-weighted Monte Carlo of E[x0 | x], the closed-form
probability-flow ODE solution of a single Gaussian, and two independent ODE integrators.
"""

from __future__ import annotations

import math

import pytest
import torch

from moe_sampler.experts.analytic import (
    REFERENCE_SIGMA_END,
    AnalyticModel,
    GaussianMixture,
    PromptSpec,
    quality_from_error,
    random_prompts,
)


def _log_density(mixture: GaussianMixture, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """log p_sigma(x) of the noised mixture, written independently of ``GaussianMixture.denoise``."""
    var = mixture.stds.square() + sigma**2  # [K, D]
    diff = x[:, None, :] - mixture.means[None]  # [B, K, D]
    log_norm = -0.5 * (diff.square() / var + torch.log(2 * math.pi * var)).sum(-1)  # [B, K]
    return torch.logsumexp(mixture.log_weights[None] + log_norm, dim=1)


@pytest.fixture(scope="module")
def model() -> AnalyticModel:
    return AnalyticModel(random_prompts(3, seed=5), shape=(6,), background_modes=3)


@pytest.mark.parametrize("sigma", [0.05, 0.7, 5.0])
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_denoiser_obeys_tweedie(model, sigma, cfg):
    """D(x, sigma) = x + sigma^2 grad log p_sigma(x) (Tweedie), guided: D_u + cfg (D_c - D_u)."""
    x = (torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * (1 + sigma))

    def tweedie(mixture: GaussianMixture) -> torch.Tensor:
        xg = x.clone().requires_grad_(True)
        (score,) = torch.autograd.grad(_log_density(mixture, xg, sigma).sum(), xg)
        return x + sigma**2 * score

    d_cond, d_uncond = tweedie(model.cond_mixtures[1]), tweedie(model.uncond_mixture)
    expected = d_uncond + cfg * (d_cond - d_uncond)
    got = model(x, torch.full((5,), sigma, dtype=torch.float64), cond=1, cfg=cfg)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_denoiser_matches_monte_carlo_posterior_mean():
    """Importance-weighted Monte Carlo of E[x0 | x] over 400k data samples (error ~1e-2)."""
    mixture = GaussianMixture.from_spec(PromptSpec(seed=9, n_modes=3, separation=1.0), dim=2)
    g = torch.Generator().manual_seed(0)
    x0 = mixture.sample(400_000, g)
    sigma = 0.8
    x = torch.tensor([[0.3, -0.5], [1.2, 0.4]], dtype=torch.float64)
    log_w = -0.5 * ((x[:, None, :] - x0[None]).square().sum(-1)) / sigma**2  # [2, N]
    weights = torch.softmax(log_w, dim=1)
    monte_carlo = weights @ x0
    exact = mixture.denoise(x, torch.full((2,), sigma, dtype=torch.float64))
    assert (exact - monte_carlo).abs().max() < 0.03


def test_single_gaussian_closed_form():
    spec = PromptSpec(seed=4, n_modes=1)
    model = AnalyticModel([spec], shape=(5,))
    mixture = model.cond_mixtures[0]
    mu, s = mixture.means[0], mixture.stds[0]
    x = torch.randn(3, 5, dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    expected = mu + s**2 / (s**2 + sigma[:, None] ** 2) * (x - mu)
    torch.testing.assert_close(model(x, sigma), expected)


def test_cfg_one_is_the_conditional_and_zero_the_unconditional(model):
    x = torch.randn(4, 6, dtype=torch.float64)
    sigma = torch.full((4,), 1.3, dtype=torch.float64)
    torch.testing.assert_close(model(x, sigma, cond=2, cfg=1.0), model.cond_mixtures[2].denoise(x, sigma))
    torch.testing.assert_close(model(x, sigma, cond=2, cfg=0.0), model.uncond_mixture.denoise(x, sigma))


def test_per_row_conditions_match_single_condition_calls(model):
    x = torch.randn(4, 6, dtype=torch.float64)
    sigma = torch.full((4,), 0.9, dtype=torch.float64)
    cond = torch.tensor([0, 2, 1, 0])
    mixed = model(x, sigma, cond=cond, cfg=2.0)
    for row, c in enumerate(cond.tolist()):
        torch.testing.assert_close(mixed[row], model(x[row:row + 1], sigma[:1], cond=c, cfg=2.0)[0])


def test_output_keeps_shape_and_dtype():
    model = AnalyticModel([PromptSpec(seed=1, n_modes=2)], shape=(2, 3, 3))
    x = torch.randn(2, 2, 3, 3, dtype=torch.float32)
    out = model(x, torch.tensor([1.0, 2.0]))
    assert out.shape == x.shape and out.dtype == torch.float32


def test_reference_matches_the_single_gaussian_ode_solution():
    """For one Gaussian the PF-ODE solution is x(sigma) - mu = (x_T - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + T^2)."""
    model = AnalyticModel([PromptSpec(seed=6, n_modes=1)], shape=(4,))
    mixture = model.cond_mixtures[0]
    mu, s = mixture.means[0], mixture.stds[0]
    sigma_start = 14.0
    x_start = model.initial_noise(3, seed=2, sigma=sigma_start, dtype=torch.float64)
    x_end = mu + (x_start - mu) * torch.sqrt(s**2 + REFERENCE_SIGMA_END**2) / torch.sqrt(s**2 + sigma_start**2)
    expected = mu + s**2 / (s**2 + REFERENCE_SIGMA_END**2) * (x_end - mu)  # the final denoise
    got = model.reference(x_start, sigma_start)
    assert model.relative_error(got, expected).max() < 1e-6


@pytest.mark.parametrize("cfg", [1.0, 7.5])
def test_reference_methods_agree(model, cfg):
    x = model.initial_noise(3, seed=4, sigma=model.schedule().sigma_max, dtype=torch.float64)
    sigma_max = model.schedule().sigma_max
    rk4 = model.reference(x, sigma_max, cond=0, cfg=cfg, method="rk4", steps=500)
    dopri = model.reference(x, sigma_max, cond=0, cfg=cfg, method="dopri5")
    # 500 RK4 steps (h = 0.03 in log sigma) already agree to ~1e-7; experts' errors start near 1e-4.
    assert model.relative_error(rk4, dopri).max() < 1e-6


def test_reference_rejects_unknown_method(model):
    with pytest.raises(ValueError, match="method must be"):
        model.reference(torch.zeros(1, 6), 1.0, method="euler")


def test_quality_anchor_points_and_monotone():
    """The documented map clip(-log10(err) / 3, 0, 1): 100% -> 0, 10% -> 1/3, 1% -> 2/3, 0.1% -> 1."""
    anchors = {1.0: 0.0, 0.1: 1 / 3, 0.01: 2 / 3, 1e-3: 1.0, 1e-6: 1.0, 5.0: 0.0, 0.0: 1.0}
    for err, expected in anchors.items():
        assert float(quality_from_error(err)) == pytest.approx(expected, abs=1e-12)
    errs = torch.logspace(-5, 1, 200, dtype=torch.float64)
    scores = quality_from_error(errs)
    assert (scores[1:] <= scores[:-1]).all() and scores.min() >= 0 and scores.max() <= 1


def test_relative_error_is_rms_in_data_units(model):
    x = torch.zeros(2, 6, dtype=torch.float64)
    shifted = x + 0.5 * model.data_rms(1)
    torch.testing.assert_close(model.relative_error(shifted, x, cond=1), torch.full((2,), 0.5, dtype=torch.float64))


def test_data_rms_matches_samples(model):
    samples = model.cond_mixtures[0].sample(200_000, torch.Generator().manual_seed(3))
    assert samples.square().mean().sqrt().item() == pytest.approx(model.data_rms(0), rel=0.02)


def test_prompt_spec_and_model_validate():
    with pytest.raises(ValueError, match="n_modes"):
        PromptSpec(seed=0, n_modes=0)
    with pytest.raises(ValueError, match="invalid prompt knobs"):
        PromptSpec(seed=0, scale=-1.0)
    with pytest.raises(ValueError, match="at least one PromptSpec"):
        AnalyticModel([])


def test_random_prompts_are_reproducible():
    assert random_prompts(4, seed=1) == random_prompts(4, seed=1) != random_prompts(4, seed=2)
