"""Router training on the workflow's own model: the trainer's ``Environment`` for ComfyUI.

A **context** is one generation the user cares about: a prompt of the list, a size, a cfg
value and a noise seed. For each context :class:`ComfyEnvironment` runs, once, a
high-accuracy **reference** through ComfyUI's own sampling path (the bridge, so model
patches, LoRA and ControlNet apply as in real use): an adaptive Dormand-Prince 5(4) solve of the
probability-flow ODE (:func:`~moe_sampler.experts.reference.reference_expert`, rtol 1e-5; a
different family from every expert it grades) from the same noise the experts get, with at most
``CALLS_PER_STEP * reference_steps`` model calls (400 for the default 100; a context that needs
more ends with a coarser reference, logged and counted in ``reference_notes``). Each expert then runs
from that noise and is scored by its relative latent error,

    relative_error = rms(x - x_ref) / rms(x_ref),   quality = clip(-log10(error) / 3, 0, 1)

(the analytic yardstick's documented quality map: 10% error scores 0.33, 1% scores 0.67,
0.1% or less scores 1). Deterministic experts converge to the reference, so their error is
their discretisation error; ancestral experts land elsewhere and score low, as they should
against a fidelity target.

Prompts are encoded once with the workflow's CLIP, the way core's CLIPTextEncode does.
References and outcomes are cached per context (a repeated context costs nothing), and each
fresh expert run can be reported to ``on_run`` (the training node records it in the stats
store). ComfyUI is imported inside functions only; the input parsers here are pure Python.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..router.environment import DenoiserEnvironment, RunReport, Sampled

logger = logging.getLogger(__name__)

REFERENCE_STEPS = 100  # the trainer's reference_steps: the reference may use 4x this many model calls
# Limits of the trainer's inputs (docs/NODES.md, "Limits"). CLIP reads 77 tokens per chunk
# (about 300 characters); a prompt of 2,000 characters is already 6-7 chunks.
MAX_PROMPTS = 1000
MAX_PROMPT_CHARS = 2000  # per prompt, and for negative_prompt
MAX_PROMPTS_TEXT_CHARS = 100_000  # the whole prompts input
MAX_LIST_TEXT_CHARS = 10_000  # sizes and cfg_values
# Training runs a reference solve and every expert per context: sizes are capped far below
# what sampling alone allows (16384), and checked against the device's memory at the start.
MAX_TRAINING_SIDE = 2048
MAX_TRAINING_PIXELS = 1536 * 1536
MAX_CFG = 100.0
_SIZE = re.compile(r"^(\d{1,6})\s*[x×X*]\s*(\d{1,6})$")
_SEPARATORS = re.compile(r"[,;\n]+")


class TrainingInputError(ValueError):
    """A training input the node cannot use; the message starts with the input's name."""


# ------------------------------------------------------------------------------------ parsing


def parse_prompts(text: Any, input_name: str = "prompts") -> list[str]:
    """One prompt per non-empty line, surrounding spaces removed, duplicates dropped (first kept).

    At most :data:`MAX_PROMPTS` prompts of :data:`MAX_PROMPT_CHARS` characters each, and
    :data:`MAX_PROMPTS_TEXT_CHARS` characters in all (checked before the text is split).
    """
    if not isinstance(text, str):
        raise TrainingInputError(f"{input_name}: expected text with one prompt per line, got {type(text).__name__}")
    if len(text) > MAX_PROMPTS_TEXT_CHARS:
        raise TrainingInputError(f"{input_name}: {len(text)} characters; at most {MAX_PROMPTS_TEXT_CHARS} in all "
                                 f"({MAX_PROMPTS} prompts of up to {MAX_PROMPT_CHARS} characters)")
    prompts = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if not prompts:
        raise TrainingInputError(f"{input_name}: enter at least one prompt, one per line")
    if len(prompts) > MAX_PROMPTS:
        raise TrainingInputError(f"{input_name}: {len(prompts)} prompts; at most {MAX_PROMPTS} per training run")
    for number, prompt in enumerate(prompts, 1):
        _check_prompt_length(prompt, f"{input_name}: prompt {number}")
    return prompts


def parse_negative_prompt(text: Any, input_name: str = "negative_prompt") -> str:
    """The negative prompt as given (may be empty), at most :data:`MAX_PROMPT_CHARS` characters."""
    if not isinstance(text, str):
        raise TrainingInputError(f"{input_name}: expected text, got {type(text).__name__}")
    _check_prompt_length(text, f"{input_name}: the negative prompt")
    return text


def _check_prompt_length(prompt: str, what: str) -> None:
    if len(prompt) > MAX_PROMPT_CHARS:
        raise TrainingInputError(
            f"{what} has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} per prompt (CLIP reads "
            f"77 tokens, about 300 characters, per chunk; longer prompts only cost encoding time)"
        )


def _items(text: Any, input_name: str, example: str) -> list[str]:
    if not isinstance(text, str):
        raise TrainingInputError(f"{input_name}: expected a comma-separated list like {example!r}, got {type(text).__name__}")
    if len(text) > MAX_LIST_TEXT_CHARS:
        raise TrainingInputError(f"{input_name}: {len(text)} characters; at most {MAX_LIST_TEXT_CHARS}")
    items = [item.strip() for item in _SEPARATORS.split(text) if item.strip()]
    if not items:
        raise TrainingInputError(f"{input_name}: enter at least one value, comma-separated, e.g. {example!r}")
    return items


def parse_sizes(text: Any, input_name: str = "sizes") -> list[tuple[int, int]]:
    """``"512x512, 512x768"`` -> ``[(512, 512), (512, 768)]`` as (width, height).

    Each size is WIDTHxHEIGHT in pixels, both multiples of 8 (the latent is 8x smaller) from 16
    to :data:`MAX_TRAINING_SIDE` (2048), at most :data:`MAX_TRAINING_PIXELS` (1536 x 1536) pixels,
    separated by commas, semicolons or new lines; duplicates are dropped. Whether the model fits
    in memory at these sizes is checked when training starts (:func:`check_sizes_fit`).
    """
    sizes = []
    for item in _items(text, input_name, "512x512, 512x768"):
        match = _SIZE.match(item)
        if not match:
            raise TrainingInputError(f"{input_name}: {item!r} is not WIDTHxHEIGHT (e.g. '512x768')")
        width, height = int(match.group(1)), int(match.group(2))
        for value, what in ((width, "width"), (height, "height")):
            if not (16 <= value <= MAX_TRAINING_SIDE) or value % 8:
                raise TrainingInputError(
                    f"{input_name}: {item!r} has {what} {value}; use multiples of 8 from 16 to {MAX_TRAINING_SIDE} "
                    f"for training"
                )
        if width * height > MAX_TRAINING_PIXELS:
            raise TrainingInputError(
                f"{input_name}: {item!r} has {width * height} pixels; training sizes have at most "
                f"{MAX_TRAINING_PIXELS} (1536x1536): each training context runs a reference solve "
                f"(up to {4 * REFERENCE_STEPS} model calls) and every expert"
            )
        sizes.append((width, height))
    return list(dict.fromkeys(sizes))


def parse_cfgs(text: Any, input_name: str = "cfg_values") -> list[float]:
    """``"4, 7.5"`` -> ``[4.0, 7.5]``: finite numbers in (0, 100], duplicates dropped."""
    values = []
    for item in _items(text, input_name, "4, 7.5"):
        try:
            value = float(item)
        except ValueError:
            raise TrainingInputError(f"{input_name}: {item!r} is not a number (e.g. '4, 7.5')") from None
        if not (math.isfinite(value) and 0.0 < value <= MAX_CFG):
            raise TrainingInputError(f"{input_name}: {item!r} is out of range; cfg values must be in (0, {MAX_CFG:g}]")
        values.append(value)
    return list(dict.fromkeys(values))


def check_sizes_fit(model: Any, sizes: Sequence[tuple[int, int]], input_name: str = "sizes") -> None:
    """Refuse training sizes whose sampling would not fit in the model's device memory.

    The need is ComfyUI's own estimate for the model (``memory_required`` of a batch-1 latent,
    the least sampling can do); what there is: the free RAM on a CPU (where running out kills
    the server), the device's total memory on a GPU (ComfyUI unloads and offloads to make room).
    """
    import comfy.model_management as mm

    base = getattr(model, "model", None)
    if not callable(getattr(base, "memory_required", None)):
        return  # not a ComfyUI model with an estimate: the static caps of parse_sizes apply
    device = getattr(model, "load_device", None) or mm.get_torch_device()
    on_cpu = getattr(device, "type", str(device)) == "cpu"
    available = mm.get_free_memory(device) if on_cpu else mm.get_total_memory(device)
    for width, height in sizes:
        needed = base.memory_required(list(empty_latent(model, width, height)["samples"].shape))
        if needed > available:
            where = "free RAM" if on_cpu else "memory on " + str(device)
            raise TrainingInputError(
                f"{input_name}: {width}x{height} needs about {needed / 2**30:.1f} GB to sample with this model "
                f"(ComfyUI's estimate) and there is {available / 2**30:.1f} GB of {where}; train at smaller sizes"
            )


MODES = {"full sweep": "sweep", "bandit": "bandit"}


@dataclass(frozen=True)
class TrainingPlan:
    """The trainer node's inputs, parsed and checked; every error names the input at fault."""

    prompts: tuple[str, ...]
    negative: str
    sizes: tuple[tuple[int, int], ...]
    cfgs: tuple[float, ...]
    priority: float
    episodes: int
    seeds_per_prompt: int
    mode: str  # the trainer's mode: "sweep" or "bandit"
    router_name: str  # file name, ".safetensors" included
    resume: bool

    @classmethod
    def from_inputs(cls, prompts: Any, negative_prompt: Any, sizes: Any, cfg_values: Any, priority: Any,
                    episodes: Any, seeds_per_prompt: Any, mode: Any, router_name: Any, resume: Any) -> "TrainingPlan":
        from .paths import check_save_name

        if mode not in MODES:
            raise TrainingInputError(f"mode: must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
        for name, value in (("episodes", episodes), ("seeds_per_prompt", seeds_per_prompt)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrainingInputError(f"{name}: must be a whole number >= 1, got {value!r}")
        if isinstance(priority, bool) or not isinstance(priority, (int, float)) or not (0.0 <= priority <= 1.0):
            raise TrainingInputError(f"priority: must be a number in [0, 1] (0 = speed, 1 = quality), got {priority!r}")
        return cls(tuple(parse_prompts(prompts)), parse_negative_prompt(negative_prompt), tuple(parse_sizes(sizes)),
                   tuple(parse_cfgs(cfg_values)), float(priority), episodes, seeds_per_prompt, MODES[mode],
                   check_save_name(router_name, "router_name"), bool(resume))


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values, skipping non-finite ones (NaN while none is finite)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out = []
    for i in range(len(values)):
        recent = [v for v in values[max(0, i + 1 - window):i + 1] if math.isfinite(v)]
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return out


# ------------------------------------------------------------------------------------ latents

# Spatial downscale of latent formats whose VAE is not 8x (ComfyUI v0.8.0's empty-latent nodes);
# a latent_format with ``spacial_downscale_ratio`` (newer ComfyUI) says it itself.
_DOWNSCALE = {"Flux2": 16, "HunyuanImage21": 32, "HunyuanVideo15": 16, "LTXV": 32, "LTXAV": 32, "Wan22": 16}


def latent_layout(model: Any) -> tuple[int, int, int]:
    """``(channels, spatial dimensions, downscale)`` of a ComfyUI MODEL's latent, from its
    ``latent_format`` (``latent_channels``, ``latent_dimensions``, and the pixel-to-latent
    factor); SD1.5's ``(4, 2, 8)`` for an object without one."""
    getter = getattr(model, "get_model_object", None)
    latent_format = getter("latent_format") if callable(getter) else None
    if latent_format is None:
        return 4, 2, 8
    downscale = getattr(latent_format, "spacial_downscale_ratio", None)
    if not isinstance(downscale, int):
        downscale = next((v for name, v in _DOWNSCALE.items()
                          if type(latent_format).__name__ == name), 8)
    return int(latent_format.latent_channels), int(getattr(latent_format, "latent_dimensions", 2)), downscale


def sampled_latent_shape(model: Any, samples: Any) -> tuple[int, ...]:
    """The shape of the latent the model actually samples, as ComfyUI's
    ``comfy.sample.fix_empty_latent_channels`` makes it: an all-zero (empty) latent with another
    channel count gets the model's; a 4-D latent of a video model gets a time axis of 1.

    The one source of the latent shape in the router's state: the sampler node and the
    training environment both call it, so a router trained in a workflow sees the same state
    at generation time (a 16-channel SD3/Flux latent, an SD1.5 empty latent on Flux, ...).
    """
    import torch

    shape = tuple(int(s) for s in samples.shape)
    channels, dimensions, _ = latent_layout(model)
    if len(shape) >= 2 and shape[1] != channels and not torch.count_nonzero(samples):
        shape = (shape[0], channels, *shape[2:])
    if dimensions == 3 and len(shape) == 4:
        shape = (shape[0], shape[1], 1, *shape[2:])
    return shape


def empty_latent(model: Any, width: int, height: int, batch: int = 1) -> dict:
    """An empty LATENT for ``width`` x ``height`` pixels with the model's channels and spatial
    factor (what the model's own empty-latent node makes; on the CPU, like core's)."""
    import torch

    channels, _, downscale = latent_layout(model)
    return {"samples": torch.zeros([batch, channels, height // downscale, width // downscale])}


# ------------------------------------------------------------------------------------ contexts


@dataclass(frozen=True)
class ComfyContext:
    """One training generation: prompt index, latent size in pixels, cfg and noise seed
    (text-to-image: ``denoise`` is 1)."""

    prompt: int
    width: int
    height: int
    cfg: float
    seed: int

    denoise = 1.0


def training_contexts(n_prompts: int, sizes: Sequence[tuple[int, int]], cfgs: Sequence[float],
                      seeds_per_prompt: int) -> list[ComfyContext]:
    """Every combination of prompt, size, cfg and seed (seeds ``0 .. seeds_per_prompt - 1``)."""
    if seeds_per_prompt < 1:
        raise TrainingInputError(f"seeds_per_prompt: must be >= 1, got {seeds_per_prompt}")
    return [ComfyContext(p, w, h, c, s) for p in range(n_prompts) for (w, h) in sizes for c in cfgs
            for s in range(seeds_per_prompt)]


def relative_error(x: Any, reference: Any) -> float:
    """``rms(x - reference) / rms(reference)`` over the whole latent (inf for non-finite x)."""
    import torch

    x, reference = x.double(), reference.double()
    if not torch.isfinite(x).all():
        return math.inf
    scale = float(reference.square().mean().sqrt())
    return float((x - reference).square().mean().sqrt()) / max(scale, 1e-12)


def quality_from_relative_error(error: float) -> float:
    """The pack's one quality map (:func:`~moe_sampler.experts.analytic.quality_from_error`,
    ``clip(-log10(error) / 3, 0, 1)``) as a float; 0 for a failed (non-finite) run."""
    from ..experts.analytic import quality_from_error

    return float(quality_from_error(error)) if math.isfinite(error) else 0.0


def reference_expert(reference_steps: int = REFERENCE_STEPS, notes: list | None = None) -> Any:
    """The reference the trainer and the sampler's audits score experts against: Dormand-Prince
    5(4) at rtol 1e-5 (:func:`moe_sampler.experts.reference.reference_expert`), run through the
    bridge like an expert, with at most ``CALLS_PER_STEP * reference_steps`` model calls (its
    start: the first sigma of a ``reference_steps``-step Karras schedule, as ComfyUI truncates
    it for img2img). On the analytic yardstick it takes about 90 calls per text-to-image
    reference and is at least 10x below the best expert's error (docs/ROUTER.md)."""
    from ..experts.reference import CALLS_PER_STEP
    from ..experts.reference import reference_expert as dormand_prince_expert

    if reference_steps < 1:
        raise TrainingInputError(f"reference_steps: must be >= 1, got {reference_steps}")
    return dormand_prince_expert(CALLS_PER_STEP * reference_steps, steps=reference_steps, notes=notes)


ExpertRunReport = RunReport  # what on_run receives (the router environment's report)


class ComfyEnvironment(DenoiserEnvironment):
    """The trainer's ``Environment`` on a ComfyUI MODEL and CLIP (see the module docstring).

    The router's :class:`~moe_sampler.router.environment.DenoiserEnvironment` core (outcome
    cache, failures, quality, run reports) with ComfyUI's sampling path: the reference and
    every expert run through the bridge from the context's seed.

    Args:
        model: ComfyUI ``MODEL`` (a ModelPatcher); never modified.
        clip: ComfyUI ``CLIP`` used to encode ``prompts`` and ``negative``.
        prompts, negative: prompt texts; the negative prompt is shared by all contexts.
        contexts: the finite set of contexts to draw from (:func:`training_contexts`).
        reference_steps: the reference's budget: at most ``CALLS_PER_STEP * reference_steps``
            model calls per reference (:func:`reference_expert`).
        on_run: called with a ``RunReport`` after every fresh expert run.
        priority: the priority the reported runs' states are computed at (the node's).

    ComfyUI's interrupt (checked at every sampling step by the bridge) propagates out of
    :meth:`evaluate` untouched; nothing is cached for the run it stopped.
    """

    def __init__(self, model: Any, clip: Any, prompts: Sequence[str], negative: str,
                 contexts: Sequence[ComfyContext], reference_steps: int = REFERENCE_STEPS,
                 on_run: Callable[[Any], None] | None = None, priority: float = 0.5) -> None:
        from . import comfy_experts

        if not contexts:
            raise TrainingInputError("prompts: no training contexts (no prompt, size or cfg value)")
        super().__init__(model, None, on_run=on_run, report_priority=priority)
        self.source = self
        self.clip = clip
        self.prompts, self.negative = list(prompts), negative
        self.contexts = list(contexts)
        self.reference_steps = reference_steps
        self.reference_notes: list[dict] = []  # per reference: calls, steps, sigma reached, capped
        self.family = comfy_experts.model_family(model)
        self._conditioning: dict[int | None, Any] = {}
        self._comfy_references: dict[ComfyContext, Any] = {}

    # -- conditioning and latents

    def conditioning(self, prompt: int | None) -> Any:
        """CONDITIONING of a prompt index (None: the negative prompt), encoded once."""
        import torch

        if prompt not in self._conditioning:
            text = self.negative if prompt is None else self.prompts[prompt]
            with torch.inference_mode():
                self._conditioning[prompt] = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))
        return self._conditioning[prompt]

    def latent(self, context: ComfyContext) -> dict:
        """The empty LATENT of the context's size for this model (:func:`empty_latent`, batch 1)."""
        return empty_latent(self.model, context.width, context.height)

    def latent_shape(self, context: ComfyContext) -> tuple[int, ...]:
        """The latent shape the model samples for a context (:func:`sampled_latent_shape`)."""
        return sampled_latent_shape(self.model, self.latent(context)["samples"])

    # -- the Environment protocol

    def sample_context(self, rng: random.Random) -> ComfyContext:
        """One of the finite contexts, drawn with ``rng`` only."""
        return rng.choice(self.contexts)

    def state(self, context: ComfyContext, priority: float) -> Any:
        """The context's router state [64] for ``priority`` (source "training"); the latent
        shape is the one the sampler node's state uses for the same generation."""
        from ..router.features import state_from_conditioning

        return state_from_conditioning(self.conditioning(context.prompt), self.conditioning(None),
                                       self.latent_shape(context), context.cfg, 1.0, self.family, priority,
                                       source="training")

    # -- runs

    def _sample(self, context: ComfyContext, expert: Any, attempts: list | None = None) -> tuple[Any, Any]:
        import torch

        from . import bridge

        # Sampling needs no autograd even while the router trains. No previews or per-run
        # progress (the node shows per-episode progress); no fallback: a failing expert must
        # score as a failure, not as BalancedMaster's result.
        with torch.inference_mode():
            return bridge.sample_with_expert(
                self.model, expert, self.conditioning(context.prompt), self.conditioning(None),
                self.latent(context), seed=context.seed, cfg=context.cfg, denoise=1.0, preview=False,
                disable_pbar=True, fallback=None, attempts=attempts,
            )

    def reference_expert(self) -> Any:
        """The reference solver (:func:`reference_expert` with this environment's
        ``reference_steps``; each run's calls and whether it hit the cap go to ``reference_notes``)."""
        return reference_expert(self.reference_steps, self.reference_notes)

    def reference(self, context: ComfyContext) -> Any:
        """The reference latent of a context (computed once)."""
        if context not in self._comfy_references:
            latent, report = self._sample(context, self.reference_expert())
            self.calls["reference"] += report.nfe
            self._comfy_references[context] = latent["samples"].detach().float().cpu()
        return self._comfy_references[context]

    def prepare(self, context: ComfyContext, expert: Any) -> tuple[None, None, Any]:
        return None, None, self.reference(context)

    def sample(self, context: ComfyContext, expert: Any, x: Any, sigmas: Any) -> Any:
        start = time.perf_counter()
        attempts: list = []
        try:
            latent, report = self._sample(context, expert, attempts)
        except (RuntimeError, ValueError, ArithmeticError) as exc:  # ComfyUI's interrupt is none of these
            logger.warning("MoE training: expert %s failed on %s: %s", expert.name, context, exc)
            last = attempts[-1] if attempts else None
            return Sampled(None, last.nfe if last else 0, last.steps if last else 0,
                           last.seconds if last else time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
        samples = latent["samples"].detach().float().cpu()
        if not math.isfinite(relative_error(samples, samples)):
            return Sampled(None, report.nfe, report.steps, report.seconds, "non-finite output")
        estimate = attempts[-1].estimate_inputs if attempts and attempts[-1].success else None
        return Sampled(samples, report.nfe, report.steps, report.seconds, estimate=estimate)

    def relative_error(self, context: ComfyContext, x: Any, reference: Any) -> Any:
        """Relative error over the whole latent, as a [1] tensor."""
        import torch

        return torch.tensor([relative_error(x, reference)], dtype=torch.float64)
