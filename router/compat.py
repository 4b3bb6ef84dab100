"""The original Python API, kept working as a thin layer over the router.

    from moe_sampler import AdvancedExpertSelector, MoERLTrainer, MixtureOfExperts, ExpertRouter
    selector = AdvancedExpertSelector(diffusion_model=model, scheduler=scheduler, device="cuda")
    state = selector.get_state_representation(...)
    expert_id, expert, info = selector.select_expert_moe(state)
    selector.update_expert_performance(expert_id, metrics)
    trainer = MoERLTrainer(mdp, reward_func, selector, state_dim=64)
    trainer.train_moe(num_episodes=1000)

``diffusion_model`` is any :class:`~moe_sampler.experts.base.Denoiser` (an ``AnalyticModel``,
a ``DiffusersDenoiser``) or a diffusers UNet, wrapped in ``DiffusersDenoiser`` with
``scheduler``. ``ExpertRouter`` is :class:`~.model.Router` under its original name.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import Tensor

from ..experts.analytic import AnalyticModel
from ..experts.base import Expert, ModelSchedule
from .features import state_from_analytic, state_from_conditioning
from .model import Router

logger = logging.getLogger(__name__)

ExpertRouter = Router

__all__ = ["AdvancedExpertSelector", "ExpertRouter", "MixtureOfExperts"]


def _family(model: Any, scheduler: Any) -> str:
    config = getattr(scheduler, "config", scheduler)
    config = config if hasattr(config, "get") else {}
    if "FlowMatch" in type(scheduler).__name__ or config.get("shift") is not None:
        return "flow"
    prediction = getattr(model, "prediction_type", None) or config.get("prediction_type")
    return "v" if prediction == "v_prediction" else "eps"


class AdvancedExpertSelector:
    """Routes generations of one model over a pool of experts (original API).

    Args:
        diffusion_model: a Denoiser (``model(x, sigma, **extra_args) -> denoised``) or a diffusers UNet.
        scheduler: diffusers scheduler or its config (needed for a UNet; gives the model family).
        device: where latents are created; ``"cuda"`` falls back to CPU with a warning when absent.
        experts: the pool (``default_pool()`` when None). router: a Router (``Router.default()``).
        priority, temperature: defaults for :meth:`select_expert_moe`.
        store: an optional ``StatsStore`` that :meth:`update_expert_performance` records into.
    """

    def __init__(self, diffusion_model: Any, scheduler: Any = None, device: str | torch.device = "cpu",
                 experts: Sequence[Expert] | None = None, router: Router | None = None, priority: float = 0.5,
                 temperature: float = 0.0, store: Any = None) -> None:
        self.model = self._wrap(diffusion_model, scheduler)
        self.scheduler = scheduler
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            logger.warning("device %r requested but CUDA is not available; using the CPU", str(device))
            self.device = torch.device("cpu")
        if experts is None:
            from ..experts import default_pool

            experts = default_pool()
        self.experts = list(experts)
        self.router = router if router is not None else ExpertRouter.default()
        self.priority, self.temperature, self.store = priority, temperature, store
        self.performance: dict[str, list[dict]] = {e.name: [] for e in self.experts}
        self.records: list[Any] = []
        self._last: dict[str, Any] = {}

    @staticmethod
    def _wrap(model: Any, scheduler: Any) -> Any:
        if hasattr(model, "config") and hasattr(model, "forward") and not hasattr(model, "schedule"):
            from ..experts.diffusers_adapter import DiffusersDenoiser

            return DiffusersDenoiser(model, scheduler)
        if not callable(model):
            raise TypeError(f"diffusion_model must be a denoiser or a diffusers UNet, got {type(model).__name__}")
        return model

    def schedule(self) -> ModelSchedule:
        """The model's noise levels (``model.schedule()``)."""
        return self.model.schedule()

    def get_state_representation(self, conditioning: Any = None, negative: Any = None, latent: Any = None,
                                 cfg: float = 7.0, denoise: float = 1.0, priority: float | None = None,
                                 cond: int = 0, batch: int = 1) -> Tensor:
        """The router state [64]. Analytic model: prompt index ``cond``. Otherwise
        ``conditioning`` is ComfyUI conditioning or a ``prompt_embeds`` tensor [B, tokens, width]
        and ``latent`` a latent tensor or shape (default [batch, 4, 64, 64])."""
        priority = self.priority if priority is None else priority
        if isinstance(self.model, AnalyticModel):
            return state_from_analytic(self.model, cond, cfg, batch, priority, denoise=denoise, source="interactive")
        if conditioning is None:
            raise ValueError("get_state_representation needs the conditioning (prompt embeddings) for this model")
        wrap = lambda c: [[c, {}]] if isinstance(c, Tensor) else c  # noqa: E731
        latent = latent if latent is not None else (batch, 4, 64, 64)
        return state_from_conditioning(wrap(conditioning), wrap(negative), latent, cfg, denoise,
                                       _family(self.model, self.scheduler), priority)

    def select_expert_moe(self, state: Tensor, priority: float | None = None, temperature: float | None = None,
                          seed: int | None = None) -> tuple[str, Expert, dict]:
        """Route ``state`` [64]: ``(expert_id, expert, info)``; info has ``probabilities``
        (name -> probability), ``confidence``, ``propensity``, ``utilities``, predicted
        quality/cost and ``decision_seconds``."""
        priority = self.priority if priority is None else priority
        temperature = self.temperature if temperature is None else temperature
        sel = self.router.select(state, self.experts, priority=priority, temperature=temperature, seed=seed)
        names = [e.name for e in self.experts]
        info = {
            "index": sel.index, "confidence": sel.confidence, "propensity": sel.propensity,
            "probabilities": dict(zip(names, sel.probabilities)), "utilities": dict(zip(names, sel.utilities)),
            "predicted_quality": dict(zip(names, sel.predicted_quality)),
            "predicted_cost": dict(zip(names, sel.predicted_cost)), "decision_seconds": sel.decision_seconds,
            "priority": priority, "selection": sel,
        }
        self._last = {"state": state, "priority": priority, "confidence": sel.confidence, "propensity": sel.propensity}
        return sel.expert, self.experts[sel.index], info

    def update_expert_performance(self, expert_id: str, metrics: dict) -> None:
        """Record a run's metrics (``nfe``, ``seconds``, ``quality``, ``success``, ``steps``):
        kept per expert, as a ``RunRecord`` in ``self.records`` (learnable with
        ``MoERLTrainer.learn_from_records``) and in the stats store when one was given."""
        if expert_id not in self.performance:
            raise ValueError(f"unknown expert {expert_id!r}; pool: {', '.join(self.performance)}")
        from ..stats.store import RunRecord

        self.performance[expert_id].append(dict(metrics))
        state = metrics.get("state", self._last.get("state"))
        record = RunRecord(
            expert=expert_id, router=self.router.name, nfe=int(metrics.get("nfe", 0)),
            steps=int(metrics.get("steps", metrics.get("nfe", 0))), seconds=float(metrics.get("seconds", 0.0)),
            success=bool(metrics.get("success", True)), quality=metrics.get("quality"),
            confidence=metrics.get("confidence", self._last.get("confidence")),
            propensity=metrics.get("propensity", self._last.get("propensity")),
            priority=metrics.get("priority", self._last.get("priority")),
            state=tuple(float(v) for v in state) if state is not None else None, seed=metrics.get("seed"),
        )
        self.records.append(record)
        if self.store is not None:
            self.store.record(record)

    def environment(self) -> Any:
        """A training environment over this selector's model (analytic models only)."""
        if not isinstance(self.model, AnalyticModel):
            raise ValueError("MoERLTrainer needs an environment (mdp) for a non-analytic model; pass one "
                             "implementing router.trainer.Environment")
        from .environment import AnalyticEnvironment

        return AnalyticEnvironment(models=[self.model])


class MixtureOfExperts:
    """Pool, router and sampling in one: ``x, info = moe.sample(cond=..., cfg=..., seed=...)``."""

    def __init__(self, diffusion_model: Any, scheduler: Any = None, experts: Sequence[Expert] | None = None,
                 router: Router | None = None, device: str | torch.device = "cpu", store: Any = None) -> None:
        self.selector = AdvancedExpertSelector(diffusion_model, scheduler, device=device, experts=experts,
                                               router=router, store=store)

    def sample(self, cond: Any = 0, cfg: float = 7.0, seed: int = 0, priority: float = 0.5,
               temperature: float = 0.0, denoise: float = 1.0, negative: Any = None,
               latent: Tensor | None = None, batch: int = 1, size: tuple[int, int] = (64, 64)) -> tuple[Tensor, dict]:
        """Route, run the chosen expert and record it; returns the final latent and info
        (the selection info plus ``nfe``, ``seconds`` and ``expert``). ``cond``: the analytic
        prompt index or the conditioning tensor [B, tokens, width]; ``latent``: img2img start
        (its noise is added here) or None for text-to-image of latent ``size`` (height, width)."""
        sel = self.selector
        analytic = isinstance(sel.model, AnalyticModel)
        if analytic:
            shape = (batch, *sel.model.shape)
        else:
            shape = tuple(latent.shape) if latent is not None else (batch, 4, *size)
        state = sel.get_state_representation(conditioning=None if analytic else cond, negative=negative, latent=shape,
                                             cfg=cfg, denoise=denoise, priority=priority,
                                             cond=cond if analytic else 0, batch=batch)
        expert_id, expert, info = sel.select_expert_moe(state, priority=priority, temperature=temperature, seed=seed)
        sigmas = expert.sigmas(sel.schedule(), denoise).to(sel.device)
        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(shape, generator=g).to(sel.device) * sigmas[0]
        x = noise if latent is None else latent.to(sel.device) + noise
        extra_args = {"cond": cond, "cfg": cfg, "seed": seed}
        if negative is not None:
            extra_args["uncond"] = negative
        out, run = expert.run(sel.model, x, sigmas, extra_args=extra_args)
        sel.update_expert_performance(expert_id, {"nfe": run.nfe, "steps": run.steps, "seconds": run.seconds,
                                                  "success": run.finite, "seed": seed})
        return out, {**info, "expert": expert_id, "nfe": run.nfe, "seconds": run.seconds}
