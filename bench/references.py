"""How accurate and how expensive are the references that grade the experts?

    OMP_NUM_THREADS=1 python -m bench.references [--contexts 40] [--seed 0]
    OMP_NUM_THREADS=1 python -m bench.references --learned [--contexts 12]

On a fixed set of held-out analytic contexts (``VARIED_CONDITIONS``, a third of them img2img),
for several reference settings (Dormand-Prince tolerance ``rtol``; ``start_grid``: img2img
start sigmas snapped to a shared log grid with that many points per decade, so experts that
start at the same grid sigma share one reference):

- the share of all model calls spent on references (the rest are the experts' runs);
- how far the outcomes move against the first setting (mean and largest change of quality,
  and the share of contexts whose best expert at priority 0.5 changes);
- the reference's own error: against a Dormand-Prince solve at rtol 1e-10 from the same start,
  as a ratio to the best expert's error on that context (what "10x below the best expert"
  means), with the expert error also floored at 1e-3, where the quality score saturates.

The ComfyUI training node's references are measured the same way on the same text-to-image
contexts: the one before (DPM-Solver++(3M), Karras, 100 steps; an expert of the pool's family)
and the one now (``nodes.comfy_environment.reference_expert``: the Dormand-Prince sampler loop of
``experts/reference.py`` that the bridge runs, at most 400 model calls), fed float32 latents as
ComfyUI does. ``--node-reference`` measures only these; ``--discrete`` measures them on the
analytic model seen through SD1.5's 1,000 rounded levels, as ComfyUI's discrete-time models see
sigma.

``--learned``: the same on the shipped learned digits model (``experts/learned.py``) through the
generic ``DenoiserEnvironment`` and ``PromptContexts`` (classes 0-9, cfg 1 to 7.5, 30% img2img
from the shipped digits), with the tight solve at rtol 1e-7 (the UNet computes in float32) and
the model's own RK4 reference (100 steps) measured too.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("moe_sampler") is None:  # a plain clone, not pip-installed
    _spec = importlib.util.spec_from_file_location("moe_sampler", ROOT / "__init__.py",
                                                   submodule_search_locations=[str(ROOT)])
    sys.modules["moe_sampler"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["moe_sampler"])

from moe_sampler.experts import default_pool, get_expert  # noqa: E402
from moe_sampler.experts.analytic import REFERENCE_SIGMA_END  # noqa: E402
from moe_sampler.router.environment import VARIED_CONDITIONS, AnalyticEnvironment, DormandPrince  # noqa: E402
from moe_sampler.router.policy import lambda_from_priority  # noqa: E402

SETTINGS = (  # (rtol, start_grid): the first is the setting before this change
    (1e-6, None),
    (1e-6, 20),
    (1e-6, 10),
    (1e-5, None),
    (1e-5, 20),
    (1e-5, 10),
    (1e-4, 10),
)
_TIGHT: dict = {}  # (context, start sigma) -> the tight solution
TIGHT_RTOL = 1e-10


def comfy_reference_expert(steps: int = 100):
    """The ComfyUI training node's reference: QualityMaster's 3M on Karras with ``steps`` steps."""
    base = get_expert("QualityMaster")
    return dataclasses.replace(base, descriptor=dataclasses.replace(base.descriptor, name="Reference3M",
                                                                    steps=steps, max_nfe=0))


def run_setting(rtol: float, grid: int | None, n: int, seed: int, pool) -> tuple[AnalyticEnvironment, np.ndarray,
                                                                                    np.ndarray, np.ndarray, float]:
    env = AnalyticEnvironment("heldout", seed=seed, n_models=40, pool_size=n, conditions=VARIED_CONDITIONS,
                              rtol=rtol, start_grid=grid)
    start = time.perf_counter()
    rows = [env.evaluate(c, pool) for c in env.contexts]
    seconds = time.perf_counter() - start
    quality = np.array([[o.quality for o in r] for r in rows])
    error = np.array([[o.relative_error for o in r] for r in rows])
    nfe = np.array([[o.nfe for o in r] for r in rows])
    return env, quality, error, nfe, seconds


def reference_errors(env: AnalyticEnvironment, pool) -> list[float]:
    """Per context: the largest error of its references (over its start sigmas) against a tight
    solve from the same start."""
    tight = DormandPrince(TIGHT_RTOL, sigma_end=REFERENCE_SIGMA_END)
    errors = []
    for context in env.contexts:
        model, args, schedule = env.model_for(context), env.extra_args(context), env.schedule_for(context)
        worst = 0.0
        for sigma in sorted({float(env.expert_sigmas(context, e)[0]) for e in pool}):
            x, reference = env.start(context, sigma)
            key = (context, round(sigma, 6))
            if key not in _TIGHT:
                _TIGHT[key] = tight(model, x, sigma, args, schedule)
            exact = _TIGHT[key]
            worst = max(worst, float(env.relative_error(context, reference, exact).mean()))
        errors.append(worst)
    return errors


def comfy_reference_errors(env: AnalyticEnvironment, pool, reference_expert,
                           calls: list | None = None) -> tuple[list[float], list[float]]:
    """Text-to-image contexts (what the ComfyUI node trains on): the best expert's error and the
    node's reference's error, both against a tight solve to the schedule's last sigma, where
    every expert (and that reference) ends with its final denoising step."""
    tight = DormandPrince(TIGHT_RTOL)  # sigma_end None: the model's sigma_min
    best, ref = [], []
    for context in env.contexts:
        if context.denoise < 1:
            continue
        model, args, schedule = env.model_for(context), env.extra_args(context), env.schedule_for(context)
        sigma = float(reference_expert.sigmas(schedule)[0])
        x = env.initial_latent(context, sigma)
        exact = tight(model, x, sigma, args, schedule)
        errors = []
        for expert in (*pool, reference_expert):
            sigmas = expert.sigmas(schedule)
            assert float(sigmas[0]) == sigma  # text-to-image: every expert starts at sigma_max
            out, run = expert.run(model, x.clone(), sigmas, extra_args=args)
            errors.append(float(env.relative_error(context, out, exact).mean()))
        if calls is not None:
            calls.append(run.nfe)
        best.append(min(errors[:-1]))
        ref.append(errors[-1])
    return best, ref


def ratio_summary(best: np.ndarray, ref: np.ndarray) -> str:
    ratio = best / np.maximum(ref, 1e-300)
    floored = np.maximum(best, 1e-3) / np.maximum(ref, 1e-300)
    return (f"best expert / reference error: median {np.median(ratio):.3g}, min {ratio.min():.3g}, "
            f">= 10x on {np.mean(ratio >= 10):.0%} of contexts; with the expert error floored at 1e-3: "
            f"min {floored.min():.3g}, >= 10x on {np.mean(floored >= 10):.0%}")


def learned_environment(rtol: float, grid: int | None, n: int, seed: int):
    """A DenoiserEnvironment on the learned digits model with a fixed list of ``n`` contexts."""
    import random

    from moe_sampler.experts.learned import NULL_CLASS, load_learned_model
    from moe_sampler.router.environment import DenoiserEnvironment, PromptContexts

    model = load_learned_model()
    images = torch.cat([model.data_images(k) for k in range(model.num_classes)])
    source = PromptContexts(list(range(model.num_classes)), None, model.latent_shape,
                            cfgs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.5), img2img_fraction=0.3, denoise_range=(0.15, 0.9),
                            images=images, images_per_prompt=True,
                            state_conditioning=[model.class_embeddings[k:k + 1] for k in range(model.num_classes)],
                            state_negative=model.class_embeddings[NULL_CLASS:], relative_error=model.relative_error)
    rng = random.Random(1_000_003 * seed + 17)
    source.contexts = [source.draw(rng) for _ in range(n)]
    env = DenoiserEnvironment(model, source, DormandPrince(rtol), start_grid=grid)
    env.contexts = source.contexts
    return model, env


LEARNED_PROBES = ((7, 5.0, 12), (3, 1.0, 11))  # (class, cfg, seed) of the text-to-image accuracy probes


def main_learned(n: int, seed: int) -> None:
    from moe_sampler.experts.base import CountingDenoiser
    from moe_sampler.router.environment import RungeKutta4

    pool = default_pool()
    print(f"{n} contexts on the learned digits model (seed {seed}), pool: {', '.join(e.name for e in pool)}")
    base = None
    for rtol, grid in ((1e-5, None), (1e-5, 20)):
        model, env = learned_environment(rtol, grid, n, seed)
        start = time.perf_counter()
        quality = np.array([[o.quality for o in env.evaluate(c, pool)] for c in env.contexts])
        base = quality if base is None else base
        img2img = [c for c in env.contexts if c.denoise < 1]
        refs_per = (sum(1 for key in env._references if key[0].denoise < 1) / len(img2img)) if img2img else math.nan
        print(f"rtol {rtol:g} grid {grid}: reference calls {env.calls['reference']}, expert calls "
              f"{env.calls['experts']}, reference share {env.reference_share:.1%}, references per img2img context "
              f"{refs_per:.2f} ({len(img2img)} img2img contexts), mean / max |dq| vs the first "
              f"{np.abs(quality - base).mean():.4f} / {np.abs(quality - base).max():.4f}, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    # Accuracy: text-to-image probes against Dormand-Prince at rtol 1e-8 (atol 1e-9).
    schedule = model.schedule()
    tight = DormandPrince(1e-8, atol=1e-9)
    print("\nReference accuracy on the learned model (text-to-image; errors in units of the data rms):")
    for cond, cfg, noise_seed in LEARNED_PROBES:
        x = model.initial_noise(1, noise_seed, schedule.sigma_max)
        args = {"cond": cond, "cfg": cfg}
        exact = tight(model, x, schedule.sigma_max, args, schedule)
        errors = {}
        for expert in pool:
            out, _ = expert.run(model, x.clone(), expert.sigmas(schedule), extra_args={**args, "seed": noise_seed})
            errors[expert.name] = float(model.relative_error(out, exact))
        best_name = min(errors, key=errors.get)
        best = errors[best_name]
        print(f"  class {cond}, cfg {cfg:g}, seed {noise_seed}: best expert {best_name} {best:.2e}")
        for label, reference in (("Dormand-Prince rtol 1e-5", DormandPrince(1e-5)), ("RK4, 100 steps", RungeKutta4(100)),
                                 ("RK4, 200 steps", RungeKutta4(200))):
            counted = CountingDenoiser(model)
            error = float(model.relative_error(reference(counted, x, schedule.sigma_max, args, schedule), exact))
            print(f"    {label:<25} calls {counted.calls:>5}  error {error:.2e}  best expert / reference {best / error:5.1f}x",
                  flush=True)


def rounded_levels(model):
    """``model`` as ComfyUI's discrete-time models see sigma: ``ModelSamplingDiscrete`` rounds it
    to the nearest trained level (in log sigma) for the network, which is fed ``x / sqrt(sigma^2 + 1)``
    (an eps-model's input); the denoised output is ``x - sigma * eps`` at the true sigma."""
    table = model.schedule().discrete_sigmas.double()
    logs = table.log()

    def denoiser(x, sigma, **kw):
        level = table[(sigma.double().log()[None, :] - logs[:, None]).abs().argmin(0)].to(x.dtype)
        shape = (-1, *[1] * (x.dim() - 1))
        xq = x / (sigma.view(shape) ** 2 + 1).sqrt() * (level.view(shape) ** 2 + 1).sqrt()
        eps = (xq - model(xq, level, **kw)) / level.view(shape)
        return x - sigma.view(shape) * eps

    return denoiser


DISCRETE_PROBES = ((11, 5.0), (12, 1.0), (13, 9.0))  # (noise seed, cfg) on one analytic prompt


def main_discrete() -> None:
    """The node's reference on a discrete-time model (the analytic model with rounded levels)."""
    from moe_sampler.experts.analytic import AnalyticModel, PromptSpec
    from moe_sampler.experts.reference import reference_expert

    model = AnalyticModel([PromptSpec(seed=3, n_modes=3, anisotropy=8.0)], shape=(4, 8, 8))
    schedule, pool = model.schedule(), default_pool()
    node = reference_expert(400, steps=100)
    print("The node's reference (at most 400 calls) and the 3M reference on SD1.5's 1,000 rounded levels, against "
          "a Dormand-Prince solve at rtol 1e-7 (uncapped) that resolves the jumps:")
    for seed, cfg in DISCRETE_PROBES:
        args = {"cond": 0, "cfg": cfg}
        x = model.initial_noise(1, seed, schedule.sigma_max).double()
        sigmas = node.sigmas(schedule)
        for label, denoiser in (("continuous", model), ("rounded levels", rounded_levels(model))):
            tight_notes: list = []
            exact = reference_expert(100_000, rtol=1e-7, notes=tight_notes)(denoiser, x.clone(), sigmas, extra_args=args,
                                                                             adaptive_share=1.0)
            assert not tight_notes[-1]["capped"]
            best = min(float(model.relative_error(e.run(denoiser, x.clone(), e.sigmas(schedule),
                                                        extra_args={**args, "seed": seed})[0], exact)) for e in pool)
            line = f"  seed {seed}, cfg {cfg:g}, {label}: best expert {best:.2e} (tight solve {tight_notes[-1]['calls']} calls)"
            for name, expert, notes in (("3M 100 steps", comfy_reference_expert(), None),
                                        ("node's reference", reference_expert(400, steps=100, notes=[]), True)):
                out, run = expert.run(denoiser, x.clone(), expert.sigmas(schedule), extra_args={**args, "seed": seed})
                error = float(model.relative_error(out, exact))
                capped = " capped" if notes and expert.options["notes"][-1]["capped"] else ""
                line += f"; {name}: {run.nfe} calls{capped}, {best / error:.1f}x below"
            print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-accuracy", action="store_true", help="skip the tight reference solves")
    parser.add_argument("--learned", action="store_true", help="measure on the shipped learned model instead")
    parser.add_argument("--node-reference", action="store_true",
                        help="only the ComfyUI training node's references (before and now)")
    parser.add_argument("--discrete", action="store_true",
                        help="the node's reference on a discrete-time model (rounded levels, as SD1.5 in ComfyUI)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.discrete:
        main_discrete()
        return
    if args.learned:
        main_learned(args.contexts, args.seed)
        return
    if args.node_reference:
        env = AnalyticEnvironment("heldout", seed=args.seed, n_models=40, pool_size=args.contexts,
                                  conditions=VARIED_CONDITIONS)  # run_setting's contexts, nothing evaluated
        node_references(env, default_pool())
        return
    pool = default_pool()
    lam = lambda_from_priority(0.5)
    base = None
    print(f"{args.contexts} held-out analytic contexts (varied conditions, seed {args.seed}), pool: "
          f"{', '.join(e.name for e in pool)}")
    print(f"{'rtol':>7} {'grid':>5} {'ref calls':>9} {'expert calls':>12} {'ref share':>9} {'img2img refs/ctx':>16} "
          f"{'mean |dq|':>9} {'max |dq|':>8} {'best@0.5 moved':>14} {'seconds':>8}")
    envs = {}
    for rtol, grid in SETTINGS:
        env, quality, error, nfe, seconds = run_setting(rtol, grid, args.contexts, args.seed, pool)
        envs[(rtol, grid)] = (env, error)
        img2img = [c for c in env.contexts if c.denoise < 1]
        refs_per = (sum(1 for key in env._references if key[0].denoise < 1) / len(img2img)) if img2img else math.nan
        utility = quality - lam * np.log2(np.maximum(nfe, 1)) / 10
        if base is None:
            base = (quality, utility.argmax(1))
        dq = np.abs(quality - base[0])
        moved = np.mean(utility.argmax(1) != base[1])
        print(f"{rtol:>7.0e} {str(grid):>5} {env.calls['reference']:>9} {env.calls['experts']:>12} "
              f"{env.reference_share:>9.1%} {refs_per:>16.2f} {dq.mean():>9.4f} {dq.max():>8.4f} {moved:>14.1%} "
              f"{seconds:>8.1f}")
    if args.no_accuracy:
        return
    print(f"\nReference accuracy against Dormand-Prince at rtol {TIGHT_RTOL:g} from the same start "
          f"(relative error, units of the prompt's data rms):")
    for rtol, grid in SETTINGS:
        env, error = envs[(rtol, grid)]
        best = np.nanmin(np.where(np.isfinite(error), error, np.nan), axis=1)
        ref = np.array(reference_errors(env, pool))
        print(f"  Dormand-Prince rtol {rtol:g}, grid {grid}: reference error median {np.median(ref):.2e}, "
              f"max {ref.max():.2e}; best expert error median {np.median(best):.2e}, min {best.min():.2e}")
        print(f"    {ratio_summary(best, ref)}")
    node_references(envs[SETTINGS[0]][0], pool)


def node_references(env: AnalyticEnvironment, pool) -> None:
    """The ComfyUI training node's reference before (3M, 100 steps) and now (Dormand-Prince loop)."""
    from moe_sampler.experts.reference import CALLS_PER_STEP, reference_expert

    steps = 100  # the node's REFERENCE_STEPS (nodes/ imports ComfyUI); its reference_expert(100) is this one
    notes: list = []
    for label, expert in (("before: DPM-Solver++(3M), Karras, 100 steps; same family as QualityMaster",
                           comfy_reference_expert()),
                          (f"now: Dormand-Prince loop through the sampler signature, rtol 1e-5, at most "
                           f"{CALLS_PER_STEP * steps} calls", reference_expert(CALLS_PER_STEP * steps, steps, notes=notes))):
        calls: list = []
        best, comfy = (np.array(v) for v in comfy_reference_errors(env, pool, expert, calls))
        print(f"  ComfyUI node's reference ({label}), {len(best)} text-to-image contexts, both against a tight "
              f"solve to sigma_min: reference error median {np.median(comfy):.2e}, max {comfy.max():.2e}; best "
              f"expert median {np.median(best):.2e}; model calls median {np.median(calls):.0f}, max {max(calls)}")
        print(f"    {ratio_summary(best, comfy)}")
    if notes:
        print(f"    capped references: {sum(n['capped'] for n in notes)} of {len(notes)}")


if __name__ == "__main__":
    main()
