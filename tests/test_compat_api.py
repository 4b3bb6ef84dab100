"""The original Python API (README, docs/ROUTER.md) runs end to end on the analytic model."""

from __future__ import annotations

import math

import pytest
import torch

import moe_sampler
from moe_sampler.experts.analytic import AnalyticModel, random_prompts
from moe_sampler.router.environment import AnalyticEnvironment, Conditions, Outcome
from moe_sampler.router.model import Router


def test_original_snippet_runs_end_to_end(tmp_path):
    from moe_sampler import AdvancedExpertSelector, ExpertRouter, MixtureOfExperts, MoERLTrainer

    model = AnalyticModel(random_prompts(2, seed=4))
    scheduler = None  # the analytic model carries its own noise schedule
    selector = AdvancedExpertSelector(diffusion_model=model, scheduler=scheduler, device="cuda")
    assert selector.device.type in ("cuda", "cpu")
    state = selector.get_state_representation(cond=1, cfg=6.0)
    assert state.shape == (64,)
    expert_id, expert, info = selector.select_expert_moe(state)
    assert expert.name == expert_id
    assert math.isclose(sum(info["probabilities"].values()), 1.0)
    assert 0 < info["confidence"] <= 1 and info["propensity"] == 1.0
    selector.update_expert_performance(expert_id, {"nfe": 20, "seconds": 0.1, "quality": 0.8})
    assert selector.performance[expert_id][-1]["nfe"] == 20 and selector.records[-1].expert == expert_id

    mdp = AnalyticEnvironment(models=[model], conditions=Conditions(img2img_fraction=0.0))
    rewards = []

    def reward_func(outcome: Outcome, priority: float) -> float:
        rewards.append(outcome.quality)
        return outcome.quality - 0.1 * math.log2(max(outcome.nfe, 1)) / 10

    trainer = MoERLTrainer(mdp, reward_func, selector, state_dim=64)
    result = trainer.train_moe(num_episodes=2)
    assert result.episodes == 2 and len(rewards) == 2 * len(selector.experts)
    assert selector.router.training["contexts"] == 2
    assert isinstance(selector.router, ExpertRouter)

    moe = MixtureOfExperts(model, router=selector.router)
    x, info = moe.sample(cond=0, cfg=4.0, seed=3, priority=0.2)
    assert x.shape == (1, *model.shape) and torch.isfinite(x).all()
    assert info["nfe"] > 0 and info["expert"] in info["probabilities"]


def test_trainer_without_mdp_builds_an_analytic_environment():
    from moe_sampler import AdvancedExpertSelector, MoERLTrainer

    selector = AdvancedExpertSelector(diffusion_model=AnalyticModel(random_prompts(1, seed=9)))
    trainer = MoERLTrainer(None, None, selector, state_dim=64)
    assert isinstance(trainer.environment, AnalyticEnvironment)
    assert trainer.router is selector.router


def test_state_from_prompt_embeddings_for_a_non_analytic_model():
    from moe_sampler import AdvancedExpertSelector

    def denoiser(x, sigma, **_):
        return x * 0.5

    selector = AdvancedExpertSelector(diffusion_model=denoiser, scheduler={"prediction_type": "v_prediction"})
    state = selector.get_state_representation(conditioning=torch.randn(1, 77, 768), latent=(1, 4, 32, 32), cfg=5.0)
    assert state.shape == (64,) and state[57] == 1.0  # v-prediction family
    with pytest.raises(ValueError, match="needs the conditioning"):
        selector.get_state_representation()
    with pytest.raises(ValueError, match="unknown expert"):
        selector.update_expert_performance("NoSuchExpert", {})


def test_public_names_resolve_lazily():
    assert moe_sampler.ExpertRouter is Router
    assert moe_sampler.MoERLTrainer.__name__ == "MoERLTrainer"


def test_mixture_of_experts_on_a_diffusers_unet():
    from moe_sampler import MixtureOfExperts
    from moe_sampler.experts import get_expert
    from helpers.tiny_unet import tiny_unet

    scheduler = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "num_train_timesteps": 1000, "prediction_type": "epsilon"}
    moe = MixtureOfExperts(tiny_unet(seed=0), scheduler, experts=[get_expert("SpeedDemon")])
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 8, 32, generator=g), torch.zeros(1, 8, 32)
    x, info = moe.sample(cond=cond, negative=uncond, cfg=5.0, seed=1, size=(16, 16))
    assert x.shape == (1, 4, 16, 16) and torch.isfinite(x).all()
    assert info["expert"] == "SpeedDemon" and info["nfe"] == 10


# ------------------------------------------------------------------ any denoiser, latent shape from the model

SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000, "prediction_type": "epsilon"}


def test_the_latent_shape_comes_from_a_one_channel_unet():
    """Issue 8: a 1-channel UNet used to get a 4-channel state and a failing ``sample(size=...)``."""
    from helpers.tiny_unet import tiny_unet

    from moe_sampler import AdvancedExpertSelector, MixtureOfExperts
    from moe_sampler.experts import get_expert

    unet = tiny_unet(seed=0, in_channels=1, out_channels=1, sample_size=8)
    selector = AdvancedExpertSelector(unet, SD_SCHEDULER)
    assert selector.latent_shape == (1, 8, 8)
    cond = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(0))
    state = selector.get_state_representation(conditioning=cond, cfg=3.0)
    assert state[50] == 1 / 16  # one channel, not four
    moe = MixtureOfExperts(unet, SD_SCHEDULER, experts=[get_expert("SpeedDemon")])
    x, info = moe.sample(cond=cond, negative=torch.zeros(1, 8, 32), cfg=3.0, seed=1, size=(16, 8))
    assert x.shape == (1, 1, 16, 8) and torch.isfinite(x).all() and info["nfe"] == 10
    x, _ = moe.sample(cond=cond, cfg=3.0, seed=1)
    assert x.shape == (1, 1, 8, 8)


def test_no_silent_default_latent_shape():
    from moe_sampler import AdvancedExpertSelector, MixtureOfExperts

    def denoiser(x, sigma, **_):
        return x * 0.5

    selector = AdvancedExpertSelector(diffusion_model=denoiser, scheduler={"prediction_type": "epsilon"})
    assert selector.latent_shape is None
    with pytest.raises(ValueError, match="latent shape of this function is unknown"):
        selector.get_state_representation(conditioning=torch.randn(1, 77, 768))
    with pytest.raises(ValueError, match="latent_shape="):
        MixtureOfExperts(denoiser).sample(cond=torch.randn(1, 77, 768))
    given = AdvancedExpertSelector(denoiser, latent_shape=(16, 32, 32))
    assert given.get_state_representation(conditioning=torch.randn(1, 77, 768))[50] == 1.0


def test_original_trainer_on_any_denoiser_in_a_few_lines():
    """``MoERLTrainer(mdp, reward_func, selector)`` on a non-analytic denoiser: the selector builds
    the environment from the prompts the model takes."""
    from helpers.tiny_unet import tiny_unet

    from moe_sampler import AdvancedExpertSelector, MoERLTrainer
    from moe_sampler.experts import get_expert
    from moe_sampler.router.environment import DenoiserEnvironment, DormandPrince

    g = torch.Generator().manual_seed(2)
    selector = AdvancedExpertSelector(tiny_unet(seed=0, in_channels=1, out_channels=1, sample_size=8), SD_SCHEDULER,
                                      experts=[get_expert("SpeedDemon"), get_expert("BalancedMaster")])
    with pytest.raises(ValueError, match="prompts: MoERLTrainer needs contexts"):
        MoERLTrainer(None, None, selector)
    mdp = selector.environment(prompts=[torch.randn(1, 8, 32, generator=g) for _ in range(2)],
                               negative=torch.zeros(1, 8, 32), cfgs=(1.0, 3.0),
                               reference=DormandPrince(rtol=1e-3))  # a loose reference keeps the test fast
    assert isinstance(mdp, DenoiserEnvironment)
    trainer = MoERLTrainer(mdp, None, selector, state_dim=64)
    result = trainer.train_moe(num_episodes=2)
    assert result.episodes == 2 and selector.router.training["contexts"] == 2
    assert mdp.calls["reference"] > 0 and mdp.calls["experts"] > 0


def test_the_core_trainer_has_one_signature():
    from moe_sampler import MoERLTrainer
    from moe_sampler.router.trainer import MoERLTrainer as Core

    assert issubclass(MoERLTrainer, Core) and MoERLTrainer is not Core
    with pytest.raises(TypeError, match="selector: expected an AdvancedExpertSelector"):
        MoERLTrainer(None, None, object())
    with pytest.raises(ValueError, match="state_dim must be 64"):
        MoERLTrainer(None, None, moe_sampler.AdvancedExpertSelector(AnalyticModel(random_prompts(1, seed=1))),
                     state_dim=32)
    import moe_sampler.router.trainer as trainer_module

    assert not hasattr(trainer_module, "AnalyticEnvironment")  # environments live in router.environment
