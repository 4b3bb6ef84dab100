"""How well each run's own fidelity estimate predicts its true error, on held-out contexts.

Run from the repository root: ``python -m bench.estimate`` (``--quick`` for a smaller run).
Contexts come from :class:`~moe_sampler.router.environment.AnalyticEnvironment` with its
default (varied) conditions: the ``train`` split fits a
:class:`~moe_sampler.router.calibration.Calibration`, the ``heldout`` split (other prompts,
noise seeds and guidance) measures it. Every default-pool expert runs on every context; its
report's ``error_estimate`` and parts (:mod:`moe_sampler.experts.observer`, no extra model call)
are compared with the relative error to the context's reference solution.

Printed per expert: the Spearman rank correlation within the expert between the (raw and
calibrated) estimate and the true error, and the mean absolute error of the quality score
(``quality_from_error``) predicted by the calibration versus the baseline that knows only which
expert ran (the train split's median quality of that expert, the constant with the smallest
absolute error). "first look" is issue 13's first attempt, reproduced: the first-order
differences alone (``log10_first_order``) with a per-expert intercept and slope. Nothing is
written.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import ensure_moe_sampler  # noqa: E402  (this checkout as ``moe_sampler``, as the tests load it)

ensure_moe_sampler()

from moe_sampler.experts import Expert, default_pool  # noqa: E402
from moe_sampler.experts.analytic import quality_from_error  # noqa: E402
from moe_sampler.router.calibration import FEATURES, Calibration, calibration_inputs  # noqa: E402
from moe_sampler.router.environment import AnalyticEnvironment  # noqa: E402

FIRST_LOOK = ("log10_first_order",)


def collect(split: str, seed: int, n: int, experts: Sequence[Expert]) -> list[tuple[str, dict, float]]:
    """``(expert, calibration inputs, true relative error)`` for ``n`` contexts of one split."""
    env = AnalyticEnvironment(split=split, seed=seed)
    contexts = env.draw_contexts(n, random.Random(f"bench.estimate/{split}/{seed}"))
    rows = []
    for context in contexts:
        model = env.models[context.model_index]
        extra_args = {"cond": context.cond, "cfg": context.cfg, "seed": context.seed}
        for expert in experts:
            sigmas = expert.sigmas(model.schedule(), context.denoise)
            x, reference = env.start(context, float(sigmas[0]))
            report: dict = {}
            out = expert(model, x.clone(), sigmas, extra_args=extra_args, disable=True, report=report)
            error = float(model.relative_error(out, reference, cond=context.cond).mean())
            inputs = calibration_inputs(report, cfg=context.cfg)
            if inputs is not None and math.isfinite(error):
                rows.append((expert.name, inputs, error))
    return rows


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    ra, rb = torch.tensor(_ranks(a)), torch.tensor(_ranks(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.square().sum() * rb.square().sum()).sqrt())


def evaluate(train: list, heldout: list, features: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per expert: Spearman (raw, calibrated), quality MAE (calibrated, constant), pairs."""
    calibration = Calibration.fit(train, features)
    results = {}
    for name in dict.fromkeys(e for e, _, _ in heldout):
        rows = [(inputs, error) for e, inputs, error in heldout if e == name]
        train_quality = sorted(float(quality_from_error(err)) for e, _, err in train if e == name)
        constant = train_quality[len(train_quality) // 2]
        true_q = [float(quality_from_error(err)) for _, err in rows]
        predicted = [calibration.predict(name, inputs)[0] for inputs, _ in rows]
        pred_q = [calibration.predict_quality(name, inputs)[0] for inputs, _ in rows]
        errors = [err for _, err in rows]
        results[name] = {
            "pairs": len(rows),
            "spearman_raw": spearman([inputs["estimate"] for inputs, _ in rows], errors),
            "spearman": spearman(predicted, errors),
            "mae": sum(abs(p - t) for p, t in zip(pred_q, true_q)) / len(rows),
            "mae_constant": sum(abs(constant - t) for t in true_q) / len(rows),
            "std": calibration.fits[name].std if name in calibration.fits else float("nan"),
        }
    return results


def table(title: str, results: dict[str, dict[str, float]]) -> None:
    print(f"\n## {title}\n")
    print("| expert | held-out runs | Spearman raw | Spearman calibrated | quality MAE | constant's MAE | ratio | "
          "residual std (log10) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['pairs']} | {r['spearman_raw']:.2f} | {r['spearman']:.2f} | {r['mae']:.3f} | "
              f"{r['mae_constant']:.3f} | {r['mae'] / r['mae_constant']:.2f} | {r['std']:.2f} |")
    values = list(results.values())
    mean = {k: sum(r[k] for r in values) / len(values) for k in ("spearman_raw", "spearman", "mae", "mae_constant")}
    print(f"| **mean** | {sum(r['pairs'] for r in values)} | {mean['spearman_raw']:.2f} | {mean['spearman']:.2f} | "
          f"{mean['mae']:.3f} | {mean['mae_constant']:.3f} | {mean['mae'] / mean['mae_constant']:.2f} | |")
    print(f"\nmin within-expert Spearman {min(r['spearman'] for r in values):.2f}, mean {mean['spearman']:.2f}; "
          f"quality MAE {mean['mae']:.3f} vs constant {mean['mae_constant']:.3f} "
          f"({100 * mean['mae'] / mean['mae_constant']:.0f}%)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=400, help="training contexts (default 400)")
    parser.add_argument("--heldout", type=int, default=300, help="held-out contexts (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="80 training and 60 held-out contexts")
    args = parser.parse_args(argv)
    n_train, n_heldout = (80, 60) if args.quick else (args.train, args.heldout)
    program = "python -m bench.estimate"
    print("$ " + " ".join([program, *(sys.argv[1:] if argv is None else argv)]))
    print(f"python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    experts = default_pool()
    start = time.perf_counter()
    train = collect("train", args.seed, n_train, experts)
    heldout = collect("heldout", args.seed, n_heldout, experts)
    print(f"analytic yardstick, varied conditions: {n_train} training and {n_heldout} held-out contexts x "
          f"{len(experts)} experts ({time.perf_counter() - start:.0f} s)")
    table("Calibrated estimate (all features: " + ", ".join(FEATURES) + ")", evaluate(train, heldout, tuple(FEATURES)))
    table("First look (first-order differences only, per-expert intercept and slope)",
          evaluate(train, heldout, FIRST_LOOK))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
