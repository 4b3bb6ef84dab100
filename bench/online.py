"""Learning from use: does the router improve from ordinary generations alone?

A stream of generations on a yardstick (fresh contexts, random priorities), starting from the
untrained router in its learning phase. Each generation runs only the expert the guarded policy
picks (:mod:`moe_sampler.router.online`, 5% exploration). Its feedback is the calibrated fidelity
estimate or, for an audited run, the quality measured against the audit's reference: each
update rescores the estimate rows with a calibration fitted, as in ComfyUI, on the audits' pairs
plus those of a small sweep of the same model (``--calibration-contexts``, half img2img; in
ComfyUI the trainer's sweep rows; 0: audits only, the out-of-the-box case, where uncalibrated
estimates cannot move the guard's choices, ``router.online.RAW_BIAS``). Audits are decided as the sampler decides them
(:class:`moe_sampler.experts.reference.AuditBudget`: a coin with probability ``audit_rate``,
skipped while the model's audits would exceed ``--audit-share`` of its model calls) and run the
sampler's own audit reference (:func:`moe_sampler.experts.reference.reference_expert`, the
Dormand-Prince sampler loop capped at 400 calls) from the run's start: its **real model calls**
are counted. Every ``every`` generations the router is updated from the logged rows and the
candidate adopted only if not worse on held-out rows.

At each checkpoint (50, 100, 200, 500, 1000 generations) the greedy guarded policy is scored on
held-out contexts: the closed gap ``(policy - SBS) / (VBS - SBS)`` with a bootstrap 95% interval
over contexts (``bench.routing.closed_gap``), per priority. The same curve for full-sweep
training (``MoERLTrainer`` mode ``sweep``, every expert plus a reference per context) at **equal
model calls**: the stream's expert calls plus its audits' calls, a sweep context costing the
pool's mean calls there plus the audit reference's mean calls measured on the calibration
contexts (what the ComfyUI trainer's reference costs).

Yardsticks: ``analytic`` (fresh analytic contexts; the truth is the environment's Dormand-Prince
reference) and ``learned`` (the shipped digits model; stream, sweep and held-out contexts are
``bench.routing``'s learned training and held-out lists, whose per-expert truth is read from a
``--cache`` of sweeps, e.g. /work/notes/bench_routing_cache_all.jsonl, or computed: a reference
there costs ~1,300 UNet calls). On the learned yardstick the stream draws from a fixed list of
``--stream-contexts`` contexts (repeats keep their seed), so a context can come back.

    OMP_NUM_THREADS=1 python -m bench.online              # 3 seeds, 500 generations
    OMP_NUM_THREADS=1 python -m bench.online --quick      # 1 seed, 200 generations
    OMP_NUM_THREADS=1 python -m bench.online --yardstick learned --seeds 1 --heldout 40 \
        --calibration-contexts 20 --cache bench_routing_cache_all.jsonl
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .routing import PRIORITIES, closed_gap

logger = logging.getLogger(__name__)

CHECKPOINTS = (50, 100, 200, 500, 1000)
REFERENCE_STEPS = 100  # the ComfyUI trainer's and audits' reference_steps: at most 4 x this many calls


def _imports():
    from moe_sampler.experts import default_pool
    from moe_sampler.experts.analytic import quality_from_error
    from moe_sampler.router import calibration, online
    from moe_sampler.router.model import Router
    from moe_sampler.router.policy import cost_from_nfe, lambda_from_priority
    from moe_sampler.router.trainer import MoERLTrainer

    return default_pool, quality_from_error, calibration, online, Router, cost_from_nfe, lambda_from_priority, MoERLTrainer


def audit_reference():
    """The sampler's audit reference (nodes.comfy_environment.reference_expert without ComfyUI)."""
    from moe_sampler.experts.reference import CALLS_PER_STEP, reference_expert

    return reference_expert(CALLS_PER_STEP * REFERENCE_STEPS, steps=REFERENCE_STEPS)


def run_expert(env, context, expert, truth: bool = True):
    """(output or None, nfe, calibration inputs, true relative error or None) of one expert on one
    context; ``truth`` False skips the environment's reference (the error is then None)."""
    from moe_sampler.router.calibration import calibration_inputs

    sigmas = env.expert_sigmas(context, expert)
    if truth:
        x, reference = env.start(context, float(sigmas[0]))
    else:
        x, reference = env.initial_latent(context, float(sigmas[0])), None
    out, run = expert.run(env.model_for(context), x.clone(), sigmas, extra_args=env.extra_args(context))
    if not run.finite:
        return None, run.nfe, None, math.inf
    error = None if reference is None else float(env.relative_error(context, out, reference).mean())
    report = {"error_estimate": run.error_estimate, "estimate_features": run.estimate_features, "nfe": run.nfe}
    return out, run.nfe, calibration_inputs(report, cfg=getattr(context, "cfg", None)), error


def run_audit(env, context, output, reference_expert, expert=None) -> tuple[float, int]:
    """(relative error of ``output`` against the audit reference, the reference's model calls):
    the sampler's audit, from the same noise and, given the audited ``expert``, the same start
    (:func:`moe_sampler.experts.reference.audit_sigmas`)."""
    from moe_sampler.experts.reference import audit_sigmas

    schedule = env.schedule_for(context)
    if expert is None:
        sigmas = reference_expert.sigmas(schedule, context.denoise)
    else:
        sigmas = audit_sigmas(reference_expert, env.expert_sigmas(context, expert), schedule, context.denoise)
    x = env.initial_latent(context, float(sigmas[0]))
    ref, run = reference_expert.run(env.model_for(context), x, sigmas, extra_args=env.extra_args(context))
    if output is None:
        return math.inf, run.nfe
    return float(env.relative_error(context, output, ref).mean()), run.nfe


def heldout_table(env, pool):
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


def stratified(contexts: list, n: int) -> list:
    """``n`` of ``contexts``, half text-to-image and half img2img (in their order; fewer of a kind
    when it runs out): a calibration drawn at the stream's 30% img2img with a dozen contexts has
    one or two img2img runs per expert, and its feedback on img2img runs was biased by up to 0.15
    (docs/ROUTER.md)."""
    t2i = [c for c in contexts if c.denoise >= 1.0]
    i2i = [c for c in contexts if c.denoise < 1.0]
    half = min(n // 2, len(i2i))
    return t2i[:n - half] + i2i[:half]


class Yardstick:
    """Stream, held-out, calibration and sweep sides of one yardstick.

    ``draw(rng)`` gives a stream context and, on the learned yardstick, its row in the stream
    table (the truth is read there instead of solving the reference again); ``sweep_router(n,
    seed)`` trains a router by full sweeps on ``n`` contexts."""

    def __init__(self, name: str, seed: int, n_heldout: int, calibration_contexts: int, stream_contexts: int,
                 cache: Path | None) -> None:
        from moe_sampler.experts import default_pool
        from moe_sampler.router.environment import AnalyticEnvironment

        self.name, self.seed, self.pool = name, seed, default_pool()
        if name == "analytic":
            self.stream = AnalyticEnvironment("train", seed=seed, n_models=200)
            self.held = AnalyticEnvironment("heldout", seed=seed, n_models=40, pool_size=n_heldout)
            self.calib = AnalyticEnvironment("train", seed=seed + 1000, n_models=30,
                                             pool_size=4 * max(calibration_contexts, 1))
            self.cost_contexts = stratified(self.calib.contexts, 4)
            self.calib.contexts = stratified(self.calib.contexts, calibration_contexts)
            self.q_held, self.n_held = heldout_table(self.held, self.pool)
            self.table = None
            return
        from . import routing

        names = tuple(e.name for e in self.pool)
        assert tuple(e.name for e in routing.yardstick_pool("learned")) == names
        self.stream = routing.learned_env("train", seed, stream_contexts)
        self.table = routing.sweep("train", seed, stream_contexts, "varied", [(i, 0) for i in range(stream_contexts)],
                                   1, "learned", cache)
        self.held = routing.learned_env("heldout", seed, n_heldout)
        held = routing.sweep("heldout", seed, n_heldout, "varied", [(i, 0) for i in range(n_heldout)], 1, "learned",
                             cache)
        self.q_held, self.n_held = held.quality, held.nfe.astype(float)
        # Calibration contexts: another draw of the training split's conditions (their own seeds).
        self.calib = routing.learned_env("train", seed + 1000, 4 * max(calibration_contexts, 1))
        self.cost_contexts = stratified(self.calib.contexts, 4)
        self.calib.contexts = self.calib.source.contexts = stratified(self.calib.contexts, calibration_contexts)

    def draw(self, rng: random.Random):
        if self.table is None:
            return self.stream.sample_context(rng), None
        row = rng.randrange(len(self.stream.contexts))
        return self.stream.contexts[row], row

    def truth(self, row, k: int, error: float | None, quality_from_error) -> float:
        if row is None:
            return float(quality_from_error(error)) if error is not None and math.isfinite(error) else 0.0
        return float(self.table.quality[row, k])

    def sweep_router(self, n: int, seed: int):
        from moe_sampler.router.model import Router
        from moe_sampler.router.trainer import MoERLTrainer

        if self.table is None:
            from moe_sampler.router.environment import AnalyticEnvironment

            env = AnalyticEnvironment("train", seed=self.seed + 2000, n_models=200, pool_size=n)
        else:
            from .routing import TableEnvironment

            if n > len(self.table.quality):
                logger.warning("sweep wants %d contexts, the stream table has %d", n, len(self.table.quality))
            env = TableEnvironment(self.stream, self.table, rows=min(n, len(self.table.quality)))
        trainer = MoERLTrainer(env, Router.default(), self.pool, mode="sweep", seed=seed)
        trainer.train(2 * n)
        return trainer.router


def simulate(seed: int, generations: int, audit_rate: float, every: int, epsilon: float, n_heldout: int,
             calibration_contexts: int, yardstick: str = "analytic", audit_share: float | None = 0.04,
             stream_contexts: int = 100, cache: Path | None = None) -> dict:
    (default_pool, quality_from_error, calibration, online, Router, cost_from_nfe, lambda_from_priority,
     MoERLTrainer) = _imports()
    from moe_sampler.experts.reference import AuditBudget

    torch.manual_seed(seed)
    rng = random.Random(seed)
    start = time.perf_counter()
    side = Yardstick(yardstick, seed, n_heldout, calibration_contexts, stream_contexts, cache)
    pool, held, q_held, n_held = side.pool, side.held, side.q_held, side.n_held
    reference = audit_reference()
    # the calibration sweep's pairs; the audit reference's cost measured there (on 4 contexts without one)
    pairs, reference_calls = [], []
    for context in side.calib.contexts:
        for expert in pool:
            _, _, inputs, error = run_expert(side.calib, context, expert)
            if inputs is not None and math.isfinite(error):
                pairs.append((expert.name, inputs, error))
        reference_calls.append(run_audit(side.calib, context, None, reference)[1])
    for context in side.cost_contexts if not side.calib.contexts else ():
        reference_calls.append(run_audit(side.calib, context, None, reference)[1])
    base_pairs = list(pairs)  # a sweep of this model outside the store (the trainer's rows, in ComfyUI)
    calib = calibration.Calibration.fit(pairs)
    sweep_reference_calls = float(np.mean(reference_calls))
    print(f"seed {seed} {yardstick}: held-out {len(held.contexts)} contexts, calibration {len(side.calib.contexts)} "
          f"contexts, audit reference {sweep_reference_calls:.0f} calls on average (max {max(reference_calls)}) "
          f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    router = Router.default()
    policy = online.GuardedPolicy(router, online.Evidence(), epsilon=epsilon)
    budget = AuditBudget(audit_share, first_cost=reference.options["max_calls"])  # as the sampler's
    rows, results = [], {}
    audits = skipped = adopted = updates = 0
    estimate_errors, audit_errors = [], []
    gen_rng = np.random.default_rng(seed)
    for t in range(1, generations + 1):
        context, row = side.draw(rng)
        priority = rng.random()
        state = side.stream.state(context, priority)
        choice = policy.select(state, pool, priority, seed=rng.randrange(1 << 31))
        k = choice.selection.index
        expert = pool[k]
        draw = budget.draw(yardstick, audit_rate, rng)  # before the run: history only
        out, nfe, inputs, error = run_expert(side.stream, context, expert, truth=row is None)
        quality = side.truth(row, k, error, quality_from_error)
        audit_calls = true_error = None
        skipped += draw.skipped
        if draw.audit:
            audits += 1
            audit_error, audit_calls = run_audit(side.stream, context, out, reference, expert)
            feedback, source = float(quality_from_error(audit_error)) if math.isfinite(audit_error) else 0.0, "audit"
            audit_errors.append(abs(feedback - quality))
            if inputs is not None and math.isfinite(audit_error):
                true_error = float(audit_error)  # a pair for the update's calibration, as the sampler's row
                pairs.append((expert.name, inputs, audit_error))
                calib = calibration.Calibration.fit(pairs)  # for the estimate MAE reported here
        elif inputs is None:
            feedback, source = (0.0 if out is None else None), "estimate"
        else:
            try:  # what the row's quality is once the update rescores it (raw without a calibration)
                feedback, source = calib.predict_quality(expert.name, inputs)[0], "estimate"
            except KeyError:
                feedback, source = float(quality_from_error(inputs["estimate"])), "estimate"
            estimate_errors.append(abs(feedback - quality))
        budget.note(yardstick, nfe, audit_calls)
        if feedback is not None:
            rows.append(online.LoggedRow(tuple(state.tolist()), expert.name, float(feedback),
                                         float(cost_from_nfe(nfe)), choice.selection.propensity, priority, source,
                                         f"{seed}|{t}", inputs, true_error))
        if t % every == 0:
            # the update rescores the estimate rows with these pairs and the audits' (as in ComfyUI)
            result = online.update(router, rows, pool, model=yardstick, seed=t, calibration_pairs=base_pairs)
            updates += 1
            if result.adopted:
                adopted += 1
                router = result.candidate
                policy = online.GuardedPolicy.for_router(router, epsilon=epsilon)
        if t in CHECKPOINTS and t <= generations:
            greedy = online.GuardedPolicy.for_router(router, epsilon=0.0)
            expert_calls, audit_total, _ = budget.calls(yardstick)
            total = expert_calls + audit_total
            per_context = float(n_held.sum(1).mean()) + sweep_reference_calls
            sweep_contexts = max(1, int(total // per_context))
            sweep_router = side.sweep_router(sweep_contexts, seed)
            results[t] = {
                "online": score(guarded_picks(greedy, held, pool), q_held, n_held, lambda_from_priority, gen_rng),
                "sweep": score(router_picks(sweep_router, held, pool, lambda_from_priority), q_held, n_held,
                               lambda_from_priority, gen_rng),
                "phase": greedy.phase, "audit_share": audit_total / total, "calls": total,
                "audit_calls": audit_total, "sweep_contexts": sweep_contexts, "audits": audits, "skipped": skipped,
                "adopted": adopted, "updates": updates, "reference_calls": sweep_reference_calls,
                "estimate_mae": float(np.mean(estimate_errors)) if estimate_errors else math.nan,
                "audit_mae": float(np.mean(audit_errors)) if audit_errors else math.nan,
                "seconds": time.perf_counter() - start,
            }
            print(f"seed {seed} gen {t}: phase {greedy.phase}, {adopted}/{updates} updates adopted, {audits} audits "
                  f"({skipped} skipped by the budget; {results[t]['audit_share']:.1%} of {total} calls), sweep "
                  f"{sweep_contexts} contexts; p=0.5 online {results[t]['online'][0.5][0]:+.2f} sweep "
                  f"{results[t]['sweep'][0.5][0]:+.2f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr,
                  flush=True)
            for kind in ("online", "sweep"):  # the checkpoint's full row, kept should the run be cut short
                print(f"seed {seed} gen {t} {kind:>6}: " + "  ".join(
                    f"p={p:.2f} {v[0]:+.2f}[{v[1]:+.2f},{v[2]:+.2f}]" for p, v in results[t][kind].items()),
                      file=sys.stderr, flush=True)
    return results


def _share(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "0") else float(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--yardstick", choices=("analytic", "learned"), default="analytic")
    parser.add_argument("--generations", type=int, default=500)
    parser.add_argument("--audit-rate", type=float, default=0.02)
    parser.add_argument("--audit-share", type=_share, default=0.04,
                        help="the audit budget (share of model calls; 'none': no budget), as the sampler's")
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--heldout", type=int, default=60)
    parser.add_argument("--calibration-contexts", type=int, default=60)
    parser.add_argument("--stream-contexts", type=int, default=100, help="learned yardstick: the stream's context list")
    parser.add_argument("--cache", type=Path, default=None, help="learned yardstick: bench.routing's sweep cache")
    parser.add_argument("--quick", action="store_true", help="1 seed, 200 generations, 40 held-out contexts")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.generations, args.heldout = 1, 200, 40
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("moe_sampler.experts.reference").setLevel(logging.ERROR)  # capped references: counted below
    try:
        commit = subprocess.run(["git", "log", "-1", "--format=%h"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent.parent).stdout.strip()
    except OSError:
        commit = "?"
    started = time.perf_counter()
    runs = [simulate(s, args.generations, args.audit_rate, args.every, args.epsilon, args.heldout,
                     args.calibration_contexts, args.yardstick, args.audit_share, args.stream_contexts, args.cache)
            for s in range(args.first_seed, args.first_seed + args.seeds)]
    print(f"\n== Learning from use on the {args.yardstick} model: {args.seeds} seed(s), audit rate {args.audit_rate}, "
          f"audit budget {args.audit_share}, update every {args.every}, epsilon {args.epsilon}, "
          f"{args.heldout} held-out contexts; "
          f"commit {commit}; {time.perf_counter() - started:.0f} s ==")
    print("closed gap on held-out contexts, point [95% bootstrap CI] per seed; 'sweep' = full-sweep training at "
          "equal model calls (audits counted at their real calls)")
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
                         f"{r[t]['audits']} ({r[t]['skipped']} skipped) = {r[t]['audit_calls']} calls = "
                         f"{r[t]['audit_share']:.1%} of {r[t]['calls']} calls, sweep contexts "
                         f"{r[t]['sweep_contexts']} (reference {r[t]['reference_calls']:.0f} calls), estimate MAE "
                         f"{r[t]['estimate_mae']:.3f}, audit MAE {r[t]['audit_mae']:.3f}" for r in runs)
        print(f"{'':>5} {'':>8}  {info}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
