"""The training node (V3): MoE Router Trainer.

Node ids are frozen (saved workflows refer to them). The work is in :func:`train_router`, which
tests call directly; ``execute`` only reads inputs and wraps the result for ComfyUI.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from comfy_api.latest import io, ui

from ..router.calibration import MIN_PAIRS, POOLED, Calibration
from ..experts import default_pool
from . import comfy_experts, paths
from .comfy_environment import (
    MODES,
    REFERENCE_STEPS,
    ComfyEnvironment,
    ExpertRunReport,
    TrainingInputError,
    TrainingPlan,
    check_sizes_fit,
    moving_average,
    parse_cfgs,
    parse_prompts,
    parse_sizes,
    training_contexts,
)

logger = logging.getLogger(__name__)

CATEGORY = "sampling/moe"
TRAINING_SEED = 0  # fixed, so that an interrupted run resumes to exactly the run it would have been
ExpertPoolType = io.Custom("MOE_EXPERT_POOL")

TOOLTIPS = {
    "model": "The diffusion model to train the router for (the same MODEL you sample with; LoRAs and patches "
             "applied upstream are part of what it learns).",
    "clip": "Text encoder used to encode the prompts, as CLIP Text Encode does.",
    "prompts": "Training prompts, one per line: the kind of prompts you generate. Blank lines are ignored. At most "
               "1000 prompts of up to 2000 characters, 100,000 characters in all.",
    "negative_prompt": "Negative prompt used for every training generation (at most 2000 characters).",
    "sizes": "Image sizes to train on, WIDTHxHEIGHT in pixels (multiples of 8, at most 2048 per side and 1536x1536 "
             "pixels in all), comma-separated, e.g. '512x512, 512x768'.",
    "cfg_values": "Guidance scales to train on, comma-separated, e.g. '4, 7.5' (high cfg makes sampling stiffer).",
    "priority": "Priority (0 = speed, 1 = quality) at which the report shows the trained router's picks. "
                "Training itself covers all priorities, so the sampler's priority needs no retraining.",
    "episodes": "Total training episodes: each draws one context (prompt, size, cfg, seed). With resume, a "
                "stopped run continues up to this total; raise it to train further.",
    "seeds_per_prompt": "Noise seeds per prompt: every prompt x size x cfg x seed is one training context.",
    "mode": "'full sweep' runs every expert on each context (fast to learn; for training). 'bandit' runs only "
            "the router's pick (what ordinary use produces).",
    "router_name": "Name of the router file saved in models/moe_routers (letters, digits, '-', '_', '.'; "
                   "'.safetensors' is added). An existing router of that name is replaced when training ends.",
    "resume": "On: continue the stopped or finished training run of this name (or fine-tune the saved "
              "router of this name). Off: start from the untrained default router.",
    "expert_pool": "Experts to train on (MoE Expert Pool). Not connected: the five main built-in experts.",
    "reference_steps": "Budget of the high-accuracy reference each expert is scored against: an adaptive "
                       "Dormand-Prince solve (a different family from the experts) with at most 4x this many "
                       "model calls per context (400 for 100). A context that needs more ends with a coarser "
                       "reference; the report counts those. Raise it for stiff models or high cfg.",
    "farm_job": "Off (default): train on this machine alone. On: share the training with every ComfyUI worker "
                "that runs this node with the same inputs on the same stats store (a PostgreSQL database for a "
                "farm, or this machine's store): each worker sweeps contexts nobody else has, the rows go to the "
                "shared store, and when all are done one worker trains the router from all of them and adopts "
                "it for every worker. Needs mode 'full sweep'; resume does not apply (the farm resumes where it "
                "is). docs/STATS.md, 'Training spread over a farm'.",
}
FARM_LEASE_VARIABLE = "MOE_SAMPLER_FARM_LEASE_SECONDS"
FARM_LEASE = 900.0  # seconds a worker's claim on a context lives without an expert run finishing


# ------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainingOutcome:
    """What :func:`train_router` produced."""

    router_file: str
    path: Path
    curve: Any  # PIL image
    report: str
    episodes: int
    resumed_from: int
    runs_recorded: int
    farm: Any = None  # router.farm.FarmResult in farm mode


def checkpoint_path(router_file: str) -> Path:
    """The resumable training state of a router: internal user dir, never the models folder."""
    return paths.stats_store_path().parent / "training" / (Path(router_file).stem + ".checkpoint.safetensors")


def _initial_router(plan: TrainingPlan, save_path: Path, checkpoint: Path) -> Any:
    from ..router.model import Router, RouterLoadError

    if plan.resume and not checkpoint.exists() and save_path.exists():
        try:
            router = Router.load(save_path, label=save_path.name)  # fine-tune the saved router
        except RouterLoadError as exc:
            raise ValueError(f"resume: cannot continue from {save_path.name}: {exc}; turn resume off") from None
    else:
        router = Router.default()
    router.name = save_path.stem
    return router


def _record_run(store: Any, label: str, mode: str, run: ExpertRunReport, model: str | None = None,
                pair: dict | None = None) -> bool:
    """Queue a fresh expert run of the trainer as a stats row; ``pair``: its ``run.pair_details()``."""
    from ..stats.store import RunRecord

    try:
        record = RunRecord(
            expert=run.expert, router=label, nfe=run.nfe, steps=run.steps, seconds=max(run.seconds, 0.0),
            success=run.success, source="training", quality=run.quality if run.success else None,
            propensity=1.0 if mode == "sweep" else None, priority=run.priority, state=run.state,
            error=run.error, seed=run.context.seed, details=pair,
            # Sweep rows are full information on this model: the online loop learns from them too.
            model=model if mode == "sweep" else None, quality_source="sweep" if mode == "sweep" else None,
            error_estimate=(run.estimate or {}).get("estimate") if run.success else None,
        )
        return bool(store.record_async(record))
    except Exception:  # the store must never break training
        logger.exception("could not record a training run of %s", run.expert)
        return False


def train_router(model: Any, clip: Any, plan: TrainingPlan, expert_pool: Sequence[Any] | None = None,
                 node_id: Any = None, reference_steps: int = REFERENCE_STEPS,
                 farm_job: bool = False) -> TrainingOutcome:
    """Train (or resume) a router on the workflow's model and save it to ``models/moe_routers``.

    Interruption (ComfyUI's Cancel) is checked between episodes and at every sampling step.
    The trainer's checkpoint (:func:`checkpoint_path`, in the internal user directory) is
    written atomically after every episode, so an interrupted run keeps its state for
    ``resume``; the router file is written only when training completes (atomically too), and
    the interrupt is re-raised for ComfyUI to report. Every fresh expert run is recorded in the
    stats store with source "training" and the router's file name.

    With ``farm_job`` the work is shared with the other workers on the same store
    (:func:`train_on_farm`).
    """
    import torch

    # ComfyUI runs nodes in inference mode; the router's weights need autograd (sampling inside
    # the environment re-enters inference mode).
    with torch.inference_mode(False), torch.enable_grad():
        if farm_job:
            return train_on_farm(model, clip, plan, expert_pool, node_id, reference_steps)
        return _train(model, clip, plan, expert_pool, node_id, reference_steps)


class _PreviewingEnvironment(ComfyEnvironment):
    """The training environment, keeping the latest run's latent for the progress preview."""

    last_samples: Any = None

    def _sample(self, context: Any, expert: Any, attempts: list | None = None) -> tuple[Any, Any]:
        self.last_samples = None
        latent, report = super()._sample(context, expert, attempts)
        self.last_samples = latent.get("samples") if isinstance(latent, dict) else None
        return latent, report


class TrainingProgress:
    """The trainer's progress bar: one unit per expert run (an episode of a full sweep runs every
    pool expert, a bandit episode one), and the run's image as the node's preview.

    Within an episode the bar stops one unit short of the episode's end, which only
    :meth:`episode_done` reaches (after the episode's checkpoint is written); a cached run (a
    context seen before) reports no run, so the bar then jumps at the episode's end.
    """

    def __init__(self, episodes: int, runs_per_episode: int, node_id: Any, model: Any) -> None:
        import comfy.utils

        self.runs = max(int(runs_per_episode), 1)
        self.total = max(int(episodes), 1) * self.runs
        self.bar = comfy.utils.ProgressBar(self.total, node_id=node_id)
        self.done = 0
        self.in_episode = 0
        self.previewer = _previewer(model)

    def episode_done(self, episodes: int) -> None:
        self.done, self.in_episode = episodes, 0
        self.bar.update_absolute(min(episodes * self.runs, self.total), self.total)

    def expert_run(self, samples: Any) -> None:
        self.in_episode = min(self.in_episode + 1, self.runs - 1)
        value = min(self.done * self.runs + self.in_episode, self.total)
        self.bar.update_absolute(value, self.total, self._preview(samples))

    def _preview(self, samples: Any) -> Any:
        if self.previewer is None or samples is None or getattr(samples, "is_nested", False):
            return None
        try:
            return self.previewer.decode_latent_to_preview_image("JPEG", samples)
        except Exception:  # a preview must never stop training
            logger.debug("no training preview", exc_info=True)
            return None


def _previewer(model: Any) -> Any:
    """ComfyUI's latent previewer for ``model`` (the one ``--preview-method`` selects), else the
    cheap latent-to-RGB map when the model's latent format has one; None when neither exists."""
    try:
        import comfy.model_management
        import latent_preview

        latent_format = model.model.latent_format
        previewer = latent_preview.get_previewer(comfy.model_management.get_torch_device(), latent_format)
        if previewer is None and getattr(latent_format, "latent_rgb_factors", None) is not None:
            previewer = latent_preview.Latent2RGBPreviewer(latent_format.latent_rgb_factors,
                                                           getattr(latent_format, "latent_rgb_factors_bias", None),
                                                           getattr(latent_format, "latent_rgb_factors_reshape", None))
        return previewer
    except Exception:
        logger.debug("no latent previewer for this model", exc_info=True)
        return None


def _train(model: Any, clip: Any, plan: TrainingPlan, expert_pool: Sequence[Any] | None, node_id: Any,
           reference_steps: int) -> TrainingOutcome:
    import comfy.model_management
    import comfy.utils

    from ..router.trainer import MoERLTrainer

    pool = comfy_experts.check_pool(default_pool() if expert_pool is None else expert_pool)
    check_sizes_fit(model, plan.sizes)
    save_path = paths.router_save_path(plan.router_name, "router_name")
    checkpoint = checkpoint_path(save_path.name)
    if not plan.resume and checkpoint.exists():
        checkpoint.unlink()  # our own resumable state; the user asked to start over
    store = paths.stats_store()
    recorded = [0]
    from .online_learning import model_fingerprint

    model_key = model_fingerprint(model)
    pairs: list = []  # (expert, calibration inputs, true error) of this run's fresh expert runs

    progress = TrainingProgress(plan.episodes, len(pool) if plan.mode == "sweep" else 1, node_id, model)

    def on_run(run: ExpertRunReport) -> None:
        pair = run.pair_details()
        recorded[0] += _record_run(store, save_path.name, plan.mode, run, model_key, pair)
        if pair is not None:
            pairs.append((run.expert, pair["estimate"], pair["true_error"]))
        progress.expert_run(environment.last_samples if run.success else None)

    contexts = training_contexts(len(plan.prompts), plan.sizes, plan.cfgs, plan.seeds_per_prompt)
    environment = _PreviewingEnvironment(model, clip, plan.prompts, plan.negative, contexts, reference_steps, on_run,
                                         priority=plan.priority)
    try:
        trainer = MoERLTrainer(environment, _initial_router(plan, save_path, checkpoint), list(pool), mode=plan.mode,
                               seed=TRAINING_SEED, checkpoint_path=checkpoint, checkpoint_every=1)
    except ValueError as exc:
        if not checkpoint.exists():
            raise
        # A checkpoint of another pool or mode, or of an older feature version.
        reason = str(exc).replace(str(checkpoint), checkpoint.name)  # the message reaches the browser: no paths
        raise ValueError(f"resume: {reason}; turn resume off to start a new training run") from None
    resumed_from = trainer.episode
    if resumed_from > plan.episodes:
        raise TrainingInputError(
            f"episodes: the training run of {save_path.name} is already at episode {resumed_from}, past the "
            f"{plan.episodes} asked; set episodes above {resumed_from} to train further, or turn resume off to "
            f"start over"
        )
    progress.episode_done(min(resumed_from, plan.episodes))
    result = trainer.train(plan.episodes, progress=lambda done, total, info: progress.episode_done(done),
                           should_stop=comfy.model_management.processing_interrupted)
    store.flush(timeout=10)
    if result.stopped:
        logger.info("MoE training of %s interrupted at episode %d; resume continues from there",
                    save_path.name, result.episodes)
        comfy.model_management.throw_exception_if_processing_interrupted()
        raise comfy.model_management.InterruptProcessingException()
    trainer.router.training["model"] = model_key  # the sampler warns when used on another model
    if len(pairs) >= MIN_PAIRS:  # the sampler scores its runs' estimates with it (a resumed run: its new runs)
        trainer.router.training["calibration"] = Calibration.fit(pairs).to_dict()
    trainer.router.save(save_path)
    report = training_report(plan, save_path.name, trainer, environment, result, resumed_from, reference_steps)
    if resumed_from == plan.episodes:
        report = (f"Nothing left to train: the run of {save_path.name} had already done {plan.episodes} episodes "
                  f"(raise episodes to train further); the router was saved again with the same weights.\n{report}")
    return TrainingOutcome(save_path.name, save_path, training_curve(result, save_path.name), report,
                           result.episodes, resumed_from, recorded[0])


# ------------------------------------------------------------------------------------- farm jobs


def farm_contexts(plan: TrainingPlan) -> tuple[list[Any], int]:
    """A farm job's contexts, numbered the same on every worker: ``episodes`` of the plan's
    contexts (all of them when there are fewer) in a shuffled order seeded by :data:`TRAINING_SEED`;
    and how many contexts the plan has in all."""
    import random

    contexts = training_contexts(len(plan.prompts), plan.sizes, plan.cfgs, plan.seeds_per_prompt)
    order = list(range(len(contexts)))
    random.Random(TRAINING_SEED).shuffle(order)
    return [contexts[i] for i in order[:min(plan.episodes, len(contexts))]], len(contexts)


def farm_spec(plan: TrainingPlan, pool: Sequence[Any], model_key: str, reference_steps: int) -> dict[str, Any]:
    """What a farm job is: every input that changes its contexts, their rows or the update (its key hashes this)."""
    from ..router.features import FEATURE_VERSION

    return {
        "kind": "MoERouterTrainer full sweep", "feature_version": FEATURE_VERSION, "model": model_key,
        "prompts": list(plan.prompts), "negative": plan.negative, "sizes": [list(s) for s in plan.sizes],
        "cfgs": list(plan.cfgs), "seeds_per_prompt": plan.seeds_per_prompt, "episodes": plan.episodes,
        "reference_steps": reference_steps, "experts": [[e.name, repr(e.descriptor)] for e in pool],
        "router": plan.router_name, "seed": TRAINING_SEED,
    }


def farm_lease() -> float:
    """``$MOE_SAMPLER_FARM_LEASE_SECONDS`` (default :data:`FARM_LEASE`): how long a claim lives
    between two finished expert runs before another worker may retake the context."""
    import os

    raw = os.environ.get(FARM_LEASE_VARIABLE, "").strip()
    try:
        return max(float(raw), 1.0) if raw else FARM_LEASE
    except ValueError:
        logger.warning("%s=%r is not a number of seconds; using %g", FARM_LEASE_VARIABLE, raw, FARM_LEASE)
        return FARM_LEASE


def train_on_farm(model: Any, clip: Any, plan: TrainingPlan, expert_pool: Sequence[Any] | None, node_id: Any,
                  reference_steps: int) -> TrainingOutcome:
    """The trainer as one worker of a farm job (docs/STATS.md, "Training spread over a farm").

    The job's key hashes the inputs (:func:`farm_spec`), so every worker running the node with the
    same inputs on the same stats store joins the same job. This worker claims contexts nobody
    has, sweeps every expert on each and writes its rows with the claim in one transaction; then
    waits for the others (retaking the context of a worker that died once its claim's lease runs
    out); the worker that sees the last context done trains the router from all the job's rows
    and adopts it through the router registry (the farm's database, or the routers folder).
    """
    import comfy.model_management

    from ..router.farm import UPDATES_PER_EPISODE, adopt, context_priority, run_farm_worker, sweep_context
    from ..router.farm import train_from_runs
    from ..router.versions import check_registry_name
    from ..stats.claims import FarmJob, job_key
    from .online_learning import model_fingerprint, registry

    if plan.mode != "sweep":
        raise TrainingInputError("farm_job: a farm job runs in mode 'full sweep' (a bandit episode depends on the "
                                 "router trained so far, so it cannot be shared); set mode to 'full sweep' or turn "
                                 "farm_job off")
    pool = list(comfy_experts.check_pool(default_pool() if expert_pool is None else expert_pool))
    check_sizes_fit(model, plan.sizes)
    save_path = paths.router_save_path(plan.router_name, "router_name")
    name = check_registry_name(plan.router_name[: -len(".safetensors")])
    model_key = model_fingerprint(model)
    contexts, total = farm_contexts(plan)
    spec = farm_spec(plan, pool, model_key, reference_steps)
    key = job_key(spec)
    store = paths.stats_store()
    routers = registry()
    job = FarmJob(store, key, len(contexts), spec, lease=farm_lease())
    progress = TrainingProgress(len(contexts), len(pool), node_id, model)

    def on_run(run: ExpertRunReport) -> None:
        progress.expert_run(environment.last_samples if run.success else None)

    environment = _PreviewingEnvironment(model, clip, plan.prompts, plan.negative, contexts, reference_steps, on_run,
                                         priority=plan.priority)

    def sweep(index: int, renew: Any) -> list[Any]:
        return sweep_context(environment, contexts[index], pool, context_priority(key, index), job=key, index=index,
                             router_label=save_path.name, model=model_key, after_run=renew)

    def update(runs: list[Any], renew: Any) -> int:
        def between() -> None:  # Cancel stops the fit (the update is released for another worker)
            comfy.model_management.throw_exception_if_processing_interrupted()
            renew()

        router = train_from_runs(runs, pool, steps=UPDATES_PER_EPISODE * len(contexts), seed=TRAINING_SEED,
                                 between=between)
        router.name = save_path.stem
        router.training["model"] = model_key  # the sampler warns when used on another model
        return adopt(routers, name, router, key)

    try:
        progress.episode_done(job.open().done)
        result = run_farm_worker(job, sweep, update, should_stop=comfy.model_management.processing_interrupted,
                                 poll=1.0, on_context=lambda context, written: _show_farm_progress(job, progress))
        runs = job.runs() if not result.stopped else []
    finally:
        job.close()
    if result.stopped:
        logger.info("MoE farm job %s: this worker was interrupted after sweeping %d contexts; the farm has done "
                    "%d of %d", key, result.swept, result.done, result.contexts)
        comfy.model_management.throw_exception_if_processing_interrupted()
        raise comfy.model_management.InterruptProcessingException()
    router = routers.load(name, result.version) if result.version else None
    report = farm_report(plan, save_path.name, name, pool, result, runs, router, total, store.label)
    curve = farm_curve(runs, router, pool, save_path.name)
    return TrainingOutcome(save_path.name, save_path, curve, report, result.contexts, 0, result.swept * len(pool),
                           farm=result)


def _show_farm_progress(job: Any, progress: Any) -> None:
    """Move the progress bar to the farm's done contexts; a store that cannot answer right now
    (the context is already written) only leaves the bar where it is."""
    from ..stats.store import StatsStoreError

    try:
        progress.episode_done(job.progress().done)
    except StatsStoreError as exc:
        logger.info("MoE farm job %s: progress not read (%s)", job.key, exc)


def _farm_scores(runs: Sequence[Any], router: Any, pool: Sequence[Any]) -> list[tuple[int, float, float]]:
    """Per context of the job's rows: ``(context, best expert's score, the router's pick's score)`` at the
    context's priority (score = quality - price of model calls; NaN without a router)."""
    import torch

    from ..router.policy import cost_from_nfe, lambda_from_priority

    by_context: dict[int, dict[str, Any]] = {}
    for run in runs:
        context = int(((run.details_dict() or {}).get("farm") or {}).get("context", -1))
        by_context.setdefault(context, {})[run.expert] = run
    out = []
    for context in sorted(by_context):
        rows = by_context[context]
        recorded = next(iter(rows.values())).priority
        priority = 0.5 if recorded is None else recorded
        price = lambda_from_priority(priority)
        score = {e: ((r.quality or 0.0) if r.success else 0.0) - price * float(cost_from_nfe(r.nfe))
                 for e, r in rows.items()}
        picked = math.nan
        state = next(iter(rows.values())).state
        if router is not None and state is not None:
            choice = router.select(torch.tensor(state), pool, priority=priority).expert
            picked = score.get(choice, math.nan)
        out.append((context, max(score.values()), picked))
    return out


def farm_curve(runs: Sequence[Any], router: Any, pool: Sequence[Any], router_file: str) -> Any:
    """The farm job's chart: per context, the best expert's score and the adopted router's pick's."""
    from ..stats.charts import line_chart

    scores = _farm_scores(runs, router, pool)
    x = [context + 1 for context, _, _ in scores]
    series = {"best expert": (x, [best for _, best, _ in scores])}
    if router is not None:
        series["adopted router's pick"] = (x, [picked for _, _, picked in scores])
    return line_chart(series, title=f"Farm training: {router_file}", xlabel="context of the job", integer_x=True,
                      ylabel="score = quality (0-1) - price of model calls")


def farm_report(plan: TrainingPlan, router_file: str, name: str, pool: Sequence[Any], result: Any,
                runs: Sequence[Any], router: Any, total: int, store_label: str) -> str:
    """What this worker did in the farm job, what the farm did, and the adopted router."""
    lines = [
        f"Farm job {result.job}: {result.contexts} contexts (episodes {plan.episodes} of the {total} "
        f"prompt x size x cfg x seed combinations); pool: {', '.join(e.name for e in pool)}.",
        f"This worker swept {result.swept} context{'s' if result.swept != 1 else ''}"
        + (f" ({result.lost} more were retaken by other workers after this worker's claim ran out; their rows "
           f"were discarded)" if result.lost else "")
        + f"; the farm has done {result.done} of {result.contexts} ({result.rows} rows in {store_label}).",
    ]
    if result.ran_update:
        lines.append(f"Final update: ran on this worker, trained on all {result.rows} rows; router {router_file} "
                     f"v{result.version} adopted.")
    elif result.version is not None:
        lines.append(f"Final update: ran on worker {result.update_worker}; router {router_file} v{result.version} "
                     f"adopted.")
    else:
        lines.append(f"Final update: not run yet (job {result.state}).")
    lines.append(f"Router {router_file} in models/{paths.ROUTER_FOLDER} follows the adopted version "
                 f"(every version in {name}.versions/). The job is done: queueing it again trains nothing; change "
                 f"an input (e.g. router_name or episodes) for a new job.")
    by_expert: dict[str, list[Any]] = {}
    for run in runs:
        by_expert.setdefault(run.expert, []).append(run)
    lines += ["", "Measured by the farm (quality against the reference, from the job's rows):",
              f"{'expert':<24}{'runs':>5}{'quality':>9}{'NFE':>6}{'sec':>8}"]
    for expert, rows in by_expert.items():
        ok = [r for r in rows if r.success]
        lines.append(f"{expert[:23]:<24}{len(rows):>5}{_mean(r.quality for r in ok if r.quality is not None):>9.3f}"
                     f"{_mean(r.nfe for r in ok):>6.0f}{_mean(r.seconds for r in ok):>8.2f}")
    scores = _farm_scores(runs, router, pool)
    if router is not None and scores:
        lines += ["", f"Mean score over the job's contexts: router's pick {_mean(p for _, _, p in scores):.3f}, "
                      f"best expert {_mean(b for _, b, _ in scores):.3f}."]
    return "\n".join(lines)


def training_curve(result: Any, router_file: str) -> Any:
    """The learning curve: score of the router's pick and of the best expert, smoothed.

    The score is what the router ranks by (the sampler's why panel shows the same): quality (the
    report's 0-1 score) minus the price of the run's model calls at the episode's priority, so it
    is below the quality and can be negative for expensive experts at low priority."""
    from ..stats.charts import line_chart

    episodes = list(range(1, len(result.rewards) + 1))
    window = max(1, len(episodes) // 10)
    series = {f"router's pick (mean of {window})": (episodes, moving_average(result.rewards, window))}
    if any(math.isfinite(v) for v in result.oracle_rewards):
        series[f"best expert (mean of {window})"] = (episodes, moving_average(result.oracle_rewards, window))
    return line_chart(series, title=f"Router training: {router_file}", xlabel="episode", integer_x=True,
                      ylabel="score = quality (0-1) - price of model calls")


def _mean(values: Any) -> float:
    finite = [float(v) for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _calibration_line(calibration: dict | None, runs: int) -> str:
    """What the saved router keeps to calibrate the runs' own quality estimates (docs/ROUTER.md,
    "Learning from your runs")."""
    experts = {k: v for k, v in ((calibration or {}).get("experts") or {}).items() if k != POOLED}
    if not experts:
        return (f"Calibration of the experts' own quality estimates: not fitted ({MIN_PAIRS} measured runs of an "
                f"expert needed; this session measured {runs} in all). The measured runs stay in the stats store, "
                f"where this model's learning loop uses them.")
    fitted = ", ".join(f"{name} ({fit['pairs']} runs)" for name, fit in experts.items())
    return (f"Calibration of the experts' own quality estimates, kept in the router: {fitted}. The sampler scores "
            f"its runs with it, and this model's learning loop uses the measured runs.")


def training_report(plan: TrainingPlan, router_file: str, trainer: Any, environment: ComfyEnvironment,
                    result: Any, resumed_from: int, reference_steps: int) -> str:
    """A plain-text summary: what was trained, measured fidelity per expert, picks per context."""
    mode = "full sweep" if plan.mode == "sweep" else "bandit"
    lines = [
        f"Router {router_file} saved to models/{paths.ROUTER_FOLDER}.",
        f"Mode {mode}; episodes {result.episodes}" + (f" (resumed at {resumed_from})" if resumed_from else "")
        + f"; {len(environment.contexts)} contexts; pool: {', '.join(e.name for e in trainer.experts)}.",
    ]
    window = max(1, min(10, len(result.rewards)))
    if result.rewards:
        line = f"Mean reward over the last {window} episodes: router {_mean(result.rewards[-window:]):.3f}"
        if any(math.isfinite(v) for v in result.oracle_rewards[-window:]):
            line += f", best expert {_mean(result.oracle_rewards[-window:]):.3f}"
        lines.append(line + ".")
    notes = getattr(environment, "reference_notes", [])
    capped = sum(1 for n in notes if n.get("capped"))
    budget = (f"a Dormand-Prince reference of at most {4 * reference_steps} model calls"
              + (f", {sum(n['calls'] for n in notes) / len(notes):.0f} on average" if notes else "")
              + (f"; {capped} of {len(notes)} hit that cap (coarser; raise reference_steps)" if capped else ""))
    lines += ["", f"Measured in this session (relative latent error to {budget}):",
              f"{'expert':<24}{'runs':>5}{'quality':>9}{'rel.err':>10}{'NFE':>6}{'sec':>8}"]
    by_expert: dict[str, list[Any]] = {}
    for outcome in environment.outcomes():
        by_expert.setdefault(outcome.expert, []).append(outcome)
    for name, outcomes in by_expert.items():
        ok = [o for o in outcomes if o.success]
        lines.append(f"{name[:23]:<24}{len(outcomes):>5}{_mean(o.quality for o in ok):>9.3f}"
                     f"{_mean(o.relative_error for o in ok):>10.2e}{_mean(o.nfe for o in ok):>6.0f}"
                     f"{_mean(o.seconds for o in ok):>8.2f}")
    lines.append(_calibration_line(trainer.router.training.get("calibration"),
                                   sum(1 for o in environment.outcomes() if o.success)))
    lines += ["", f"Picks at priority {plan.priority:.2f}:"]
    shown = environment.contexts[:12]
    for context in shown:
        selection = trainer.router.select(environment.state(context, plan.priority), trainer.experts,
                                          priority=plan.priority)
        prompt = plan.prompts[context.prompt]
        prompt = prompt if len(prompt) <= 32 else prompt[:31] + "…"
        lines.append(f"  {prompt!r} {context.width}x{context.height} cfg {context.cfg:g} seed {context.seed}: "
                     f"{selection.expert} ({selection.confidence:.0%})")
    if len(environment.contexts) > len(shown):
        lines.append(f"  … and {len(environment.contexts) - len(shown)} more contexts")
    return "\n".join(lines)


class MoERouterTrainer(io.ComfyNode):
    """Trains a router on the workflow's own model and prompts, and saves it."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        t = TOOLTIPS
        return io.Schema(
            node_id="MoERouterTrainer",
            display_name="MoE Router Trainer",
            category=CATEGORY,
            description="Teaches a router which expert suits your model and prompts: runs the experts on "
                        "training contexts, scores them against a high-accuracy reference from the same noise, "
                        "and saves the router to models/moe_routers for MoE Adaptive Sampler.",
            inputs=[
                io.Model.Input("model", tooltip=t["model"]),
                io.Clip.Input("clip", tooltip=t["clip"]),
                io.String.Input("prompts", multiline=True, tooltip=t["prompts"],
                                default="a photograph of a lighthouse at dusk\na watercolor painting of a fox"),
                io.String.Input("negative_prompt", multiline=True, default="blurry, low quality",
                                tooltip=t["negative_prompt"]),
                io.String.Input("sizes", default="512x512, 512x768", tooltip=t["sizes"]),
                io.String.Input("cfg_values", default="4, 7.5", tooltip=t["cfg_values"]),
                io.Float.Input("priority", default=0.5, min=0.0, max=1.0, step=0.05,
                               display_mode=io.NumberDisplay.slider, tooltip=t["priority"]),
                io.Int.Input("episodes", default=40, min=1, max=100000, tooltip=t["episodes"]),
                io.Int.Input("seeds_per_prompt", default=2, min=1, max=64, tooltip=t["seeds_per_prompt"]),
                io.Combo.Input("mode", options=list(MODES), default="full sweep", tooltip=t["mode"]),
                io.String.Input("router_name", default="my_router", tooltip=t["router_name"]),
                io.Boolean.Input("resume", default=True, tooltip=t["resume"]),
                io.Int.Input("reference_steps", default=REFERENCE_STEPS, min=10, max=1000,
                             tooltip=t["reference_steps"]),
                ExpertPoolType.Input("expert_pool", optional=True, tooltip=t["expert_pool"]),
                io.Boolean.Input("farm_job", default=False, optional=True, tooltip=t["farm_job"]),
            ],
            outputs=[
                io.String.Output("router", tooltip="File name of the saved router (pick it in MoE Adaptive Sampler)."),
                io.Image.Output("training_curve", tooltip="Learning curve: reward of the router's pick per episode."),
                io.String.Output("report", tooltip="Text summary: measured fidelity per expert and the router's picks."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, prompts=None, sizes=None, cfg_values=None, router_name=None) -> bool | str:
        # Inputs named here are checked before the queue accepts the prompt; linked ones arrive as None.
        checks = ((parse_prompts, prompts), (parse_sizes, sizes), (parse_cfgs, cfg_values),
                  (paths.check_save_name, router_name))
        for check, value in checks:
            if value is not None:
                try:
                    check(value)
                except ValueError as exc:
                    return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, router_name=None, **kwargs) -> Any:
        # Re-run when the saved router changed or vanished since the cached run.
        try:
            stat = paths.router_save_path(router_name).stat()
            return (router_name, stat.st_mtime_ns, stat.st_size)
        except (ValueError, OSError, TypeError):
            return (router_name, None)

    @classmethod
    def execute(cls, model, clip, prompts, negative_prompt, sizes, cfg_values, priority, episodes, seeds_per_prompt,
                mode, router_name, resume, reference_steps=REFERENCE_STEPS, expert_pool=None,
                farm_job=False) -> io.NodeOutput:
        from ..stats.charts import image_to_comfy_tensor

        plan = TrainingPlan.from_inputs(prompts, negative_prompt, sizes, cfg_values, priority, episodes,
                                        seeds_per_prompt, mode, router_name, resume)
        outcome = train_router(model, clip, plan, expert_pool, getattr(cls.hidden, "unique_id", None), reference_steps,
                               farm_job=bool(farm_job))
        return io.NodeOutput(outcome.router_file, image_to_comfy_tensor(outcome.curve), outcome.report,
                             ui=ui.PreviewText(outcome.report))


NODES: list[type[io.ComfyNode]] = [MoERouterTrainer]
