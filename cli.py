"""Command line: ``python -m moe_sampler demo`` and ``python -m moe_sampler experts``.

``demo`` trains a router on the built-in analytic model (exact reference solutions) for about
a minute, routes held-out prompts it has never seen, prints the routing table against the
best fixed expert, writes every run to the stats store and a PNG chart of per-expert stats,
and says where both went. No GPU, no download.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

BAR_WIDTH = 30


class ProgressBar:
    """A plain-text progress bar on stderr, redrawn in place; no dependency."""

    def __init__(self, label: str, total: float, unit: str = "") -> None:
        self.label, self.total, self.unit = label, total, unit
        self.start = time.perf_counter()

    def update(self, done: float, note: str = "") -> None:
        fraction = min(max(done / self.total, 0.0), 1.0) if self.total else 1.0
        filled = int(round(fraction * BAR_WIDTH))
        elapsed = time.perf_counter() - self.start
        line = f"{self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction:4.0%} {elapsed:5.1f}s {note}"
        sys.stderr.write("\r" + line.ljust(100))
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


class RecordingEnvironment:
    """Wraps an environment so that every expert run of training also lands in the stats store."""

    def __init__(self, env, store, router_name: str) -> None:
        self.env, self.store, self.router_name = env, store, router_name

    def sample_context(self, rng):
        return self.env.sample_context(rng)

    def state(self, context, priority):
        return self.env.state(context, priority)

    def evaluate(self, context, experts):
        from .stats.store import RunRecord

        outcomes = self.env.evaluate(context, experts)
        for o in outcomes:
            self.store.record_async(RunRecord(expert=o.expert, router=self.router_name, nfe=o.nfe, steps=o.nfe,
                                              seconds=o.seconds, success=o.success, source="training",
                                              quality=o.quality, seed=context.seed))
        return outcomes


def _paths(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    from .stats.store import default_store_path

    if args.home:
        home = Path(args.home).expanduser()
        store = Path(args.store).expanduser() if args.store else home / "stats.sqlite3"
    else:
        store = Path(args.store).expanduser() if args.store else default_store_path()
        home = store.parent
    return store, home / "demo_expert_stats.png", home / "routers" / "demo.safetensors"


def demo(args: argparse.Namespace) -> int:
    import torch

    from .experts import default_pool
    from .stats.charts import expert_stats_chart
    from .router.environment import AnalyticEnvironment
    from .router.model import Router
    from .router.policy import cost_from_nfe, lambda_from_priority
    from .stats.store import RunRecord, StatsStore
    from .router.trainer import MoERLTrainer

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    store_path, chart_path, router_path = _paths(args)
    pool, name = default_pool(), f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    store = StatsStore(store_path)
    router = Router(name=name)
    trainer = MoERLTrainer(RecordingEnvironment(AnalyticEnvironment("train", seed=args.seed), store, name),
                           router, pool, mode="sweep", seed=args.seed, updates_per_episode=16)
    limit = args.episodes if args.episodes else None
    bar = ProgressBar("training router", limit or args.seconds)
    start = time.perf_counter()
    while (limit and trainer.episode < limit) or (not limit and time.perf_counter() - start < args.seconds):
        trainer.train(trainer.episode + 1)
        done = trainer.episode if limit else time.perf_counter() - start
        bar.update(done, f"{trainer.episode} contexts x {len(pool)} experts")
    bar.close()
    router.save(router_path)

    heldout = AnalyticEnvironment("heldout", seed=args.seed, pool_size=args.contexts)
    lam = lambda_from_priority(args.priority)
    rows, bar = [], ProgressBar("routing held-out prompts", len(heldout.contexts))
    for i, ctx in enumerate(heldout.contexts):
        state = heldout.state(ctx, args.priority)
        sel = router.select(state, pool, priority=args.priority)
        outcomes = heldout.evaluate(ctx, pool)  # every expert, to compare with the best fixed one
        rows.append((ctx, sel, outcomes))
        o = outcomes[sel.index]
        store.record_async(RunRecord(expert=o.expert, router=name, nfe=o.nfe, steps=o.nfe, seconds=o.seconds,
                                     success=o.success, quality=o.quality, confidence=sel.confidence,
                                     propensity=sel.propensity, priority=args.priority, state=tuple(state.tolist()),
                                     seed=ctx.seed))
        bar.update(i + 1)
    bar.close()

    def utility(o) -> float:
        return o.quality - lam * cost_from_nfe(o.nfe)

    fixed = [sum(utility(r[2][k]) for r in rows) / len(rows) for k in range(len(pool))]
    best = max(range(len(pool)), key=fixed.__getitem__)
    print(f"\nRouter {name!r} trained on {trainer.episode} analytic contexts x {len(pool)} experts "
          f"in {time.perf_counter() - start:.0f} s; priority {args.priority} (lambda {lam:.2f}).")
    print(f"Best fixed expert on these prompts: {pool[best].name}.  quality = -log10(rel. error) / 3.\n")
    print(f"{'#':>2} {'latent':<9} {'cfg':>5} {'den':>4} {'chosen expert':<15} {'conf':>5} {'NFE':>4} {'quality':>7}"
          f" | {'best fixed':>10} {'NFE':>4} | {'oracle':<15}")
    for i, (ctx, sel, outcomes) in enumerate(rows):
        o, b = outcomes[sel.index], outcomes[best]
        oracle = max(outcomes, key=utility).expert
        shape = "x".join(map(str, heldout.models[ctx.model_index].shape))
        print(f"{i:2d} {shape:<9} {ctx.cfg:5.2f} {ctx.denoise:4.2f} {sel.expert:<15} {sel.confidence:5.2f} {o.nfe:4d} "
              f"{o.quality:7.3f} | {b.quality:10.3f} {b.nfe:4d} | {oracle:<15}")
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    chosen = [r[2][r[1].index] for r in rows]
    print(f"\n{'':<22}{'quality':>8} {'NFE':>6} {'utility':>8}")
    print(f"{'router':<22}{mean([o.quality for o in chosen]):8.3f} {mean([o.nfe for o in chosen]):6.1f} "
          f"{mean([utility(o) for o in chosen]):8.3f}")
    print(f"{'best fixed expert':<22}{mean([r[2][best].quality for r in rows]):8.3f} "
          f"{mean([r[2][best].nfe for r in rows]):6.1f} {fixed[best]:8.3f}")
    oracle = mean([max(map(utility, r[2])) for r in rows])
    print(f"{'per-prompt oracle':<22}{'':>15} {oracle:8.3f}")
    if oracle - fixed[best] > 1e-6:
        gap = (mean([utility(o) for o in chosen]) - fixed[best]) / (oracle - fixed[best])
        print(f"closed gap: the router got {gap:.0%} of the oracle's advantage over the best fixed expert")
    print(f"decision time: {1e3 * mean([r[1].decision_seconds for r in rows]):.2f} ms per generation")

    store.flush(timeout=30)
    stats = store.expert_stats(router=name, experts=[e.name for e in pool])
    chart_path.parent.mkdir(parents=True, exist_ok=True)
    expert_stats_chart(stats, title=f"MoE experts, demo router {name}").save(chart_path)
    store.close()
    print(f"\nstats store: {store_path}\nchart:       {chart_path}\nrouter:      {router_path}")
    return 0


def experts_table(args: argparse.Namespace) -> int:
    from .experts import registered_experts

    print(f"{'expert':<24} {'solver':<24} {'order':>5} {'steps':>5} {'max NFE':>7} {'schedule':<12} "
          f"{'stop rule':<14} pool")
    for e in registered_experts():
        d = e.descriptor
        print(f"{d.name:<24} {d.solver:<24} {d.order:5.1f} {d.steps:5d} {d.max_nfe:7d} {d.schedule:<12} "
              f"{d.stop_rule:<14} {'compat (off)' if e.compat else 'default'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_sampler", description="MoE Adaptive Sampler tools")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="train a router on the analytic model and route held-out prompts")
    p.add_argument("--seconds", type=float, default=60.0, help="training time budget (default 60)")
    p.add_argument("--episodes", type=int, default=0, help="train exactly this many contexts instead")
    p.add_argument("--contexts", type=int, default=12, help="held-out prompts to route (default 12)")
    p.add_argument("--priority", type=float, default=0.5, help="0 = speed ... 1 = quality (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--home", help="folder for the stats store, chart and router (default: next to the store)")
    p.add_argument("--store", help="stats store file (default: moe_sampler's user data folder)")
    p.set_defaults(run=demo)
    commands.add_parser("experts", help="print the registered experts").set_defaults(run=experts_table)
    args = parser.parse_args(argv)
    if getattr(args, "priority", 0.5) < 0 or getattr(args, "priority", 0.5) > 1:
        parser.error("--priority must be in [0, 1]")
    return args.run(args)
