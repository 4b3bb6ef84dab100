"""A small learned yardstick that ships with the pack: class-conditional digits at 16x16.

Public surface (pure torch + diffusers + safetensors; no ComfyUI, no scikit-learn at run time)::

    from moe_sampler.experts.learned import load_learned_model

    model = load_learned_model(device="cpu")        # -> LearnedModel, float32, eval mode
    model.schedule()                                 # ModelSchedule: SD1.5 levels, sigma in [0.0292, 14.61]
    model.num_classes                                # 10 (digits 0-9)
    model.latent_shape                               # (1, 16, 16)
    x = model.initial_noise(batch, seed)             # [batch, 1, 16, 16] = sigma_max * N(0, I) from seed
    model(x, sigma, cond=labels, cfg=3.0)            # denoised, shaped like x (k-diffusion Denoiser)
    model.data_images(label)                         # [20, 1, 16, 16] real digits of that class in [-1, 1]
    x0, x = model.img2img_start(labels, sigma, seed) # real digits and x0 + sigma * N(0, I)
    ref = model.reference(x, sigma_start, cond=labels, cfg=3.0)   # Dormand-Prince, rtol 1e-5
    model.relative_error(x, ref)                     # per-sample rms(x - ref) / data rms, shape [B]

``cond`` is an int label, a [B] long tensor of labels (mixed labels in one batch are fine), or
None for the unconditional (null-class) prediction; an unknown label raises ``ValueError``.
``cfg`` is classifier-free guidance ``D_u + cfg * (D_c - D_u)``; at ``cfg == 1`` only the
conditional branch runs. Other extra_args (``seed``, ``model_options``) are ignored.

The network is a diffusers ``UNet2DConditionModel`` (~0.27M parameters) trained by
``bench/train_learned.py`` (docs/LEARNED.md) on scikit-learn's 8x8 digits, upsampled bilinearly to
16x16 and scaled to [-1, 1], with DDPM epsilon prediction on Stable Diffusion's ``scaled_linear``
betas (1000 steps). The class is fed as ``encoder_hidden_states``: a learned table of
``CLASS_TOKENS`` tokens per class plus a null class (index ``NULL_CLASS``) for classifier-free
guidance. The discrete-time wrapping is :class:`~.diffusers_adapter.DiffusersDenoiser`'s (Karras et
al. 2022, Table 1, VP column), so this model is exactly what a user's diffusers model looks like
to an expert. Weights: ``experts/data/learned_digits.safetensors`` (float16 storage, cast to
float32 on load); real digits for img2img: ``experts/data/digits16_images.safetensors``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .base import ModelSchedule
from .diffusers_adapter import DiffusersDenoiser
from .schedules import SD_BETA_END, SD_BETA_START, SD_TRAIN_STEPS

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
WEIGHTS_FILE = DATA_DIR / "learned_digits.safetensors"
IMAGES_FILE = DATA_DIR / "digits16_images.safetensors"

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES
CLASS_TOKENS = 4
EMBED_DIM = 64
LATENT_SHAPE = (1, 16, 16)
REFERENCE_RTOL = 1e-5

UNET_CONFIG: Mapping[str, Any] = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": EMBED_DIM,
    "attention_head_dim": 8,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}


def sd_alphas_cumprod() -> Tensor:
    """Stable Diffusion's ``scaled_linear`` alphā_t, float64, shape [1000] (the model's training schedule)."""
    betas = torch.linspace(SD_BETA_START**0.5, SD_BETA_END**0.5, SD_TRAIN_STEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def build_unet(config: Mapping[str, Any] | None = None) -> Any:
    """A fresh ``UNet2DConditionModel`` from :data:`UNET_CONFIG` (or ``config``); random weights."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(dict(config or UNET_CONFIG))


class LearnedModel:
    """The shipped class-conditional digits model as a k-diffusion ``Denoiser``.

    Args:
        unet: the trained ``UNet2DConditionModel`` (eval mode, no grad).
        class_embeddings: the class-token table, shape [NUM_CLASSES + 1, CLASS_TOKENS, EMBED_DIM];
            the last row is the null class.
        images: real digits for img2img starts, [N, 1, 16, 16] in [-1, 1], with ``labels`` [N].
        labels: the class of each image.
    """

    num_classes = NUM_CLASSES
    latent_shape = LATENT_SHAPE

    def __init__(self, unet: Any, class_embeddings: Tensor, images: Tensor, labels: Tensor) -> None:
        expected = (NUM_CLASSES + 1, CLASS_TOKENS, EMBED_DIM)
        if tuple(class_embeddings.shape) != expected:
            raise ValueError(f"class_embeddings must have shape {expected}, got {tuple(class_embeddings.shape)}")
        param = next(unet.parameters())
        self.unet = unet
        self.device = param.device
        self.class_embeddings = class_embeddings.to(param.device, param.dtype)
        self.denoiser = DiffusersDenoiser(unet, alphas_cumprod=sd_alphas_cumprod(), prediction_type="epsilon")
        self.images = images.float().cpu()
        self.labels = labels.long().cpu()
        self._data_rms = float(self.images.square().mean().sqrt())

    def schedule(self) -> ModelSchedule:
        """SD1.5's noise levels (the training schedule): sigma in [0.0292, 14.61], 1000-entry table."""
        return self.denoiser.schedule()

    def labels_of(self, cond: int | Tensor | None, batch: int) -> Tensor:
        """``cond`` as a [batch] long tensor of class indices (None -> the null class)."""
        if cond is None:
            return torch.full((batch,), NULL_CLASS, dtype=torch.long)
        if isinstance(cond, Tensor) and cond.is_floating_point():
            raise ValueError(f"cond must be an integer class label in [0, {NUM_CLASSES}), got a float tensor")
        labels = torch.as_tensor(cond, dtype=torch.long).reshape(-1).cpu()
        if labels.numel() not in (1, batch):
            raise ValueError(f"cond must be one label or {batch} labels (one per sample), got {labels.numel()}")
        if ((labels < 0) | (labels >= NUM_CLASSES)).any():
            bad = sorted({int(v) for v in labels if not 0 <= int(v) < NUM_CLASSES})
            raise ValueError(f"unknown class label(s) {bad} for cond: the learned digits model knows 0-{NUM_CLASSES - 1}")
        return labels.expand(batch)

    def __call__(self, x: Tensor, sigma: Tensor, cond: int | Tensor | None = 0, cfg: float = 1.0,
                 **_: Any) -> Tensor:
        """Denoised prediction ``D(x, sigma)``; x [B, 1, 16, 16], sigma [B] or scalar; result like x."""
        if tuple(x.shape[1:]) != LATENT_SHAPE:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, LATENT_SHAPE))}], got {tuple(x.shape)}")
        labels = self.labels_of(cond, x.shape[0]).to(self.device)
        context = self.class_embeddings[labels]
        uncond = self.class_embeddings[NULL_CLASS:]
        with torch.no_grad():
            return self.denoiser(x, sigma, cond=context, uncond=uncond, cfg=float(cfg))

    def initial_noise(self, batch: int, seed: int, sigma: float | None = None,
                      dtype: torch.dtype = torch.float32) -> Tensor:
        """``sigma * eps``, eps ~ N(0, I) from ``seed`` (sigma defaults to sigma_max); [batch, 1, 16, 16]."""
        sigma = self.schedule().sigma_max if sigma is None else float(sigma)
        g = torch.Generator().manual_seed(int(seed))
        return (torch.randn(batch, *LATENT_SHAPE, generator=g, dtype=torch.float64) * sigma).to(dtype)

    def data_images(self, label: int) -> Tensor:
        """The shipped real digits of class ``label``, [n, 1, 16, 16] float32 in [-1, 1] (n = 20)."""
        self.labels_of(label, 1)
        return self.images[self.labels == int(label)].clone()

    def img2img_start(self, cond: int | Tensor, sigma: float, seed: int, batch: int | None = None,
                      dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """Real digits of the given classes and their noised copies ``x0 + sigma * eps``.

        ``cond`` is one label (with ``batch``, default 1) or [B] labels; the image of each class is
        drawn from the shipped ones with ``seed``, as is ``eps``. Returns ``(x0, x)``, each [B, 1, 16, 16].
        """
        n = batch if batch is not None else torch.as_tensor(cond).numel()
        labels = self.labels_of(cond, n)
        g = torch.Generator().manual_seed(int(seed))
        x0 = torch.empty(n, *LATENT_SHAPE, dtype=torch.float64)
        for i, label in enumerate(labels.tolist()):
            pool = self.images[self.labels == label]
            x0[i] = pool[int(torch.randint(len(pool), (1,), generator=g))]
        eps = torch.randn(n, *LATENT_SHAPE, generator=g, dtype=torch.float64)
        return x0.to(dtype), (x0 + float(sigma) * eps).to(dtype)

    def data_rms(self, cond: int | None = None) -> float:
        """Root mean square of the shipped real digits (of one class, or all), the error scale."""
        if cond is None:
            return self._data_rms
        return float(self.data_images(cond).square().mean().sqrt())

    def reference(self, x_start: Tensor, sigma_start: float, cond: int | Tensor | None = 0, cfg: float = 1.0,
                  method: str = "dopri5", rtol: float = REFERENCE_RTOL, steps: int = 200) -> Tensor:
        """The probability-flow ODE ``dx/dt = x - D(x, e^t)`` solved in ``t = log sigma`` from
        ``sigma_start`` to the model's sigma_min, then ``D`` there (what every expert's last step returns).

        ``method="dopri5"`` (default): adaptive Dormand-Prince 5(4) at ``rtol`` (about 1,100 model
        calls at 1e-5 from sigma_max; 23-37x below the best expert's error, docs/LEARNED.md);
        ``"rk4"``: classical RK4 with ``steps`` steps (``4 * steps + 1`` calls; 200 steps is only
        6-12x below). Returns float32 shaped like ``x_start``.
        """
        from .analytic import _dopri5, _rk4

        b = x_start.shape[0]
        x = x_start.double().clone()
        labels = self.labels_of(cond, b)
        sigma_min = self.schedule().sigma_min

        def f(x_: Tensor, t: float) -> Tensor:
            sigma = torch.full((b,), math.exp(t), dtype=torch.float64)
            return x_ - self(x_, sigma, cond=labels, cfg=cfg).double()

        t0, t1 = math.log(float(sigma_start)), math.log(sigma_min)
        if method == "dopri5":
            x = _dopri5(f, x, t0, t1, rtol=rtol)
        elif method == "rk4":
            x = _rk4(f, x, t0, t1, steps)
        else:
            raise ValueError(f"method must be 'dopri5' or 'rk4', got {method!r}")
        out = self(x, torch.full((b,), sigma_min, dtype=torch.float64), cond=labels, cfg=cfg)
        return out.float()

    def relative_error(self, x: Tensor, reference: Tensor) -> Tensor:
        """Per-sample ``rms(x - reference) / data_rms()``, float64, shape [B]."""
        diff = (x.double() - reference.double()).reshape(x.shape[0], -1)
        return diff.square().mean(1).sqrt() / self.data_rms()


def save_weights(path: Path | str, unet: Any, class_embeddings: Tensor, metadata: Mapping[str, Any]) -> None:
    """Write the UNet and the class table as float16 ``.safetensors`` with the config in its metadata."""
    from safetensors.torch import save_file

    tensors = {f"unet.{k}": v.detach().half().contiguous() for k, v in unet.state_dict().items()}
    tensors["class_embeddings"] = class_embeddings.detach().half().contiguous()
    meta = {"unet_config": json.dumps(dict(unet.config)), **{k: str(v) for k, v in metadata.items()}}
    save_file(tensors, str(path), metadata=meta)


def save_images(path: Path | str, images: Tensor, labels: Tensor) -> None:
    """Write the img2img digits ([N, 1, 16, 16] in [-1, 1], float16) and their labels [N]."""
    from safetensors.torch import save_file

    save_file({"images": images.half().contiguous(), "labels": labels.to(torch.int64).contiguous()}, str(path))


def load_learned_model(device: str | torch.device = "cpu", weights: Path | str | None = None,
                       images: Path | str | None = None) -> LearnedModel:
    """Load the shipped digits model (float32, eval mode, no grad) with its real digits for img2img."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights = Path(weights or WEIGHTS_FILE)
    images = Path(images or IMAGES_FILE)
    for path in (weights, images):
        if not path.is_file():
            raise FileNotFoundError(f"learned model file {path} is missing; train it with bench/train_learned.py")
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata() or {}
    config = {**UNET_CONFIG, **_config_from(metadata)}
    tensors = load_file(str(weights))
    unet = build_unet(config)
    state = {k[len("unet."):]: v.float() for k, v in tensors.items() if k.startswith("unet.")}
    unet.load_state_dict(state)
    unet = unet.to(device).eval().requires_grad_(False)
    data = load_file(str(images))
    logger.debug("loaded learned digits model from %s (%s)", weights, metadata.get("trained", "?"))
    return LearnedModel(unet, tensors["class_embeddings"].float(), data["images"].float(), data["labels"])


def _config_from(metadata: Mapping[str, str]) -> dict[str, Any]:
    raw = metadata.get("unet_config")
    if not raw:
        return {}
    config = json.loads(raw)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


__all__: Sequence[str] = (
    "LearnedModel", "load_learned_model", "build_unet", "save_weights", "save_images", "UNET_CONFIG",
    "NUM_CLASSES", "NULL_CLASS", "LATENT_SHAPE", "WEIGHTS_FILE", "IMAGES_FILE",
)
