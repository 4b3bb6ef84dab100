"""The original Python API, kept working as a thin layer over the router.

    from moe_sampler import AdvancedExpertSelector, MoERLTrainer, MixtureOfExperts, ExpertRouter
    selector = AdvancedExpertSelector(diffusion_model=model, scheduler=scheduler, device="cuda")
    state = selector.get_state_representation(...)
    expert_id, expert, info = selector.select_expert_moe(state)
    selector.update_expert_performance(expert_id, metrics)
    trainer = MoERLTrainer(mdp, reward_func, selector, state_dim=64)
    trainer.train_moe(num_episodes=1000)

``diffusion_model`` is any :class:`~moe_sampler.experts.base.Denoiser` (an ``AnalyticModel``,
a ``DiffusersDenoiser``, the learned yardstick) or a diffusers UNet, wrapped in
``DiffusersDenoiser`` with ``scheduler``. The latent shape comes from the model
(:func:`latent_shape_of`) or the caller (``latent_shape=``), never from a default. For a
model that is not analytic, ``selector.environment(prompts=...)`` builds the training
environment (:class:`~.environment.DenoiserEnvironment` over :class:`~.environment.PromptContexts`).
``ExpertRouter`` is :class:`~.model.Router` under its original name; :class:`MoERLTrainer`
here is the core trainer (:mod:`.trainer`) behind the original signature.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..experts.analytic import AnalyticModel
from ..experts.base import Expert, ModelSchedule
from .environment import DenoiserEnvironment, Outcome, PromptContexts
from .features import STATE_DIM, state_from_analytic, state_from_conditioning
from .model import Router
from .trainer import MoERLTrainer as _CoreTrainer
from .trainer import TrainingResult

logger = logging.getLogger(__name__)

ExpertRouter = Router

__all__ = ["AdvancedExpertSelector", "ExpertRouter", "MixtureOfExperts", "MoERLTrainer", "latent_shape_of"]


def latent_shape_of(model: Any) -> tuple[int, ...] | None:
    """One sample's latent shape as the model declares it, or None when it does not say.

    In this order: ``model.latent_shape`` (the convention for any denoiser; the learned
    yardstick has it), an analytic model's ``shape``, a diffusers UNet's ``in_channels`` x
    ``sample_size`` (a ``DiffusersDenoiser``'s ``unet.config``).
    """
    declared = getattr(model, "latent_shape", None)
    if declared is not None:
        return tuple(int(s) for s in declared)
    if isinstance(model, AnalyticModel):
        return tuple(model.shape)
    config = getattr(getattr(model, "unet", model), "config", None)
    get = config.get if hasattr(config, "get") else (lambda key, default=None: getattr(config, key, default))
    channels, size = (get("in_channels"), get("sample_size")) if config is not None else (None, None)
    if isinstance(channels, int) and size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (channels, *(int(v) for v in size))
    return None


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
        latent_shape: one sample's latent shape, e.g. ``(4, 64, 64)``, when the model does not
            declare it (:func:`latent_shape_of`).
    """

    def __init__(self, diffusion_model: Any, scheduler: Any = None, device: str | torch.device = "cpu",
                 experts: Sequence[Expert] | None = None, router: Router | None = None, priority: float = 0.5,
                 temperature: float = 0.0, store: Any = None, latent_shape: Sequence[int] | None = None) -> None:
        self.model = self._wrap(diffusion_model, scheduler)
        self.scheduler = scheduler
        self.latent_shape = tuple(int(v) for v in latent_shape) if latent_shape is not None \
            else latent_shape_of(self.model)
        self.family = _family(self.model, scheduler)
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

    def batch_shape(self, batch: int = 1) -> tuple[int, ...]:
        """The latent shape ``[batch, ...]`` of this model; ValueError when neither the model nor
        the caller gave one."""
        if self.latent_shape is None:
            raise ValueError(f"the latent shape of this {type(self.model).__name__} is unknown: pass latent= (a latent "
                             f"or its shape [B, C, H, W]) or AdvancedExpertSelector(..., latent_shape=(C, H, W))")
        return (int(batch), *self.latent_shape)

    def get_state_representation(self, conditioning: Any = None, negative: Any = None, latent: Any = None,
                                 cfg: float = 7.0, denoise: float = 1.0, priority: float | None = None,
                                 cond: int = 0, batch: int = 1) -> Tensor:
        """The router state [64]. Analytic model: prompt index ``cond``. Otherwise
        ``conditioning`` is ComfyUI conditioning or a ``prompt_embeds`` tensor [B, tokens, width]
        and ``latent`` a latent tensor or shape (default: ``batch`` samples of the model's
        latent shape, see :meth:`batch_shape`)."""
        priority = self.priority if priority is None else priority
        if isinstance(self.model, AnalyticModel):
            return state_from_analytic(self.model, cond, cfg, batch, priority, denoise=denoise, source="interactive")
        if conditioning is None:
            raise ValueError("get_state_representation needs the conditioning (prompt embeddings) for this model")
        wrap = lambda c: [[c, {}]] if isinstance(c, Tensor) else c  # noqa: E731
        latent = latent if latent is not None else self.batch_shape(batch)
        return state_from_conditioning(wrap(conditioning), wrap(negative), latent, cfg, denoise, self.family, priority)

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

    def environment(self, prompts: Sequence[Any] | None = None, negative: Any = None, **options: Any) -> Any:
        """A training environment over this selector's model.

        Analytic model: an ``AnalyticEnvironment`` on it (no arguments needed). Any other
        denoiser: a :class:`~.environment.DenoiserEnvironment` over
        :class:`~.environment.PromptContexts` with ``prompts`` (what the model takes as
        ``cond``, e.g. prompt embeddings [1, tokens, width]), ``negative`` (its ``uncond``) and
        this selector's latent shape and model family; ``options`` go to ``PromptContexts``
        (``cfgs``, ``img2img_fraction``, ``images``, ``state_conditioning``, ...) except
        ``reference``, ``start_grid`` and ``schedule``, which go to the environment.
        """
        if isinstance(self.model, AnalyticModel):
            from .environment import AnalyticEnvironment

            return AnalyticEnvironment(models=[self.model])
        if not prompts:
            raise ValueError("prompts: MoERLTrainer needs contexts for this model: pass mdp=selector.environment("
                             "prompts=[...]) (the conditionings the model takes as cond), or an Environment of your own")
        env_options = {k: options.pop(k) for k in ("reference", "start_grid", "schedule") if k in options}
        source = PromptContexts(prompts, negative, self.batch_shape(1)[1:], model_family=self.family, **options)
        return DenoiserEnvironment(self.model, source, **env_options)


class MixtureOfExperts:
    """Pool, router and sampling in one: ``x, info = moe.sample(cond=..., cfg=..., seed=...)``."""

    def __init__(self, diffusion_model: Any, scheduler: Any = None, experts: Sequence[Expert] | None = None,
                 router: Router | None = None, device: str | torch.device = "cpu", store: Any = None) -> None:
        self.selector = AdvancedExpertSelector(diffusion_model, scheduler, device=device, experts=experts,
                                               router=router, store=store)

    def sample(self, cond: Any = 0, cfg: float = 7.0, seed: int = 0, priority: float = 0.5,
               temperature: float = 0.0, denoise: float = 1.0, negative: Any = None,
               latent: Tensor | None = None, batch: int = 1, size: tuple[int, ...] | None = None) -> tuple[Tensor, dict]:
        """Route, run the chosen expert and record it; returns the final latent and info
        (the selection info plus ``nfe``, ``seconds`` and ``expert``). ``cond``: the analytic
        prompt index or the conditioning tensor [B, tokens, width]; ``latent``: img2img start
        (its noise is added here) or None for text-to-image of the model's latent shape, with
        the spatial ``size`` (height, width) when given (channels still from the model)."""
        sel = self.selector
        analytic = isinstance(sel.model, AnalyticModel)
        if analytic:
            shape = (batch, *sel.model.shape)
        elif latent is not None:
            shape = tuple(latent.shape)
        else:
            shape = sel.batch_shape(batch)
            if size is not None:
                shape = (*shape[:2], *(int(v) for v in size))
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


class MoERLTrainer(_CoreTrainer):
    """The original API's trainer: ``MoERLTrainer(mdp, reward_func, selector, state_dim=64)``.

    The core :class:`~.trainer.MoERLTrainer` on the selector's router and pool. ``mdp`` is an
    :class:`~.environment.Environment` (None: ``selector.environment()``, which needs no
    arguments for an analytic model); ``reward_func(outcome, priority) -> float`` replaces the
    reported reward (None keeps ``quality - lambda(priority) * cost``; the scorer still learns
    quality and cost, so the priority slider keeps working). ``options`` go to the core
    trainer (``mode``, ``seed``, ``checkpoint_path``, ...).
    """

    def __init__(self, mdp: Any = None, reward_func: Callable[[Outcome, float], float] | None = None,
                 selector: AdvancedExpertSelector | None = None, state_dim: int = STATE_DIM, **options: Any) -> None:
        if not hasattr(selector, "select_expert_moe"):
            raise TypeError(f"selector: expected an AdvancedExpertSelector, got {type(selector).__name__}")
        if state_dim != STATE_DIM:
            raise ValueError(f"state_dim must be {STATE_DIM} (router.features.STATE_DIM), got {state_dim}")
        super().__init__(mdp if mdp is not None else selector.environment(), selector.router, selector.experts,
                         **options)
        self.reward_func = reward_func
        self.selector = selector

    def reward(self, outcome: Outcome, priority: float) -> float:
        if self.reward_func is not None:
            return float(self.reward_func(outcome, priority))
        return super().reward(outcome, priority)

    def train_moe(self, num_episodes: int = 1000) -> TrainingResult:
        """Train ``num_episodes`` more episodes."""
        return self.train(self.episode + num_episodes)
