"""The package works both ways (ComfyUI custom_nodes clone and pip install), CI runs the README's
test commands, and the tests do not depend on the import path (the repository root is never on
``sys.path``, so ``import nodes`` is ComfyUI's)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(python3\.11 -m venv[^\n]+)\n```", text)


def test_readme_has_exactly_two_fresh_machine_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert any(c.endswith("python -m moe_sampler demo") for c in commands)
    assert all("torch==2.13.0" in c for c in commands)


def _readme_comfyui_command() -> str:
    text = (ROOT / "README.md").read_text()
    commands = [c for c in re.findall(r"```bash\n([^\n]+)\n```", text) if "COMFYUI_PYTHON" in c]
    assert len(commands) == 1, commands
    return commands[0]


def _ci_lines() -> list[str]:
    return [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]


def test_ci_runs_the_readme_test_command():
    test_command = next(c for c in _readme_commands() if "pytest" in c)
    assert test_command in _ci_lines()


def test_ci_runs_the_readme_comfyui_command_with_no_skips():
    command = _readme_comfyui_command()
    assert "MOE_SAMPLER_NO_SKIP=1" in command and "-m pytest" in command and ".ci/postgres.sh start" in command
    assert command in _ci_lines()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "../shared/comfyui/setup.sh" in ci and "chromium" in ci and "postgres.sh stop" in ci
    assert (ROOT / ".ci" / "constraints.txt").read_text().split() == ["torch==2.13.0"]


def test_pyproject_has_registry_and_package_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["name"] == "moe-adaptive-sampler"
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert "Repository" in project["urls"]
    deps = " ".join(project["dependencies"])
    for dep in ("torch", "diffusers", "safetensors", "numpy", "pillow"):
        assert dep in deps
    assert "pillow" in (ROOT / "requirements.txt").read_text().lower()  # stats/charts.py draws with it
    assert any(d.startswith("psycopg") for d in project["optional-dependencies"]["postgres"])
    assert "==" not in next(d for d in project["dependencies"] if d.startswith("torch"))
    comfy = meta["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["web"] == "web"


def test_package_data_ships_every_data_file_the_pack_reads():
    # A pip install (not -e) copies only what these globs match: the learned model's weights and
    # digits, the web client and the templates must all be matched, and every package listed.
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = meta["tool"]["setuptools"]["package-data"]["moe_sampler"]
    shipped = [*ROOT.glob("experts/data/*"), *ROOT.glob("web/*.js"), *ROOT.glob("example_workflows/*")]
    assert any(path.suffix == ".safetensors" for path in shipped)
    for path in shipped:
        relative = path.relative_to(ROOT).as_posix()
        assert any(Path(relative).match(pattern) for pattern in globs), f"{relative} is not in package-data"
    packages = set(meta["tool"]["setuptools"]["packages"])
    for init in ROOT.glob("*/__init__.py"):
        if init.parent.name not in ("tests", "bench"):  # benchmarks run from a checkout, not an install
            assert f"moe_sampler.{init.parent.name}" in packages, init.parent.name


def test_loads_by_path_under_any_folder_name_like_comfyui(tmp_path):
    # ComfyUI imports <pack>/__init__.py under a path-like module name; relative imports must work.
    script = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location(
    "custom_nodes_x_weird-Folder Name", {str(ROOT / "__init__.py")!r},
    submodule_search_locations=[{str(ROOT)!r}])
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
assert mod.WEB_DIRECTORY == "./web" and callable(mod.comfy_entrypoint)
experts = importlib.import_module(spec.name + ".experts")
assert "BalancedMaster" in experts.expert_names()
assert not any(m == "comfy" or m.startswith("comfy.") for m in sys.modules), "imported ComfyUI"
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_pip_installed_package_imports_without_comfyui():
    # The README installs the pack with pip (-e .); experts/ and router/ need plain torch only.
    script = (
        "import sys, moe_sampler, moe_sampler.experts, moe_sampler.router.model, moe_sampler.stats.store\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths', 'server')]\n"
        "assert not bad, bad\n"
        "print(moe_sampler.MoERLTrainer.__name__)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "MoERLTrainer"


# ------------------------------------------------------------------ import path and skip policy


def _on_sys_path_as_root(entry: str) -> bool:
    return Path(entry or os.getcwd()).resolve() == ROOT


def _inner_pytest(tmp_path: Path, *tests: str, **env: str) -> subprocess.CompletedProcess:
    """``python -m pytest`` run from the repository root on tests of this file, as CI runs it."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("COMFYUI_PATH", "PYTHONPATH", "MOE_SAMPLER_NO_SKIP", "PYTEST_ADDOPTS")}
    environ.update(env)
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "inner"),
            *[f"tests/test_packaging.py::{t}" for t in tests]]
    return subprocess.run(args, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600)


def test_nodes_is_never_the_pack_folder():
    # The inner half of the test below; in any run, `nodes` is not the pack's nodes/ folder.
    expected = os.environ.get("MOE_SAMPLER_EXPECTED_NODES")
    if expected:
        assert Path(importlib.import_module("nodes").__file__) == Path(expected)
    spec = importlib.util.find_spec("nodes")  # (CI's ComfyUI copy lives in the root's .ci-cache/)
    assert spec is None or Path(spec.origin).resolve().parent != ROOT / "nodes", f"nodes is {spec.origin}"
    assert not [entry for entry in sys.path if _on_sys_path_as_root(entry)], "the repository root is on sys.path"


def test_import_nodes_finds_comfyuis_module_when_pytest_runs_from_the_root(tmp_path):
    # Regression: `python -m pytest` from the root put the root first on sys.path, so with ComfyUI
    # on the path behind it, `import nodes` found the pack's nodes/ package and
    # tests/test_comfy_sampling.py failed with "module 'nodes' has no attribute 'common_ksampler'".
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    (comfy / "nodes.py").write_text("def common_ksampler(*args, **kwargs):\n    return 'comfy'\n")
    result = _inner_pytest(tmp_path, "test_nodes_is_never_the_pack_folder",
                           PYTHONPATH=str(comfy), MOE_SAMPLER_EXPECTED_NODES=str(comfy / "nodes.py"))
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]


@pytest.mark.comfyui
def test_comfyui_path_names_a_comfyui_checkout():
    root = Path(os.environ["COMFYUI_PATH"])
    assert (root / "comfy").is_dir() and (root / "nodes.py").is_file(), f"COMFYUI_PATH={root} is not ComfyUI"


@pytest.mark.gpu
def test_cuda_device_runs_a_kernel():
    assert torch.ones(4, device="cuda").sum().item() == 4.0


SKIPPING = ("test_comfyui_path_names_a_comfyui_checkout", "test_cuda_device_runs_a_kernel")


def test_a_skipped_comfyui_test_is_reported_as_skipped(tmp_path):
    result = _inner_pytest(tmp_path, *SKIPPING)
    assert result.returncode == 0, result.stdout[-3000:]
    skips = 1 if torch.cuda.is_available() else 2
    assert f"{skips} skipped" in result.stdout and "skips by reason" in result.stdout, result.stdout[-3000:]
    assert "needs a real ComfyUI checkout: set COMFYUI_PATH" in result.stdout


def test_no_skip_mode_fails_a_skipped_comfyui_test_but_not_a_gpu_test(tmp_path):
    result = _inner_pytest(tmp_path, *SKIPPING, MOE_SAMPLER_NO_SKIP="1")
    assert result.returncode == 1, result.stdout[-3000:]
    assert "skipped while MOE_SAMPLER_NO_SKIP=1" in result.stdout, result.stdout[-3000:]
    assert "1 error" in result.stdout, result.stdout[-3000:]  # the comfyui test, failed at its setup
    if not torch.cuda.is_available():
        assert "1 skipped" in result.stdout, result.stdout[-3000:]  # a GPU test may still skip


def test_no_skip_mode_fails_a_skipped_module_but_runs_the_rest(tmp_path):
    # A module-level importorskip has no test to fail: the run goes on and fails at its end.
    (tmp_path / "test_needs_a_missing_module.py").write_text(
        "import pytest\npytest.importorskip('moe_sampler_no_such_module')\n\ndef test_x():\n    pass\n")
    (tmp_path / "test_known_failure.py").write_text(
        "import pytest\n\n@pytest.mark.xfail(reason='known')\ndef test_x():\n    assert False\n")
    environ = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "PYTEST_ADDOPTS")}
    environ.update(PYTHONPATH=str(ROOT / "tests"), MOE_SAMPLER_NO_SKIP="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", "."],
                            cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "modules skipped while MOE_SAMPLER_NO_SKIP=1" in result.stdout, result.stdout[-3000:]
    assert "1 xfailed" in result.stdout, result.stdout[-3000:]  # an expected failure is not a skip
