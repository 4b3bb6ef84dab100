"""Does the learned router beat the best single expert on contexts it has never seen?

    OMP_NUM_THREADS=1 python -m bench.routing [--quick] [--workers 2] [--seed 0]
        [--yardsticks analytic,learned] [--cache FILE] [--analytic-sizes T,H,C,S] [--learned-sizes T,H,C,S]
        [--fit-prior] [--no-analytic-curves]

Two yardsticks, side by side: the analytic Gaussian-mixture model (exact references; training
and held-out contexts come from different prompts (knob values), noise seeds and guidance
values) and the shipped learned digits UNet (``experts/learned.py``, through the generic
``DenoiserEnvironment``; held-out contexts share its ten classes but not noise seeds, guidance
values or img2img start digits; Dormand-Prince rtol 1e-5 references, about 1,100 model calls
each, so its sweeps are small). Every expert runs once on every context (``--cache`` keeps
the rows in a JSON-lines file so an interrupted or repeated run reuses them); policies are
scored on utility = quality - lambda x cost over a sweep of lambda against the single best
expert (SBS) and the per-context oracle (VBS). The oracle gap comes first, with the part of it
that no router can reach: the oracle knows how each expert fares on *this* noise seed, a
router sees only the conditions. The "noise-blind ceiling" picks, per held-out context, the
expert with the best utility averaged over other seeds of the same conditions.

First the untrained router's fixed pick per priority against the expert of smallest worst-case
regret over the yardsticks' training contexts, pooled and per group (text-to-image / img2img;
``--fit-prior`` refits ``router.model.PRIOR_INIT`` to it; the per-group table is
``router.online.PRIOR_FIXED``). Then per yardstick (default pool), the closed gap with a
bootstrap 95% interval at every priority, on all held-out contexts and split text-to-image /
img2img, of: the untrained router; routers trained by full sweep on 10, 30, 100, 300, 1000 and
all training contexts of that yardstick; the router trained on the other yardstick; the guarded
policy of ``router.online`` with no data (its per-group fixed experts) and after one online
update from the same sweep rows (issue 8, items 5 and 6); and model calls saved at equal mean
quality against every fixed expert. On the analytic model also the earlier report: two pools (the
default pool, and a labelled bench pool that adds members built from the same solvers with
other step counts and schedules, as users build with the MoE Expert node), learning curves of
sweep and bandit training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
GUARD_STEPS_PER_CONTEXT = 8  # Adam steps of the guarded policy's update: SWEEP_EPOCHS x the trainer's 4 per episode
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


# ----------------------------------------------------------------------------- the learned yardstick

# Held-out learned contexts share the ten classes with training (the model has no others), but
# not their noise seeds, img2img start images (the first 14 shipped digits of each class train,
# the last 6 are held out) or guidance values.
LEARNED_SPLITS = {
    "train": {"cfgs": (1.0, 1.5, 2.0, 3.0, 5.0, 7.5), "images": slice(0, 14)},
    "heldout": {"cfgs": (1.0, 1.25, 2.5, 4.0, 6.0), "images": slice(14, 20)},
}
LEARNED_RTOL = 1e-5  # Dormand-Prince reference, 23-37x below the best expert's error there (docs/ROUTER.md)
_LEARNED_MODEL = None


def learned_env(split: str, seed: int, n: int):
    """A DenoiserEnvironment on the shipped learned digits model with a fixed list of ``n``
    contexts of ``split`` (30% img2img, denoise 0.15-0.9; the first ``k`` contexts are the same
    for every ``n >= k``)."""
    global _LEARNED_MODEL
    from moe_sampler.experts.learned import NULL_CLASS, load_learned_model
    from moe_sampler.router.environment import SPLITS, DenoiserEnvironment, DormandPrince, PromptContexts

    if _LEARNED_MODEL is None:
        _LEARNED_MODEL = load_learned_model()
    model, spec = _LEARNED_MODEL, LEARNED_SPLITS[split]
    k = model.num_classes
    images = torch.cat([model.data_images(c)[spec["images"]] for c in range(k)])
    source = PromptContexts(list(range(k)), None, model.latent_shape, cfgs=spec["cfgs"], img2img_fraction=0.3,
                            denoise_range=(0.15, 0.9), images=images, images_per_prompt=True,
                            state_conditioning=[model.class_embeddings[c:c + 1] for c in range(k)],
                            state_negative=model.class_embeddings[NULL_CLASS:], relative_error=model.relative_error)
    rng = random.Random(1_000_003 * seed + 7_919 * (1 + SPLITS.index(split)) + 17)
    source.contexts = [source.draw(rng) for _ in range(n)]
    env = DenoiserEnvironment(model, source, DormandPrince(LEARNED_RTOL))
    env.contexts = source.contexts
    return env


def yardstick_pool(yardstick: str) -> list[Expert]:
    """The experts swept on a yardstick: the bench pool on the analytic model, the default pool
    on the learned one (its references cost ~1,100 calls each, so sweeps are kept small)."""
    return bench_pool() if yardstick == "analytic" else default_pool()


def yardstick_env(yardstick: str, split: str, seed: int, n: int, conditions: str = "varied"):
    if yardstick == "analytic":
        return make_env(split, seed, n, conditions)
    if yardstick == "learned":
        return learned_env(split, seed, n)
    raise ValueError(f"yardstick must be 'analytic' or 'learned', got {yardstick!r}")


_ENVS: dict = {}
def _sweep_one(job: tuple) -> list[tuple[str, list[tuple[float, int]]]]:
    """One job: contexts ``[(index, seed offset), ...]`` of a split; returns (cache key,
    [(quality, nfe) per expert]) per context."""
    yardstick, split, seed, n, conditions, items = job
    torch.set_num_threads(1)
    key = (yardstick, split, seed, n, conditions)
    if key not in _ENVS:
        _ENVS.clear()  # one environment per process at a time (its reference cache)
        _ENVS[key] = (yardstick_env(yardstick, split, seed, n, conditions), yardstick_pool(yardstick))
    env, pool = _ENVS[key]
    contexts = [dataclasses.replace(env.contexts[i], seed=env.contexts[i].seed + SEED_STRIDE * o) for i, o in items]
    return [(cache_key(yardstick, split, seed, conditions, i, o), [(r.quality, r.nfe) for r in env.evaluate(c, pool)])
            for (i, o), c in zip(items, contexts)]


def cache_key(yardstick: str, split: str, seed: int, conditions: str, i: int, offset: int) -> str:
    """The key of one context's sweep row in the cache (contexts are prefix-stable in ``n``)."""
    cond = conditions if yardstick == "analytic" else "-"
    return f"{yardstick}|{split}|{seed}|{cond}|{i}|{offset}"


def load_cache(path: Path | None) -> dict[str, list]:
    """Sweep rows already measured (a JSON line per context); a torn last line is ignored."""
    rows: dict[str, list] = {}
    if path is None or not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            key, row = json.loads(line)
        except ValueError:
            continue
        rows[key] = row
    return rows


def sweep(split: str, seed: int, n: int, conditions: str, items: list[tuple[int, int]], workers: int,
          yardstick: str = "analytic", cache: Path | None = None) -> Table:
    """Every pool expert of the yardstick on contexts ``(index, seed offset)`` of the split, over
    ``workers`` processes; rows found in ``cache`` are not run again, new ones are appended to it."""
    done = load_cache(cache)
    keys = [cache_key(yardstick, split, seed, conditions, i, o) for i, o in items]
    todo = [item for item, k in zip(items, keys) if k not in done]
    jobs = [(yardstick, split, seed, n, conditions, [item]) for item in todo]
    if jobs:
        out = open(cache, "a") if cache is not None else None
        if out is not None and cache.stat().st_size and not cache.read_bytes().endswith(b"\n"):
            out.write("\n")  # a torn last line (an interrupted run) stays on its own line

        def keep(results):
            for key, row in results:
                done[key] = row
                if out is not None:
                    out.write(json.dumps([key, row]) + "\n")
                    out.flush()

        try:
            if workers > 1:
                with multiprocessing.get_context("fork").Pool(workers) as processes:
                    for results in processes.imap_unordered(_sweep_one, jobs):
                        keep(results)
            else:
                for job in jobs:
                    keep(_sweep_one(job))
        finally:
            if out is not None:
                out.close()
    rows = [done[k] for k in keys]
    names = tuple(e.name for e in yardstick_pool(yardstick))
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


SIZES = {  # (training, held-out, ceiling contexts, ceiling seeds) per yardstick; quick / full
    "analytic": {"quick": (100, 40, 15, 2), "full": (300, 120, 30, 2)},
    "learned": {"quick": (12, 10, 4, 2), "full": (30, 20, 4, 2)},
}


@dataclasses.dataclass
class Sweeps:
    """A yardstick's outcome tables and the environments whose contexts they are."""

    yardstick: str
    train: Table
    heldout: Table
    ceiling: Table
    n_seeds: int
    train_env: object
    heldout_env: object


def sweep_yardstick(yardstick: str, sizes: tuple[int, int, int, int], seed: int, conditions: str, workers: int,
                    cache: Path | None) -> Sweeps:
    """Held-out contexts first, then training contexts in order, then the ceiling's extra seeds."""
    n_train, n_heldout, n_ceiling, n_seeds = sizes
    start = time.perf_counter()
    print(f"{yardstick}: sweeping {n_heldout} held-out + {n_train} training + {n_ceiling * n_seeds} extra-seed "
          f"contexts x {len(yardstick_pool(yardstick))} experts on {workers} workers...", file=sys.stderr, flush=True)
    heldout = sweep("heldout", seed, n_heldout, conditions, [(i, 0) for i in range(n_heldout)], workers, yardstick,
                    cache)
    train = sweep("train", seed, n_train, conditions, [(i, 0) for i in range(n_train)], workers, yardstick, cache)
    ceiling = sweep("heldout", seed, n_heldout, conditions,
                    [(i, s) for s in range(1, n_seeds + 1) for i in range(n_ceiling)], workers, yardstick, cache)
    print(f"{yardstick}: sweeps done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return Sweeps(yardstick, train, heldout, ceiling, n_seeds, yardstick_env(yardstick, "train", seed, n_train, conditions),
                  yardstick_env(yardstick, "heldout", seed, n_heldout, conditions))


# ----------------------------------------------------------------------------- the untrained router's prior

PRIOR_GRID = tuple(round(0.001 * i, 3) for i in range(1001))  # priorities the prior's picks are judged on


def prior_outcomes(theta, experts) -> tuple[np.ndarray, np.ndarray]:
    """The descriptor prior's quality and cost [N] of ``experts`` with prior numbers ``theta`` (6)."""
    from moe_sampler.experts.base import features_of
    from moe_sampler.router.model import ExpertScorer

    scorer = ExpertScorer()
    with torch.no_grad():
        scorer.prior.copy_(torch.tensor([float(v) for v in theta]))
        q, c = scorer(torch.zeros(len(experts), 64), features_of(experts))
    return q.double().numpy(), c.double().numpy()


def minimax_regrets(tables: dict[str, Table], grid=PRIOR_GRID) -> np.ndarray:
    """[len(grid), N]: each expert's worst regret over the yardsticks' tables (mean utility of the
    best fixed expert of that yardstick minus its own) at each priority; the tables share columns."""
    lam = np.array([lambda_from_priority(p) for p in grid])[:, None]
    worst = None
    for t in tables.values():
        u = t.quality.mean(0)[None] - lam * (np.log2(np.maximum(t.nfe, 1)) / 10).mean(0)[None]  # [G, N]
        regret = u.max(1, keepdims=True) - u
        worst = regret if worst is None else np.maximum(worst, regret)
    return worst


def _prior_picks(theta, experts, grid) -> np.ndarray:
    q, c = prior_outcomes(theta, experts)
    lam = np.array([lambda_from_priority(p) for p in grid])[:, None]
    return np.argmax(q[None] - lam * c[None], axis=1)


def prior_regrets(theta, tables: dict[str, Table], experts, grid=PRIOR_GRID, regret: np.ndarray | None = None
                  ) -> np.ndarray:
    """[len(grid)]: the worst regret over the yardsticks of the prior's fixed pick at each priority."""
    regret = minimax_regrets(tables, grid) if regret is None else regret
    return regret[np.arange(len(grid)), _prior_picks(theta, experts, grid)]


def nelder_mead(f, x0, maxiter: int = 4000, xatol: float = 1e-4, fatol: float = 1e-4) -> np.ndarray:
    """The minimiser of ``f`` found by the Nelder-Mead simplex from ``x0`` (the standard
    coefficients and initial simplex of scipy.optimize's, without the dependency): stops when the
    simplex is within ``xatol`` of its best point and its values within ``fatol``, or after
    ``maxiter`` iterations."""
    x0 = np.asarray(x0, dtype=float)
    n = len(x0)
    simplex = [x0] + [x0 + np.eye(n)[i] * (0.05 * x0[i] if x0[i] != 0 else 0.00025) for i in range(n)]
    values = [f(x) for x in simplex]
    for _ in range(maxiter):
        order = np.argsort(values)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        if (max(np.max(np.abs(x - simplex[0])) for x in simplex[1:]) <= xatol
                and max(abs(v - values[0]) for v in values[1:]) <= fatol):
            break
        centroid = np.mean(simplex[:-1], axis=0)
        reflected = centroid + (centroid - simplex[-1])
        fr = f(reflected)
        if fr < values[0]:
            expanded = centroid + 2.0 * (centroid - simplex[-1])
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            outside = fr < values[-1]
            contracted = centroid + 0.5 * ((reflected if outside else simplex[-1]) - centroid)
            fc = f(contracted)
            if fc < (fr if outside else values[-1]):
                simplex[-1], values[-1] = contracted, fc
            else:  # shrink towards the best point
                simplex = [simplex[0]] + [simplex[0] + 0.5 * (x - simplex[0]) for x in simplex[1:]]
                values = [values[0]] + [f(x) for x in simplex[1:]]
    return simplex[int(np.argmin(values))]


def fit_prior(tables: dict[str, Table], experts, fit_tables: dict[str, tuple[Table, list]] | None = None,
              start=None, grid=PRIOR_GRID, tolerance: float = 1e-4) -> tuple[np.ndarray, dict]:
    """The prior numbers of ``router.model.PRIOR_INIT`` fitted to training contexts.

    First: the untrained router's fixed pick at every priority of ``grid`` should be the expert
    with the smallest worst-case regret over the yardsticks (``tables``: training contexts of each
    yardstick, columns ``experts``): the mean over ``grid`` of the pick's worst regret is at most
    ``tolerance`` above the minimax one; then, among the numbers that achieve that, the smallest
    mean squared error of the
    prior's quality and cost against each expert's mean outcome (``fit_tables``: yardstick ->
    (table, its experts), default ``tables``). The stochastic penalty ``e`` is kept (no stochastic
    expert in the pools). Nelder-Mead from ``start`` (default ``PRIOR_INIT``), three restarts."""
    from moe_sampler.router.model import PRIOR_INIT

    fit_tables = fit_tables or {y: (t, experts) for y, t in tables.items()}
    regret = minimax_regrets(tables, grid)
    bound = float(regret.min(1).mean())
    e = PRIOR_INIT[4]
    full = lambda x: (x[0], x[1], x[2], x[3], e, x[4])  # noqa: E731

    def mse(theta) -> float:
        errors = []
        for table, pool in fit_tables.values():
            q, c = prior_outcomes(theta, pool)
            errors += [(q - table.quality.mean(0)) ** 2, (c - np.log2(np.maximum(table.nfe, 1)).mean(0) / 10) ** 2]
        return float(np.mean(np.concatenate(errors)))

    def objective(x) -> float:
        excess = prior_regrets(full(x), tables, experts, grid, regret).mean() - bound - tolerance
        return 1e5 * max(excess, 0.0) + mse(full(x))

    start = PRIOR_INIT if start is None else start
    x = np.array([start[0], start[1], start[2], start[3], start[5]], dtype=float)
    for _ in range(3):
        x = nelder_mead(objective, x, maxiter=4000, xatol=1e-5, fatol=1e-9)
    theta = np.array(full(x))
    achieved = prior_regrets(theta, tables, experts, grid, regret)
    return theta, {"regret_mean": float(achieved.mean()), "regret_max": float(achieved.max()), "bound_mean": bound,
                   "mse": mse(theta)}


def switch_points(theta, experts, grid=PRIOR_GRID) -> list[tuple[float, str]]:
    """``[(priority, expert)]``: where the prior's fixed pick changes along ``grid``."""
    out = []
    for p, k in zip(grid, _prior_picks(theta, experts, grid)):
        name = experts[int(k)].name
        if not out or out[-1][1] != name:
            out.append((p, name))
    return out


def report_prior(sweeps: dict[str, "Sweeps"], fit: bool) -> None:
    """The untrained router's fixed pick per priority against the minimax-regret expert of the
    yardsticks' training contexts (default pool); with ``fit``, the prior numbers refitted."""
    from moe_sampler.router.model import PRIOR_INIT

    pool = default_pool()
    names = [e.name for e in pool]
    tables = {y: sw.train.columns(names) for y, sw in sweeps.items()}
    regret = minimax_regrets(tables)
    minimax = []
    for p, row in zip(PRIOR_GRID, regret):
        if not minimax or minimax[-1][1] != names[int(row.argmin())]:
            minimax.append((p, names[int(row.argmin())]))
    sizes = ", ".join(f"{y} {len(t.quality)}" for y, t in tables.items())
    print(f"\n== The untrained router's fixed expert per priority (training contexts: {sizes}) ==")
    print(f"minimax-regret expert (from priority): {minimax}")
    current = prior_regrets(PRIOR_INIT, tables, pool)
    print(f"PRIOR_INIT {tuple(PRIOR_INIT)}: {switch_points(PRIOR_INIT, pool)}; worst regret, mean over "
          f"priorities 0-1 {current.mean():.4f} (minimax {regret.min(1).mean():.4f}), max {current.max():.4f}")
    for group, keep in GROUPS.items():
        split = {}
        for y, sw in sweeps.items():
            rows = [i for i, c in enumerate(sw.train_env.contexts[:len(sw.train.quality)]) if keep(c)]
            split[y] = Table(tuple(names), tables[y].quality[rows], tables[y].nfe[rows])
        points = []
        for p, row in zip(PRIOR_GRID, minimax_regrets(split)):
            if not points or points[-1][1] != names[int(row.argmin())]:
                points.append((p, names[int(row.argmin())]))
        print(f"{group} only ({', '.join(f'{y} {len(t.quality)}' for y, t in split.items())} contexts): minimax-regret "
              f"expert {points} (router.online.PRIOR_FIXED)")
    if fit:
        fit_tables = {y: (sw.train.columns([e.name for e in yardstick_pool(y)]), yardstick_pool(y))
                      for y, sw in sweeps.items()}
        theta, info = fit_prior(tables, pool, fit_tables)
        print(f"fitted prior {tuple(round(float(v), 3) for v in theta)}: {switch_points(theta, pool)}; "
              f"worst regret, mean {info['regret_mean']:.4f} (minimax {info['bound_mean']:.4f}), "
              f"max {info['regret_max']:.4f}, "
              f"mean squared error of quality and cost {info['mse']:.5f}")


# ----------------------------------------------------------------------------- both yardsticks, side by side

CURVE = (10, 30, 100, 300, 1000)  # training contexts of the item-6 curve ("never worse than the best fixed expert")
GROUPS = {"text-to-image": lambda c: c.denoise >= 1, "img2img": lambda c: c.denoise < 1}


def router_policy(router: Router, env, pool):
    """``priority -> greedy picks [n]`` of a router on the environment's contexts."""
    pred = predictions(router, env, pool)
    return lambda p: picks(pred, p)


def sweep_rows(env, table: Table, rows: int, seed: int) -> list:
    """Full-sweep rows of the first ``rows`` contexts as the online learner logs them: one
    ``LoggedRow`` per expert, propensity 1, ``quality_source="sweep"``, each context at a priority
    drawn uniformly (as the trainer does), keyed so that a context's rows share a held-out side."""
    from moe_sampler.router.online import LoggedRow
    from moe_sampler.router.policy import cost_from_nfe

    rng = random.Random(seed)
    out = []
    for i in range(rows):
        priority = rng.random()
        state = tuple(float(v) for v in env.state(env.contexts[i], priority))
        for k, name in enumerate(table.names):
            out.append(LoggedRow(state, name, float(table.quality[i, k]), float(cost_from_nfe(int(table.nfe[i, k]))),
                                 1.0, priority, "sweep", f"ctx{i}|{seed}|{name}|{priority!r}|0"))
    return out


def guarded_policy(env, table: Table, rows: int, pool, seed: int, model: str, heldout_env):
    """The product's protection (``router.online``): one online update of the untrained router from
    the sweep rows of the first ``rows`` training contexts (``GUARD_STEPS_PER_CONTEXT`` Adam steps
    per context, as the sweep trainer); the adopted candidate's guarded policy
    (greedy, no exploration), or the untrained router's (the prior's fixed expert) when the update
    is not adopted. Returns ``(priority -> picks [n] on the held-out contexts, UpdateResult)``."""
    from moe_sampler.router.online import GuardedPolicy, update

    # As many Adam steps as the sweep-trained router of the same rows (the product's background
    # update caps a single update at 600; its later updates continue from the adopted router).
    result = update(Router.default(), sweep_rows(env, table, rows, seed), pool, model=model, seed=seed,
                    steps=max(GUARD_STEPS_PER_CONTEXT * rows, 100))
    policy = GuardedPolicy.for_router(result.candidate if result.adopted else Router.default(), epsilon=0.0)
    contexts = heldout_env.contexts

    def choose(p: float) -> np.ndarray:
        states = torch.stack([heldout_env.state(c, p) for c in contexts])
        return policy.greedy_batch(states, pool, [p] * len(contexts))[0].numpy()

    return choose, result


def no_data_policy(pool, heldout_env):
    """The guarded policy before any row of the model (``priority -> picks [n]``): the best fixed
    expert of ``router.online.PRIOR_FIXED`` for each context's group (text-to-image / img2img)."""
    from moe_sampler.router.online import Evidence, GuardedPolicy

    policy = GuardedPolicy(Router.default(), Evidence(), epsilon=0.0)
    contexts = heldout_env.contexts

    def choose(p: float) -> np.ndarray:
        states = torch.stack([heldout_env.state(c, p) for c in contexts])
        return policy.greedy_batch(states, pool, [p] * len(contexts))[0].numpy()

    return choose


def train_router(env, table: Table, pool, seed: int, rows: int) -> Router:
    """Full-sweep training on the first ``rows`` contexts (``SWEEP_EPOCHS * rows`` episodes)."""
    router = Router(name="bench-sweep")
    MoERLTrainer(TableEnvironment(env, table, rows=rows), router, pool, mode="sweep", seed=seed).train(
        SWEEP_EPOCHS * rows)
    return router


def gap_cell(u: np.ndarray, chosen: np.ndarray, rng: np.random.Generator) -> str:
    point, lo, hi = closed_gap(u, chosen, rng)
    if math.isnan(point):
        return f"{'n/a':>19}"
    if math.isnan(lo):
        return f"{point:6.2f} [  n/a,   n/a]"
    return f"{point:6.2f} [{lo:5.2f}, {hi:5.2f}]"


def report_policies(label: str, table: Table, env, policies: dict, seed: int, rows=None) -> dict:
    """Closed gap [95% CI] of each policy at every priority on the held-out contexts (``rows``: a
    subset); returns {policy: {priority: (point, lo, hi)}}."""
    rows = np.arange(len(table.quality)) if rows is None else np.asarray(rows)
    rng = np.random.default_rng(seed)
    print(f"\n== Closed gap [95% CI] by priority, {label}: {len(rows)} held-out contexts ==")
    print(f"{'policy':<34}" + "".join(f"{f'p = {p:g}':>21}" for p in PRIORITIES))
    sub = Table(table.names, table.quality[rows], table.nfe[rows])
    line = f"{'SBS expert / oracle gap (utility)':<34}"
    for p in PRIORITIES:
        u = sub.utility(p)
        line += f"{sub.names[int(u.mean(0).argmax())][:13]:>14} {u.max(1).mean() - u.mean(0).max():6.3f}"
    print(line)
    out = {}
    for name, choose in policies.items():
        cells, out[name] = [], {}
        for p in PRIORITIES:
            chosen = np.asarray(choose(p))[rows]
            out[name][p] = closed_gap(sub.utility(p), chosen, rng)
            cells.append(f"{gap_cell(sub.utility(p), chosen, rng):>21}")
        print(f"{name:<34}" + "".join(cells))
    return out


def _contexts_seen(policy: str) -> int:
    """Training contexts of this model behind a policy row (0 for the untrained router and the
    other yardstick's router)."""
    if policy.startswith(("sweep-trained", "guarded")):
        return int(policy.split(", ")[1].split()[0])
    return 0


def report_calls_saved(table: Table, policies: dict) -> None:
    """Model calls saved at equal mean quality against each fixed expert, for each policy (and the
    per-context oracle): the cheapest priority whose mean quality reaches the expert's."""
    curves = {name: operating_curve(table, choose) for name, choose in policies.items()}
    curves["oracle"] = operating_curve(table, lambda p: table.utility(p).argmax(1))
    print("model calls saved at equal mean quality against each fixed expert ('-': never reached):")
    print(f"  {'expert':<20} {'quality':>7} {'NFE':>6} " + " ".join(f"{n[:16]:>16}" for n in curves))
    for k, name in enumerate(table.names):
        q, nfe = table.quality[:, k].mean(), table.nfe[:, k].mean()
        cells = []
        for curve in curves.values():
            v = saving(curve, q, nfe)
            cells.append(f"{'-' if math.isnan(v) else f'{v:+.0%}':>16}")
        print(f"  {name:<20} {q:7.3f} {nfe:6.1f} " + " ".join(cells))


def side_by_side(sweeps: dict[str, Sweeps], seed: int, curve: tuple[int, ...]) -> dict:
    """Items 5 and 6 of issue 8 on each yardstick's default pool: oracle gap and noise-blind
    ceiling; closed gap at every priority of the untrained router, routers trained by full sweep
    on 10/30/100 and all training contexts of that yardstick, the router trained on the other
    yardstick, and the guarded policy of ``router.online`` updated from the same sweep rows; by
    text-to-image / img2img; model calls saved at equal mean quality."""
    pool = default_pool()
    names = [e.name for e in pool]
    full = {}
    for y, sw in sweeps.items():
        full[y] = train_router(sw.train_env, sw.train.columns(names), pool, seed, len(sw.train.quality))
    results = {}
    for y, sw in sweeps.items():
        table, ceiling = sw.heldout.columns(names), sw.ceiling.columns(names)
        tr, n_train = sw.train.columns(names), len(sw.train.quality)
        start = time.perf_counter()
        print(f"\n\n######## {y} yardstick, default pool ({n_train} training, {len(table.quality)} held-out contexts)")
        report_oracle(f"{y}, default pool", table, ceiling, sw.n_seeds)
        policies = {"untrained (Router.default())": router_policy(Router.default(), sw.heldout_env, pool)}
        updates = {}
        for n in curve:
            if n < n_train:
                policies[f"sweep-trained, {n} contexts"] = router_policy(train_router(sw.train_env, tr, pool, seed, n),
                                                                        sw.heldout_env, pool)
        policies[f"sweep-trained, {n_train} contexts"] = router_policy(full[y], sw.heldout_env, pool)
        for other, router in full.items():
            if other != y:
                policies[f"trained on {other} ({len(sweeps[other].train.quality)})"] = router_policy(
                    router, sw.heldout_env, pool)
        policies["guarded, 0 contexts (no data)"] = no_data_policy(pool, sw.heldout_env)
        for n in sorted({*(c for c in curve if c < n_train), n_train}):
            choose, updates[n] = guarded_policy(sw.train_env, tr, n, pool, seed, y, sw.heldout_env)
            policies[f"guarded, {n} contexts"] = choose
        cache = {name: {p: np.asarray(choose(p)) for p in PRIORITIES} for name, choose in policies.items()}
        fixed = {name: c.__getitem__ for name, c in cache.items()}
        results[y] = {"all": report_policies(f"{y}, all", table, sw.heldout_env, fixed, seed)}
        for group, keep in GROUPS.items():
            rows = [i for i, c in enumerate(sw.heldout_env.contexts) if keep(c)]
            if len(rows) >= 5:
                results[y][group] = report_policies(f"{y}, {group}", table, sw.heldout_env, fixed, seed, rows)
        for n, result in updates.items():
            print(f"guarded, {n} contexts: update {result.summary()}")
        below = [f"{name} / {part} / p = {p:g}: {hi:+.4f}" for part, table_ in results[y].items()
                 for name, cells in table_.items() for p, (_, _, hi) in cells.items()
                 if hi < 0 and _contexts_seen(name) >= 30]
        print(f"upper bounds below 0 with >= 30 contexts seen ({y}): " + ("; ".join(below) if below else "none"))
        report_calls_saved(table, {k: v for k, v in policies.items() if not k.startswith("guarded")})
        print(f"({y} report {time.perf_counter() - start:.0f} s)")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a fast check")
    parser.add_argument("--workers", type=int, default=2, help="processes for the expert sweeps (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conditions", choices=sorted(CONDITIONS), default="varied",
                        help="analytic context distribution (router.environment.VARIED_CONDITIONS / STANDARD_CONDITIONS)")
    parser.add_argument("--yardsticks", default="analytic,learned",
                        help="comma-separated: analytic (the Gaussian-mixture model), learned (the shipped digits UNet)")
    parser.add_argument("--analytic-sizes", default=None, metavar="T,H,C,S",
                        help="analytic training, held-out, ceiling contexts and ceiling seeds (full: 300,120,30,2)")
    parser.add_argument("--learned-sizes", default=None, metavar="T,H,C,S",
                        help="the same for the learned model (full: 30,20,4,2)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="JSON-lines file of sweep rows: read, and new rows appended (a rerun reuses them)")
    parser.add_argument("--fit-prior", action="store_true",
                        help="refit the untrained router's prior numbers (router.model.PRIOR_INIT) on the training "
                             "contexts: minimax-regret fixed pick per priority, then least squares")
    parser.add_argument("--no-analytic-curves", action="store_true",
                        help="skip the analytic model's learning curves, bandit training and bench-pool router report")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    yardsticks = [y.strip() for y in args.yardsticks.split(",") if y.strip()]
    for y in yardsticks:
        if y not in SIZES:
            parser.error(f"--yardsticks: unknown yardstick {y!r} (analytic, learned)")
    start = time.perf_counter()
    sweeps = {}
    for y in yardsticks:
        sizes = SIZES[y]["quick" if args.quick else "full"]
        override = args.analytic_sizes if y == "analytic" else args.learned_sizes
        if override:
            try:
                sizes = tuple(int(v) for v in override.split(","))
                assert len(sizes) == 4 and sizes[0] >= 1 and sizes[1] >= 2 and sizes[2] >= 1 and sizes[3] >= 1
            except (ValueError, AssertionError):
                parser.error(f"--{y}-sizes: four integers T,H,C,S (T >= 1, H >= 2, C, S >= 1), got {override!r}")
        sweeps[y] = sweep_yardstick(y, sizes, args.seed, args.conditions, args.workers, args.cache)
    print(f"analytic conditions: {args.conditions} {CONDITIONS[args.conditions]}")
    if "learned" in sweeps:
        print(f"learned conditions: classes 0-9, 30% img2img (denoise 0.15-0.9), training cfgs "
              f"{LEARNED_SPLITS['train']['cfgs']} and digits 0-13 of each class, held-out cfgs "
              f"{LEARNED_SPLITS['heldout']['cfgs']} and digits 14-19; Dormand-Prince rtol {LEARNED_RTOL:g} reference")
    print(f"sweeps done at {time.perf_counter() - start:.0f} s")
    report_prior(sweeps, args.fit_prior)
    side_by_side(sweeps, args.seed, CURVE)
    if "analytic" in sweeps and not args.no_analytic_curves:
        sw = sweeps["analytic"]
        n_train = len(sw.train.quality)
        sizes = tuple(n for n in ((0, 30, 100) if args.quick else (0, 30, 100, 300)) if n < n_train) + (n_train,)
        bandits = (0, 300, 1000) if args.quick else (0, 300, 1000, 3000)
        pools = {"default pool": default_pool(), "bench pool (default + 5 'bench:' variants)": bench_pool()}
        for label, pool in pools.items():
            names = [e.name for e in pool]
            report_oracle(f"analytic, {label}", sw.heldout.columns(names), sw.ceiling.columns(names), sw.n_seeds)
        for label, pool in pools.items():
            names = [e.name for e in pool]
            tr, ho = sw.train.columns(names), sw.heldout.columns(names)
            router = train_sweep(sw.train_env, tr, pool, args.seed, sizes, sw.heldout_env, ho, f"analytic, {label}")
            train_bandit(sw.train_env, tr, pool, args.seed, bandits, sw.heldout_env, ho, f"analytic, {label}")
            report_router(f"analytic, {label}, router trained by full sweep on {n_train} contexts "
                          f"({SWEEP_EPOCHS * n_train} episodes)", ho, predictions(router, sw.heldout_env, pool),
                          sw.heldout_env, sw.ceiling.columns(names), sw.n_seeds, args.seed)
        state = sw.heldout_env.state(sw.heldout_env.contexts[0], MIDDLE)
        times = sorted(router.select(state, pool, priority=MIDDLE).decision_seconds for _ in range(201))
        print(f"\ndecision time, {len(pool)} experts, 1 CPU thread: median {1e3 * times[100]:.3f} ms, "
              f"95th percentile {1e3 * times[190]:.3f} ms")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
