"""The shipped learned yardstick (experts/learned.py): it loads, denoises, guides and refuses bad labels."""

from __future__ import annotations

import ast

import pytest
import torch

from moe_sampler.experts import ModelSchedule
from moe_sampler.experts import learned
from moe_sampler.experts.learned import IMAGES_FILE, WEIGHTS_FILE, LearnedModel, load_learned_model


@pytest.fixture(scope="module")
def model() -> LearnedModel:
    torch.manual_seed(0)
    return load_learned_model()


def test_shipped_files_are_small_safetensors():
    for path in (WEIGHTS_FILE, IMAGES_FILE):
        assert path.suffix == ".safetensors"
        assert 0 < path.stat().st_size < 3_000_000, f"{path.name} is {path.stat().st_size} bytes"


def test_loads_with_its_public_surface(model):
    assert model.num_classes == 10
    assert model.latent_shape == (1, 16, 16)
    schedule = model.schedule()
    assert isinstance(schedule, ModelSchedule)
    assert schedule.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert schedule.sigma_max == pytest.approx(14.61, abs=1e-2)
    assert schedule.discrete_sigmas.shape == (1000,)
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in model.unet.parameters())
    assert not model.unet.training


def test_data_images_are_real_digits_per_class(model):
    for label in range(10):
        images = model.data_images(label)
        assert images.shape == (20, 1, 16, 16) and images.dtype == torch.float32
        assert images.min() >= -1.0 and images.max() <= 1.0
    assert not torch.equal(model.data_images(0), model.data_images(1))


def test_denoises_real_digits_better_at_the_smallest_sigma(model):
    x0 = torch.stack([model.data_images(c)[0] for c in range(10)])
    labels = torch.arange(10)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    schedule = model.schedule()
    errors = {}
    for sigma in (schedule.sigma_max, 1.0, schedule.sigma_min):
        denoised = model(x0 + sigma * eps, torch.full((10,), sigma), cond=labels, cfg=1.0)
        errors[sigma] = model.relative_error(denoised, x0).mean().item()
    assert errors[schedule.sigma_min] < errors[1.0] < errors[schedule.sigma_max], errors
    assert errors[schedule.sigma_min] < 0.1, errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_dtype_kept_for_a_batch(model, dtype):
    x = model.initial_noise(3, seed=0, dtype=dtype)
    assert x.shape == (3, 1, 16, 16) and x.dtype == dtype
    assert x.std().item() == pytest.approx(model.schedule().sigma_max, rel=0.2)
    out = model(x, torch.full((3,), 5.0, dtype=dtype), cond=torch.tensor([0, 4, 9]), cfg=3.0)
    assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()


def test_cfg_one_is_the_conditional_prediction_and_guidance_extrapolates(model):
    x = model.initial_noise(2, seed=3, sigma=2.0)
    sigma = torch.full((2,), 2.0)
    labels = torch.tensor([3, 7])
    cond = model(x, sigma, cond=labels, cfg=1.0)
    uncond = model(x, sigma, cond=None, cfg=1.0)
    direct = model.denoiser(x, sigma, cond=model.class_embeddings[labels])
    torch.testing.assert_close(cond, direct)
    assert (cond - uncond).abs().max() > 1e-3, "the class label changes nothing"
    guided = model(x, sigma, cond=labels, cfg=3.0)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-4)


def test_mixed_labels_in_one_batch_match_single_calls(model):
    x = model.initial_noise(2, seed=5, sigma=3.0)
    both = model(x, torch.full((2,), 3.0), cond=torch.tensor([1, 8]), cfg=2.0)
    first = model(x[:1], torch.full((1,), 3.0), cond=1, cfg=2.0)
    second = model(x[1:], torch.full((1,), 3.0), cond=8, cfg=2.0)
    torch.testing.assert_close(both, torch.cat([first, second]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cond", [10, -1, torch.tensor([0, 12]), torch.tensor([0.0, 1.0])])
def test_unknown_class_label_is_a_clear_error(model, cond):
    x = model.initial_noise(2, seed=0)
    with pytest.raises(ValueError, match="class label"):
        model(x, torch.full((2,), 1.0), cond=cond)


def test_wrong_latent_shape_is_a_clear_error(model):
    with pytest.raises(ValueError, match=r"\[B, 1, 16, 16\]"):
        model(torch.zeros(1, 4, 16, 16), torch.ones(1), cond=0)


def test_img2img_start_is_seeded_data_plus_noise(model):
    x0, x = model.img2img_start(torch.tensor([2, 5]), sigma=0.5, seed=11)
    again0, again = model.img2img_start(torch.tensor([2, 5]), sigma=0.5, seed=11)
    assert torch.equal(x, again) and torch.equal(x0, again0)
    assert any(torch.equal(x0[0], img) for img in model.data_images(2))
    assert (x - x0).std().item() == pytest.approx(0.5, rel=0.25)


def test_runtime_needs_no_sklearn_or_comfy():
    tree = ast.parse(open(learned.__file__).read())
    imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"sklearn", "comfy", "matplotlib"}, imported


def test_reference_methods_agree_on_a_short_solve(model):
    x0, x = model.img2img_start(torch.tensor([4]), sigma=0.3, seed=2)
    rk4 = model.reference(x, 0.3, cond=4, cfg=3.0, method="rk4", steps=4)
    dopri = model.reference(x, 0.3, cond=4, cfg=3.0, rtol=1e-3)
    assert rk4.shape == x.shape and rk4.dtype == torch.float32
    assert model.relative_error(rk4, dopri).item() < 0.01
    with pytest.raises(ValueError, match="method"):
        model.reference(x, 0.3, cond=4, method="euler")
