"""A diffusers ``UNet2DConditionModel`` as the :class:`~.base.Denoiser` of the expert contract.

The wrapping is Karras et al. (2022, arXiv 2206.00364, Table 1, "VP" column) for a discrete-time
model, as k-diffusion's ``DiscreteEpsDDPMDenoiser``/``DiscreteVDDPMDenoiser`` and ComfyUI's
``ModelSamplingDiscrete`` do it: with ``sigma_t = sqrt((1 - alphā_t) / alphā_t)``,

    c_in = 1 / sqrt(sigma^2 + 1),  t = sigma_to_timestep(sigma)  (log-sigma interpolation)
    eps: D(x, sigma) = x - sigma * eps(c_in x, t)
    v:   D(x, sigma) = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v(c_in x, t)

Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598) runs cond and uncond as one
batched UNet call: ``D = D_u + cfg * (D_c - D_u)``. diffusers is imported lazily, so importing
``moe_sampler.experts`` never needs it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import Tensor

from .base import ModelSchedule

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def alphas_cumprod_from(scheduler: Any) -> tuple[Tensor, str]:
    """``(alphas_cumprod [T], prediction_type)`` of a diffusers scheduler object or its config.

    A config (dict or ``FrozenDict`` with ``beta_start``/``beta_end``/``beta_schedule``/
    ``trained_betas``/``num_train_timesteps``) is turned into betas by diffusers' own
    ``DDPMScheduler``, so every beta schedule it knows is supported.
    """
    table = getattr(scheduler, "alphas_cumprod", None)
    if isinstance(table, Tensor):
        return table, str(scheduler.config.get("prediction_type", "epsilon"))
    if not isinstance(scheduler, Mapping):
        raise TypeError(
            f"scheduler must be a diffusers scheduler or its config mapping, got {type(scheduler).__name__}"
        )
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler.from_config(dict(scheduler))
    return ddpm.alphas_cumprod, str(ddpm.config.prediction_type)


class DiffusersDenoiser:
    """``denoiser(x, sigma, cond=None, uncond=None, cfg=1.0, **extra_args) -> denoised``.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (any dtype/device; inputs are cast to it and
            the prediction back to ``x``'s dtype).
        scheduler: a diffusers scheduler, or its config mapping; gives ``alphas_cumprod`` and the
            prediction type. Ignored where ``alphas_cumprod`` is given.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``; overrides the scheduler's.
        alphas_cumprod: the discrete table ``alphā_t``, shape [T], instead of a scheduler.
        round_timesteps: call the UNet at the nearest integer timestep, as diffusers'
            ``DPMSolverMultistepScheduler`` does for Karras sigmas; default off (fractional
            timesteps, as k-diffusion and ComfyUI).

    Call arguments: ``x`` [B, C, H, W]; ``sigma`` [B] (or a scalar); ``cond`` the
    ``encoder_hidden_states`` [B or 1, seq, dim]; ``uncond`` the negative ones (same shape), used
    when ``cfg != 1``. Other extra_args (``seed``, ``model_options``) are ignored.
    """

    def __init__(
        self,
        unet: "UNet2DConditionModel",
        scheduler: Any = None,
        *,
        prediction_type: str | None = None,
        alphas_cumprod: Tensor | None = None,
        round_timesteps: bool = False,
    ) -> None:
        config_prediction = "epsilon"
        if alphas_cumprod is None:
            if scheduler is None:
                raise ValueError("DiffusersDenoiser needs a scheduler (or its config) or alphas_cumprod")
            alphas_cumprod, config_prediction = alphas_cumprod_from(scheduler)
        self.prediction_type = prediction_type or config_prediction
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        self.unet = unet
        self.round_timesteps = round_timesteps
        alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().double().cpu()
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()

    def schedule(self) -> ModelSchedule:
        """The model's noise levels with its ascending discrete table (float32, shape [T])."""
        return ModelSchedule(float(self.sigmas[0]), float(self.sigmas[-1]), self.sigmas.float())

    def sigma_to_timestep(self, sigma: Tensor) -> Tensor:
        """Fractional timestep of each sigma by linear interpolation in log sigma over the table,
        clamped to [0, T - 1] (k-diffusion ``DiscreteSchedule.sigma_to_t``); float64, shaped like sigma."""
        log_sigma = sigma.detach().double().cpu().clamp_min(1e-10).log()
        dists = log_sigma - self.log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(self.log_sigmas) - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        t = t.round() if self.round_timesteps else t
        return t.view(sigma.shape)

    def __call__(
        self,
        x: Tensor,
        sigma: Tensor,
        cond: Tensor | None = None,
        uncond: Tensor | None = None,
        cfg: float = 1.0,
        **_: Any,
    ) -> Tensor:
        if cond is None:
            raise ValueError("DiffusersDenoiser needs extra_args['cond'] (the encoder_hidden_states)")
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(batch)
        conds = [cond.expand(batch, *cond.shape[1:]) if cond.shape[0] == 1 else cond]
        if uncond is not None and cfg != 1.0:
            conds.insert(0, uncond.expand(batch, *uncond.shape[1:]) if uncond.shape[0] == 1 else uncond)
        copies = len(conds)
        x_in, sigma_in = x.repeat(copies, *[1] * (x.dim() - 1)), sigma.repeat(copies)
        out = self._model_output(x_in, sigma_in, torch.cat(conds))
        denoised = self._denoised(x_in, sigma_in, out)
        if copies == 1:
            return denoised
        d_uncond, d_cond = denoised.chunk(2)
        return d_uncond + cfg * (d_cond - d_uncond)

    def _model_output(self, x: Tensor, sigma: Tensor, context: Tensor) -> Tensor:
        param = next(self.unet.parameters())
        c_in = (sigma**2 + 1).rsqrt().view(-1, *[1] * (x.dim() - 1))
        timestep = self.sigma_to_timestep(sigma).to(param.device, torch.float32)
        out = self.unet(
            (x * c_in).to(param.device, param.dtype),
            timestep,
            encoder_hidden_states=context.to(param.device, param.dtype),
        ).sample
        return out.to(x.device, x.dtype)

    def _denoised(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        sigma = sigma.view(-1, *[1] * (x.dim() - 1))
        if self.prediction_type == "epsilon":
            return x - sigma * out
        if self.prediction_type == "v_prediction":
            return x / (sigma**2 + 1) - out * sigma * (sigma**2 + 1).rsqrt()
        return out
