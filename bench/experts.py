"""Benchmark every registered expert against the exact analytic yardstick.

Run from the repository root: ``python -m bench.experts`` (or ``python bench/experts.py``), add
``--quick`` for a smaller run. Conditions: ``random_prompts(PROMPTS, seed)`` at shape (64,) and one
prompt at shape (4, 16, 16), each at guidance 1, 3, 7.5 and 12, starting from seeded noise at the
model's sigma_max. Fidelity is ``AnalyticModel.relative_error`` against the high-accuracy ODE
reference from the same noise; the quality score is ``quality_from_error`` (clip(-log10(err)/3, 0, 1)).
Compatibility experts (stochastic DDPM, up to 1000 steps) run on the (64,) conditions only; their
"error" is the distance to the deterministic ODE sample from the same noise, not a discretisation
error. Nothing is cached or written.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

GUIDANCE = (1.0, 3.0, 7.5, 12.0)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import ensure_moe_sampler  # noqa: E402  (this checkout as ``moe_sampler``, as the tests load it)

ensure_moe_sampler()

from moe_sampler.experts import Expert, get_expert, registered_experts  # noqa: E402
from moe_sampler.experts.analytic import AnalyticModel, quality_from_error, random_prompts  # noqa: E402
from moe_sampler.experts.dpm_solver import sample_dpmpp_2m  # noqa: E402


@dataclass
class Condition:
    label: str
    model: AnalyticModel
    extra_args: dict
    x: torch.Tensor
    ref: torch.Tensor
    compat: bool


@dataclass
class Result:
    errors: list[float]
    nfe: list[int]
    steps: list[int]
    seconds: list[float]
    stopped: list[bool]

    def row(self, name: str) -> list[str]:
        q = quality_from_error(torch.tensor(self.errors)).mean().item()
        return [name, f"{statistics.mean(self.errors):.4f}", f"{statistics.median(self.errors):.4f}",
                f"{max(self.errors):.3f}", f"{q:.3f}", f"{statistics.mean(self.nfe):.1f}",
                f"{statistics.mean(self.steps):.1f}", f"{statistics.mean(self.seconds) * 1e3:.1f}"]


def build_conditions(prompt_count: int, seed: int, batch: int, latent_guidance: Sequence[float]) -> list[Condition]:
    prompts = random_prompts(prompt_count, seed)
    flat = AnalyticModel(prompts, shape=(64,))
    latent = AnalyticModel(prompts[:1], shape=(4, 16, 16))
    sigma_max = flat.schedule().sigma_max
    conditions = []
    jobs = [(flat, c, g, True) for c in range(prompt_count) for g in GUIDANCE]
    jobs += [(latent, 0, g, False) for g in latent_guidance]
    for k, (model, cond, cfg, compat) in enumerate(jobs):
        x = model.initial_noise(batch, seed=seed + k, sigma=sigma_max)
        ref = model.reference(x, sigma_max, cond=cond, cfg=cfg)
        label = f"p{cond} {'x'.join(map(str, model.shape))} cfg {cfg:g}"
        conditions.append(Condition(label, model, {"cond": cond, "cfg": cfg, "seed": seed + k}, x, ref, compat))
    return conditions


def run(expert: Expert, conditions: Sequence[Condition], sigmas_steps: int | None = None, **options: Any) -> Result:
    """Run ``expert`` on every condition (its own schedule, or ``sigmas_steps`` levels of it)."""
    result = Result([], [], [], [], [])
    for c in conditions:
        schedule = c.model.schedule()
        sigmas = expert.sigmas(schedule) if sigmas_steps is None else expert.make_sigmas(schedule, sigmas_steps)
        report: dict = {}
        out = expert(c.model, c.x, sigmas, extra_args=c.extra_args, report=report, **options)
        result.errors.extend(c.model.relative_error(out, c.ref, cond=c.extra_args["cond"]).tolist())
        result.nfe.append(report["nfe"])
        result.steps.append(report["steps"])
        result.seconds.append(report["seconds"])
        result.stopped.append(bool(report.get("stopped_early", False)))
    return result


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    print(f"\n## {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(v).ljust(w) for v, w in zip(r, widths)) + " |")


HEADERS = ["expert", "mean err", "median err", "max err", "quality", "NFE", "steps", "ms/run"]


def expert_tables(conditions: list[Condition]) -> None:
    main_rows, compat_rows, by_guidance = [], [], []
    for expert in registered_experts():
        pool = [c for c in conditions if c.compat] if expert.compat else conditions
        result = run(expert, pool)
        (compat_rows if expert.compat else main_rows).append(result.row(expert.name))
        per_cfg = []
        for g in GUIDANCE:
            errs = [e for c, e in zip(_repeat(pool, result), result.errors) if c.extra_args["cfg"] == g]
            per_cfg.append(f"{statistics.median(errs):.4f}" if errs else "-")
        by_guidance.append([expert.name, *per_cfg])
    print_table(f"Experts on {len(conditions)} conditions (relative error vs exact ODE reference)", HEADERS, main_rows)
    print_table("Compatibility experts (stochastic; (64,) conditions only; distance to the ODE sample)",
                HEADERS, compat_rows)
    print_table("Median error by guidance scale", ["expert", *[f"cfg {g:g}" for g in GUIDANCE]], by_guidance)


def _repeat(pool: list[Condition], result: Result) -> list[Condition]:
    """Each condition once per sample of its batch, aligned with ``result.errors``."""
    per = len(result.errors) // len(pool)
    return [c for c in pool for _ in range(per)]


def tradeoff_tables(conditions: list[Condition], quick: bool) -> None:
    rows = []
    balanced, quality = get_expert("BalancedMaster"), get_expert("QualityMaster")
    for steps in ([5, 10, 20, 40] if quick else [5, 8, 10, 15, 20, 30, 40, 80]):
        rows.append(run(balanced, conditions, steps).row(f"2M karras {steps} steps"))
    for steps in ([20, 40] if quick else [15, 20, 30, 40, 80]):
        rows.append(run(quality, conditions, steps).row(f"3M karras {steps} steps"))
    adaptive = get_expert("NoiseAdaptive")
    for rtol in ([0.2, 0.05, 0.01] if quick else [0.2, 0.1, 0.05, 0.02, 0.01]):
        rows.append(run(adaptive, conditions, rtol=rtol).row(f"NoiseAdaptive rtol {rtol:g} (cap 64)"))
        if not quick:
            uncapped = run(adaptive, conditions, rtol=rtol, max_nfe=10_000)
            rows.append(uncapped.row(f"NoiseAdaptive rtol {rtol:g} (no cap)"))
    print_table("Error versus NFE trade-off", HEADERS, rows)


def early_stop_table(conditions: list[Condition]) -> None:
    """EarlyStopper against its own schedule run to the end (same solver, no stop rule)."""
    early = get_expert("EarlyStopper")
    stopped = run(early, conditions)
    full = Result([], [], [], [], [])
    for c in conditions:
        out = sample_dpmpp_2m(c.model, c.x, early.sigmas(c.model.schedule()), extra_args=c.extra_args)
        full.errors.extend(c.model.relative_error(out, c.ref, cond=c.extra_args["cond"]).tolist())
    loss = sorted(a - b for a, b in zip(stopped.errors, full.errors))
    saved = 1 - statistics.mean(stopped.nfe) / early.descriptor.steps
    rows = [["EarlyStopper", f"{statistics.median(stopped.errors):.4f}", f"{statistics.mean(stopped.nfe):.1f}",
             f"{sum(stopped.stopped)}/{len(stopped.stopped)}", f"{statistics.median(loss):+.4f}", f"{loss[-1]:+.4f}",
             f"{saved:.1%}"],
            [f"2M, same {early.descriptor.steps} steps to the end", f"{statistics.median(full.errors):.4f}",
             f"{early.descriptor.steps}", "-", "-", "-", "-"]]
    print_table("EarlyStopper: fidelity loss and NFE saving versus its own schedule run to the end",
                ["run", "median err", "NFE", "stopped", "median loss", "max loss", "NFE saved"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 prompts, batch 1, fewer trade-off points")
    parser.add_argument("--prompts", type=int, default=None, help="number of analytic prompts (default 6, quick 3)")
    parser.add_argument("--seed", type=int, default=2024, help="seed of the prompts and of the starting noise")
    parser.add_argument("--batch", type=int, default=None, help="samples per condition (default 2, quick 1)")
    args = parser.parse_args(argv)
    prompts = args.prompts or (3 if args.quick else 6)
    batch = args.batch or (1 if args.quick else 2)
    program = f"-m {__spec__.name}" if __spec__ is not None else sys.argv[0]
    print("$ " + " ".join([os.path.basename(sys.executable), program, *(sys.argv[1:] if argv is None else argv)]))
    print(f"python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {platform.machine()} {platform.system()}")
    start = time.perf_counter()
    conditions = build_conditions(prompts, args.seed, batch, (7.5,) if args.quick else GUIDANCE)
    print(f"{len(conditions)} conditions x batch {batch} ({prompts} prompts x cfg {list(GUIDANCE)} at (64,), "
          f"{sum(not c.compat for c in conditions)} at (4, 16, 16)); references in {time.perf_counter() - start:.1f} s")
    expert_tables(conditions)
    early_stop_table(conditions)
    tradeoff_tables(conditions, args.quick)
    print(f"\ntotal {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
