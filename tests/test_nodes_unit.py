"""The ComfyUI-free logic of nodes/: name checks, paths, the sampler descriptor table, pools,
errors that name the node input, store rows and the badge. Runs without ComfyUI (a stand-in
``folder_paths`` module plays ComfyUI's folder registry)."""

from __future__ import annotations

import math
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import import_node_module

paths = import_node_module("paths")
bridge = import_node_module("bridge")
comfy_experts = import_node_module("comfy_experts")

from moe_sampler.experts import default_pool, expert_names, get_expert  # noqa: E402
from moe_sampler.experts.base import Expert, ExpertDescriptor  # noqa: E402


# ------------------------------------------------------------------------------ a folder_paths stand-in


def _fake_folder_paths(root: Path) -> types.ModuleType:
    """The parts of ComfyUI's folder_paths that nodes/paths.py uses, with the same semantics."""
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(root / "models")
    fp.folder_names_and_paths = {}

    def add_model_folder_path(name, path, is_default=False):
        if name in fp.folder_names_and_paths:
            folders = fp.folder_names_and_paths[name][0]
            if path in folders:
                folders.remove(path)
            folders.insert(0, path) if is_default else folders.append(path)
        else:
            fp.folder_names_and_paths[name] = ([path], set())

    def get_folder_paths(name):
        return list(fp.folder_names_and_paths[name][0])

    def get_filename_list(name):
        folders, extensions = fp.folder_names_and_paths[name]
        found = set()
        for folder in folders:
            for dirpath, _, files in os.walk(folder):
                for f in files:
                    if not extensions or os.path.splitext(f)[1].lower() in extensions:
                        found.add(Path(os.path.relpath(os.path.join(dirpath, f), folder)).as_posix())
        return sorted(found)

    def get_system_user_directory(name):
        return str(root / "user" / f"__{name}")

    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = get_folder_paths
    fp.get_filename_list = get_filename_list
    fp.get_system_user_directory = get_system_user_directory
    return fp


@pytest.fixture
def folders(tmp_path, monkeypatch):
    fp = _fake_folder_paths(tmp_path)
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    paths.register_folders()
    return fp


# ------------------------------------------------------------------------------ names and paths


@pytest.mark.parametrize("name, problem", [
    ("/etc/passwd.safetensors", "absolute"),
    ("C:/routers/x.safetensors", "absolute"),
    ("..\\x.safetensors", "backslash"),
    ("../x.safetensors", "'..'"),
    ("sub/../../x.safetensors", "'..'"),
    ("sub//x.safetensors", "empty"),
    ("./x.safetensors", "'.'"),
    ("router.pt", "safetensors"),
    ("", "pick a router"),
    (None, "pick a router"),
])
def test_router_names_that_would_leave_the_folder_are_refused(name, problem):
    with pytest.raises(ValueError, match="router") as err:
        paths.check_router_name(name)
    assert problem in str(err.value)


@pytest.mark.parametrize("name", ["r.safetensors", "sub/dir/my-router_2.safetensors", "A.SAFETENSORS"])
def test_router_names_inside_the_folder_pass(name):
    assert paths.check_router_name(name) == name


@pytest.mark.parametrize("name, expected", [
    ("my_router", "my_router.safetensors"),
    ("v1.2-final", "v1.2-final.safetensors"),
    ("already.safetensors", "already.safetensors"),
    ("  padded  ", "padded.safetensors"),
])
def test_save_names_get_one_extension(name, expected):
    assert paths.check_save_name(name) == expected


@pytest.mark.parametrize("name", ["", "../up", "a/b", "a\\b", ".hidden", "-dash", "a..b", "x" * 101, "sp ace", 3])
def test_bad_save_names_name_the_input(name):
    with pytest.raises(ValueError, match="^router_name: "):
        paths.check_save_name(name)


def test_is_inside_is_lexical_and_excludes_the_folder_itself(tmp_path):
    assert paths.is_inside(tmp_path, tmp_path / "a" / "b")
    assert not paths.is_inside(tmp_path, tmp_path / ".." / "x")
    assert not paths.is_inside(tmp_path, tmp_path)
    assert not paths.is_inside(tmp_path / "a", tmp_path / "ab")


def test_register_folders_restricts_to_safetensors_and_keeps_extra_folders(tmp_path, monkeypatch):
    fp = _fake_folder_paths(tmp_path)
    fp.folder_names_and_paths["moe_routers"] = ([str(tmp_path / "extra")], set())  # from extra_model_paths.yaml
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    default = paths.register_folders()
    folders, extensions = fp.folder_names_and_paths["moe_routers"]
    assert default == tmp_path / "models" / "moe_routers"
    assert folders == [str(default), str(tmp_path / "extra")]
    assert extensions == {".safetensors"}


def test_router_dropdown_lists_the_builtin_first_then_safetensors_only(folders, tmp_path):
    folder = tmp_path / "models" / "moe_routers"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.safetensors", "a.safetensors", "sub/c.safetensors", "notes.txt", "old.pt"):
        (folder / name).write_bytes(b"x")
    assert paths.router_names() == [paths.BUILTIN_ROUTER, "a.safetensors", "b.safetensors", "sub/c.safetensors"]


def test_resolve_router(folders, tmp_path):
    folder = tmp_path / "models" / "moe_routers"
    folder.mkdir(parents=True)
    (folder / "r.safetensors").write_bytes(b"x")
    (tmp_path / "models" / "outside.safetensors").write_bytes(b"x")
    assert paths.resolve_router(paths.BUILTIN_ROUTER) is None
    assert paths.resolve_router("r.safetensors") == folder / "r.safetensors"
    with pytest.raises(ValueError, match="^router: router file 'missing.safetensors' not found.*available: .*r.safetensors"):
        paths.resolve_router("missing.safetensors")
    with pytest.raises(ValueError, match="^router: .*'..'"):
        paths.resolve_router("../outside.safetensors")


def test_router_save_path_is_in_the_first_folder(folders, tmp_path):
    assert paths.router_save_path("mine") == tmp_path / "models" / "moe_routers" / "mine.safetensors"
    with pytest.raises(ValueError, match="^name: "):
        paths.router_save_path("../../evil", input_name="name")


def test_stats_store_lives_in_the_internal_user_directory(folders, tmp_path):
    path = paths.stats_store_path()
    assert path == tmp_path / "user" / "__moe_sampler" / "stats.sqlite3"
    store = paths.stats_store()
    assert store is paths.stats_store()  # one per process and path
    assert Path(store.path) == path


def test_load_router_caches_by_mtime_and_names_the_input_on_errors(folders, tmp_path):
    from moe_sampler.router.model import Router, RouterLoadError

    folder = tmp_path / "models" / "moe_routers"
    Router.default().save(folder / "good.safetensors")
    (folder / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    first = paths.load_router("good.safetensors")
    assert paths.load_router("good.safetensors") is first
    os.utime(folder / "good.safetensors", (1, 1))
    assert paths.load_router("good.safetensors") is not first
    assert paths.router_mtime("good.safetensors") == 1
    assert paths.router_mtime(paths.BUILTIN_ROUTER) is None
    with pytest.raises(RouterLoadError, match="^router: "):
        paths.load_router("corrupt.safetensors")
    assert isinstance(paths.load_router(paths.BUILTIN_ROUTER), Router)


# ------------------------------------------------------------------------------ experts from ComfyUI samplers


@pytest.mark.parametrize("sampler, order, calls, stochastic", [
    ("euler", 1, 1, False),
    ("heun", 2, 2, False),
    ("dpm_2", 2, 2, False),
    ("dpmpp_2m", 2, 1, False),
    ("lms", 4, 1, False),
    ("euler_ancestral", 0.5, 1, True),
    ("dpmpp_sde", 0.5, 2, True),
    ("dpmpp_3m_sde", 0.5, 1, True),
    ("ddim", 1, 1, False),
    ("uni_pc", 3, 1, False),
])
def test_descriptor_table(sampler, order, calls, stochastic):
    d = comfy_experts.comfy_descriptor(sampler, "karras", 20)
    assert (d.order, d.calls_per_step, d.stochastic) == (order, calls, stochastic)
    assert d.solver == sampler and d.steps == 20 and d.schedule == "karras"
    assert d.max_nfe == math.ceil(20 * calls)
    assert d.name == f"{sampler}/karras/20"


def test_unknown_sampler_gets_conservative_defaults():
    d = comfy_experts.comfy_descriptor("some_new_sampler", "normal", 10)
    info = comfy_experts.UNKNOWN_SOLVER
    assert (d.order, d.calls_per_step, d.stochastic) == (info.order, info.calls_per_step, info.stochastic)
    assert d.order <= min(i.order for i in comfy_experts.COMFY_SOLVERS.values() if not i.stochastic)
    assert d.calls_per_step >= 2
    assert "conservative" in d.description


@pytest.mark.parametrize("scheduler, family", [
    ("karras", "karras"), ("exponential", "exponential"), ("normal", "discrete"), ("simple", "discrete"),
    ("beta", "discrete"), ("linear_quadratic", "other"), ("kl_optimal", "other"),
])
def test_schedule_families(scheduler, family):
    assert comfy_experts.comfy_descriptor("euler", scheduler, 5).schedule == family


def test_adaptive_sampler_and_stop_rule_descriptors():
    d = comfy_experts.comfy_descriptor("dpm_adaptive", "karras", 20)
    assert (d.schedule, d.stop_rule) == ("adaptive", "error_control")
    c = comfy_experts.comfy_descriptor("euler", "normal", 30, "converged")
    assert c.name == "euler/normal/30/converged" and c.stop_rule == "converged"


@pytest.mark.parametrize("steps", [0, -1, 2.5, True, "20"])
def test_steps_below_one_name_the_steps_input(steps):
    with pytest.raises(ValueError, match="^steps: "):
        comfy_experts.comfy_descriptor("euler", "normal", steps)


def test_stop_rule_must_be_known():
    with pytest.raises(ValueError, match="^stop_rule: "):
        comfy_experts.comfy_descriptor("euler", "normal", 20, "error_control")


@pytest.mark.parametrize("name", ["euler/normal", "../normal/20", "euler/../20", "euler//20", "eu ler/normal/20",
                                  "euler/normal/20\x00", "BalancedMaster", 7])
def test_custom_expert_names_cannot_escape_or_collide(name):
    with pytest.raises(ValueError):
        comfy_experts.check_custom_expert_name(name)


def test_custom_expert_names_never_collide_with_builtins():
    assert all("/" not in name for name in expert_names(include_compat=True))
    assert comfy_experts.custom_expert_name("euler", "normal", 20) == "euler/normal/20"


def test_convergence_min_steps_follows_early_stopper():
    from moe_sampler.experts.builtin import EARLY_STOP_STEPS
    from moe_sampler.experts.early_stop import DEFAULT_MIN_STEPS

    assert comfy_experts.convergence_min_steps(EARLY_STOP_STEPS) == DEFAULT_MIN_STEPS
    assert comfy_experts.convergence_min_steps(1) == 2


# ------------------------------------------------------------------------------ pools and modes


def _custom(name: str = "euler/normal/7") -> Expert:
    descriptor = ExpertDescriptor(name=name, solver="euler", order=1, calls_per_step=1, steps=7,
                                  schedule="discrete", stochastic=False)
    return Expert(descriptor, lambda model, x, sigmas, **kw: x, lambda schedule, n: torch.zeros(n + 1))


def test_pool_defaults_order_and_duplicates():
    main = [e.name for e in default_pool()]
    enabled = {name: not get_expert(name).compat for name in expert_names(include_compat=True)}
    custom = _custom()
    pool = comfy_experts.assemble_pool(enabled, [None, custom, _custom()])
    assert [e.name for e in pool] == [*main, custom.name]
    assert pool[-1] is custom  # later duplicates of a name are dropped
    base = (get_expert(main[-1]),)
    assert [e.name for e in comfy_experts.assemble_pool({main[0]: True}, base=base)] == [main[-1], main[0]]


def test_pool_errors():
    with pytest.raises(ValueError, match="unknown built-in experts"):
        comfy_experts.assemble_pool({"NoSuchExpert": True})
    with pytest.raises(TypeError, match="MOE_EXPERT"):
        comfy_experts.assemble_pool({}, ["euler"])
    with pytest.raises(ValueError, match="^expert_pool: the expert pool is empty"):
        comfy_experts.check_pool(comfy_experts.assemble_pool({name: False for name in expert_names()}))
    with pytest.raises(ValueError, match="^expert_pool: "):
        comfy_experts.check_pool(None)


def test_forced_mode():
    pool = tuple(default_pool())
    assert comfy_experts.forced_expert("auto", pool) is None
    assert comfy_experts.forced_expert(pool[1].name, pool) is pool[1]
    with pytest.raises(ValueError, match="^mode: expert 'FastSampler' is not in the expert pool"):
        comfy_experts.forced_expert("FastSampler", pool)


# ------------------------------------------------------------------------------ model family, latents


def _sampling(*bases: str) -> object:
    classes = {name: type(name, (), {}) for name in ("EPS", "CONST", "COSMOS_RFLOW", "ModelSamplingDiscrete")}
    classes["V_PREDICTION"] = type("V_PREDICTION", (classes["EPS"],), {})
    classes["EDM"] = type("EDM", (classes["V_PREDICTION"],), {})
    classes["X0"] = type("X0", (classes["EPS"],), {})
    return type("ModelSampling", tuple(classes[b] for b in bases), {})()


@pytest.mark.parametrize("bases, family", [
    (("ModelSamplingDiscrete", "EPS"), "eps"),
    (("ModelSamplingDiscrete", "X0"), "eps"),
    (("ModelSamplingDiscrete", "V_PREDICTION"), "v"),
    (("EDM",), "v"),
    (("CONST",), "flow"),
    (("COSMOS_RFLOW",), "flow"),
    (("ModelSamplingDiscrete",), "eps"),  # unknown: eps, with a warning
])
def test_model_family(bases, family):
    assert comfy_experts.family_of_sampling(_sampling(*bases)) == family


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_latent_names_latent_image(value):
    samples = torch.zeros(1, 4, 8, 8)
    samples[0, 1, 2, 3] = value
    with pytest.raises(ValueError, match="^latent_image: the latent contains 1 NaN/Inf"):
        bridge.check_latent({"samples": samples})


@pytest.mark.parametrize("latent", [None, {}, {"samples": [1, 2]}, torch.zeros(1, 4, 8, 8)])
def test_malformed_latent_names_latent_image(latent):
    with pytest.raises(ValueError, match="^latent_image: expected a LATENT"):
        bridge.check_latent(latent)


# ------------------------------------------------------------------------------ store rows and badge


def _attempt(expert: str, outcome: str = "ok", **kw) -> "bridge.Attempt":
    return bridge.Attempt(expert=expert, outcome=outcome, nfe=kw.pop("nfe", 20), steps=kw.pop("steps", 20),
                          seconds=kw.pop("seconds", 1.5), **kw)


SELECTION = SimpleNamespace(confidence=0.8, propensity=0.6, decision_seconds=0.0002)


def test_run_records_for_a_fallback():
    attempts = [_attempt("NaNExpert", "non_finite", error="the expert's output contains NaN/Inf", nfe=3),
                _attempt("BalancedMaster")]
    state = torch.linspace(-1, 1, 64)
    failed, fallback = bridge.run_records(attempts, state=state, selection=SELECTION, router="default",
                                          priority=0.5, seed=2**64 - 1)
    assert (failed.expert, failed.success, failed.nfe, failed.propensity, failed.confidence) == \
        ("NaNExpert", False, 3, 0.6, 0.8)
    assert "NaN" in failed.error and failed.source == "sampling" and failed.seed == 2**64 - 1
    assert (fallback.expert, fallback.success, fallback.propensity, fallback.confidence) == \
        ("BalancedMaster", True, None, None)
    assert len(failed.state) == 64


def test_run_records_forced_and_quality_from_every_estimate():
    converged = _attempt("euler/normal/30/converged", error_estimate=1e-2, stop_rule="converged", stopped_early=True)
    (record,) = bridge.run_records([converged], state=None, selection=None, router="manual", priority=1.0, seed=1)
    assert record.propensity == 1.0 and record.confidence is None and record.router == "manual"
    assert record.quality == pytest.approx(2 / 3)
    assert record.error_estimate == 1e-2 and record.quality_source == "estimate"
    adaptive = _attempt("NoiseAdaptive", error_estimate=1e-3, stop_rule="error_control")
    (record,) = bridge.run_records([adaptive], state=None, selection=SELECTION, router="r.safetensors",
                                   priority=0.0, seed=None)
    assert record.quality == pytest.approx(1.0) and record.quality_source == "estimate"
    (record,) = bridge.run_records([_attempt("SpeedDemon")], state=None, selection=None, router="manual",
                                   priority=0.5, seed=None)
    assert record.quality is None and record.quality_source is None and record.error_estimate is None


def test_run_records_quality_through_a_calibration():
    from moe_sampler.router.calibration import Calibration, ExpertFit

    inputs = {"estimate": 1e-2}
    calibration = Calibration({"BalancedMaster": ExpertFit(("log10_estimate",), (-1.0, 1.0), 0.2, 50)})
    attempt = _attempt("BalancedMaster", error_estimate=1e-2, estimate_inputs=inputs)
    (record,) = bridge.run_records([attempt], state=None, selection=None, router="manual", priority=0.5, seed=None,
                                   calibration=calibration)
    assert record.quality == pytest.approx(1.0)  # calibrated error 1e-3, where the raw 1e-2 would score 2/3
    (record,) = bridge.run_records([attempt], state=None, selection=None, router="manual", priority=0.5, seed=None,
                                   calibration=Calibration())
    assert record.quality == pytest.approx(2 / 3)  # nothing calibrated: the raw estimate's score
    assert bridge.estimated_quality(attempt, calibration) == (pytest.approx(1.0), True)
    # an expert without a fit of its own keeps the raw score (a pooled fit does not count)
    pooled = Calibration({"*": ExpertFit(("log10_estimate",), (-1.0, 1.0), 0.2, 50)})
    assert bridge.estimated_quality(attempt, pooled) == (pytest.approx(2 / 3), False)
    assert bridge.estimated_quality(_attempt("BalancedMaster", "non_finite"), calibration) == (None, False)


def test_badge():
    report = bridge.SamplingReport((_attempt("NaNExpert", "non_finite"), _attempt("BalancedMaster", nfe=20)),
                                   scheduled_steps=20, wall_seconds=2.345678)
    ui = bridge.badge(report, SELECTION, "default")
    (info,) = ui["moe_run"]
    assert info == {
        "expert": "BalancedMaster", "requested": "NaNExpert", "confidence": 0.8, "propensity": 0.6, "nfe": 20,
        "steps": 20, "seconds": 2.3457, "router": "default", "forced": False, "fallback": True,
        "stopped_early": False, "decision_ms": 0.2,
    }
    assert ui["text"] == ["BalancedMaster (fallback: NaNExpert failed): 20 model calls, 2.35 s, confidence 80%"]
    forced = bridge.badge(bridge.SamplingReport((_attempt("SpeedDemon", nfe=10),), 10, 1.0), None, "manual")
    assert forced["moe_run"][0]["forced"] and forced["moe_run"][0]["confidence"] is None
    assert forced["text"][0].endswith("forced")
