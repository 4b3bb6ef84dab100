"""How well each run's own fidelity estimate predicts its true error, on held-out contexts.

Run from the repository root: ``python -m bench.estimate`` (``--quick`` for a smaller run).
Contexts come from :class:`~moe_sampler.router.environment.AnalyticEnvironment` with its
default (varied) conditions: the ``train`` split fits a
:class:`~moe_sampler.router.calibration.Calibration`, the ``heldout`` split (other prompts,
noise seeds and guidance) measures it. Every default-pool expert runs on every context; its
report's ``error_estimate`` and parts (:mod:`moe_sampler.experts.observer`, no extra model call)
are compared with the relative error to the context's reference solution.

Printed per expert: the Spearman rank correlation within the expert between the (raw and
calibrated) estimate and the true error (calibrated: with a 95% bootstrap interval over the
held-out runs; the mean's resamples every expert at once), and the mean absolute error of the
quality score (``quality_from_error``) predicted by the calibration versus the baseline that knows only which
expert ran (the train split's median quality of that expert, the constant with the smallest
absolute error). "first look" is issue 13's first attempt, reproduced: the first-order
differences alone (``log10_first_order``) with a per-expert intercept and slope; "previous
features" the calibration's features before the early-stop remainder and the other local-error
parts. Nothing is written unless ``--save-pairs``; ``--load-pairs`` evaluates saved pairs again
(no model call; valid while the observer's features are unchanged).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import ensure_moe_sampler  # noqa: E402  (this checkout as ``moe_sampler``, as the tests load it)

ensure_moe_sampler()

from moe_sampler.experts import Expert, default_pool  # noqa: E402
from moe_sampler.experts.analytic import quality_from_error  # noqa: E402
from moe_sampler.experts.observer import FidelityEstimator, error_estimate, planned_end  # noqa: E402
from moe_sampler.router.calibration import DEFAULT_FEATURES, Calibration, calibration_inputs  # noqa: E402
from moe_sampler.router.environment import AnalyticEnvironment  # noqa: E402

FIRST_LOOK = ("log10_first_order",)
# The calibration's features before ``remaining``, ``local_plain``, ``local_last`` and ``last_change``.
PREVIOUS = ("log10_estimate", "log10_first_order", "log10_tail", "log_sigma_start", "log_sigma_end", "log_cfg",
            "log_nfe", "log_scale")
BOOTSTRAP = 1000  # resamples for the Spearman intervals


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


LEARNED_GUIDANCE = (1.0, 3.0, 6.0, 10.0)
LEARNED_DENOISE = (1.0,)  # img2img needs one batched reference per expert (each starts lower): too slow on a CPU


def _replayed_report(events: list[tuple], out: Tensor, b: int, order: float, nfe: int,
                     sigma_final: float | None) -> dict:
    """The report sample ``b`` of a batched fixed-grid run would have had alone (the same steps:
    fixed-grid experts treat samples independently; the estimator only reads the callbacks)."""
    estimator = FidelityEstimator(order, sigma_final)
    for x, sigma, denoised in events:
        estimator.observe(x[b:b + 1], sigma, denoised[b:b + 1])
    features = estimator.features(out[b:b + 1])
    return {"error_estimate": error_estimate(features) if estimator.steps else None,
            "estimate_features": features, "nfe": nfe}


def collect_learned(split: str, seed: int, per_group: int, experts: Sequence[Expert]) -> list[tuple[str, dict, float]]:
    """The same triples on the learned yardstick (:mod:`moe_sampler.experts.learned`, 16x16 digits).

    Contexts: ``per_group`` digits (random class, own noise) for each guidance in
    :data:`LEARNED_GUIDANCE` and denoise strength in :data:`LEARNED_DENOISE` (img2img from a real
    digit); the reference (RK4, 100 steps) runs batched per group. Experts without a stop rule run
    batched too (each sample's report replayed from the callbacks, identical to a batch-1 run);
    EarlyStopper and NoiseAdaptive, whose steps depend on the batch, run one sample at a time.
    """
    from moe_sampler.experts.learned import load_learned_model

    model = load_learned_model()
    schedule = model.schedule()
    rng = random.Random(f"bench.estimate/learned/{split}/{seed}")
    rows = []
    for cfg in LEARNED_GUIDANCE:
        for denoise in LEARNED_DENOISE:
            labels = torch.tensor([rng.randrange(model.num_classes) for _ in range(per_group)])
            noise_seed = rng.randrange(1 << 31)
            for expert in experts:
                sigmas = expert.sigmas(schedule, denoise)
                sigma_start = float(sigmas[0])
                if denoise < 1.0:
                    x = model.img2img_start(labels, sigma_start, noise_seed)[1]
                else:
                    x = model.initial_noise(per_group, noise_seed, sigma_start)
                reference = _learned_reference(model, x, sigma_start, labels, cfg)
                if expert.stop is None and expert.descriptor.stop_rule == "none":
                    events: list[tuple] = []
                    report: dict = {}
                    out = expert(model, x.clone(), sigmas, extra_args={"cond": labels, "cfg": cfg}, disable=True,
                                 report=report, callback=lambda i: events.append(
                                     (i["x"], float(i["sigma_hat"]), i["denoised"])))
                    reports = [_replayed_report(events, out, b, expert.descriptor.order, report["nfe"],
                                                planned_end(sigmas))
                               for b in range(per_group)]
                else:
                    outs, reports = [], []
                    for b in range(per_group):
                        report = {}
                        outs.append(expert(model, x[b:b + 1].clone(), sigmas,
                                           extra_args={"cond": labels[b:b + 1], "cfg": cfg}, disable=True,
                                           report=report))
                        reports.append(report)
                    out = torch.cat(outs)
                errors = model.relative_error(out, reference)
                for report, error in zip(reports, errors.tolist()):
                    inputs = calibration_inputs(report, cfg=cfg)
                    if inputs is not None and math.isfinite(error):
                        rows.append((expert.name, inputs, error))
    return rows


_REFERENCES: dict = {}


def _learned_reference(model, x: Tensor, sigma_start: float, labels: Tensor, cfg: float) -> Tensor:
    key = (x.numpy().tobytes(), sigma_start, tuple(labels.tolist()), cfg)
    if key not in _REFERENCES:
        _REFERENCES[key] = model.reference(x, sigma_start, cond=labels, cfg=cfg)
    return _REFERENCES[key]


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


def spearman_draws(predicted: Sequence[float], errors: Sequence[float], draws: int = BOOTSTRAP,
                   seed: int = 0) -> list[float]:
    """Bootstrap draws of the Spearman correlation (held-out runs resampled with replacement)."""
    rng = random.Random(seed)
    n, values = len(errors), []
    for _ in range(draws):
        pick = [rng.randrange(n) for _ in range(n)]
        values.append(spearman([predicted[i] for i in pick], [errors[i] for i in pick]))
    return values


def interval(draws: Sequence[float]) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap draws (non-finite draws left out)."""
    values = sorted(v for v in draws if math.isfinite(v))
    if not values:
        return math.nan, math.nan
    return values[int(0.025 * (len(values) - 1))], values[int(0.975 * (len(values) - 1))]


def evaluate(train: list, heldout: list, features: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per expert: Spearman (raw, calibrated, its bootstrap interval), quality MAE (calibrated,
    constant), pairs."""
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
            "draws": spearman_draws(predicted, errors, seed=len(results)),
            "mae": sum(abs(p - t) for p, t in zip(pred_q, true_q)) / len(rows),
            "mae_constant": sum(abs(constant - t) for t in true_q) / len(rows),
            "std": calibration.fits[name].std if name in calibration.fits else float("nan"),
        }
    return results


def table(title: str, results: dict[str, dict[str, float]]) -> None:
    print(f"\n## {title}\n")
    print("| expert | held-out runs | Spearman raw | Spearman calibrated | 95% interval | quality MAE | "
          "constant's MAE | ratio | residual std (log10) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        low, high = interval(r["draws"])
        print(f"| {name} | {r['pairs']} | {r['spearman_raw']:.2f} | {r['spearman']:.2f} | {low:.2f}-{high:.2f} | "
              f"{r['mae']:.3f} | {r['mae_constant']:.3f} | {r['mae'] / r['mae_constant']:.2f} | {r['std']:.2f} |")
    values = list(results.values())
    mean = {k: sum(r[k] for r in values) / len(values) for k in ("spearman_raw", "spearman", "mae", "mae_constant")}
    low, high = interval([sum(d) / len(d) for d in zip(*(r["draws"] for r in values))])
    print(f"| **mean** | {sum(r['pairs'] for r in values)} | {mean['spearman_raw']:.2f} | {mean['spearman']:.2f} | "
          f"{low:.2f}-{high:.2f} | "
          f"{mean['mae']:.3f} | {mean['mae_constant']:.3f} | {mean['mae'] / mean['mae_constant']:.2f} | |")
    print(f"\nmin within-expert Spearman {min(r['spearman'] for r in values):.2f}, mean {mean['spearman']:.2f}; "
          f"quality MAE {mean['mae']:.3f} vs constant {mean['mae_constant']:.3f} "
          f"({100 * mean['mae'] / mean['mae_constant']:.0f}%)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--yardstick", choices=("analytic", "learned", "both"), default="analytic")
    parser.add_argument("--train", type=int, default=400, help="analytic training contexts (default 400)")
    parser.add_argument("--heldout", type=int, default=300, help="analytic held-out contexts (default 300)")
    parser.add_argument("--learned-train", type=int, default=20,
                        help="learned yardstick: training digits per (guidance, denoise) group (default 20)")
    parser.add_argument("--learned-heldout", type=int, default=15,
                        help="learned yardstick: held-out digits per group (default 15)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-pairs", type=Path, default=None, help="write the (expert, inputs, error) triples as JSON")
    parser.add_argument("--load-pairs", type=Path, default=None,
                        help="evaluate the triples a --save-pairs run wrote (same split, no model call) instead of "
                             "collecting them; only valid for pairs recorded by the current observer")
    parser.add_argument("--quick", action="store_true", help="80 training and 60 held-out contexts (learned: 4 and 3 per group)")
    args = parser.parse_args(argv)
    n_train, n_heldout = (80, 60) if args.quick else (args.train, args.heldout)
    l_train, l_heldout = (4, 3) if args.quick else (args.learned_train, args.learned_heldout)
    program = "python -m bench.estimate"
    print("$ " + " ".join([program, *(sys.argv[1:] if argv is None else argv)]))
    print(f"python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    experts = default_pool()
    saved: dict = {}
    if args.load_pairs is not None:
        for yardstick, split in json.loads(args.load_pairs.read_text()).items():
            if args.yardstick in (yardstick, "both"):
                train, heldout = ([tuple(row) for row in split[part]] for part in ("train", "heldout"))
                print(f"\n# {yardstick.capitalize()} yardstick, pairs from {args.load_pairs}: {len(train)} training "
                      f"and {len(heldout)} held-out runs")
                report_tables(train, heldout)
        return 0
    if args.yardstick in ("analytic", "both"):
        start = time.perf_counter()
        train = collect("train", args.seed, n_train, experts)
        heldout = collect("heldout", args.seed, n_heldout, experts)
        print(f"\n# Analytic yardstick, varied conditions: {n_train} training and {n_heldout} held-out contexts x "
              f"{len(experts)} experts ({time.perf_counter() - start:.0f} s)")
        report_tables(train, heldout)
        saved["analytic"] = {"train": train, "heldout": heldout}
    if args.yardstick in ("learned", "both"):
        start = time.perf_counter()
        train = collect_learned("train", args.seed, l_train, experts)
        heldout = collect_learned("heldout", args.seed, l_heldout, experts)
        groups = len(LEARNED_GUIDANCE) * len(LEARNED_DENOISE)
        print(f"\n# Learned yardstick (16x16 digits), guidance {list(LEARNED_GUIDANCE)} x denoise "
              f"{list(LEARNED_DENOISE)}: {l_train * groups} training and {l_heldout * groups} held-out contexts x "
              f"{len(experts)} experts ({time.perf_counter() - start:.0f} s)")
        report_tables(train, heldout)
        saved["learned"] = {"train": train, "heldout": heldout}
    if args.save_pairs is not None:
        args.save_pairs.write_text(json.dumps(saved))
    return 0


def report_tables(train: list, heldout: list) -> None:
    table("Calibrated estimate (features: " + ", ".join(DEFAULT_FEATURES) + ")",
          evaluate(train, heldout, DEFAULT_FEATURES))
    table("Previous features (" + ", ".join(PREVIOUS) + ")", evaluate(train, heldout, PREVIOUS))
    table("First look (first-order differences only, per-expert intercept and slope)",
          evaluate(train, heldout, FIRST_LOOK))


if __name__ == "__main__":
    raise SystemExit(main())
