"""Learning from use: does the router improve from ordinary generations alone?

A stream of generations on the analytic model (fresh contexts, random priorities), starting from
the untrained router in its learning phase. Each generation runs only the expert the guarded
policy picks (:mod:`moe_sampler.router.online`, 5% exploration). Its feedback is the calibrated
fidelity estimate (:mod:`moe_sampler.router.calibration`: a calibration fitted on 60 other
contexts, as the pack would ship it, refitted with every audit) or, with probability
``audit_rate``, the exact quality (an audit). Every ``every`` generations the router is updated
from the logged rows and the candidate adopted only if not worse on held-out rows.

At each checkpoint (50, 100, 200, 500 generations) the greedy guarded policy is scored on
held-out contexts of other analytic models: the closed gap ``(policy - SBS) / (VBS - SBS)``
with a bootstrap 95% interval over contexts (``bench.routing.closed_gap``), per priority. The
same curve for full-sweep training (``MoERLTrainer`` mode ``sweep``, every expert plus a
reference per context) at **equal model calls**: the stream's expert calls plus its audits. An
audit and a sweep's reference are counted at ``REFERENCE_CALLS`` = 100 model calls (what the
ComfyUI sampler's audit reference costs; the analytic simulation's own Dormand-Prince
reference is not counted).

    OMP_NUM_THREADS=1 python -m bench.online              # 3 seeds, 500 generations
    OMP_NUM_THREADS=1 python -m bench.online --quick      # 1 seed, 200 generations
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import time

import numpy as np
import torch

from .routing import PRIORITIES, closed_gap

logger = logging.getLogger(__name__)

REFERENCE_CALLS = 100
CHECKPOINTS = (50, 100, 200, 500, 1000)


def _imports():
    from moe_sampler.experts import default_pool
    from moe_sampler.experts.analytic import quality_from_error
    from moe_sampler.router import calibration, online
    from moe_sampler.router.environment import AnalyticEnvironment
    from moe_sampler.router.model import Router
    from moe_sampler.router.policy import cost_from_nfe, lambda_from_priority
    from moe_sampler.router.trainer import MoERLTrainer

    return (default_pool, quality_from_error, calibration, online, AnalyticEnvironment, Router, cost_from_nfe,
            lambda_from_priority, MoERLTrainer)


def run_expert(env, context, expert, quality_from_error):
    """(true quality, nfe, calibration inputs, true relative error) of one expert on one context."""
    from moe_sampler.router.calibration import calibration_inputs

    x, sigmas, reference = env.prepare(context, expert)
    out, run = expert.run(env.model_for(context), x.clone(), sigmas, extra_args=env.extra_args(context))
    if not run.finite:
        return 0.0, run.nfe, None, math.inf
    error = float(env.relative_error(context, out, reference).mean())
    report = {"error_estimate": run.error_estimate, "estimate_features": run.estimate_features, "nfe": run.nfe}
    return float(quality_from_error(error)), run.nfe, calibration_inputs(report, cfg=context.cfg), error


def heldout_table(env, pool, quality_from_error):
    """quality, nfe [n_contexts, n_experts] of every expert on every held-out context."""
    q = np.zeros((len(env.contexts), len(pool)))
    n = np.zeros_like(q)
    for i, context in enumerate(env.contexts):
        for k, outcome in enumerate(env.evaluate(context, pool)):
            q[i, k], n[i, k] = outcome.quality, outcome.nfe
    return q, n


def utilities(q, n, priority, lambda_from_priority):
    return q - lambda_from_priority(priority) * np.log2(np.maximum(n, 1)) / 10


def score(policy_picks, q, n, lambda_from_priority, rng):
    """{priority: (closed gap, low, high)} for picks {priority: [n_contexts]}."""
    return {p: closed_gap(utilities(q, n, p, lambda_from_priority), policy_picks[p], rng, n_boot=500)
            for p in PRIORITIES}


def guarded_picks(policy, env, pool):
    states = {p: torch.stack([env.state(c, p) for c in env.contexts]) for p in PRIORITIES}
    return {p: policy.greedy_batch(states[p], pool, [p] * len(env.contexts))[0].numpy() for p in PRIORITIES}


def router_picks(router, env, pool, lambda_from_priority):
    out = {}
    for p in PRIORITIES:
        picks = []
        for c in env.contexts:
            qq, cc = router.predict(env.state(c, p), pool)
            picks.append(int(torch.argmax(qq - lambda_from_priority(p) * cc)))
        out[p] = np.array(picks)
    return out


def environments(yardstick: str, seed: int, n_heldout: int, calibration_contexts: int, stream_contexts: int):
    """(stream, held-out, calibration, sweep factory) environments on one yardstick."""
    from moe_sampler.router.environment import AnalyticEnvironment

    if yardstick == "analytic":
        return (AnalyticEnvironment("train", seed=seed, n_models=200),
                AnalyticEnvironment("heldout", seed=seed, n_models=40, pool_size=n_heldout),
                AnalyticEnvironment("train", seed=seed + 1000, n_models=30, pool_size=calibration_contexts),
                lambda n: AnalyticEnvironment("train", seed=seed + 2000, n_models=200, pool_size=n))
    from .references import learned_environment  # the learned digits model: draws of class, cfg, seed, img2img

    def make(n, s):
        return learned_environment(1e-5, 20, n, s)[1]  # draws from its fixed list of n contexts

    return (make(stream_contexts, seed), make(n_heldout, seed + 500), make(calibration_contexts, seed + 1000),
            lambda n: make(n, seed + 2000))


def simulate(seed: int, generations: int, audit_rate: float, every: int, epsilon: float, n_heldout: int,
             calibration_contexts: int, yardstick: str = "analytic") -> dict:
    (default_pool, quality_from_error, calibration, online, AnalyticEnvironment, Router, cost_from_nfe,
     lambda_from_priority, MoERLTrainer) = _imports()
    torch.manual_seed(seed)
    pool = default_pool()
    rng = random.Random(seed)
    stream, held, calib_env, sweep_env_of = environments(yardstick, seed, n_heldout, calibration_contexts,
                                                         max(2 * generations, 200))
    start = time.perf_counter()
    q_held, n_held = heldout_table(held, pool, quality_from_error)
    # the shipped calibration: pairs from other contexts (another seed of the training split)
    pairs = []
    for context in calib_env.contexts:
        for expert in pool:
            _, _, inputs, error = run_expert(calib_env, context, expert, quality_from_error)
            if inputs is not None and math.isfinite(error):
                pairs.append((expert.name, inputs, error))
    calib = calibration.Calibration.fit(pairs)
    router = Router.default()
    policy = online.GuardedPolicy(router, online.Evidence(), epsilon=epsilon)
    rows, results = [], {}
    calls = {"experts": 0, "audits": 0}
    audits = adopted = updates = 0
    estimate_errors = []
    gen_rng = np.random.default_rng(seed)
    for t in range(1, generations + 1):
        context = stream.sample_context(rng)
        priority = rng.random()
        state = stream.state(context, priority)
        choice = policy.select(state, pool, priority, seed=rng.randrange(1 << 31))
        expert = pool[choice.selection.index]
        quality, nfe, inputs, error = run_expert(stream, context, expert, quality_from_error)
        calls["experts"] += nfe
        audited = rng.random() < audit_rate
        if audited:
            audits += 1
            calls["audits"] += REFERENCE_CALLS
            feedback, source = quality, "audit"
            if inputs is not None and math.isfinite(error):
                pairs.append((expert.name, inputs, error))
                calib = calibration.Calibration.fit(pairs)
        elif inputs is None or not math.isfinite(error):
            feedback, source = (0.0 if not math.isfinite(error) else None), "estimate"
        else:
            feedback, source = calib.predict_quality(expert.name, inputs)[0], "estimate"
            estimate_errors.append(abs(feedback - quality))
        if feedback is not None:
            rows.append(online.LoggedRow(tuple(state.tolist()), expert.name, float(feedback),
                                         float(cost_from_nfe(nfe)), choice.selection.propensity, priority, source,
                                         f"{seed}|{t}"))
        if t % every == 0:
            result = online.update(router, rows, pool, model="analytic", seed=t)
            updates += 1
            if result.adopted:
                adopted += 1
                router = result.candidate
                policy = online.GuardedPolicy.for_router(router, epsilon=epsilon)
        if t in CHECKPOINTS and t <= generations:
            greedy = online.GuardedPolicy.for_router(router, epsilon=0.0)
            total = calls["experts"] + calls["audits"]
            per_context = float(n_held.sum(1).mean()) + REFERENCE_CALLS
            sweep_contexts = max(1, int(total // per_context))
            sweep_env = sweep_env_of(sweep_contexts)
            trainer = MoERLTrainer(sweep_env, Router.default(), pool, mode="sweep", seed=seed)
            trainer.train(2 * sweep_contexts)
            results[t] = {
                "online": score(guarded_picks(greedy, held, pool), q_held, n_held, lambda_from_priority, gen_rng),
                "sweep": score(router_picks(trainer.router, held, pool, lambda_from_priority), q_held, n_held,
                               lambda_from_priority, gen_rng),
                "phase": greedy.phase, "audit_share": calls["audits"] / total, "calls": total,
                "sweep_contexts": sweep_contexts, "audits": audits, "adopted": adopted, "updates": updates,
                "estimate_mae": float(np.mean(estimate_errors)) if estimate_errors else math.nan,
            }
            print(f"seed {seed} gen {t}: phase {greedy.phase}, {adopted}/{updates} updates adopted, {audits} audits "
                  f"({results[t]['audit_share']:.1%} of {total} calls), sweep {sweep_contexts} contexts; "
                  f"p=0.5 online {results[t]['online'][0.5][0]:+.2f} sweep {results[t]['sweep'][0.5][0]:+.2f} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--yardstick", choices=("analytic", "learned"), default="analytic")
    parser.add_argument("--generations", type=int, default=500)
    parser.add_argument("--audit-rate", type=float, default=0.02)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--heldout", type=int, default=60)
    parser.add_argument("--calibration-contexts", type=int, default=60)
    parser.add_argument("--quick", action="store_true", help="1 seed, 200 generations, 40 held-out contexts")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.generations, args.heldout = 1, 200, 40
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    runs = [simulate(s, args.generations, args.audit_rate, args.every, args.epsilon, args.heldout,
                     args.calibration_contexts, args.yardstick)
            for s in range(args.first_seed, args.first_seed + args.seeds)]
    print(f"\n== Learning from use on the {args.yardstick} model: {args.seeds} seed(s), audit rate {args.audit_rate}, "
          f"update every {args.every}, epsilon {args.epsilon}, {args.heldout} held-out contexts ==")
    print("closed gap on held-out contexts, point [95% bootstrap CI] per seed; 'sweep' = full-sweep training at "
          "equal model calls")
    header = f"{'gens':>5} {'priority':>8}  {'online (guarded)':<44} {'full sweep':<44}"
    print(header)
    for t in CHECKPOINTS:
        if t > args.generations:
            continue
        for p in PRIORITIES:
            cells = []
            for kind in ("online", "sweep"):
                cells.append("  ".join(f"{r[t][kind][p][0]:+.2f}[{r[t][kind][p][1]:+.2f},{r[t][kind][p][2]:+.2f}]"
                                       for r in runs))
            print(f"{t:>5} {p:>8.2f}  {cells[0]:<44} {cells[1]:<44}")
        info = "; ".join(f"phase {r[t]['phase']}, adopted {r[t]['adopted']}/{r[t]['updates']}, audits "
                         f"{r[t]['audits']} = {r[t]['audit_share']:.1%} of {r[t]['calls']} calls, sweep contexts "
                         f"{r[t]['sweep_contexts']}, estimate MAE {r[t]['estimate_mae']:.3f}" for r in runs)
        print(f"{'':>5} {'':>8}  {info}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
