"""How exact is an audit? The audit reference against the yardstick's own reference.

An audit grades a run against the sampler's audit reference (Dormand-Prince, at most 400 model
calls, ``experts.reference.reference_expert``); the yardstick's truth is a tighter Dormand-Prince
solve. For each context and default-pool expert this runs the expert, then the audit reference at
several tolerances from the run's start (``audit_sigmas``), and prints per tolerance: its mean
model calls, the audit quality's error against the true quality (mean and largest), and how often
the reference's own error is at most a tenth of the run's.

    OMP_NUM_THREADS=1 python -m bench.audit_reference --yardstick learned --contexts 6   # ~6 min
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

RTOLS = (1e-5, 1e-4, 1e-3, 3e-3, 1e-2)


def main(argv: list[str] | None = None) -> int:
    from moe_sampler.experts import default_pool
    from moe_sampler.experts.analytic import quality_from_error
    from moe_sampler.experts.reference import audit_sigmas, reference_expert
    from moe_sampler.router.environment import AnalyticEnvironment

    from . import routing
    from .online import run_expert

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--yardstick", choices=("analytic", "learned"), default="learned")
    parser.add_argument("--contexts", type=int, default=6)
    parser.add_argument("--max-calls", type=int, default=400, help="the audit reference's cap (the sampler's: 400)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.ERROR)
    if args.yardstick == "learned":
        env = routing.learned_env("train", 7, args.contexts)
    else:
        env = AnalyticEnvironment("train", seed=7, n_models=30, pool_size=args.contexts)
    start = time.perf_counter()
    rows: dict[tuple[str, float], list[tuple[int, float, float]]] = {}
    for context in env.contexts:
        for expert in default_pool():
            out, _, _, error = run_expert(env, context, expert)
            if out is None:
                continue
            sigmas = env.expert_sigmas(context, expert)
            _, truth = env.start(context, float(sigmas[0]))
            for rtol in RTOLS:
                reference = reference_expert(args.max_calls, rtol=rtol)
                audit = audit_sigmas(reference, sigmas, env.schedule_for(context), context.denoise)
                x = env.initial_latent(context, float(audit[0]))
                solved, run = reference.run(env.model_for(context), x, audit, extra_args=env.extra_args(context))
                audited = float(env.relative_error(context, out, solved).mean())
                own = float(env.relative_error(context, solved, truth).mean())
                dq = float(quality_from_error(audited)) - float(quality_from_error(error))
                rows.setdefault((expert.name, rtol), []).append((run.nfe, dq, own / error))
    print(f"$ python -m bench.audit_reference --yardstick {args.yardstick} --contexts {args.contexts} "
          f"--max-calls {args.max_calls}   ({time.perf_counter() - start:.0f} s)")
    print("| expert | rtol | mean calls | mean abs quality error | largest | share with reference error <= run's / 10 |")
    print("|---|---|---|---|---|---|")
    names = list(dict.fromkeys(name for name, _ in rows))
    for name in [*names, "all"]:
        for rtol in RTOLS:
            sel = [r for (n, t), v in rows.items() if t == rtol and name in (n, "all") for r in v]
            print(f"| {name} | {rtol:g} | {sum(r[0] for r in sel) / len(sel):.0f} | "
                  f"{sum(abs(r[1]) for r in sel) / len(sel):.3f} | {max(abs(r[1]) for r in sel):.3f} | "
                  f"{sum(r[2] <= 0.1 for r in sel) / len(sel):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
