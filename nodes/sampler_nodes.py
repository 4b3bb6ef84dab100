"""Sampling nodes (V3): MoE Adaptive Sampler, MoE Expert, MoE Built-in Expert, MoE Expert Pool.

Node ids are frozen (saved workflows refer to them). The sampler's work is in
:func:`run_adaptive` (route, sample through :mod:`.bridge`, record to the stats store), which
tests and benchmarks call directly; ``execute`` only wraps it for ComfyUI.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import comfy.samplers
from comfy_api.latest import io

from ..experts import default_pool, expert_names, get_expert
from ..router.features import state_from_conditioning
from ..stats.report import MANUAL_ROUTER, router_label
from . import bridge, comfy_experts, online_learning, paths, why
from .comfy_environment import sampled_latent_shape

logger = logging.getLogger(__name__)

CATEGORY = "sampling/moe"
EVENT = "moe_sampler.run"
MIN_FEATURE_CFG = 0.01  # cfg 0 is allowed like core KSampler; the router's state needs cfg > 0
CUSTOM_EXPERT_SLOTS = 4
ExpertType = io.Custom("MOE_EXPERT")
ExpertPoolType = io.Custom("MOE_EXPERT_POOL")

TOOLTIPS = {
    "model": "The diffusion model (LoRAs, ControlNets and model patches applied upstream keep working).",
    "positive": "Conditioning to steer towards; also part of what the router reads to pick an expert.",
    "negative": "Conditioning to steer away from.",
    "latent_image": "The latent to denoise: an Empty Latent Image for txt2img, a VAE Encode for img2img "
                    "(batch_index and noise_mask are kept).",
    "seed": "Seed of the initial noise (same as KSampler's) and of the router's draw when temperature > 0.",
    "cfg": "Classifier-free guidance scale, as in KSampler. The router also reads it: high cfg makes "
           "sampling stiffer.",
    "priority": "What the router optimises: 0 = fastest acceptable expert, 1 = highest quality, "
                "0.5 = balanced. Needs no retraining.",
    "router": "Router weights from models/moe_routers (.safetensors). '(learned for this model)' (default) "
              "learns from your runs: one router per model, updated in the background, starting with the best "
              "fixed expert. '(built-in default)' is the untrained router that ranks experts by their "
              "descriptors. 'NAME.versions/vNNNN.safetensors' pins one version of a learned router.",
    "mode": "'auto' lets the router choose; an expert name forces that expert. The list offers the experts of "
            "the connected pool, custom ones included (all built-ins when the pool cannot be read from the "
            "graph); the pool is checked again when the prompt runs. Forced runs are recorded with router "
            "'manual'.",
    "temperature": "Exploration: 0 always takes the best-scored expert; higher values sometimes try others "
                   "(seeded by seed), which helps the router learn. The learned router explores on its own "
                   "(5% of runs, logged) and ignores it.",
    "audit_rate": "Share of runs that are audited: after the expert, the reference (a Dormand-Prince solve of at "
                  "most 400 model calls) also runs from the same noise, so the run gets its exact quality for the "
                  "stats and the learning loop. The output is the expert's either way; an audited run takes "
                  "longer (shown on the node). Audits are skipped while they would exceed 4% of this model's "
                  "model calls (MOE_SAMPLER_AUDIT_SHARE; 'none' lifts the limit), so a model's first audit comes "
                  "after about 10,000 of its model calls. 0 turns audits off.",
    "denoise": "How much of the schedule to run, as in KSampler: 1.0 for txt2img, lower to keep more of "
               "the input latent (img2img).",
    "expert_pool": "Experts the router may choose from (MoE Expert Pool). Not connected: the five main "
                   "built-in experts.",
    "sampler_name": "A ComfyUI sampler (the same list as KSampler).",
    "scheduler": "A ComfyUI scheduler: how the noise levels are spaced (the same list as KSampler).",
    "steps": "Number of sampler steps (at least 1); model calls per step depend on the sampler.",
    "stop_rule": "'none' runs every step; 'converged' stops once the denoised prediction stops changing "
                 "and returns it.",
    "expert": "A built-in expert to use as MOE_EXPERT (e.g. to put it in a pool next to custom experts).",
    "pool": "Another MoE Expert Pool to extend (its experts come first); chain pools for more than "
            f"{CUSTOM_EXPERT_SLOTS} custom experts.",
}


def builtin_tooltip(name: str) -> str:
    expert = get_expert(name)
    kind = "compatibility expert, off by default" if expert.compat else "built-in expert"
    return f"Include {name} ({kind}): {expert.descriptor.description}".strip()


@dataclass(frozen=True)
class AdaptiveRun:
    """What one MoE Adaptive Sampler execution did."""

    latent: dict
    report: bridge.SamplingReport
    selection: Any  # router.policy.Selection, or None when ``mode`` forced the expert
    router: str
    recorded: bool
    pool: tuple = ()  # the experts the router chose from, in pool order
    priority: float = 0.5
    router_info: dict | None = None  # why.router_info: name and version of the router used
    model: str | None = None  # the model's fingerprint (online_learning.model_fingerprint)
    learning: dict | None = None  # online_learning.learning_info with the learned router, else None
    audit: Any = None  # online_learning.Audit when the run was audited
    warning: str | None = None  # a router trained on another model
    audit_info: dict | None = None  # online_learning.note_calls: audit probability, calls and share
    calibration: Any = None  # the router's calibration of the fidelity estimate for this model, or None

    @property
    def forced(self) -> bool:
        return self.selection is None

    def explain(self) -> dict:
        """What the router expected from every pool expert, the pick's lead, router and settings."""
        ran = next((e for e in self.pool if e.name == self.report.expert), self.report.expert)
        if isinstance(ran, str) and ran in expert_names(include_compat=True):
            ran = get_expert(ran)  # the fallback expert, outside the pool
        return why.record_details(self.selection, self.pool, self.priority, self.router_info or {"label": self.router},
                                  ran, self.report)

    def ui(self) -> dict:
        """Node payload: ``ui.moe_run`` (run info with ``why``) and ``ui.text`` (summary and table)."""
        ui = bridge.badge(self.report, self.selection, self.router, why=self.explain())
        ui = online_learning.badge_extras(ui, self.model, self.learning, self.audit, self.warning,
                                          self.audit_info)
        # The run's own fidelity estimate, as the stats row records it (item 1 of docs/ROUTER.md's loop).
        quality, calibrated = bridge.estimated_quality(self.report.final, self.calibration)
        ui["moe_run"][0]["estimate"] = None if quality is None else {"quality": round(quality, 4),
                                                                     "calibrated": calibrated}
        if quality is not None:
            how = ("calibrated on this model's audited and swept runs" if calibrated
                   else "raw estimate: not yet calibrated on this model")
            ui["text"] = [f"{ui['text'][0]}\nestimated quality {quality:.2f} ({how})", *ui["text"][1:]]
        return ui


def _record(store: Any, attempts: Sequence[bridge.Attempt], annotate: Any = None, **fields: Any) -> bool:
    """Queue the attempts' rows off the hot path (``record_async``); never raises. ``annotate``
    adds the learning loop's fields (:func:`online_learning.annotate`)."""
    try:
        records = bridge.run_records(attempts, **fields)
        if annotate is not None:
            records = annotate(records)
        writer = getattr(store, "record_async", None) or store.record
        return all([bool(writer(record)) for record in records])
    except Exception:  # recording must never break sampling
        logger.exception("could not record %d run(s) in the stats store", len(attempts))
        return False


def run_adaptive(model: Any, positive: Any, negative: Any, latent_image: dict, seed: int, cfg: float,
                 priority: float = 0.5, router: str = paths.BUILTIN_ROUTER, mode: str = "auto",
                 temperature: float = 0.0, denoise: float = 1.0, expert_pool: Sequence[Any] | None = None,
                 store: Any = None, callback: Any = None, preview: bool = True, audit_rate: float = 0.0,
                 learner: Any = None) -> AdaptiveRun:
    """Route, sample and record one generation (the MoE Adaptive Sampler's work).

    ``store`` defaults to the process-wide store (:func:`paths.stats_store`). Errors name the
    node input at fault (``expert_pool``, ``mode``, ``router``, ``latent_image``, ``audit_rate``).
    With ``router`` = :data:`online_learning.LEARNED_ROUTER` the model's own router picks through
    the guarded policy and the run counts towards a background update (``learner``, default the
    process-wide one); ``audit_rate`` is the probability of an audit (the node's default is 0.02,
    this function's 0).
    """
    pool = comfy_experts.check_pool(default_pool() if expert_pool is None else expert_pool)
    forced = comfy_experts.forced_expert(mode, pool)
    samples = bridge.check_latent(latent_image, model=model)
    bridge.check_conditioning(positive, "positive")
    bridge.check_conditioning(negative, "negative")
    # The latent as the model samples it: the same helper builds the training state (issue 11).
    state = state_from_conditioning(positive, negative, sampled_latent_shape(model, samples),
                                    max(cfg, MIN_FEATURE_CFG), denoise, comfy_experts.model_family(model), priority,
                                    "interactive")
    key = online_learning.model_fingerprint(model)
    store = paths.stats_store() if store is None else store
    audit_draw = online_learning.decide_audit(key, audit_rate, store=store)  # before sampling: earlier runs only
    selection = router_info = learning = learning_details = warning = active_learner = calibration = None
    label = MANUAL_ROUTER
    if forced is None and router == online_learning.LEARNED_ROUTER:
        learned = online_learning.learned_policy(key)
        choice = learned.policy.select(state, pool, priority=priority, seed=seed)
        selection, label = choice.selection, learned.label
        active_learner = online_learning.learner() if learner is None else learner
        calibration = online_learning.router_calibration(learned.policy.router)
        learning = online_learning.learning_info(choice, learned, active_learner, key, calibration)
        learning_details = online_learning.choice_details(choice, learned)
        router_info = why.router_info(learned.policy.router, label)
    elif forced is None:
        routing = paths.load_router(router)
        selection = routing.select(state, pool, priority=priority, temperature=temperature, seed=seed)
        label = router_label(router)
        router_info = why.router_info(routing, label)
        warning = None if router == paths.BUILTIN_ROUTER else online_learning.model_warning(routing, key, router)
        calibration = online_learning.router_calibration(routing) if warning is None else None
    expert = forced if forced is not None else pool[selection.index]
    details = why.record_details(selection, pool, priority, router_info or {"label": label}, expert)
    attempts: list[bridge.Attempt] = []
    audit = audit_info = None
    try:
        latent, report = bridge.sample_with_expert(model, expert, positive, negative, latent_image, seed, cfg,
                                                   denoise, callback=callback, preview=preview, attempts=attempts)
        if audit_draw.audit and not report.fallback:
            audit = online_learning.run_audit(model, positive, negative, latent_image, seed, cfg, denoise,
                                              latent["samples"], expert=expert)
    finally:
        audit_info = online_learning.note_calls(key, attempts, audit, audit_draw, audit_rate)
        row_details = {**(learning_details or {}), **({"audit": audit_info} if audit_info else {})}
        recorded = _record(store, attempts, state=state, selection=selection, router=label, priority=priority,
                           seed=seed, details=details, calibration=calibration,
                           annotate=lambda records: online_learning.annotate(records, model=key, audit=audit,
                                                                             details=row_details or None))
    if active_learner is not None and recorded:
        active_learner.note_run(key, pool, store)  # counts and queues; never waits for an update
    return AdaptiveRun(latent, report, selection, label, recorded, pool, priority, router_info, key, learning, audit,
                       warning, audit_info, calibration)


def _notify(payload: dict, node_id: Any) -> None:
    """Send the run to the browser (``moe_sampler.run``) when a ComfyUI server is running."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return
    try:
        instance.send_sync(EVENT, {**payload, "node_id": node_id}, sid=getattr(instance, "client_id", None))
    except Exception:
        logger.debug("could not send %s", EVENT, exc_info=True)


def _save_chart(image: Any) -> list[dict]:
    """Save the "why this expert" chart in ComfyUI's temp folder like Preview Image does; the
    entries are the node's ``ui.images`` (shown by both frontends, kept in /history)."""
    import os

    import folder_paths

    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        "moe_why", folder_paths.get_temp_directory(), image.width, image.height)
    name = f"{filename}_{counter:05}_.png"
    image.save(os.path.join(folder, name), compress_level=1)
    return [{"filename": name, "subfolder": subfolder, "type": "temp"}]


def _add_image_metadata(extra_pnginfo: Any, node_id: Any, info: dict, inputs: dict) -> None:
    """Put what reproduces this run into the prompt's ``extra_pnginfo``, which core's Save Image
    writes into every PNG it saves afterwards (key ``moe_sampler``: one entry per sampler run).

    ``extra_pnginfo`` is the dict ComfyUI passes to every node of the prompt (the frontend
    sends it with the workflow; an API prompt without ``extra_data.extra_pnginfo`` has none and
    gets no metadata)."""
    if not isinstance(extra_pnginfo, dict):
        return
    why_data = info.get("why", {})
    entry = {
        "node": None if node_id is None else str(node_id),
        "expert": info["expert"],
        "settings": why_data.get("settings"),
        "router": why_data.get("router", {"label": info["router"]}),
        "priority": why_data.get("priority"),
        **inputs,
        "fallback": info["fallback"],
        "model_calls": info["nfe"],
        "seconds": info["seconds"],
        "expected": why_data.get("experts", []),
        "why": why_data.get("summary"),
    }
    runs = extra_pnginfo.get("moe_sampler")
    if not isinstance(runs, list):
        runs = extra_pnginfo["moe_sampler"] = []
    runs.append(entry)


def sampler_inputs(*own: io.Input) -> list[io.Input]:
    """The inputs MoE Adaptive Sampler and MoE A/B Compare share, in their widget order: model,
    prompts, latent, seed, cfg and priority, then the node's ``own`` inputs (its router first),
    then denoise and expert_pool."""
    t = TOOLTIPS
    return [
        io.Model.Input("model", tooltip=t["model"]),
        io.Conditioning.Input("positive", tooltip=t["positive"]),
        io.Conditioning.Input("negative", tooltip=t["negative"]),
        io.Latent.Input("latent_image", tooltip=t["latent_image"]),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip=t["seed"]),
        io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip=t["cfg"]),
        io.Float.Input("priority", default=0.5, min=0.0, max=1.0, step=0.05,
                       display_mode=io.NumberDisplay.slider, tooltip=t["priority"]),
        *own,
        io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01, tooltip=t["denoise"]),
        ExpertPoolType.Input("expert_pool", optional=True, tooltip=t["expert_pool"]),
    ]


class MoEAdaptiveSampler(io.ComfyNode):
    """KSampler's drop-in: a router picks the sampling expert for each generation."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        t = TOOLTIPS
        return io.Schema(
            node_id="MoEAdaptiveSampler",
            display_name="MoE Adaptive Sampler",
            category=CATEGORY,
            description="Samples like KSampler, but a learned router picks the sampling expert (solver, "
                        "schedule, steps, stop rule) for this model, prompt, size and priority, and every run "
                        "is recorded so the router can improve.",
            inputs=[
                *sampler_inputs(
                    io.Combo.Input("router", options=online_learning.router_options(paths.router_names()),
                                   default=online_learning.LEARNED_ROUTER, tooltip=t["router"]),
                    io.Combo.Input("mode", options=["auto", *expert_names(include_compat=True)], default="auto",
                                   tooltip=t["mode"]),
                    io.Float.Input("temperature", default=0.0, min=0.0, max=10.0, step=0.01,
                                   tooltip=t["temperature"]),
                ),
                io.Float.Input("audit_rate", default=online_learning.DEFAULT_AUDIT_RATE, min=0.0, max=1.0,
                               step=0.01, optional=True, tooltip=t["audit_rate"]),
            ],
            outputs=[io.Latent.Output(tooltip="The denoised latent.")],
            hidden=[io.Hidden.unique_id, io.Hidden.extra_pnginfo],
        )

    @classmethod
    def validate_inputs(cls, mode=None) -> bool | str:
        # Named here, mode skips core's combo check: custom expert names ("euler/normal/20") can be
        # forced from API prompts. Only mode is named: ComfyUI files a failure under every input
        # named here. router keeps core's check against the dropdown, which lists the router files
        # at validation time (folder traversal cannot match one); load_router checks it again.
        if isinstance(mode, str) and mode != "auto" and mode not in expert_names(include_compat=True):
            try:
                comfy_experts.check_custom_expert_name(mode)
            except ValueError as exc:
                return f"mode: {exc}; use 'auto', a built-in expert or a custom expert's name"
        return True

    @classmethod
    def fingerprint_inputs(cls, router=None, model=None, **kwargs) -> Any:
        # The output depends on the router file's contents: re-run when it is retrained, or for
        # the learned router when the model's router gets a new version.
        if router == online_learning.LEARNED_ROUTER and model is not None:
            label = online_learning.learned_label(online_learning.model_fingerprint(model))
            return (router, label, paths.router_mtime(label))
        return (router, paths.router_mtime(router) if isinstance(router, str) else None)

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, cfg, priority, router, mode, temperature,
                denoise, expert_pool=None, audit_rate=online_learning.DEFAULT_AUDIT_RATE) -> io.NodeOutput:
        run = run_adaptive(model, positive, negative, latent_image, seed, cfg, priority, router, mode, temperature,
                           denoise, expert_pool, audit_rate=audit_rate)
        ui = run.ui()
        node_id = getattr(cls.hidden, "unique_id", None)
        info = ui["moe_run"][0]
        ui["images"] = _save_chart(why.why_chart(info["why"], info))
        _add_image_metadata(getattr(cls.hidden, "extra_pnginfo", None), node_id, info,
                            {"seed": seed, "cfg": cfg, "denoise": denoise, "temperature": temperature, "mode": mode})
        _notify(info, node_id)
        return io.NodeOutput(run.latent, ui=ui)


class MoEExpert(io.ComfyNode):
    """Any ComfyUI sampler + scheduler + steps as an expert."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        t = TOOLTIPS
        return io.Schema(
            node_id="MoEExpert",
            display_name="MoE Expert",
            category=CATEGORY,
            description="Makes an expert from a ComfyUI sampler, scheduler and step count, named like "
                        "'euler/normal/20'. Connect it to MoE Expert Pool.",
            inputs=[
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, tooltip=t["sampler_name"]),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, tooltip=t["scheduler"]),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip=t["steps"]),
                io.Combo.Input("stop_rule", options=list(comfy_experts.CUSTOM_STOP_RULES), default="none",
                               optional=True, tooltip=t["stop_rule"]),
            ],
            outputs=[ExpertType.Output(tooltip="The expert, for MoE Expert Pool.")],
        )

    @classmethod
    def execute(cls, sampler_name, scheduler, steps, stop_rule="none") -> io.NodeOutput:
        return io.NodeOutput(comfy_experts.expert_from_comfy(sampler_name, scheduler, steps, stop_rule))


class MoEBuiltinExpert(io.ComfyNode):
    """One built-in expert as MOE_EXPERT."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MoEBuiltinExpert",
            display_name="MoE Built-in Expert",
            category=CATEGORY,
            description="Outputs one of the pack's built-in experts as MOE_EXPERT.",
            inputs=[io.Combo.Input("expert", options=expert_names(include_compat=True), tooltip=TOOLTIPS["expert"])],
            outputs=[ExpertType.Output(tooltip="The expert, for MoE Expert Pool.")],
        )

    @classmethod
    def execute(cls, expert) -> io.NodeOutput:
        return io.NodeOutput(get_expert(expert))


class MoEExpertPool(io.ComfyNode):
    """The experts the router may choose from: toggles for built-ins plus custom experts."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        toggles = [
            io.Boolean.Input(name, default=not get_expert(name).compat, tooltip=builtin_tooltip(name))
            for name in expert_names(include_compat=True)
        ]
        customs = [
            ExpertType.Input(f"expert_{i}", optional=True,
                             tooltip="A custom expert (MoE Expert or MoE Built-in Expert) to add to the pool.")
            for i in range(1, CUSTOM_EXPERT_SLOTS + 1)
        ]
        return io.Schema(
            node_id="MoEExpertPool",
            display_name="MoE Expert Pool",
            category=CATEGORY,
            description="Chooses the experts MoE Adaptive Sampler may use: switch built-in experts on or off "
                        "and connect custom ones.",
            inputs=[*toggles, *customs, ExpertPoolType.Input("pool", optional=True, tooltip=TOOLTIPS["pool"])],
            outputs=[ExpertPoolType.Output(tooltip="The pool, for MoE Adaptive Sampler's expert_pool.")],
        )

    @classmethod
    def execute(cls, pool=None, **inputs) -> io.NodeOutput:
        enabled = {name: bool(inputs.get(name, False)) for name in expert_names(include_compat=True)}
        customs = [inputs.get(f"expert_{i}") for i in range(1, CUSTOM_EXPERT_SLOTS + 1)]
        experts = comfy_experts.check_pool(comfy_experts.assemble_pool(enabled, customs, pool))
        return io.NodeOutput(experts)


NODES: list[type[io.ComfyNode]] = [MoEAdaptiveSampler, MoEExpert, MoEBuiltinExpert, MoEExpertPool]
