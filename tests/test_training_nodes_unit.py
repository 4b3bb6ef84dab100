"""The ComfyUI-free logic of the training node.

- parsing of the trainer's text inputs (prompts, sizes, cfg values, router name, ...) with
  errors that name the input;
- :class:`ComfyEnvironment` (the trainer's Environment on a ComfyUI model) with the bridge
  replaced by the analytic model: reference once per context, each expert once per context,
  every fresh run reported, failures scored as failures, ComfyUI's interrupt never swallowed,
  and MoERLTrainer learning and resuming on it.
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from helpers import import_node_module

environment_module = import_node_module("comfy_environment")
bridge = import_node_module("bridge")
comfy_experts = import_node_module("comfy_experts")

from moe_sampler.experts import get_expert  # noqa: E402
from moe_sampler.experts.analytic import AnalyticModel, PromptSpec  # noqa: E402
from moe_sampler.router.calibration import calibration_inputs  # noqa: E402
from moe_sampler.router.trainer import MoERLTrainer  # noqa: E402

ComfyEnvironment = environment_module.ComfyEnvironment
TrainingInputError = environment_module.TrainingInputError
TrainingPlan = environment_module.TrainingPlan


# ------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(("text", "expected"), [
    ("a cat\na dog", ["a cat", "a dog"]),
    ("  a cat  \n\n\t\na dog\n", ["a cat", "a dog"]),
    ("a cat\na cat\na dog", ["a cat", "a dog"]),
    ("a cat, sitting; on a mat", ["a cat, sitting; on a mat"]),
    ("one\r\ntwo", ["one", "two"]),
])
def test_prompts_are_one_per_line(text, expected):
    assert environment_module.parse_prompts(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("512x512, 512x768", [(512, 512), (512, 768)]),
    ("512x512;768X512\n1024×1024", [(512, 512), (768, 512), (1024, 1024)]),
    (" 64 x 64 ,64x64", [(64, 64)]),
    ("16x2048", [(16, 2048)]),
    ("2048x1152", [(2048, 1152)]),
])
def test_sizes_parse_as_width_by_height(text, expected):
    assert environment_module.parse_sizes(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("4, 7.5", [4.0, 7.5]),
    ("1;2\n3.25", [1.0, 2.0, 3.25]),
    ("7, 7.0, 8", [7.0, 8.0]),
    ("1e1", [10.0]),
])
def test_cfg_values_parse_as_numbers(text, expected):
    assert environment_module.parse_cfgs(text) == expected


@pytest.mark.parametrize(("parser", "value", "input_name", "hint"), [
    ("parse_prompts", "", "prompts", "at least one prompt"),
    ("parse_prompts", " \n\t\n", "prompts", "at least one prompt"),
    ("parse_prompts", None, "prompts", "one prompt per line"),
    ("parse_prompts", "\n".join(f"p{i}" for i in range(1001)), "prompts", "at most 1000"),
    ("parse_sizes", "", "sizes", "at least one value"),
    ("parse_sizes", "512by512", "sizes", "WIDTHxHEIGHT"),
    ("parse_sizes", "512x", "sizes", "WIDTHxHEIGHT"),
    ("parse_sizes", "-512x512", "sizes", "WIDTHxHEIGHT"),
    ("parse_sizes", "500x512", "sizes", "multiples of 8"),
    ("parse_sizes", "8x512", "sizes", "from 16"),
    ("parse_sizes", "512x20000", "sizes", "from 16 to 2048"),
    ("parse_sizes", 512, "sizes", "comma-separated"),
    ("parse_cfgs", "", "cfg_values", "at least one value"),
    ("parse_cfgs", "7, lots", "cfg_values", "'lots' is not a number"),
    ("parse_cfgs", "0", "cfg_values", "(0, 100]"),
    ("parse_cfgs", "-3", "cfg_values", "(0, 100]"),
    ("parse_cfgs", "nan", "cfg_values", "(0, 100]"),
    ("parse_cfgs", "inf", "cfg_values", "(0, 100]"),
    ("parse_cfgs", "101", "cfg_values", "(0, 100]"),
])
def test_bad_text_inputs_name_the_input(parser, value, input_name, hint):
    with pytest.raises(TrainingInputError) as caught:
        getattr(environment_module, parser)(value)
    message = str(caught.value)
    assert message.startswith(f"{input_name}:") and hint in message, message
    assert isinstance(caught.value, ValueError)


def _plan_inputs(**changes):
    inputs = dict(prompts="a cat\na dog", negative_prompt="blurry", sizes="512x512", cfg_values="4, 7.5",
                  priority=0.5, episodes=10, seeds_per_prompt=2, mode="full sweep", router_name="my_router",
                  resume=True)
    inputs.update(changes)
    return inputs


def test_training_plan_from_inputs():
    plan = TrainingPlan.from_inputs(**_plan_inputs(mode="bandit", router_name="night_shots.safetensors"))
    assert plan.prompts == ("a cat", "a dog") and plan.sizes == ((512, 512),) and plan.cfgs == (4.0, 7.5)
    assert plan.mode == "bandit" and plan.router_name == "night_shots.safetensors" and plan.resume is True
    assert TrainingPlan.from_inputs(**_plan_inputs()).mode == "sweep"


@pytest.mark.parametrize(("changes", "input_name"), [
    ({"mode": "sweep-all"}, "mode"),
    ({"episodes": 0}, "episodes"),
    ({"episodes": 2.5}, "episodes"),
    ({"episodes": True}, "episodes"),
    ({"seeds_per_prompt": 0}, "seeds_per_prompt"),
    ({"priority": 1.5}, "priority"),
    ({"priority": "high"}, "priority"),
    ({"negative_prompt": None}, "negative_prompt"),
    ({"router_name": "../escape"}, "router_name"),
    ({"router_name": "sub/dir"}, "router_name"),
    ({"router_name": ""}, "router_name"),
    ({"router_name": ".hidden"}, "router_name"),
    ({"router_name": "a" * 101}, "router_name"),
    ({"sizes": "512x511"}, "sizes"),
    ({"cfg_values": "x"}, "cfg_values"),
    ({"prompts": ""}, "prompts"),
])
def test_training_plan_errors_name_the_input(changes, input_name):
    with pytest.raises(ValueError) as caught:
        TrainingPlan.from_inputs(**_plan_inputs(**changes))
    assert str(caught.value).startswith(f"{input_name}:"), str(caught.value)


def test_training_contexts_cover_every_combination():
    contexts = environment_module.training_contexts(2, [(64, 64), (64, 96)], [4.0, 7.5], 3)
    assert len(contexts) == 2 * 2 * 2 * 3 == len(set(contexts))
    assert {c.seed for c in contexts} == {0, 1, 2} and {c.prompt for c in contexts} == {0, 1}
    with pytest.raises(TrainingInputError, match="^seeds_per_prompt:"):
        environment_module.training_contexts(1, [(64, 64)], [4.0], 0)


def test_quality_map_and_relative_error():
    quality = environment_module.quality_from_relative_error
    assert quality(1.0) == 0.0 and quality(1e-3) == 1.0 and quality(1e-6) == 1.0
    assert quality(0.1) == pytest.approx(1 / 3) and quality(0.01) == pytest.approx(2 / 3)
    assert quality(math.inf) == 0.0 and quality(math.nan) == 0.0
    errors = [0.5, 0.1, 0.03, 0.01, 0.002]
    assert [quality(e) for e in errors] == sorted(quality(e) for e in errors)
    reference = torch.ones(1, 4, 8, 8)
    assert environment_module.relative_error(reference.clone(), reference) == 0.0
    assert environment_module.relative_error(reference * 1.1, reference) == pytest.approx(0.1)
    assert environment_module.relative_error(torch.full_like(reference, math.nan), reference) == math.inf


def test_moving_average_skips_gaps():
    average = environment_module.moving_average
    assert average([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]
    smoothed = average([math.nan, 2.0, math.nan, 4.0], 3)
    assert math.isnan(smoothed[0]) and smoothed[1:] == [2.0, 2.0, 3.0]
    with pytest.raises(ValueError):
        average([1.0], 0)


# ------------------------------------------------------------------ the environment, analytically


class FakeClip:
    """A CLIP stand-in: a seeded [1, 77, 768] embedding per text, as CLIPTextEncode returns it."""

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        self.encoded.append(tokens)
        g = torch.Generator().manual_seed(sum(map(ord, tokens)) + len(tokens))
        return [[torch.randn(1, 77, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]]


class Interrupted(Exception):
    """Stands for comfy.model_management.InterruptProcessingException (a plain Exception)."""


class FakeBridge:
    """``bridge.sample_with_expert`` on an analytic model whose shape matches the 16x16 latent."""

    def __init__(self, fail: set[str] = frozenset(), interrupt: set[str] = frozenset()) -> None:
        self.model = AnalyticModel([PromptSpec(seed=3, n_modes=3, anisotropy=8.0)], shape=(4, 2, 2))
        self.calls: list[tuple[str, int]] = []
        self.fail, self.interrupt = set(fail), set(interrupt)

    def sample_with_expert(self, model, expert, positive, negative, latent, seed, cfg, denoise=1.0, sigmas=None,
                           callback=None, preview=True, disable_pbar=None, attempts=None, fallback="BalancedMaster"):
        assert preview is False and fallback is None and disable_pbar is True
        assert latent["samples"].shape == (1, 4, 2, 2)
        self.calls.append((expert.name, seed))
        if expert.name in self.interrupt:
            raise Interrupted()
        if expert.name in self.fail:
            raise RuntimeError("the expert blew up")
        sigmas = expert.sigmas(self.model.schedule(), denoise)
        x = self.model.initial_noise(1, seed, float(sigmas[0]))
        out, run = expert.run(self.model, x, sigmas, extra_args={"cond": 0, "cfg": cfg, "seed": seed})
        if attempts is not None:  # as the real bridge: the run with its estimate's calibration inputs
            report = {"error_estimate": run.error_estimate, "estimate_features": run.estimate_features, "nfe": run.nfe}
            attempts.append(bridge.Attempt(expert=expert.name, outcome="ok", nfe=run.nfe, steps=run.steps,
                                           seconds=run.seconds, error_estimate=run.error_estimate,
                                           estimate_inputs=calibration_inputs(report, cfg)))
        return {"samples": out}, SimpleNamespace(nfe=run.nfe, steps=run.steps, seconds=run.seconds)


@pytest.fixture
def fake_bridge(monkeypatch):
    fake = FakeBridge()
    monkeypatch.setattr(bridge, "sample_with_expert", fake.sample_with_expert)
    monkeypatch.setattr(comfy_experts, "model_family", lambda model: "eps")
    return fake


def _environment(fake, runs=None, seeds=2, reference_steps=60):
    contexts = environment_module.training_contexts(2, [(16, 16)], [3.0], seeds)
    return ComfyEnvironment(fake.model, FakeClip(), ["a cat", "a dog"], "blurry", contexts, reference_steps,
                            on_run=None if runs is None else runs.append)


EXPERTS = ("QualityMaster", "SpeedDemon", "BalancedMaster")


def test_environment_runs_the_reference_once_and_each_expert_once_per_context(fake_bridge):
    runs = []
    env = _environment(fake_bridge, runs)
    experts = [get_expert(name) for name in EXPERTS]
    context = env.contexts[0]
    state = env.state(context, 0.25)
    assert state.shape == (64,) and torch.isfinite(state).all()
    first = env.evaluate(context, experts)
    again = env.evaluate(context, experts)
    assert first == again
    assert [name for name, _ in fake_bridge.calls] == ["Reference", *EXPERTS]
    assert [r.expert for r in runs] == list(EXPERTS)
    # Reports carry the state at the environment's report priority (0.5 here), whatever was asked before.
    assert all(r.priority == 0.5 and torch.equal(r.state, env.state(context, 0.5)) and r.context == context
               and r.success for r in runs)
    assert [o.expert for o in first] == list(EXPERTS)
    # Deterministic experts converge to the reference: more steps, higher order, closer.
    quality = {o.expert: o.quality for o in first}
    assert quality["QualityMaster"] > quality["BalancedMaster"] > quality["SpeedDemon"] > 0.0
    assert all(o.success and o.nfe > 0 and 0.0 <= o.quality <= 1.0 for o in first)
    # CLIP encodes each text once (both prompts share the negative).
    env.state(env.contexts[-1], 0.5)
    assert sorted(env.clip.encoded) == ["a cat", "a dog", "blurry"]


def test_environment_scores_a_failing_expert_as_a_failure(fake_bridge):
    fake_bridge.fail = {"SpeedDemon"}
    runs = []
    env = _environment(fake_bridge, runs)
    outcomes = env.evaluate(env.contexts[0], [get_expert("SpeedDemon"), get_expert("BalancedMaster")])
    assert (outcomes[0].success, outcomes[0].quality, outcomes[0].relative_error) == (False, 0.0, math.inf)
    assert outcomes[1].success
    assert runs[0].error.startswith("RuntimeError") and runs[0].success is False


def test_environment_never_swallows_the_interrupt(fake_bridge):
    fake_bridge.interrupt = {"BalancedMaster"}
    runs = []
    env = _environment(fake_bridge, runs)
    with pytest.raises(Interrupted):
        env.evaluate(env.contexts[0], [get_expert("SpeedDemon"), get_expert("BalancedMaster")])
    assert [r.expert for r in runs] == ["SpeedDemon"]
    fake_bridge.interrupt = set()
    env.evaluate(env.contexts[0], [get_expert("SpeedDemon"), get_expert("BalancedMaster")])
    assert [r.expert for r in runs] == ["SpeedDemon", "BalancedMaster"], "the interrupted run was not cached"


def test_environment_draws_only_its_contexts(fake_bridge):
    env = _environment(fake_bridge, seeds=3)
    rng = random.Random(5)
    drawn = {env.sample_context(rng) for _ in range(200)}
    assert drawn == set(env.contexts)


def test_trainer_learns_and_resumes_on_the_environment(fake_bridge, tmp_path):
    experts = [get_expert(name) for name in EXPERTS]
    checkpoint = tmp_path / "run.checkpoint.safetensors"
    first = MoERLTrainer(_environment(fake_bridge), None, experts, mode="sweep", seed=0, checkpoint_path=checkpoint,
                         checkpoint_every=1)
    partial = first.train(3)
    assert partial.episodes == 3 and checkpoint.is_file()
    resumed = MoERLTrainer(_environment(fake_bridge), None, experts, mode="sweep", seed=0,
                           checkpoint_path=checkpoint, checkpoint_every=1)
    assert resumed.episode == 3
    done = resumed.train(6)
    straight = MoERLTrainer(_environment(fake_bridge), None, experts, mode="sweep", seed=0).train(6)
    assert done.episodes == 6 and done.rewards == straight.rewards
    assert all(math.isfinite(r) for r in done.rewards + done.oracle_rewards)


def test_reports_do_not_depend_on_what_was_asked_before(fake_bridge):
    """A run's report carries the state at the node's priority even when ``state`` was never called,
    or was last called for another context or priority (no call-order dependence)."""
    runs = []
    contexts = environment_module.training_contexts(2, [(16, 16)], [3.0], 2)
    env = ComfyEnvironment(fake_bridge.model, FakeClip(), ["a cat", "a dog"], "blurry", contexts, 60,
                           on_run=runs.append, priority=0.8)
    env.state(env.contexts[-1], 0.1)  # another context, another priority
    env.evaluate(env.contexts[0], [get_expert("SpeedDemon")])
    assert runs[0].priority == 0.8 and torch.equal(runs[0].state, env.state(env.contexts[0], 0.8))


# ------------------------------------------------------------------ the latent shape, from the model


class LatentFormat:
    """Stands for a ComfyUI latent_format (``comfy.latent_formats.SD3`` and co.)."""

    def __init__(self, channels: int, dimensions: int = 2) -> None:
        self.latent_channels, self.latent_dimensions = channels, dimensions


class SD3(LatentFormat):
    def __init__(self) -> None:
        super().__init__(16)


class Flux2(LatentFormat):
    def __init__(self) -> None:
        super().__init__(128)


class StubModel:
    """A MODEL whose only ComfyUI trait is ``get_model_object("latent_format")``."""

    def __init__(self, latent_format) -> None:
        self.latent_format = latent_format

    def get_model_object(self, name):
        assert name == "latent_format"
        return self.latent_format


def test_latent_layout_and_the_sampled_shape_follow_the_model():
    shape, empty = environment_module.sampled_latent_shape, environment_module.empty_latent
    sd3, flux2, video = StubModel(SD3()), StubModel(Flux2()), StubModel(LatentFormat(16, 3))
    assert environment_module.latent_layout(sd3) == (16, 2, 8)
    assert environment_module.latent_layout(flux2) == (128, 2, 16)
    assert environment_module.latent_layout(object()) == (4, 2, 8)  # no latent_format: SD1.5's
    assert empty(sd3, 512, 768)["samples"].shape == (1, 16, 96, 64)
    assert empty(flux2, 512, 768)["samples"].shape == (1, 128, 48, 32)
    # An empty 4-channel latent (core's Empty Latent Image) is sampled with the model's channels,
    # a filled one (VAE Encode of another model) as it is; an image latent on a video model gets a time axis.
    assert shape(sd3, torch.zeros(2, 4, 64, 64)) == (2, 16, 64, 64)
    assert shape(sd3, torch.ones(1, 4, 64, 64)) == (1, 4, 64, 64)
    assert shape(video, torch.zeros(1, 16, 64, 64)) == (1, 16, 1, 64, 64)


@pytest.mark.parametrize("user_latent", [torch.zeros(1, 16, 96, 64), torch.zeros(1, 4, 96, 64)],
                         ids=["EmptySD3LatentImage", "EmptyLatentImage"])
def test_training_state_is_the_sampling_state_on_a_16_channel_model(fake_bridge, user_latent):
    """Issue 11: for SD3/Flux the training state used to say 4 channels. The training
    environment and the sampler node now take the latent shape from one helper, so the state
    the trainer learns from is the state the sampler computes for the same generation (the
    real sampler node is checked in tests/test_comfy_latent_shape.py)."""
    from moe_sampler.router.features import SOURCE_SLOTS, state_from_conditioning

    model = StubModel(SD3())
    contexts = environment_module.training_contexts(1, [(512, 768)], [4.5], 1)
    env = ComfyEnvironment(model, FakeClip(), ["a cat"], "blurry", contexts)
    context = env.contexts[0]
    training = env.state(context, 0.7)
    # What sampler_nodes.run_adaptive computes for this generation (the user's latent, interactive).
    sampling = state_from_conditioning(env.conditioning(0), env.conditioning(None),
                                       environment_module.sampled_latent_shape(model, user_latent), 4.5, 1.0, "eps",
                                       0.7, "interactive")
    keep = torch.ones(64, dtype=torch.bool)
    keep[SOURCE_SLOTS] = False  # the source one-hot says training vs interactive; the scorer ignores it
    assert torch.equal(training[keep], sampling[keep])
    assert training[50] == 1.0  # 16 channels / 16
    four_channel = state_from_conditioning(env.conditioning(0), env.conditioning(None), (1, 4, 96, 64), 4.5, 1.0,
                                           "eps", 0.7, "training")
    assert not torch.equal(training, four_channel)  # what training used to see


# ------------------------------------------------------------------------------ farm jobs (ComfyUI)


@pytest.mark.comfyui
def test_the_trainer_node_as_a_farm_worker(tiny_comfy, tmp_path, monkeypatch):
    """farm_job on: the contexts are claimed in the store, their rows written with the job, the router
    adopted through the registry (a version file plus the followed file); asked again, the done
    job sweeps nothing and reports the adopted version; bandit mode is refused naming farm_job."""
    from helpers.comfy_env import use_temp_dirs

    from moe_sampler.nodes import paths, training_nodes
    from moe_sampler.router.model import Router

    use_temp_dirs(tmp_path)
    monkeypatch.delenv(paths.DATABASE_URL_VARIABLE, raising=False)
    fake = FakeBridge()
    monkeypatch.setattr(bridge, "sample_with_expert", fake.sample_with_expert)
    monkeypatch.setattr(comfy_experts, "model_family", lambda model: "eps")
    pool = [get_expert("SpeedDemon"), get_expert("BalancedMaster")]
    inputs = dict(prompts="a cat\na dog", negative_prompt="blurry", sizes="16x16", cfg_values="3", priority=0.5,
                  episodes=3, seeds_per_prompt=2, mode="full sweep", router_name="farmed", resume=True)
    plan = TrainingPlan.from_inputs(**inputs)

    first = training_nodes.train_router(fake.model, FakeClip(), plan, pool, reference_steps=20, farm_job=True)
    farm = first.farm
    assert (farm.contexts, farm.swept, farm.lost, farm.done, farm.rows) == (3, 3, 0, 3, 6)
    assert farm.ran_update and farm.version == 1 and farm.state == "done"
    assert first.runs_recorded == 6 and first.router_file == "farmed.safetensors"
    assert "This worker swept 3 contexts; the farm has done 3 of 3 (6 rows" in first.report
    assert "Final update: ran on this worker, trained on all 6 rows; router farmed.safetensors v1 adopted" in first.report
    routers = tmp_path / "models" / "moe_routers"
    adopted = Router.load(routers / "farmed.safetensors")
    assert adopted.training["farm_job"] == farm.job and adopted.training["version"] == 1
    assert (adopted.training["contexts"], adopted.training["runs"]) == (3, 6)
    assert (routers / "farmed.versions" / "v0001.safetensors").is_file()
    rows = [r for r in paths.stats_store().runs() if r.job == farm.job]
    assert len(rows) == 6 and {r.router for r in rows} == {"farmed.safetensors"}
    assert sorted((r.details_dict()["farm"]["context"], r.expert) for r in rows) == sorted(
        (c, e.name) for c in range(3) for e in pool)
    calls = len(fake.calls)

    again = training_nodes.train_router(fake.model, FakeClip(), plan, pool, reference_steps=20, farm_job=True)
    assert (again.farm.swept, again.farm.ran_update, again.farm.version) == (0, False, 1)
    assert len(fake.calls) == calls, "a done job was swept again"
    assert "This worker swept 0 contexts" in again.report and "v1 adopted" in again.report
    assert [p.name for p in (routers / "farmed.versions").iterdir()] == ["v0001.safetensors"]

    bandit = TrainingPlan.from_inputs(**{**inputs, "mode": "bandit"})
    with pytest.raises(TrainingInputError, match="^farm_job: a farm job runs in mode 'full sweep'"):
        training_nodes.train_router(fake.model, FakeClip(), bandit, pool, reference_steps=20, farm_job=True)
