"""The router's latent shape inside a real ComfyUI (``COMFYUI_PATH``): the pack's helper agrees
with ComfyUI's own ``fix_empty_latent_channels`` for v0.8.0's latent formats, and on a
16-channel model the state the MoE Adaptive Sampler computes is the state the router trainer
learned from for the same generation (issue 11).

Run: ``COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/test_comfy_latent_shape.py -q``
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def env(tiny_comfy):
    from moe_sampler.nodes import comfy_environment, sampler_nodes

    return dict(tiny_comfy, environment=comfy_environment, nodes=sampler_nodes)


class WithLatentFormat:
    """A MODEL that reports another latent format (sampling is replaced in these tests)."""

    def __init__(self, model, latent_format) -> None:
        self.inner, self.latent_format = model, latent_format

    def get_model_object(self, name):
        return self.latent_format if name == "latent_format" else self.inner.get_model_object(name)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("format_name", ["SD15", "SDXL", "SD3", "Flux", "Flux2", "Mochi", "Wan21", "HunyuanVideo"])
@pytest.mark.parametrize("latent", [torch.zeros(1, 4, 12, 10), torch.zeros(2, 16, 12, 10), torch.ones(1, 4, 12, 10)],
                         ids=["empty-4ch", "empty-16ch", "filled-4ch"])
def test_sampled_shape_is_comfyuis(env, format_name, latent):
    import comfy.latent_formats
    import comfy.sample

    model = WithLatentFormat(env["model"], getattr(comfy.latent_formats, format_name)())
    expected = tuple(comfy.sample.fix_empty_latent_channels(model, latent).shape)
    assert env["environment"].sampled_latent_shape(model, latent) == expected


def test_empty_latent_matches_the_models_own_empty_latent_nodes(env):
    import comfy.latent_formats
    from comfy_extras.nodes_flux import EmptyFlux2LatentImage
    from comfy_extras.nodes_sd3 import EmptySD3LatentImage

    empty = env["environment"].empty_latent
    sd3 = WithLatentFormat(env["model"], comfy.latent_formats.SD3())
    flux2 = WithLatentFormat(env["model"], comfy.latent_formats.Flux2())
    made = EmptySD3LatentImage.execute(512, 768, 1).args[0]["samples"]
    assert empty(sd3, 512, 768)["samples"].shape == made.shape
    made = EmptyFlux2LatentImage.execute(512, 768, 1).args[0]["samples"]
    assert empty(flux2, 512, 768)["samples"].shape == made.shape


@pytest.mark.parametrize("latent_node", ["EmptySD3LatentImage", "EmptyLatentImage"])
def test_sampler_state_is_the_training_state_on_a_16_channel_model(env, monkeypatch, latent_node):
    import comfy.latent_formats
    import nodes as core_nodes
    from comfy_extras.nodes_sd3 import EmptySD3LatentImage

    from moe_sampler.router.features import SOURCE_SLOTS

    model = WithLatentFormat(env["model"], comfy.latent_formats.SD3())
    environment = env["environment"]
    contexts = environment.training_contexts(1, [(512, 768)], [4.5], 1)
    trainer_env = environment.ComfyEnvironment(model, env["clip"], ["a watercolor fox"], "blurry", contexts)
    context = trainer_env.contexts[0]
    training = trainer_env.state(context, 0.7)

    if latent_node == "EmptySD3LatentImage":
        latent = EmptySD3LatentImage.execute(512, 768, 1).args[0]
    else:
        latent = core_nodes.EmptyLatentImage().generate(512, 768, 1)[0]
    recorded = {}
    bridge = env["nodes"].bridge
    monkeypatch.setattr(bridge, "sample_with_expert", lambda model, expert, positive, negative, latent, *a, **k: (
        latent, bridge.SamplingReport.__new__(bridge.SamplingReport)))
    monkeypatch.setattr(env["nodes"], "_record", lambda store, attempts, **fields: recorded.update(fields) or True)
    monkeypatch.setattr(env["nodes"], "AdaptiveRun", lambda *a: a)
    env["nodes"].run_adaptive(model, trainer_env.conditioning(0), trainer_env.conditioning(None), latent, context.seed,
                              context.cfg, priority=0.7, store=object())
    sampling = recorded["state"]
    keep = torch.ones(64, dtype=torch.bool)
    keep[SOURCE_SLOTS] = False  # training vs interactive; the scorer ignores these slots
    assert torch.equal(training[keep], sampling[keep])
    assert training[50] == 1.0  # 16 channels
