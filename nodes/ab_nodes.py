"""MoE A/B Compare (V3): the router's choice against the user's usual sampler, same everything else.

For one model, conditioning, latent and seed (so the same initial noise) the node runs MoE
Adaptive Sampler's routed expert (:func:`.sampler_nodes.run_adaptive`) and a baseline named
like core KSampler (sampler, scheduler, steps; defaults euler / normal / 20 as KSampler's), and
outputs both latents plus a comparison: model calls and time of each and how far apart they
are, and how different the two latents are. The baseline runs ComfyUI's own sampler function on
KSampler's sigmas (:func:`.comfy_experts.expert_from_comfy`), so its latent equals KSampler's.
Node id frozen: ``MoEABCompare``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import comfy.samplers
from comfy_api.latest import io

from ..router.features import state_from_conditioning
from ..stats.report import MANUAL_ROUTER
from . import bridge, comfy_experts, paths, why
from .comfy_environment import sampled_latent_shape
from .sampler_nodes import (
    CATEGORY,
    MIN_FEATURE_CFG,
    TOOLTIPS,
    AdaptiveRun,
    _add_image_metadata,
    _notify,
    _record,
    _save_chart,
    run_adaptive,
    sampler_inputs,
)

logger = logging.getLogger(__name__)

AB_TOOLTIPS = {
    "baseline_sampler": "The sampler you would use in KSampler (the baseline the router's choice is compared with).",
    "baseline_scheduler": "The baseline's scheduler, as in KSampler.",
    "baseline_steps": "The baseline's steps, as in KSampler.",
}


@dataclass(frozen=True)
class Comparison:
    """What :func:`run_ab` measured."""

    moe: AdaptiveRun
    baseline_latent: dict
    baseline: bridge.SamplingReport
    baseline_name: str
    latent_difference: float | None

    def text(self) -> str:
        return comparison_text(self.moe.report, self.baseline, self.baseline_name, self.latent_difference)

    def data(self) -> dict:
        return {
            "moe": {"expert": self.moe.report.expert, "model_calls": self.moe.report.nfe,
                    "seconds": round(self.moe.report.wall_seconds, 4)},
            "baseline": {"expert": self.baseline_name, "model_calls": self.baseline.nfe,
                         "seconds": round(self.baseline.wall_seconds, 4)},
            "calls_change": _relative(self.moe.report.nfe, self.baseline.nfe),
            "time_change": _relative(self.moe.report.wall_seconds, self.baseline.wall_seconds),
            "latent_difference": None if self.latent_difference is None else round(self.latent_difference, 6),
        }


def _relative(value: float, reference: float) -> float | None:
    """``value / reference - 1`` (``-0.5``: half of the baseline), None without a reference."""
    return None if reference <= 0 else round(float(value) / float(reference) - 1.0, 4)


def _change_words(change: float | None, unit: str, fewer: str = "less") -> str:
    """``"50% fewer model calls"``, ``"12% more time"``, ``"the same time"``."""
    if change is None:
        return f"{unit}: nothing to compare with"
    if abs(change) < 0.005:
        return f"the same {unit}"
    return f"{abs(change):.0%} {fewer if change < 0 else 'more'} {unit}"


def comparison_text(moe: bridge.SamplingReport, baseline: bridge.SamplingReport, baseline_name: str,
                    latent_difference: float | None) -> str:
    """Plain text: each run's model calls and time, the relative differences, the latent distance."""
    calls, seconds = _relative(moe.nfe, baseline.nfe), _relative(moe.wall_seconds, baseline.wall_seconds)
    lines = [
        f"MoE pick  {moe.expert}: {moe.nfe} model calls, {moe.wall_seconds:.2f} s"
        + (" (fallback)" if moe.fallback else ""),
        f"Baseline  {baseline_name} (as KSampler): {baseline.nfe} model calls, {baseline.wall_seconds:.2f} s",
        f"MoE vs baseline: {_change_words(calls, 'model calls', 'fewer')}, {_change_words(seconds, 'time')}",
    ]
    if latent_difference is not None:
        lines.append(f"Latent difference (relative, 0 = identical): {latent_difference:.4f}")
    return "\n".join(lines)


def latent_difference(a: Any, b: Any) -> float | None:
    """``||a - b|| / ||b||`` of two latent tensors, None when they cannot be compared."""
    try:
        if getattr(a, "is_nested", False) or a.shape != b.shape:
            return None
        norm = float(b.float().norm())
        return float((a.float() - b.float()).norm()) / norm if norm > 0 else None
    except Exception:  # a comparison must never break the run
        return None


def run_ab(model: Any, positive: Any, negative: Any, latent_image: dict, seed: int, cfg: float, priority: float,
           router: str, baseline_sampler: str, baseline_scheduler: str, baseline_steps: int, denoise: float = 1.0,
           expert_pool: Sequence[Any] | None = None, store: Any = None) -> Comparison:
    """The routed run, then the baseline from the same noise; both recorded in the stats store
    (the baseline as a forced run, router ``manual``)."""
    moe = run_adaptive(model, positive, negative, latent_image, seed, cfg, priority, router, "auto", 0.0, denoise,
                       expert_pool, store=store)
    for name, value in (("baseline_sampler", baseline_sampler), ("baseline_scheduler", baseline_scheduler)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name}: expected a ComfyUI {name.split('_')[1]} name")
    try:
        expert = comfy_experts.expert_from_comfy(baseline_sampler, baseline_scheduler, baseline_steps)
    except ValueError as exc:
        raise ValueError(f"baseline_{exc}") from None
    # The baseline's row carries the same context as the MoE run's, so stats filters (image size)
    # and learning see it like any forced run.
    state = state_from_conditioning(positive, negative, sampled_latent_shape(model, latent_image["samples"]),
                                    max(cfg, MIN_FEATURE_CFG), denoise, comfy_experts.model_family(model), priority,
                                    "interactive")
    attempts: list[bridge.Attempt] = []
    start = time.perf_counter()
    try:
        latent, report = bridge.sample_with_expert(model, expert, positive, negative, latent_image, seed, cfg,
                                                   denoise, attempts=attempts, fallback=None)
    finally:
        _record(paths.stats_store() if store is None else store, attempts, state=state, selection=None,
                router=MANUAL_ROUTER, priority=priority, seed=seed)
    logger.debug("baseline %s took %.2f s", expert.name, time.perf_counter() - start)
    return Comparison(moe, latent, report, expert.name, latent_difference(moe.latent["samples"], latent["samples"]))


class MoEABCompare(io.ComfyNode):
    """Runs the router's choice and the user's usual KSampler settings from the same noise."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        t = TOOLTIPS
        return io.Schema(
            node_id="MoEABCompare",
            display_name="MoE A/B Compare",
            category=CATEGORY,
            description="Samples twice from the same noise: once with the expert the router picks (as MoE "
                        "Adaptive Sampler), once with your usual KSampler settings, and says how many model "
                        "calls and how much time each took. Decode both latents to compare the images.",
            inputs=sampler_inputs(
                io.Combo.Input("router", options=paths.router_names(), default=paths.BUILTIN_ROUTER,
                               tooltip=t["router"]),
                io.Combo.Input("baseline_sampler", options=comfy.samplers.SAMPLER_NAMES, default="euler",
                               tooltip=AB_TOOLTIPS["baseline_sampler"]),
                io.Combo.Input("baseline_scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal",
                               tooltip=AB_TOOLTIPS["baseline_scheduler"]),
                io.Int.Input("baseline_steps", default=20, min=1, max=10000, tooltip=AB_TOOLTIPS["baseline_steps"]),
            ),
            outputs=[
                io.Latent.Output("moe_latent", tooltip="The latent from the expert the router picked."),
                io.Latent.Output("baseline_latent", tooltip="The latent from the baseline (your KSampler settings)."),
                io.String.Output("comparison", tooltip="Model calls and time of each run and their difference."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.extra_pnginfo],
        )

    @classmethod
    def validate_inputs(cls, router=None) -> bool | str:
        if isinstance(router, str):
            try:
                paths.resolve_router(router)
            except ValueError as exc:
                return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, router=None, **kwargs) -> Any:
        return (router, paths.router_mtime(router) if isinstance(router, str) else None)

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, cfg, priority, router, baseline_sampler,
                baseline_scheduler, baseline_steps, denoise, expert_pool=None) -> io.NodeOutput:
        result = run_ab(model, positive, negative, latent_image, seed, cfg, priority, router, baseline_sampler,
                        baseline_scheduler, baseline_steps, denoise, expert_pool)
        ui = result.moe.ui()
        info = ui["moe_run"][0]
        info["ab"] = result.data()
        text = result.text()
        ui["text"] = [text]
        node_id = getattr(cls.hidden, "unique_id", None)
        ui["images"] = _save_chart(why.why_chart(info["why"], info))
        _add_image_metadata(getattr(cls.hidden, "extra_pnginfo", None), node_id, info,
                            {"seed": seed, "cfg": cfg, "denoise": denoise, "temperature": 0.0, "mode": "auto",
                             "baseline": {"sampler_name": baseline_sampler, "scheduler": baseline_scheduler,
                                          "steps": baseline_steps}})
        _notify(info, node_id)
        return io.NodeOutput(result.moe.latent, result.baseline_latent, text, ui=ui)


NODES: list[type[io.ComfyNode]] = [MoEABCompare]
