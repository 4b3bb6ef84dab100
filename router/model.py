"""The router: an expert scorer over (state, descriptor) pairs, and save/load as safetensors.

``ExpertScorer`` predicts, for a state [B, 64] and an expert descriptor [B, 16], the expert's
quality in [0, 1] and its cost ``log2(NFE) / 10`` (see :mod:`.policy`). Each prediction is a
descriptor-based prior plus a learned residual whose last layer starts at zero:

- quality: ``sigmoid(a log10(max_nfe) + c (order - 2) - d [stop rule] - e [stochastic] + b
  + residual)``: quality rises with log model calls and solver order; a stop rule may end
  early and a stochastic sampler does not follow the ODE, so both start with less credit;
- cost: ``log2(max_nfe) / 10 * (1 - s [stop rule]) + residual``.

The prior's six numbers (``PRIOR_INIT``) are trained with the rest; their initial values put
the untrained router's pick at BalancedMaster-like experts (about 20 calls of a second-order
solver) for priority 0.5, at the cheapest expert for priority 0 and at a high-order many-call
expert for priority 1.

So an untrained router already ranks experts sensibly, an expert it has never seen is scored
through its descriptor, and a pool may change without retraining. The scorer ignores the
priority and source slots of the state: priority enters only through the utility.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..experts.base import DESCRIPTOR_DIM, ExpertDescriptor
from .features import FEATURE_VERSION, PRIORITY_SLOT, SOURCE_SLOTS, STATE_DIM
from .policy import Selection, choose

logger = logging.getLogger(__name__)

FORMAT = "moe_sampler.router"
# Slots of ExpertDescriptor.to_features() that the priors read (layout in experts/base.py).
LOG_NFE_SLOT = 0  # log2(max_nfe) / 10
ORDER_SLOT = 2  # order / 3
STOCHASTIC_SLOT = 4  # 1 for a stochastic sampler
NO_STOP_RULE_SLOT = 5  # 1 for stop_rule "none"
STOP_LOG_NFE_SLOT = 14  # [stop rule] * log2(max_nfe) / 10
# a (per decade of calls), b (bias), c (per order), d (stop rule), e (stochastic), s (stop cost discount)
PRIOR_INIT = (2.4, -2.2, 0.1, 0.5, 3.0, 0.1)


class RouterLoadError(ValueError):
    """A router file that cannot be used; the message names the file and what to do."""


class ExpertScorer(nn.Module):
    """(state [B, 64], descriptor [B, 16]) -> (quality [B] in [0, 1], cost [B] >= 0)."""

    def __init__(self, hidden: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.hidden = hidden
        self.prior = nn.Parameter(torch.tensor(PRIOR_INIT))
        linear = [nn.utils.skip_init(nn.Linear, i, o) for i, o in  # no init from the global RNG
                  ((STATE_DIM + DESCRIPTOR_DIM, hidden), (hidden, hidden), (hidden, 2))]
        self.net = nn.Sequential(linear[0], nn.SiLU(), linear[1], nn.SiLU(), linear[2])
        g = torch.Generator().manual_seed(seed)  # PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), seeded
        for layer in linear[:2]:
            bound = 1.0 / math.sqrt(layer.in_features)
            with torch.no_grad():
                layer.weight.uniform_(-bound, bound, generator=g)
                layer.bias.uniform_(-bound, bound, generator=g)
        nn.init.zeros_(linear[2].weight)
        nn.init.zeros_(linear[2].bias)
        mask = torch.ones(STATE_DIM)
        mask[PRIORITY_SLOT] = 0.0
        mask[SOURCE_SLOTS] = 0.0
        self.register_buffer("state_mask", mask, persistent=False)

    def forward(self, state: Tensor, descriptor: Tensor) -> tuple[Tensor, Tensor]:
        """state [B, 64], descriptor [B, 16] -> predicted quality [B], predicted cost [B]."""
        residual = self.net(torch.cat([state * self.state_mask, descriptor], dim=-1))
        a, b, c, d, e, s = self.prior
        log10_nfe = descriptor[:, LOG_NFE_SLOT] * (10.0 * math.log10(2.0))
        has_stop_rule = 1.0 - descriptor[:, NO_STOP_RULE_SLOT]
        logit = (a * log10_nfe + b + c * (descriptor[:, ORDER_SLOT] * 3.0 - 2.0) - d * has_stop_rule
                 - e * descriptor[:, STOCHASTIC_SLOT])
        quality = torch.sigmoid(logit + residual[:, 0])
        cost = descriptor[:, LOG_NFE_SLOT] - s * descriptor[:, STOP_LOG_NFE_SLOT] + residual[:, 1]
        return quality, cost.clamp_min(0.0)


def _descriptor_of(expert: Any) -> ExpertDescriptor:
    descriptor = getattr(expert, "descriptor", expert)
    if not isinstance(descriptor, ExpertDescriptor):
        raise TypeError(f"expected an Expert or ExpertDescriptor in the pool, got {type(expert).__name__}")
    return descriptor


class Router:
    """A trained (or default) scorer plus its provenance; :meth:`select` is what the nodes call."""

    def __init__(self, scorer: ExpertScorer | None = None, name: str = "default",
                 training: dict | None = None, descriptors: Sequence[ExpertDescriptor] = (),
                 created: str | None = None) -> None:
        self.scorer = scorer if scorer is not None else ExpertScorer()
        self.name = name
        self.training = dict(training or {"contexts": 0, "runs": 0})
        self.descriptors = tuple(descriptors)
        self.created = created or time.strftime("%Y-%m-%dT%H:%M:%S%z")

    @classmethod
    def default(cls) -> "Router":
        """An untrained router: the descriptor prior alone (prefers balanced experts at priority 0.5)."""
        return cls(name="default")

    @torch.no_grad()
    def predict(self, state: Tensor, experts: Sequence[Any]) -> tuple[Tensor, Tensor]:
        """Predicted quality and cost of each expert for one state [64] -> ([N], [N])."""
        state = _check_state(state)
        features = torch.stack([_descriptor_of(e).to_features() for e in experts])
        return self.scorer(state.expand(len(experts), -1), features)

    def select(self, state: Tensor, experts: Sequence[Any], priority: float = 0.5, temperature: float = 0.0,
               seed: int | None = None) -> Selection:
        """Pick one expert of ``experts`` (Expert or ExpertDescriptor) for ``state`` [64].

        ``priority`` in [0, 1] (0 speed, 1 quality); ``temperature`` >= 0 (0 greedy);
        ``seed`` seeds the draw when temperature > 0.
        """
        start = time.perf_counter()
        if experts is None or len(experts) == 0:
            raise ValueError("expert pool is empty: connect at least one MoE Expert or use the default pool")
        quality, cost = self.predict(state, experts)  # priority and temperature are checked by choose()
        names = [_descriptor_of(e).name for e in experts]
        selection = choose(quality, cost, names, priority, temperature, seed)
        return dataclasses.replace(selection, decision_seconds=time.perf_counter() - start)

    def save(self, path: str | os.PathLike) -> Path:
        """Write weights and metadata as .safetensors (atomically: temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.scorer.state_dict().items()}
        metadata = {
            "format": FORMAT,
            "feature_version": str(FEATURE_VERSION),
            "state_dim": str(STATE_DIM),
            "descriptor_dim": str(DESCRIPTOR_DIM),
            "hidden": str(self.scorer.hidden),
            "name": self.name,
            "created": self.created,
            "training": json.dumps(self.training),
            "experts": json.dumps([dataclasses.asdict(d) for d in self.descriptors]),
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Router":
        """Load a router saved by :meth:`save`; raises :class:`RouterLoadError` naming the file."""
        path = Path(path)
        tensors, metadata = read_safetensors(path, what="router")
        if metadata.get("format") != FORMAT:
            raise RouterLoadError(f"{path} is a safetensors file but not a MoE router (no router metadata)")
        version = int(metadata.get("feature_version", -1))
        if version != FEATURE_VERSION:
            raise RouterLoadError(
                f"router {metadata.get('name', path.stem)!r} ({path}) was trained for feature version "
                f"{version}; this pack uses {FEATURE_VERSION}; retrain it"
            )
        scorer = ExpertScorer(hidden=int(metadata.get("hidden", 32)))
        try:
            scorer.load_state_dict(tensors)
        except RuntimeError as exc:
            raise RouterLoadError(f"{path}: weights do not fit this pack's router network: {exc}") from None
        try:
            descriptors = [ExpertDescriptor(**d) for d in json.loads(metadata.get("experts", "[]"))]
            training = json.loads(metadata.get("training", "{}"))
        except (TypeError, ValueError) as exc:
            raise RouterLoadError(f"{path}: unreadable router metadata: {exc}") from None
        return cls(scorer, name=metadata.get("name", path.stem), training=training,
                   descriptors=descriptors, created=metadata.get("created"))


def read_safetensors(path: Path, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with :class:`RouterLoadError` for bad files.

    Pickles (``torch.save`` files) are recognised and refused, never unpickled.
    """
    if not path.is_file():
        raise RouterLoadError(f"{what} file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: u64 little-endian header length, then the JSON header
    header_ok = len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size
    pickle_protocol = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    pickled = head.startswith(b"PK\x03\x04") or pickle_protocol  # zip: torch.save's format
    if pickled and not header_ok:
        raise RouterLoadError(
            f"{path} looks like a pickle/torch.save file; {what}s are only read from .safetensors "
            f"(pickles can run code and are never loaded)"
        )
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise RouterLoadError(f"{path} is not a valid safetensors {what} file (corrupt or truncated?): {exc}") from None
    return tensors, metadata


def _check_state(state: Tensor) -> Tensor:
    if not isinstance(state, Tensor):
        raise TypeError(f"state must be a tensor of shape [{STATE_DIM}], got {type(state).__name__}")
    state = state.detach().float().cpu()
    if state.dim() == 2 and state.shape[0] == 1:
        state = state[0]
    if state.shape != (STATE_DIM,):
        raise ValueError(f"state must have shape [{STATE_DIM}] (see router.features), got {tuple(state.shape)}")
    if not torch.isfinite(state).all():
        raise ValueError("state contains NaN or Inf")
    return state[None]
