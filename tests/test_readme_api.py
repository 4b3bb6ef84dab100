"""The README's Python API example runs as written (only its episode count made small), so the
README cannot drift from the API: the block after ``<!-- readme-api-example -->``."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from helpers import ensure_moe_sampler

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- readme-api-example -->"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    assert text.count(MARKER) == 1, f"README.md must have exactly one {MARKER}"
    match = re.match(r"\s*```python\n(.*?)\n```", text.split(MARKER, 1)[1], re.S)
    assert match, f"README.md: a ```python block must follow {MARKER}"
    return match.group(1)


def test_readme_api_example_runs():
    ensure_moe_sampler()
    code = readme_example()
    small, count = re.subn(r"num_episodes=\d+", "num_episodes=2", code)
    assert count == 1, "the example trains with train_moe(num_episodes=N)"
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(small, str(README), "exec"), namespace)
    trainer, selector, run, image = (namespace[k] for k in ("trainer", "selector", "run", "image"))
    assert trainer.episode == 2 and len(trainer.environment.outcomes()) >= 5
    assert namespace["expert_id"] in {e.name for e in selector.experts}
    assert 0.0 <= namespace["info"]["confidence"] <= 1.0
    assert image.shape == (1, 1, 16, 16) and torch.isfinite(image).all() and run.nfe > 0
    assert [r.expert for r in selector.records] == [namespace["expert_id"]]
