"""Load this checkout as ``moe_sampler``, keep the repository root off ``sys.path``, and decide skips.

The pack's folder can have any name (ComfyUI's custom_nodes clone), so the root ``__init__.py``
is loaded by path under the package name (:func:`helpers.ensure_moe_sampler`). The root itself
is never importable: run from it, ``python -m pytest`` would otherwise let the pack's ``nodes/``
package shadow ComfyUI's ``nodes.py``.

Skips: ``gpu`` tests without CUDA, ``comfyui`` tests without ``COMFYUI_PATH``, and tests that are
both without ``MOE_SAMPLER_DEVICE=cuda`` (ComfyUI picks one device per process: with that variable
the in-process ComfyUI runs on the GPU, else on the CPU). With
``MOE_SAMPLER_NO_SKIP=1`` (the full suite inside ComfyUI, see the README) any other skip,
whatever its cause (a missing browser, database, tool or package), fails the test instead.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pytest

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:  # pytest's default import mode put it there; others may not
    sys.path.insert(0, TESTS)

from helpers import ensure_moe_sampler  # noqa: E402

ensure_moe_sampler()

NO_SKIP_VARIABLE = "MOE_SAMPLER_NO_SKIP"
DEVICE_VARIABLE = "MOE_SAMPLER_DEVICE"


def comfy_on_gpu() -> bool:
    """True when the in-process ComfyUI is to run on CUDA (``MOE_SAMPLER_DEVICE=cuda``)."""
    return os.environ.get(DEVICE_VARIABLE, "cpu").strip().lower() == "cuda"


def no_skip() -> bool:
    """True when every test but GPU tests must run (``MOE_SAMPLER_NO_SKIP=1``)."""
    return os.environ.get(NO_SKIP_VARIABLE, "").strip().lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is available here")
    skip_comfy = pytest.mark.skip(reason="needs a real ComfyUI checkout: set COMFYUI_PATH to run it")
    skip_comfy_gpu = pytest.mark.skip(reason=f"needs ComfyUI on the GPU: set {DEVICE_VARIABLE}=cuda to run it")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        elif "gpu" in item.keywords and "comfyui" in item.keywords and not comfy_on_gpu():
            item.add_marker(skip_comfy_gpu)
        if "comfyui" in item.keywords and not os.environ.get("COMFYUI_PATH"):
            item.add_marker(skip_comfy)


@pytest.fixture(scope="module")
def tiny_comfy(tmp_path_factory):
    """ComfyUI in-process (``COMFYUI_PATH``) on the tiny SD1.5-family checkpoint, loaded once per test
    module with ComfyUI's folders in a temporary directory: ``model``, ``clip``, ``positive`` ("a
    watercolor fox in the snow") and ``negative`` ("blurry"). The pack's router folder is registered
    and ComfyUI's console progress bar is off while the module runs. Only for ``comfyui`` tests:
    without ``COMFYUI_PATH`` they are skipped (above) before this is set up."""
    from helpers.comfy_env import encode_prompt, import_comfy, load_tiny_checkpoint

    import_comfy(cpu=not comfy_on_gpu())
    import comfy.utils

    model, clip, _ = load_tiny_checkpoint(tmp_path_factory.mktemp("comfy"))
    from moe_sampler.nodes import paths

    paths.register_folders()
    bar = comfy.utils.PROGRESS_BAR_ENABLED
    comfy.utils.PROGRESS_BAR_ENABLED = False
    yield dict(model=model, clip=clip, positive=encode_prompt(clip, "a watercolor fox in the snow"),
               negative=encode_prompt(clip, "blurry"))
    comfy.utils.PROGRESS_BAR_ENABLED = bar


@pytest.fixture
def store(tmp_path):
    """An empty stats store in the test's temporary folder (a module needing another defines its own)."""
    from moe_sampler.stats.store import StatsStore

    s = StatsStore(tmp_path / "stats.sqlite3")
    yield s
    s.close()


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    report.moe_gpu = "gpu" in item.keywords
    if no_skip() and not report.moe_gpu:
        report.outcome = "failed"
        report.longrepr = (f"skipped while {NO_SKIP_VARIABLE}=1 (only GPU tests may skip): "
                           f"{_skip_reason(report)}")


_module_skips: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # A whole module skipped (a module-level importorskip) has no test to fail: it is noted here
    # and fails the session at its end, so the other modules still run.
    outcome = yield
    report = outcome.get_result()
    if report.skipped and no_skip():
        _module_skips.append(f"{report.nodeid}: {_skip_reason(report)}")


def pytest_sessionfinish(session, exitstatus):
    if _module_skips and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line per skip reason with its count, GPU and other skips apart."""
    skipped = terminalreporter.stats.get("skipped", [])
    if skipped:
        counts = Counter(("GPU" if getattr(r, "moe_gpu", False) else "other", _skip_reason(r)) for r in skipped)
        terminalreporter.section("skips by reason")
        for (kind, reason), count in sorted(counts.items()):
            terminalreporter.write_line(f"{count:4d} {kind:5s} {reason}")
    if _module_skips:
        terminalreporter.section(f"modules skipped while {NO_SKIP_VARIABLE}=1 (this fails the run)", red=True)
        for line in _module_skips:
            terminalreporter.write_line(line, red=True)
