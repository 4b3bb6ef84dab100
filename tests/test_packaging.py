"""The package works both ways (ComfyUI custom_nodes clone and pip install) and CI runs the
README's test command."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(python3\.11 -m venv[^\n]+)\n```", text)


def test_readme_has_exactly_two_fresh_machine_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert any(c.endswith("python -m moe_sampler demo") for c in commands)
    assert all("torch==2.13.0" in c for c in commands)


def test_ci_runs_the_readme_test_command():
    test_command = next(c for c in _readme_commands() if "pytest" in c)
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_pyproject_has_registry_and_package_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["name"] == "moe-adaptive-sampler"
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert "Repository" in project["urls"]
    deps = " ".join(project["dependencies"])
    for dep in ("torch", "diffusers", "safetensors", "numpy"):
        assert dep in deps
    assert "==" not in next(d for d in project["dependencies"] if d.startswith("torch"))
    comfy = meta["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["web"] == "web"


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
