"""Does the learned router beat the best single expert on contexts it has never seen?

    OMP_NUM_THREADS=1 python -m bench.routing [--quick] [--workers 2] [--seed 0]

On the analytic model (exact reference solutions), training and held-out contexts come from
different prompts (knob values), noise seeds and guidance values. Every expert runs once on
every context (outcomes kept in memory only); the router is scored on utility = quality -
lambda x cost over a sweep of lambda against the single best expert (SBS) and the per-context
oracle (VBS). The oracle gap comes first, with the part of it that no router can reach: the
oracle knows how each expert fares on *this* noise seed, a router sees only the conditions.
The "noise-blind ceiling" picks, per held-out context, the expert with the best utility
averaged over other seeds of the same conditions. Two pools: the default pool, and a labelled
bench pool that adds members built from the same solvers with other step counts and
schedules (what users build with the MoE Expert node).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import ensure_moe_sampler  # noqa: E402  (this checkout as ``moe_sampler``, as the tests load it)

ensure_moe_sampler()

from moe_sampler.experts import default_pool, get_expert  # noqa: E402
from moe_sampler.experts.base import Expert  # noqa: E402
from moe_sampler.experts.schedules import exponential_sigmas  # noqa: E402
from moe_sampler.router.environment import (  # noqa: E402
    STANDARD_CONDITIONS,
    VARIED_CONDITIONS,
    AnalyticEnvironment,
    Outcome,
)
from moe_sampler.router.model import Router  # noqa: E402
from moe_sampler.router.policy import lambda_from_priority  # noqa: E402
from moe_sampler.router.trainer import MoERLTrainer  # noqa: E402

PRIORITIES = (0.0, 0.25, 0.5, 0.75, 1.0)
MIDDLE = 0.5
MODELS = {"train": 240, "heldout": 40}  # two prompts per analytic model
CONDITIONS = {"varied": VARIED_CONDITIONS, "standard": STANDARD_CONDITIONS}
SEED_STRIDE = 7919
SWEEP_EPOCHS = 2  # sweep training: episodes per training context (a context drawn again reuses its runs)
MIN_GAP = 0.005  # utility (0.015 decades of error)
BENCH_EXTRAS = (  # (base expert, name, steps, schedule): same solvers, other budgets/schedules
    ("SpeedDemon", "bench:2M-karras-6", 6, "karras"),
    ("QualityMaster", "bench:3M-karras-25", 25, "karras"),
    ("BalancedMaster", "bench:2M-exp-20", 20, "exponential"),
    ("QualityMaster", "bench:3M-exp-30", 30, "exponential"),
    ("QualityMaster", "bench:3M-karras-60", 60, "karras"),
)


def _exponential(schedule, n):
    return exponential_sigmas(n, schedule.sigma_min, schedule.sigma_max)


def variant(base: str, name: str, steps: int, schedule: str) -> Expert:
    """A registered expert with another step budget and/or schedule."""
    expert, d = get_expert(base), get_expert(base).descriptor
    extra = 1 if d.solver == "dpmpp_3m" else 0  # 3M's first-step midpoint call
    descriptor = dataclasses.replace(d, name=name, steps=steps, schedule=schedule, max_nfe=steps + extra,
                                     calls_per_step=(steps + extra) / steps, description=f"bench variant of {base}")
    sigmas = _exponential if schedule == "exponential" else expert.make_sigmas
    return Expert(descriptor, expert.sampler, sigmas, expert.options)


def bench_pool() -> list[Expert]:
    return [*default_pool(), *(variant(*spec) for spec in BENCH_EXTRAS)]


@dataclasses.dataclass(frozen=True)
class Table:
    """Outcomes of every expert on every context: quality and nfe [n_contexts, n_experts]."""

    names: tuple[str, ...]
    quality: np.ndarray
    nfe: np.ndarray

    def columns(self, names) -> "Table":
        idx = [self.names.index(n) for n in names]
        return Table(tuple(names), self.quality[:, idx], self.nfe[:, idx])

    def utility(self, priority: float) -> np.ndarray:
        return self.quality - lambda_from_priority(priority) * np.log2(np.maximum(self.nfe, 1)) / 10


def make_env(split: str, seed: int, n: int, conditions: str) -> AnalyticEnvironment:
    return AnalyticEnvironment(split, seed=seed, n_models=MODELS[split], pool_size=n, conditions=CONDITIONS[conditions])


def _sweep_chunk(job: tuple) -> list[list[tuple[float, int]]]:
    split, seed, n, conditions, items = job
    torch.set_num_threads(1)
    env, pool = make_env(split, seed, n, conditions), bench_pool()
    rows = []
    for i, offset in items:
        ctx = dataclasses.replace(env.contexts[i], seed=env.contexts[i].seed + SEED_STRIDE * offset)
        rows.append([(o.quality, o.nfe) for o in env.evaluate(ctx, pool)])
    return rows


def sweep(split: str, seed: int, n: int, conditions: str, items: list[tuple[int, int]], workers: int) -> Table:
    """Every bench-pool expert on contexts ``(index, seed offset)`` of the split, over ``workers`` processes."""
    jobs = [(split, seed, n, conditions, items[w::workers]) for w in range(workers)]
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as processes:
            parts = processes.map(_sweep_chunk, jobs)
    else:
        parts = [_sweep_chunk(jobs[0])]
    rows = [None] * len(items)
    for w, part in enumerate(parts):
        rows[w::workers] = part
    names = tuple(e.name for e in bench_pool())
    return Table(names, np.array([[q for q, _ in r] for r in rows]), np.array([[k for _, k in r] for r in rows]))


class TableEnvironment:
    """The trainer's Environment over precomputed outcomes (contexts are the first ``rows`` table
    rows). ``runs`` collects the distinct (context, expert) runs the trainer has asked for: a
    context drawn again reuses its outcomes, as the analytic environment's cache does."""

    def __init__(self, env: AnalyticEnvironment, table: Table, rows: int | None = None) -> None:
        self.env, self.table = env, table
        self.rows = len(table.quality) if rows is None else rows
        self.runs: set[tuple[int, str]] = set()

    def sample_context(self, rng: random.Random) -> int:
        return rng.randrange(self.rows)

    def state(self, row: int, priority: float) -> torch.Tensor:
        return self.env.state(self.env.contexts[row], priority)

    def evaluate(self, row: int, experts) -> list[Outcome]:
        out = []
        for e in experts:
            self.runs.add((row, e.name))
            k = self.table.names.index(e.name)
            q, nfe = float(self.table.quality[row, k]), int(self.table.nfe[row, k])
            out.append(Outcome(e.name, 10 ** (-3 * q), q, nfe, 0.0, True))
        return out


def predictions(router: Router, env: AnalyticEnvironment, pool) -> tuple[np.ndarray, np.ndarray]:
    """Predicted quality and cost [n, k] (the scorer ignores priority, so once per context)."""
    q, c = zip(*(router.predict(env.state(ctx, MIDDLE), pool) for ctx in env.contexts))
    return torch.stack(q).numpy(), torch.stack(c).numpy()


def picks(pred: tuple[np.ndarray, np.ndarray], priority: float) -> np.ndarray:
    return np.argmax(pred[0] - lambda_from_priority(priority) * pred[1], axis=1)


def ceiling_picks(ceiling: Table, n_seeds: int, priority: float) -> np.ndarray:
    """The noise-blind ceiling's picks on the first ``len(ceiling) // n_seeds`` held-out contexts:
    the best expected utility over the other seeds of the same conditions."""
    return ceiling.utility(priority).reshape(n_seeds, len(ceiling.quality) // n_seeds, -1).mean(0).argmax(1)


def mean_picked(u: np.ndarray, chosen: np.ndarray) -> float:
    """Mean utility of the picks ``chosen`` [n] on utilities ``u`` [n, k]."""
    return float(u[np.arange(len(u)), chosen].mean())


def closed_gap(u: np.ndarray, chosen: np.ndarray, rng: np.random.Generator | None = None, n_boot: int = 1000):
    """(router - SBS) / (VBS - SBS) on utilities u [n, k]; with ``rng``, a bootstrap 95% CI over contexts."""

    def gap(rows):
        sbs, vbs = u[rows].mean(0).max(), u[rows].max(1).mean()
        # No gap to close (the SBS is the oracle almost everywhere): undefined, not a huge ratio.
        return (u[rows, chosen[rows]].mean() - sbs) / (vbs - sbs) if vbs - sbs > MIN_GAP else math.nan

    point = gap(np.arange(len(u)))
    if rng is None:
        return point
    boot = [gap(rng.integers(0, len(u), len(u))) for _ in range(n_boot)]
    if np.isnan(point) or np.mean(np.isnan(boot)) > 0.05:
        return point, math.nan, math.nan
    return point, np.nanpercentile(boot, 2.5), np.nanpercentile(boot, 97.5)


def report_oracle(label: str, table: Table, ceiling: Table, n_seeds: int) -> None:
    n_c = len(ceiling.quality) // n_seeds
    print(f"\n== Oracle gap, {label}: {len(table.names)} experts, {len(table.quality)} held-out contexts ==")
    print(f"{'priority':>8} {'lambda':>7} {'SBS':>7} {'VBS':>7} {'gap':>6} {'decades':>7} {'SBS not best':>12}  "
          f"{'noise-blind ceiling':>19}  SBS expert")
    for p in PRIORITIES:
        u = table.utility(p)
        sbs_k, gap = int(u.mean(0).argmax()), u.max(1).mean() - u.mean(0).max()
        blind = closed_gap(u[:n_c], ceiling_picks(ceiling, n_seeds, p))
        print(f"{p:8.2f} {lambda_from_priority(p):7.3f} {u.mean(0).max():7.3f} {u.max(1).mean():7.3f} {gap:6.3f} "
              f"{3 * gap:7.3f} {np.mean(u[:, sbs_k] < u.max(1) - 1e-9):12.0%}  {blind:19.2f}  {table.names[sbs_k]}")
    print(f"(gap in decades of error = 3 x utility; ceiling from {n_seeds} other seeds on the first {n_c} contexts)")


def report_router(label: str, table: Table, pred, env: AnalyticEnvironment, ceiling: Table, n_seeds: int,
                  seed: int) -> None:
    rng, n_c = np.random.default_rng(seed), len(ceiling.quality) // n_seeds
    print(f"\n== Router vs SBS / VBS on held-out contexts, {label} ==")
    print(f"{'priority':>8} {'lambda':>7} {'SBS':>7} {'router':>7} {'VBS':>7} {'closed gap [95% CI]':>24}"
          f"   first {n_c}: router / ceiling")
    for p in PRIORITIES:
        u, chosen = table.utility(p), picks(pred, p)
        point, lo, hi = closed_gap(u, chosen, rng)
        blind = ceiling_picks(ceiling, n_seeds, p)
        print(f"{p:8.2f} {lambda_from_priority(p):7.3f} {u.mean(0).max():7.3f} {mean_picked(u, chosen):7.3f} "
              f"{u.max(1).mean():7.3f} {point:9.2f} [{lo:5.2f}, {hi:5.2f}]   "
              f"{closed_gap(u[:n_c], chosen[:n_c]):13.2f} / {closed_gap(u[:n_c], blind):.2f}")
    u, chosen = table.utility(MIDDLE), picks(pred, MIDDLE)
    sbs_k = int(u.mean(0).argmax())
    groups = {"text-to-image, cfg <= 3": lambda c: c.denoise == 1 and c.cfg <= 3,
              "text-to-image, cfg > 3": lambda c: c.denoise == 1 and c.cfg > 3,
              "img2img (denoise < 1)": lambda c: c.denoise < 1}
    print(f"mean utility at the middle priority by condition:   {'n':>4} {'SBS':>7} {'router':>7} {'VBS':>7}")
    for name, keep in groups.items():
        rows = np.array([i for i, c in enumerate(env.contexts) if keep(c)])
        if len(rows):
            print(f"  {name:<48} {len(rows):4d} {u[rows, sbs_k].mean():7.3f} {u[rows, chosen[rows]].mean():7.3f} "
                  f"{u[rows].max(1).mean():7.3f}")
    calls_saved(table, pred, ceiling, n_seeds, sbs_k)


def operating_curve(table: Table, choose) -> list[tuple[float, float, float]]:
    """(mean NFE, priority, mean quality) of ``choose(priority) -> picks [n]`` over a priority grid."""
    rows = np.arange(len(table.quality))
    return [(table.nfe[rows, c].mean(), p, table.quality[rows, c].mean())
            for p, c in ((p, choose(p)) for p in np.linspace(0, 1, 81))]


def saving(curve: list[tuple[float, float, float]], quality: float, nfe: float) -> float:
    """1 - (fewest mean calls on ``curve`` with mean quality >= ``quality``) / ``nfe``; NaN if never reached."""
    ok = [n for n, _, q in curve if q >= quality - 1e-9]
    return 1 - min(ok) / nfe if ok else math.nan


def calls_saved(table: Table, pred, ceiling: Table, n_seeds: int, sbs_k: int) -> None:
    """Model calls saved at equal mean quality against each fixed expert: the cheapest priority
    whose mean quality on the held-out contexts reaches the expert's. On all contexts for the
    router and the per-context oracle; on the first contexts also for the noise-blind ceiling."""
    n_c = len(ceiling.quality) // n_seeds
    first = Table(table.names, table.quality[:n_c], table.nfe[:n_c])
    curves = {"all": [operating_curve(table, lambda p: picks(pred, p)),
                      operating_curve(table, lambda p: table.utility(p).argmax(1))],
              "first": [operating_curve(first, lambda p: picks(pred, p)[:n_c]),
                        operating_curve(first, lambda p: ceiling_picks(ceiling, n_seeds, p)),
                        operating_curve(first, lambda p: first.utility(p).argmax(1))]}
    print(f"model calls saved at equal mean quality (cheapest priority whose mean quality >= the expert's; "
          f"'-': never reached):")
    print(f"  {'':<20} {'all ' + str(len(table.quality)) + ' held-out contexts':>37} | "
          f"{'first ' + str(n_c) + ' contexts':>33}")
    print(f"  {'expert':<20} {'quality':>7} {'NFE':>6} {'router':>7} {'oracle':>7} | {'router':>7} {'ceiling':>8} "
          f"{'oracle':>7}")

    def cell(curve, q, nfe, width):
        v = saving(curve, q, nfe)
        return f"{'-' if math.isnan(v) else f'{v:+.0%}':>{width}}"

    for k, name in enumerate(table.names):
        q, nfe = table.quality[:, k].mean(), table.nfe[:, k].mean()
        qf, nf = first.quality[:, k].mean(), first.nfe[:, k].mean()
        text = f"  {name:<20} {q:7.3f} {nfe:6.1f} " + " ".join(cell(c, q, nfe, 7) for c in curves["all"]) + " | "
        text += " ".join(cell(c, qf, nf, w) for c, w in zip(curves["first"], (7, 8, 7)))
        print(text + ("  <- SBS at the middle priority" if k == sbs_k else ""))


def heldout_score(router: Router, env: AnalyticEnvironment, pool, u: np.ndarray) -> str:
    """Closed gap and mean utility of the router's greedy picks at the middle priority, as a table cell."""
    chosen = picks(predictions(router, env, pool), MIDDLE)
    return f"{closed_gap(u, chosen):10.2f} {mean_picked(u, chosen):14.3f}"


def train_sweep(train_env, train_table, pool, seed, sizes, heldout_env, heldout_table, label) -> Router:
    """Learning curve of full-sweep training: a router per training-set size (the first ``n``
    contexts, ``SWEEP_EPOCHS * n`` episodes); returns the one trained on the largest set."""
    u = heldout_table.utility(MIDDLE)
    print(f"\n-- learning curve, {label}, sweep training (held-out, middle priority) --")
    print(f"{'contexts':>8} {'expert runs':>11} {'episodes':>8} {'closed gap':>10} {'router utility':>14}")
    for n in sizes:
        router = Router(name="bench-sweep")
        environment = TableEnvironment(train_env, train_table, rows=max(n, 1))
        MoERLTrainer(environment, router, pool, mode="sweep", seed=seed).train(SWEEP_EPOCHS * n)
        print(f"{n:8d} {len(environment.runs):11d} {SWEEP_EPOCHS * n:8d} {heldout_score(router, heldout_env, pool, u)}")
    return router


def train_bandit(train_env, train_table, pool, seed, schedule, heldout_env, heldout_table, label) -> Router:
    """Learning curve of bandit training (only the pick runs) on all training contexts."""
    router = Router(name="bench-bandit")
    environment = TableEnvironment(train_env, train_table)
    trainer = MoERLTrainer(environment, router, pool, mode="bandit", seed=seed)
    u = heldout_table.utility(MIDDLE)
    print(f"\n-- learning curve, {label}, bandit training on {environment.rows} contexts (held-out, middle "
          f"priority) --")
    print(f"{'episodes':>8} {'expert runs':>11} {'closed gap':>10} {'router utility':>14}")
    for episodes in schedule:
        trainer.train(episodes)
        print(f"{episodes:8d} {len(environment.runs):11d} {heldout_score(router, heldout_env, pool, u)}")
    return router


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a fast check")
    parser.add_argument("--workers", type=int, default=2, help="processes for the expert sweeps (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conditions", choices=sorted(CONDITIONS), default="varied",
                        help="context distribution (router.environment.VARIED_CONDITIONS / STANDARD_CONDITIONS)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    n_train, n_heldout, n_ceiling, n_seeds = (100, 40, 15, 2) if args.quick else (1200, 120, 40, 3)
    sizes = (0, 30, 100) if args.quick else (0, 30, 100, 300, 1200)  # training contexts, sweep mode
    bandits = (0, 300, 1000) if args.quick else (0, 300, 1000, 3000, 6000)
    start = time.perf_counter()
    print(f"{args.conditions} conditions: {CONDITIONS[args.conditions]}")
    print(f"sweeping {n_train} training + {n_heldout} held-out + {n_ceiling * n_seeds} extra-seed contexts x "
          f"{len(bench_pool())} experts on {args.workers} workers...", file=sys.stderr)
    cond = args.conditions
    train_table = sweep("train", args.seed, n_train, cond, [(i, 0) for i in range(n_train)], args.workers)
    heldout_table = sweep("heldout", args.seed, n_heldout, cond, [(i, 0) for i in range(n_heldout)], args.workers)
    ceiling_table = sweep("heldout", args.seed, n_heldout, cond,
                          [(i, s) for s in range(1, n_seeds + 1) for i in range(n_ceiling)], args.workers)
    train_env, heldout_env = (make_env(s, args.seed, n, cond) for s, n in (("train", n_train), ("heldout", n_heldout)))
    print(f"sweeps done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    pools = {"default pool": default_pool(), "bench pool (default + 5 'bench:' variants)": bench_pool()}
    for label, pool in pools.items():
        names = [e.name for e in pool]
        report_oracle(label, heldout_table.columns(names), ceiling_table.columns(names), n_seeds)
    for label, pool in pools.items():
        names = [e.name for e in pool]
        tr, ho = train_table.columns(names), heldout_table.columns(names)
        router = train_sweep(train_env, tr, pool, args.seed, sizes, heldout_env, ho, label)
        train_bandit(train_env, tr, pool, args.seed, bandits, heldout_env, ho, label)
        report_router(f"{label}, router trained by full sweep on {sizes[-1]} contexts ({SWEEP_EPOCHS * sizes[-1]} "
                      f"episodes)", ho,
                      predictions(router, heldout_env, pool), heldout_env, ceiling_table.columns(names), n_seeds,
                      args.seed)
    state = heldout_env.state(heldout_env.contexts[0], MIDDLE)
    times = sorted(router.select(state, pool, priority=MIDDLE).decision_seconds for _ in range(201))
    print(f"\ndecision time, {len(pool)} experts, 1 CPU thread: median {1e3 * times[100]:.3f} ms, "
          f"95th percentile {1e3 * times[190]:.3f} ms")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
