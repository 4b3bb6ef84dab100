"""Regression tests for what an adversarial test of the pack found (issue 9), one named after each
defect: training sizes and prompts bounded, hostile router files refused before anything is
allocated, the router listing bounded and cached, and errors that name the node input at fault
without absolute server paths.

The tests marked ``comfyui`` run the sampler and trainer inside a real ComfyUI (``COMFYUI_PATH``).
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import sys
import threading
import time
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from helpers import import_node_module

paths = import_node_module("paths")
bridge = import_node_module("bridge")
routes = import_node_module("routes")
environment_module = import_node_module("comfy_environment")

from moe_sampler.router import model as router_model  # noqa: E402
from moe_sampler.router.features import FEATURE_VERSION  # noqa: E402
from moe_sampler.router.model import ExpertScorer, Router, RouterLoadError  # noqa: E402

TrainingInputError = environment_module.TrainingInputError
TrainingPlan = environment_module.TrainingPlan


# ------------------------------------------------------------------------------ helpers


def _fake_folder_paths(root: Path) -> types.ModuleType:
    """ComfyUI's folder registry as nodes/paths.py uses it, with one routers folder under ``root``."""
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(root / "models")
    fp.folder_names_and_paths = {}

    def add_model_folder_path(name, path, is_default=False):
        fp.folder_names_and_paths.setdefault(name, ([], set()))[0].insert(0, path)

    def get_filename_list(name):
        folders, extensions = fp.folder_names_and_paths[name]
        return sorted(Path(os.path.relpath(os.path.join(d, f), folder)).as_posix()
                      for folder in folders for d, _, files in os.walk(folder) for f in files
                      if os.path.splitext(f)[1].lower() in extensions)

    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])
    fp.get_filename_list = get_filename_list
    fp.get_system_user_directory = lambda name: str(root / "user" / f"__{name}")
    return fp


@pytest.fixture
def router_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "folder_paths", _fake_folder_paths(tmp_path))
    monkeypatch.setattr(routes, "_listing", {})
    folder = paths.register_folders()
    folder.mkdir(parents=True)
    return folder


def _plan(**changes):
    inputs = dict(prompts="a cat\na dog", negative_prompt="blurry", sizes="512x512", cfg_values="4, 7.5",
                  priority=0.5, episodes=10, seeds_per_prompt=2, mode="full sweep", router_name="my_router",
                  resume=True)
    inputs.update(changes)
    return TrainingPlan.from_inputs(**inputs)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                      pad_header: int = 0) -> Path:
    """A safetensors file written by hand: u64 header length, JSON header, raw little-endian data."""
    header: dict = {"__metadata__": metadata}
    data, offset = b"", 0
    for name, tensor in tensors.items():
        raw = tensor.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(raw)]}
        data, offset = data + raw, offset + len(raw)
    text = json.dumps(header).encode()
    text += b" " * pad_header
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def router_metadata(**changes: str) -> dict[str, str]:
    metadata = {"format": "moe_sampler.router", "feature_version": str(FEATURE_VERSION), "state_dim": "64",
                "descriptor_dim": "16", "hidden": "32", "name": "hostile", "training": "{}", "experts": "[]"}
    metadata.update(changes)
    return metadata


def default_weights() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ExpertScorer().state_dict().items()}


# ------------------------------------------------------------------------------ 1. training sizes


@pytest.mark.parametrize("sizes", ["16384x16384", "4096x512", "512x4096", "2048x2048", "2048x1536"])
def test_trainer_refuses_sizes_beyond_memory_cap(sizes):
    with pytest.raises(TrainingInputError) as caught:
        environment_module.parse_sizes(sizes)
    assert str(caught.value).startswith("sizes:"), caught.value
    with pytest.raises(TrainingInputError, match="^sizes:"):
        _plan(sizes=f"512x512, {sizes}")
    assert environment_module.parse_sizes("1536x1536, 2048x1152, 1152x2048") == [(1536, 1536), (2048, 1152),
                                                                               (1152, 2048)]


def test_trainer_refuses_sizes_beyond_free_memory(monkeypatch):
    """Below the static cap, the sizes are checked against ComfyUI's memory estimate for the model."""
    free = {"bytes": 4 * 2**30}
    mm = types.ModuleType("comfy.model_management")
    mm.get_free_memory = lambda device=None: free["bytes"]
    mm.get_total_memory = lambda device=None: 80 * 2**30
    mm.get_torch_device = lambda: torch.device("cpu")
    comfy = types.ModuleType("comfy")
    comfy.model_management = mm
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    shapes = []

    def memory_required(shape):  # ComfyUI's formula without flash attention: 0.15 MB per latent pixel
        shapes.append(shape)
        return shape[0] * shape[2] * shape[3] * 0.15 * 2**20

    model = SimpleNamespace(model=SimpleNamespace(memory_required=memory_required), load_device=torch.device("cpu"))
    environment_module.check_sizes_fit(model, [(512, 512), (1024, 1024)])  # 0.6 and 2.4 GB of 4 GB free
    assert shapes == [[1, 4, 64, 64], [1, 4, 128, 128]]
    with pytest.raises(TrainingInputError) as caught:
        environment_module.check_sizes_fit(model, [(512, 512), (1536, 1536)])  # 5.4 GB
    message = str(caught.value)
    assert message.startswith("sizes: 1536x1536 needs about 5.4 GB") and "4.0 GB of free RAM" in message, message
    # On a GPU ComfyUI offloads: the device's total memory counts, not what is free right now.
    free["bytes"] = 0
    gpu = SimpleNamespace(model=model.model, load_device=SimpleNamespace(type="cuda"))
    environment_module.check_sizes_fit(gpu, [(1536, 1536)])
    # Something that is not a ComfyUI model has no estimate: only the static caps apply.
    environment_module.check_sizes_fit(object(), [(1536, 1536)])


# ------------------------------------------------------------------------------ 2. hostile router files


def test_router_load_rejects_hidden_metadata_before_allocating(tmp_path, monkeypatch):
    """A 15 KB file claiming hidden 30000 cost 3.4 GB and 20 s; now it is refused from its header."""
    weights = default_weights()
    built = []
    real_init = ExpertScorer.__init__

    def counting_init(self, *args, **kwargs):
        built.append(kwargs.get("hidden", args[0] if args else 32))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(ExpertScorer, "__init__", counting_init)
    cases = {"30000": "hidden is 30000; a router's hidden width must be from 1 to 1024",
             "100000": "hidden is 100000",
             "-5": "hidden is -5",
             "0": "hidden is 0",
             "abc": "hidden is 'abc', not a whole number",
             "1000": "net.0.weight has shape [32, 80], the metadata's hidden width needs [1000, 80]"}
    for hidden, expected in cases.items():
        path = write_safetensors(tmp_path / f"h{hidden}.safetensors", weights, router_metadata(hidden=hidden))
        assert path.stat().st_size < 16_000
        start = time.perf_counter()
        with pytest.raises(RouterLoadError) as caught:
            Router.load(path, label=path.name)
        elapsed = time.perf_counter() - start
        assert str(caught.value).startswith(path.name) and expected in str(caught.value), caught.value
        assert elapsed < 1.0, f"hidden {hidden}: {elapsed:.2f} s"
    assert built == [], "a scorer was built before the metadata was checked"


@pytest.mark.parametrize(("changes", "expected"), [
    ({"feature_version": "abc"}, "feature_version is 'abc', not a whole number"),
    ({"feature_version": ""}, "feature_version is '', not a whole number"),
    ({"state_dim": "65"}, "state_dim is '65'"),
    ({"descriptor_dim": "x"}, "descriptor_dim is 'x', not a whole number"),
])
def test_router_load_rejects_bad_metadata_numbers_naming_the_router(tmp_path, changes, expected):
    path = write_safetensors(tmp_path / "bad.safetensors", default_weights(), router_metadata(**changes))
    with pytest.raises(RouterLoadError) as caught:
        Router.load(path)
    assert str(caught.value).startswith(str(path)) and expected in str(caught.value), caught.value


def test_router_load_rejects_tensors_that_disagree_with_their_header(tmp_path):
    weights = default_weights()
    path = write_safetensors(tmp_path / "short.safetensors", weights, router_metadata())
    data = bytearray(path.read_bytes())
    header_length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_length])
    header["net.2.weight"]["data_offsets"][1] += 4 * 1000  # claims more bytes than its shape
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data[8 + header_length:]))
    with pytest.raises(RouterLoadError, match="byte range does not match its shape"):
        Router.load(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_router_load_refuses_non_finite_weights(tmp_path, bad):
    weights = default_weights()
    weights["net.2.weight"][3, 5] = bad
    path = write_safetensors(tmp_path / "nan.safetensors", weights, router_metadata())
    with pytest.raises(RouterLoadError, match=r"weights contain NaN or Inf \(net\.2\.weight\)"):
        Router.load(path)


def test_router_load_bounds_the_header_it_reads(tmp_path):
    path = write_safetensors(tmp_path / "fat.safetensors", default_weights(), router_metadata(),
                             pad_header=router_model.MAX_HEADER_BYTES)
    start = time.perf_counter()
    with pytest.raises(RouterLoadError, match=rf"header is \d+ bytes; a router's header is at most "
                                              rf"{router_model.MAX_HEADER_BYTES} bytes"):
        Router.load(path)
    assert time.perf_counter() - start < 0.5
    # The bound leaves room: a router describing 1000 experts has a header of about 300 KB.
    experts = [{"name": f"e{i}", "solver": "dpmpp_2m", "order": 2.0, "calls_per_step": 1.0, "steps": 20,
                "schedule": "karras", "stochastic": False, "stop_rule": "none", "max_nfe": 20,
                "description": "x" * 120} for i in range(1000)]
    big = write_safetensors(tmp_path / "many.safetensors", default_weights(),
                            router_metadata(experts=json.dumps(experts)))
    assert len(Router.load(big).descriptors) == 1000


def test_router_saved_by_the_pack_still_loads(tmp_path):
    router = Router(name="ok", training={"contexts": 3, "runs": 9})
    loaded = Router.load(router.save(tmp_path / "ok.safetensors"))
    assert loaded.name == "ok" and loaded.training == {"contexts": 3, "runs": 9}
    for hidden in (1, 8, 64):
        shapes = {k: tuple(v.shape) for k, v in ExpertScorer(hidden=hidden).state_dict().items()}
        assert ExpertScorer.parameter_shapes(hidden) == shapes


def test_load_router_errors_name_the_input_and_file_not_the_path(router_folder):
    write_safetensors(router_folder / "hostile.safetensors", default_weights(), router_metadata(hidden="30000"))
    with pytest.raises(RouterLoadError) as caught:
        paths.load_router("hostile.safetensors")
    message = str(caught.value)
    assert message.startswith("router: hostile.safetensors: metadata hidden is 30000"), message
    assert str(router_folder) not in message
    with pytest.raises(ValueError) as caught:
        paths.resolve_router("missing.safetensors")
    assert "not found in the moe_routers models folder" in str(caught.value)
    assert str(router_folder) not in str(caught.value)


# ------------------------------------------------------------------------------ 4. prompt length


@pytest.mark.parametrize(("inputs", "named", "hint"), [
    ({"prompts": "a cat " * 400_000}, "prompts", "2400000 characters; at most 100000 in all"),
    ({"prompts": "a cat\n" + "x" * 2001}, "prompts", "prompt 2 has 2001 characters; at most 2000 per prompt"),
    ({"prompts": "\n".join(f"prompt {i} " + "y" * 150 for i in range(700))}, "prompts", "at most 100000 in all"),
    ({"negative_prompt": "blurry, " * 25_000}, "negative_prompt", "200000 characters; at most 2000"),
    ({"negative_prompt": "z" * 2001}, "negative_prompt", "2001 characters"),
    ({"sizes": "512x512, " * 2000}, "sizes", "at most 10000"),
    ({"sizes": "9" * 5000 + "x512"}, "sizes", "is not WIDTHxHEIGHT"),
    ({"cfg_values": "7, " * 5000}, "cfg_values", "at most 10000"),
])
def test_trainer_caps_prompt_length(inputs, named, hint):
    start = time.perf_counter()
    with pytest.raises(TrainingInputError) as caught:
        _plan(**inputs)
    message = str(caught.value)
    assert message.startswith(f"{named}:") and hint in message, message
    assert time.perf_counter() - start < 0.5
    ok = _plan(prompts="\n".join("p" * 1999 + str(i) for i in range(10)), negative_prompt="n" * 2000)
    assert len(ok.prompts) == 10 and len(ok.negative) == 2000


# ------------------------------------------------------------------------------ 5. the router listing


def test_router_listing_skips_huge_headers_and_caches_reads(router_folder, monkeypatch):
    """One 60 MB-header file used to cost every request a full parse (0.16 s, +180 MB each)."""
    Router(name="good").save(router_folder / "good.safetensors")
    huge = router_folder / "huge.safetensors"
    save_file({"w": torch.zeros(2)}, str(huge), metadata={"format": "moe_sampler.router", "feature_version": "1",
                                                          "experts": "x" * (60 * 2**20)})
    (router_folder / "junk.safetensors").write_bytes(b"\x00" * 40)
    reads = []
    real = routes._router_metadata
    monkeypatch.setattr(routes, "_router_metadata", lambda path, name: reads.append(name) or real(path, name))

    start = time.perf_counter()
    listing = {entry["name"]: entry for entry in routes.routers_payload()}
    assert time.perf_counter() - start < 1.0
    assert sorted(reads) == ["good.safetensors", "huge.safetensors", "junk.safetensors"]
    assert "error" not in listing["good.safetensors"] and listing["good.safetensors"]["compatible"]
    assert "safetensors header is 629" in listing["huge.safetensors"]["error"]
    assert "not a valid safetensors router file" in listing["junk.safetensors"]["error"]
    assert str(router_folder) not in json.dumps(listing), "a response carries an absolute path"

    reads.clear()
    assert routes.routers_payload() == list(listing.values())
    assert reads == [], "unchanged files were read again"
    stat = (router_folder / "good.safetensors").stat()
    os.utime(router_folder / "good.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    routes.routers_payload()
    assert reads == ["good.safetensors"]
    huge.unlink()
    assert [entry["name"] for entry in routes.routers_payload()] == ["good.safetensors", "junk.safetensors"]
    assert set(routes._listing) == {str(router_folder / "good.safetensors"), str(router_folder / "junk.safetensors")}


def test_router_listing_reads_each_file_once_under_parallel_requests(router_folder, monkeypatch):
    for i in range(5):
        Router(name=f"r{i}").save(router_folder / f"r{i}.safetensors")
    reads = []
    real = routes._router_metadata
    monkeypatch.setattr(routes, "_router_metadata", lambda path, name: reads.append(name) or real(path, name))
    results = []
    threads = [threading.Thread(target=lambda: results.append(routes.routers_payload())) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 40 and all(result == results[0] for result in results)
    assert sorted(reads) == [f"r{i}.safetensors" for i in range(5)]


def test_router_listing_errors_carry_no_paths(router_folder, monkeypatch):
    Router(name="good").save(router_folder / "good.safetensors")

    def failing(path, name):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(routes, "_router_metadata", failing)
    (entry,) = routes.routers_payload()
    assert entry["error"] == "PermissionError: Permission denied"


# ------------------------------------------------------------------------------ 7. smaller ones


@pytest.mark.parametrize("samples", [torch.zeros(1, 4, 0, 0), torch.zeros(0, 4, 8, 8), torch.zeros(1, 4, 8, 0),
                                     torch.zeros(4, 8), torch.zeros(1, 0, 8, 8)])
def test_empty_latent_names_latent_image(samples):
    with pytest.raises(ValueError, match=r"^latent_image: the latent has shape"):
        bridge.check_latent({"samples": samples})


def test_latent_of_the_wrong_dimensions_names_latent_image():
    image_model = SimpleNamespace(model=SimpleNamespace(latent_format=SimpleNamespace(latent_dimensions=2)))
    video_model = SimpleNamespace(model=SimpleNamespace(latent_format=SimpleNamespace(latent_dimensions=3)))
    with pytest.raises(ValueError, match=r"^latent_image: a 5-D latent .* this model samples \[batch, channels, "
                                         r"height, width\]"):
        bridge.check_latent({"samples": torch.zeros(1, 4, 2, 8, 8)}, model=image_model)
    with pytest.raises(ValueError, match="^latent_image: a 3-D latent"):
        bridge.check_latent({"samples": torch.zeros(1, 4, 8)}, model=image_model)
    bridge.check_latent({"samples": torch.zeros(1, 4, 8, 8)}, model=image_model)
    bridge.check_latent({"samples": torch.zeros(1, 16, 2, 8, 8)}, model=video_model)
    bridge.check_latent({"samples": torch.zeros(1, 16, 8, 8)}, model=video_model)  # core unsqueezes it


@pytest.mark.parametrize("where", ["embeddings", "pooled_output"])
def test_nan_conditioning_names_positive_or_negative(where):
    good = [[torch.zeros(1, 77, 768), {"pooled_output": torch.zeros(1, 768)}]]
    bad = [[torch.zeros(1, 77, 768), {"pooled_output": torch.zeros(1, 768)}]]
    (bad[0][0] if where == "embeddings" else bad[0][1]["pooled_output"])[0, 0] = float("nan")
    assert bridge.check_conditioning(good, "positive") is good
    for name in ("positive", "negative"):
        with pytest.raises(ValueError, match=f"^{name}: the conditioning's {where} contain NaN/Inf"):
            bridge.check_conditioning(bad, name)
    for malformed in (None, "text", [torch.zeros(1)], [[torch.zeros(1), "x"]]):
        with pytest.raises(ValueError, match="^negative: expected a CONDITIONING"):
            bridge.check_conditioning(malformed, "negative")


@pytest.mark.parametrize("name", ["con", "CON", "Nul", "aux", "prn", "com1", "COM9", "lpt1", "LPT3", "con.safetensors",
                                  "NUL.safetensors", "aux.backup", "com1.v2.safetensors", "con.", "nul.tar"])
def test_windows_device_names_are_refused_as_router_name(name):
    with pytest.raises(ValueError, match="^router_name: .* is a Windows device name"):
        paths.check_save_name(name)
    with pytest.raises(ValueError, match="^router_name:"):
        _plan(router_name=name)
    picked = name if name.lower().endswith(".safetensors") else name + ".safetensors"
    with pytest.raises(ValueError, match="^router: .* names a Windows device"):
        paths.check_router_name(f"sub/{picked}")


@pytest.mark.parametrize("name", ["console", "com10", "nullify", "aux_router", "lpt", "my.con", "prn2x"])
def test_names_that_only_resemble_windows_devices_pass(name):
    assert paths.check_save_name(name) == name + ".safetensors"
    assert paths.check_router_name(name + ".safetensors") == name + ".safetensors"


# ------------------------------------------------------------------------------ inside a real ComfyUI


@pytest.fixture(scope="module")
def comfy(tiny_comfy):
    """ComfyUI with the tiny SD1.5-family checkpoint (conftest's ``tiny_comfy``), prompted "a fox",
    and the pack's sampler and trainer modules."""
    from helpers.comfy_env import encode_prompt
    from moe_sampler.nodes import comfy_experts, sampler_nodes, training_nodes

    return SimpleNamespace(**{**tiny_comfy, "positive": encode_prompt(tiny_comfy["clip"], "a fox")},
                           comfy_experts=comfy_experts, sampler_nodes=sampler_nodes, training_nodes=training_nodes)


class _NoStore:
    def record_async(self, record):
        return True


def _adaptive(comfy, latent, positive=None, **kw):
    return comfy.sampler_nodes.run_adaptive(comfy.model, comfy.positive if positive is None else positive,
                                            comfy.negative, latent, 7, 6.5, store=_NoStore(), **kw)


@pytest.mark.comfyui
def test_trainer_refuses_sizes_beyond_free_memory_in_comfyui(comfy, monkeypatch):
    """ComfyUI's own estimate for the loaded model against the (CPU) free RAM."""
    import comfy.model_management as mm

    environment_module.check_sizes_fit(comfy.model, [(512, 512)])  # about 0.6 GB: fits on any test machine
    monkeypatch.setattr(mm, "get_free_memory", lambda *args, **kwargs: 2**30)
    with pytest.raises(TrainingInputError, match=r"^sizes: 1536x1536 needs about \d+\.\d GB to sample with this "
                                                 r"model \(ComfyUI's estimate\) and there is 1\.0 GB of free RAM"):
        environment_module.check_sizes_fit(comfy.model, [(512, 512), (1536, 1536)])


@pytest.mark.comfyui
@pytest.mark.parametrize("shape", [(1, 4, 0, 0), (1, 4, 8, 0), (1, 4, 2, 8, 8), (1, 4, 1, 8, 8)])
def test_sampler_bad_latent_names_latent_image(comfy, shape):
    """A 0x0 latent gave ZeroDivisionError and a 5-D latent a conv2d error."""
    with pytest.raises(ValueError, match="^latent_image: "):
        _adaptive(comfy, {"samples": torch.zeros(shape)})


@pytest.mark.comfyui
def test_sampler_nan_conditioning_names_positive(comfy):
    """NaN conditioning made both the expert and the fallback fail, and the error named the experts."""
    positive = [[torch.full_like(comfy.positive[0][0], float("nan")), dict(comfy.positive[0][1])]]
    with pytest.raises(ValueError, match="^positive: the conditioning's embeddings contain NaN/Inf"):
        _adaptive(comfy, {"samples": torch.zeros(1, 4, 8, 8)}, positive=positive)


@pytest.mark.comfyui
def test_simple_scheduler_beyond_its_noise_levels_names_steps(comfy):
    """'simple' with more than 1000 steps repeats noise levels: "sigmas must be strictly decreasing"."""
    expert = comfy.comfy_experts.expert_from_comfy("euler", "simple", 1200)
    with pytest.raises(ValueError, match=r"^steps: the 'simple' scheduler repeats noise levels when asked for 1200 .* "
                                         r"gives 1000 distinct ones"):
        _adaptive(comfy, {"samples": torch.zeros(1, 4, 8, 8)}, mode=expert.name, expert_pool=[expert])
    ok = comfy.comfy_experts.expert_from_comfy("euler", "simple", 1000)
    from moe_sampler.nodes.comfy_experts import schedule_for

    assert len(ok.sigmas(schedule_for(comfy.model))) == 1001


@pytest.mark.comfyui
def test_sampler_validation_messages_appear_once_under_their_input(comfy, monkeypatch):
    """ComfyUI files a validate_inputs failure under every input the function names: it named
    router and mode, so each message appeared twice."""
    import execution
    import nodes

    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "MoEAdaptiveSampler", comfy.sampler_nodes.MoEAdaptiveSampler)
    inputs = {"model": "m", "positive": "p", "negative": "n", "latent_image": "l", "seed": 0, "cfg": 8.0,
              "priority": 0.5, "temperature": 0.0, "denoise": 1.0}

    def errors(**values):
        prompt = {"1": {"class_type": "MoEAdaptiveSampler", "inputs": {**inputs, **values}}}
        ok, found, _ = asyncio.run(execution.validate_inputs("p", prompt, "1", {}))
        return [(error["extra_info"]["input_name"], error["details"]) for error in found]

    both = errors(router="../../x.safetensors", mode="../x")
    assert sorted(name for name, _ in both) == ["mode", "router"]
    assert [name for name, _ in errors(router="../../x.safetensors", mode="auto")] == ["router"]
    assert [name for name, _ in errors(router="missing.safetensors", mode="auto")] == ["router"]
    (only,) = errors(router=paths.BUILTIN_ROUTER, mode="../x")
    assert only[0] == "mode" and "mode: invalid custom expert name" in only[1]
    assert errors(router=paths.BUILTIN_ROUTER, mode="euler/normal/20") == []


@pytest.mark.comfyui
def test_resume_below_the_checkpoint_episodes_is_refused(comfy, tmp_path, monkeypatch):
    """A resume with fewer episodes than the checkpoint re-saved the router without saying so."""
    from test_training_nodes_unit import FakeBridge, FakeClip

    from helpers.comfy_env import use_temp_dirs

    use_temp_dirs(tmp_path)
    training = comfy.training_nodes
    fake = FakeBridge()
    monkeypatch.setattr(bridge, "sample_with_expert", fake.sample_with_expert)
    monkeypatch.setattr(comfy.comfy_experts, "model_family", lambda model: "eps")
    from moe_sampler.experts import get_expert

    pool = [get_expert("SpeedDemon"), get_expert("BalancedMaster")]

    def train(episodes):
        plan = _plan(prompts="a cat", sizes="16x16", cfg_values="3", episodes=episodes, seeds_per_prompt=1,
                     router_name="resumed")
        return training.train_router(fake.model, FakeClip(), plan, pool, reference_steps=20)

    first = train(3)
    assert first.episodes == 3 and first.resumed_from == 0
    saved = first.path.stat().st_mtime_ns
    with pytest.raises(TrainingInputError) as caught:
        train(2)
    message = str(caught.value)
    assert message.startswith("episodes: the training run of resumed.safetensors is already at episode 3"), message
    assert first.path.stat().st_mtime_ns == saved, "the router was saved again"
    again = train(3)
    assert again.report.startswith("Nothing left to train: the run of resumed.safetensors had already done 3")
    assert train(4).episodes == 4


@pytest.mark.comfyui
def test_resume_errors_carry_no_paths(comfy, tmp_path, monkeypatch):
    """Errors reach the browser: a router that cannot be resumed is named by its file name."""
    from test_training_nodes_unit import FakeBridge, FakeClip

    from helpers.comfy_env import use_temp_dirs

    use_temp_dirs(tmp_path)
    monkeypatch.setattr(comfy.comfy_experts, "model_family", lambda model: "eps")
    (tmp_path / "models" / "moe_routers" / "broken.safetensors").write_bytes(b"\x00" * 64)
    plan = _plan(prompts="a cat", sizes="16x16", cfg_values="3", episodes=1, seeds_per_prompt=1, router_name="broken")
    with pytest.raises(ValueError) as caught:
        comfy.training_nodes.train_router(FakeBridge().model, FakeClip(), plan, None, reference_steps=20)
    message = str(caught.value)
    assert message.startswith("resume: cannot continue from broken.safetensors: broken.safetensors is not a valid")
    assert str(tmp_path) not in message, message


@pytest.mark.comfyui
def test_a_sweep_calibrates_the_estimates_and_says_so(comfy, tmp_path, monkeypatch):
    """A full sweep measures every expert's runs: the rows are calibration pairs of the model, the
    saved router keeps the calibration fitted on them, and the report says which experts have one."""
    from test_training_nodes_unit import FakeBridge, FakeClip

    from helpers.comfy_env import use_temp_dirs
    from moe_sampler.experts import get_expert
    from moe_sampler.nodes import online_learning, paths
    from moe_sampler.router.model import Router

    use_temp_dirs(tmp_path)
    fake = FakeBridge()
    monkeypatch.setattr(bridge, "sample_with_expert", fake.sample_with_expert)
    monkeypatch.setattr(comfy.comfy_experts, "model_family", lambda model: "eps")
    monkeypatch.setattr(online_learning, "model_fingerprint", lambda model: "eps-fake")
    pool = [get_expert("SpeedDemon"), get_expert("BalancedMaster")]
    plan = _plan(prompts="a cat\na dog", sizes="16x16", cfg_values="3, 6", episodes=40, seeds_per_prompt=2,
                 router_name="calibrated", resume=False)
    outcome = comfy.training_nodes.train_router(fake.model, FakeClip(), plan, pool, reference_steps=20)
    calibration = Router.load(outcome.path).training["calibration"]
    assert {name: fit["pairs"] for name, fit in calibration["experts"].items() if name != "*"} == \
        {"SpeedDemon": 8, "BalancedMaster": 8}  # 2 prompts x 2 cfg x 2 seeds
    assert "kept in the router: SpeedDemon (8 runs), BalancedMaster (8 runs)" in outcome.report
    store = paths.stats_store()
    store.flush(10)
    rows = [r for r in store.runs() if r.source == "training"]
    assert len(rows) == 16 and {r.model for r in rows} == {"eps-fake"} and {r.quality_source for r in rows} == {"sweep"}
    assert all(r.details_dict()["true_error"] > 0 and "estimate" in r.details_dict() for r in rows)
