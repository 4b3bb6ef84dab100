"""Training and benchmark contexts on the analytic model, where the exact answer is known.

:class:`AnalyticEnvironment` implements the trainer's ``Environment`` protocol on
:class:`~moe_sampler.experts.analytic.AnalyticModel`: it draws contexts that vary the way real
use varies (prompt difficulty, data scale, anisotropy, latent size, guidance 1 to 12, img2img
denoise strength, noise seed; see :class:`Conditions`), runs a Dormand-Prince reference once
per context (and start sigma) from the same noise as the experts, and scores each expert by
its relative error to that reference. Outcomes are cached in memory only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..experts.analytic import AnalyticModel, quality_from_error, random_prompts
from ..experts.base import Expert
from .features import state_from_analytic

logger = logging.getLogger(__name__)

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Conditions:
    """How varied the generation contexts are.

    Args:
        shapes: latent shapes, cycled over the analytic models.
        cfg_one_share: share of contexts at cfg 1 (no guidance); the rest log-uniform in
            ``[1.5, cfg_max]``.
        img2img_fraction: share of contexts with denoise < 1, uniform in ``denoise_range``.
        scale_range: each prompt's data scale is multiplied by a log-uniform factor in this range.
    """

    shapes: tuple[tuple[int, ...], ...] = ((64,), (4, 16, 16))
    cfg_max: float = 12.0
    cfg_one_share: float = 0.15
    img2img_fraction: float = 0.2
    denoise_range: tuple[float, float] = (0.3, 0.9)
    scale_range: tuple[float, float] = (1.0, 1.0)


# The first conditions: two latent sizes, guidance 1-12, one context in five img2img.
STANDARD_CONDITIONS = Conditions()
# More of what varies in real use: a third, non-square latent, a wider data scale, and the
# hires-fix/refiner/inpaint passes of real workflows (one in three, denoise down to 0.15).
VARIED_CONDITIONS = Conditions(shapes=((64,), (4, 16, 16), (4, 8, 12)), img2img_fraction=0.3,
                               denoise_range=(0.15, 0.9), scale_range=(0.5, 2.0))


@dataclass(frozen=True)
class Outcome:
    """One expert's run on one context: relative error to the reference, quality score in
    [0, 1] (``quality_from_error``), model calls, seconds, and success (finite, finished)."""

    expert: str
    relative_error: float
    quality: float
    nfe: int
    seconds: float
    success: bool


@dataclass(frozen=True)
class AnalyticContext:
    """One generation on the analytic model: which model and prompt, guidance, noise seed,
    batch and img2img denoise strength (1.0 = text-to-image)."""

    model_index: int
    cond: int
    cfg: float
    seed: int
    batch: int = 1
    denoise: float = 1.0


class AnalyticEnvironment:
    """Contexts on a family of analytic models; train and held-out splits share nothing.

    Args:
        split: ``"train"`` or ``"heldout"``: different prompt seeds (so different knob values),
            different noise seeds and guidance values.
        seed: base seed of the split.
        n_models: analytic models (each with ``prompts_per_model`` prompts); their latent
            shapes cycle through ``shapes``.
        pool_size: when set, contexts are drawn from a fixed list of this many contexts (a
            finite training set); otherwise each draw is fresh.
        conditions: :class:`Conditions` (``VARIED_CONDITIONS`` by default).
        rtol: relative tolerance of the reference solve (1e-6 gives ~1e-6 relative error,
            far below the 1e-3 where the quality score saturates).
        models: use these analytic models instead of building ``n_models`` (e.g. the user's own).
    """

    def __init__(self, split: str = "train", seed: int = 0, n_models: int = 8, prompts_per_model: int = 2,
                 conditions: Conditions | None = None, pool_size: int | None = None, rtol: float = 1e-6,
                 reference_cache: int = 512, models: Sequence[AnalyticModel] | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split, self.seed, self.rtol = split, seed, rtol
        self.conditions = conditions = conditions if conditions is not None else VARIED_CONDITIONS
        split_seed = 1_000_003 * seed + 7_919 * (1 + SPLITS.index(split))
        scale_rng = random.Random(split_seed + 1)
        low, high = (math.log(v) for v in conditions.scale_range)
        prompts = [dataclasses.replace(p, scale=p.scale * math.exp(scale_rng.uniform(low, high)))
                   for p in random_prompts(n_models * prompts_per_model, split_seed)]
        shapes = conditions.shapes
        self.models = list(models) if models else [
            AnalyticModel(prompts[i * prompts_per_model:(i + 1) * prompts_per_model], shape=shapes[i % len(shapes)],
                          background_seed=split_seed + i)
            for i in range(n_models)
        ]
        self.contexts = self.draw_contexts(pool_size, random.Random(split_seed)) if pool_size else None
        self._outcomes: dict[tuple, Outcome] = {}
        self._references: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()
        self._reference_cache = reference_cache

    def draw_contexts(self, n: int, rng: random.Random) -> list[AnalyticContext]:
        """``n`` fresh contexts drawn with ``rng``."""
        return [self._draw(rng) for _ in range(n)]

    def _draw(self, rng: random.Random) -> AnalyticContext:
        c = self.conditions
        log_cfg = rng.uniform(math.log(1.5), math.log(c.cfg_max))
        cfg = 1.0 if rng.random() < c.cfg_one_share else round(math.exp(log_cfg), 2)
        denoise = round(rng.uniform(*c.denoise_range), 2) if rng.random() < c.img2img_fraction else 1.0
        model_index = rng.randrange(len(self.models))
        return AnalyticContext(model_index=model_index, cond=rng.randrange(len(self.models[model_index].prompts)),
                               cfg=cfg, seed=rng.randrange(1 << 31), denoise=denoise)

    def sample_context(self, rng: random.Random) -> AnalyticContext:
        """A context from the fixed list (``pool_size``) or a fresh one, drawn with ``rng`` only."""
        return rng.choice(self.contexts) if self.contexts is not None else self._draw(rng)

    def state(self, context: AnalyticContext, priority: float) -> Tensor:
        """The context's state [64] for a given priority."""
        model = self.models[context.model_index]
        return state_from_analytic(model, context.cond, context.cfg, context.batch, priority,
                                   denoise=context.denoise, source="training")

    def start(self, context: AnalyticContext, sigma_start: float) -> tuple[Tensor, Tensor]:
        """The starting latent [B, *shape] float32 at ``sigma_start`` and its reference
        solution (float64). Text-to-image starts from pure noise; img2img from a data sample
        of the prompt plus noise, as ComfyUI does."""
        key = (context, round(sigma_start, 6))
        if key in self._references:
            self._references.move_to_end(key)
            return self._references[key]
        model = self.models[context.model_index]
        x = model.initial_noise(context.batch, context.seed, sigma_start, dtype=torch.float64)
        if context.denoise < 1.0:
            g = torch.Generator().manual_seed(context.seed + 1)
            x0 = model.cond_mixtures[context.cond].sample(context.batch, g).reshape(x.shape)
            x = x0 + x
        x = x.float()
        reference = model.reference(x, sigma_start, cond=context.cond, cfg=context.cfg, rtol=self.rtol)
        self._references[key] = (x, reference)
        if len(self._references) > self._reference_cache:
            self._references.popitem(last=False)
        return x, reference

    def evaluate(self, context: AnalyticContext, experts: Sequence[Expert]) -> list[Outcome]:
        """Run each expert from the context's noise and score it against the reference."""
        return [self._evaluate_one(context, expert) for expert in experts]

    def _evaluate_one(self, context: AnalyticContext, expert: Expert) -> Outcome:
        key = (context, expert.name, expert.descriptor)
        if key in self._outcomes:
            return self._outcomes[key]
        model = self.models[context.model_index]
        sigmas = expert.sigmas(model.schedule(), context.denoise)
        x, reference = self.start(context, float(sigmas[0]))
        extra_args = {"cond": context.cond, "cfg": context.cfg, "seed": context.seed}
        try:
            result, run = expert.run(model, x.clone(), sigmas, extra_args=extra_args)
        except (RuntimeError, ValueError, ArithmeticError) as exc:
            logger.warning("expert %s failed on %s: %s", expert.name, context, exc)
            outcome = Outcome(expert.name, math.inf, 0.0, expert.descriptor.max_nfe, 0.0, False)
        else:
            if run.finite:
                error = model.relative_error(result, reference, cond=context.cond)
                outcome = Outcome(expert.name, float(error.mean()), float(quality_from_error(error).mean()),
                                  run.nfe, run.seconds, True)
            else:
                outcome = Outcome(expert.name, math.inf, 0.0, run.nfe, run.seconds, False)
        self._outcomes[key] = outcome
        return outcome
