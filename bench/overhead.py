"""Overhead of MoE Adaptive Sampler over core KSampler running the same expert configuration.

Both nodes run in-process in a real ComfyUI (``--comfyui`` or ``COMFYUI_PATH``), same model,
seed and settings, interleaved pair by pair (the order inside a pair alternates, and the seed
changes every repetition). Each MoE run does the whole node's work: state features, router
decision, sampling through the bridge, queuing the stats-store row, UI payload.

Configurations:

1. ``BalancedMaster`` forced vs KSampler ``dpmpp_2m`` / ``karras`` / 20 (the same method).
2. ``auto`` over a pool of MoE Expert nodes (ComfyUI samplers) vs KSampler with whatever the
   router picked (exactly the same sampler function and sigmas).
3. ``auto`` over the default pool vs core ``SamplerCustom`` running the picked expert wrapped
   in ``KSAMPLER`` (routing, features and recording are the only difference).

Then the router's decision time (``Router.select`` over the default pool; median of many calls)
and the state-feature time.

CPU (default): the tiny SD1.5-family checkpoint, 64x64 images. GPU: ``--device cuda --fp16
--sd15-size`` builds a random-weight checkpoint with the full SD1.5 UNet (860 M parameters,
512x512 by default).

    OMP_NUM_THREADS=1 COMFYUI_PATH=/path/to/ComfyUI python bench/overhead.py --reps 8

The number of pairs is made even, so each side runs first in half of them: on an H200, 5 pairs
(one side first in 3, the other in 2) put the control row, core against itself, at a paired
ratio of 1.07, a bias as large as the differences measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import ensure_moe_sampler  # noqa: E402
from helpers.comfy_env import encode_prompt, import_comfy, load_tiny_checkpoint  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=None, help="ComfyUI checkout (default: $COMFYUI_PATH)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--fp16", action="store_true", help="run the UNet in fp16 (GPU)")
    parser.add_argument("--sd15-size", action="store_true", help="full-size SD1.5 UNet with random weights")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 64; 512 with --sd15-size)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--reps", type=int, default=6,
                        help="interleaved pairs per configuration (an odd number is rounded up)")
    parser.add_argument("--decisions", type=int, default=2000, help="router decisions to time")
    parser.add_argument("--workdir", default=None, help="where to build the checkpoint (default: a temp dir)")
    return parser.parse_args(argv)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv=None) -> int:
    args = parse_args(argv)
    args.reps += args.reps % 2  # each side first in half of the pairs
    import_comfy(args.comfyui, cpu=args.device == "cpu")
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    import latent_preview
    import nodes
    import torch

    ensure_moe_sampler()
    from moe_sampler.experts import default_pool
    from moe_sampler.nodes import bridge, comfy_experts, paths
    from moe_sampler.nodes.sampler_nodes import MoEAdaptiveSampler, MoEExpert
    from moe_sampler.router.features import state_from_conditioning
    from moe_sampler.stats.store import StatsStore

    comfy.utils.PROGRESS_BAR_ENABLED = False
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="moe_overhead_"))
    options = {"dtype": torch.float16} if args.fp16 else {}
    model, clip, _ = load_tiny_checkpoint(workdir, sd15_size=args.sd15_size, model_options=options)
    paths.register_folders()
    positive = encode_prompt(clip, "a lighthouse on a cliff at dusk, oil painting")
    negative = encode_prompt(clip, "blurry, low quality")
    side = args.size or (512 if args.sd15_size else 64)
    latent = {"samples": torch.zeros(args.batch, 4, side // 8, side // 8)}
    cfg, builtin = args.cfg, paths.BUILTIN_ROUTER

    def moe(seed, mode, pool=None):
        return MoEAdaptiveSampler.execute(model, positive, negative, latent, seed, cfg, 0.5, builtin, mode, 0.0,
                                          1.0, pool)

    def ksampler(seed, sampler, scheduler, steps):
        return nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent)

    def sampler_custom(seed, expert):
        # core SamplerCustom.execute with the expert in KSAMPLER: no routing, no recording.
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        noise = comfy.sample.prepare_noise(samples, seed, None)
        sigmas = expert.sigmas(comfy_experts.schedule_for(model), 1.0)
        callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
        return comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.KSAMPLER(expert), sigmas, positive,
                                          negative, samples, callback=callback, disable_pbar=True, seed=seed)

    custom_pool = tuple(MoEExpert.execute(*spec).args[0] for spec in
                        [("dpmpp_2m", "karras", 20), ("euler", "normal", 20), ("heun", "karras", 10)])
    picked_custom = moe(0, "auto", custom_pool).ui["moe_run"][0]["expert"]
    sampler_name, scheduler, steps = picked_custom.split("/")
    picked_default = moe(0, "auto").ui["moe_run"][0]["expert"]
    picked_expert = next(e for e in default_pool() if e.name == picked_default)

    configs = [
        ("BalancedMaster (forced)", "KSampler dpmpp_2m/karras/20",
         lambda s: moe(s, "BalancedMaster"), lambda s: ksampler(s, "dpmpp_2m", "karras", 20)),
        (f"auto, MoE Expert pool -> {picked_custom}", f"KSampler {picked_custom}",
         lambda s: moe(s, "auto", custom_pool), lambda s: ksampler(s, sampler_name, scheduler, int(steps))),
        (f"auto, default pool -> {picked_default}", f"SamplerCustom KSAMPLER({picked_default})",
         lambda s: moe(s, "auto"), lambda s: sampler_custom(s, picked_expert)),
        ("(control) KSampler dpmpp_2m/karras/20", "KSampler dpmpp_2m/karras/20",
         lambda s: ksampler(s, "dpmpp_2m", "karras", 20), lambda s: ksampler(s, "dpmpp_2m", "karras", 20)),
    ]
    # wall[name] = (moe, core) seconds; cpu likewise in process CPU seconds (all threads, so the
    # store's writer thread counts), which a busy shared machine disturbs far less than wall time.
    wall = {name: ([], []) for name, *_ in configs}
    cpu = {name: ([], []) for name, *_ in configs}
    for _, _, run_moe, run_core in configs:  # warm-up: model load, first-call costs
        run_moe(1), run_core(1)
    for rep in range(args.reps):
        for name, _, run_moe, run_core in configs:
            seed = 1000 + rep
            pair = [(0, run_moe), (1, run_core)]
            for which, fn in (pair if rep % 2 == 0 else pair[::-1]):
                start, start_cpu = time.perf_counter(), time.process_time()
                fn(seed)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                wall[name][which].append(time.perf_counter() - start)
                cpu[name][which].append(time.process_time() - start_cpu)

    router = paths.load_router(builtin)
    pool = default_pool()
    scratch_store = StatsStore(workdir / "scratch_stats.sqlite3")

    def fixed_work(i: int) -> float:
        """Everything the node adds around sampling: checks, state, routing, store rows, badge."""
        start = time.perf_counter()
        experts = comfy_experts.check_pool(pool)
        comfy_experts.forced_expert("auto", experts)
        samples = bridge.check_latent(latent)
        state_i = state_from_conditioning(positive, negative, tuple(samples.shape), cfg, 1.0,
                                          comfy_experts.model_family(model), 0.5)
        selection = paths.load_router(builtin).select(state_i, experts, priority=0.5, temperature=0.0, seed=i)
        report = bridge.SamplingReport((bridge.Attempt(selection.expert, "ok", 20, 20, 1.0),), 20, 1.0)
        for record in bridge.run_records(report.attempts, state=state_i, selection=selection, router="default",
                                         priority=0.5, seed=i):
            scratch_store.record_async(record)
        bridge.badge(report, selection, "default")
        return time.perf_counter() - start

    state = state_from_conditioning(positive, negative, tuple(latent["samples"].shape), cfg, 1.0,
                                    comfy_experts.model_family(model), 0.5)
    decisions, features = [], []
    for i in range(args.decisions):
        start = time.perf_counter()
        router.select(state, pool, priority=0.5, temperature=0.0, seed=i)
        decisions.append(time.perf_counter() - start)
    for _ in range(max(args.decisions // 10, 10)):
        start = time.perf_counter()
        state_from_conditioning(positive, negative, tuple(latent["samples"].shape), cfg, 1.0, "eps", 0.5)
        features.append(time.perf_counter() - start)
    fixed = [fixed_work(i) for i in range(max(args.decisions // 10, 10))]
    paths.stats_store().flush(30)
    scratch_store.close()

    device = comfy.model_management.get_torch_device()
    unet = "SD1.5-size" if args.sd15_size else "tiny SD1.5-family"
    print(f"\ndevice {device}, {unet} UNet, dtype {model.model_dtype()}, {side}x{side}, batch {args.batch}, "
          f"cfg {cfg}, torch threads {torch.get_num_threads()}, {args.reps} interleaved pairs each\n")
    show_cpu = args.device == "cpu"  # on a GPU, CPU time is not the cost
    head = (f"| {'MoE Adaptive Sampler':<44} | {'core baseline':<40} | MoE s  | core s | ratio  | paired ratio "
            f"| MoE - core ms |")
    rule = f"|{'-' * 46}|{'-' * 42}|--------|--------|--------|--------------|---------------|"
    if show_cpu:
        head += " cpu paired ratio |"
        rule += "------------------|"
    print(head)
    print(rule)
    for name, core_name, *_ in configs:
        (moe_w, core_w), (moe_c, core_c) = wall[name], cpu[name]
        moe_s, core_s = median(moe_w), median(core_w)
        paired = median([m / c for m, c in zip(moe_w, core_w)])
        diff_ms = median([(m - c) * 1e3 for m, c in zip(moe_w, core_w)])
        line = (f"| {name:<44} | {core_name:<40} | {moe_s:6.3f} | {core_s:6.3f} | {moe_s / core_s:6.4f} "
                f"| {paired:12.4f} | {diff_ms:13.1f} |")
        if show_cpu:
            line += f" {median([m / c for m, c in zip(moe_c, core_c)]):16.4f} |"
        print(line)
    print("(MoE s, core s: medians of wall time; ratio = their quotient; paired ratio / MoE - core: medians over\n"
          " the interleaved pairs; cpu: process CPU time, all threads. The control row runs core against itself:\n"
          " its distance from 1 is the noise floor of this machine.)")
    print(f"\nrouter decision (Router.select, {len(pool)} experts): median {median(decisions) * 1e3:.3f} ms, "
          f"p95 {sorted(decisions)[int(0.95 * len(decisions))] * 1e3:.3f} ms over {len(decisions)} calls")
    print(f"state features (state_from_conditioning): median {median(features) * 1e3:.3f} ms")
    core_median = median(wall[configs[0][0]][1])
    print(f"fixed work the node adds per generation (checks, state, routing, store row, badge): median "
          f"{median(fixed) * 1e3:.3f} ms = {median(fixed) / core_median:.2%} of the median core run above")
    print("targets: ratio <= 1.01, decision < 1 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
