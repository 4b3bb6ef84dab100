"""The router: an expert scorer over (state, descriptor) pairs, and save/load as safetensors.

``ExpertScorer`` predicts, for a state [B, 64] and an expert descriptor [B, 16], the expert's
quality in [0, 1] and its cost ``log2(NFE) / 10`` (see :mod:`.policy`). Each prediction is a
descriptor-based prior plus a learned residual whose last layer starts at zero:

- quality: ``sigmoid(a log10(max_nfe) + c (order - 2) - d [stop rule] - e [stochastic] + b
  + residual)``: quality rises with log model calls and solver order; a stop rule may end
  early and a stochastic sampler does not follow the ODE, so both start with less credit;
- cost: ``log2(max_nfe) / 10 * (1 - s [stop rule]) + residual``.

The prior's six numbers (``PRIOR_INIT``) are trained with the rest. Their initial values are
fitted (``python -m bench.routing --fit-prior``, :func:`bench.routing.fit_prior`) on the training
contexts of both yardsticks (the analytic model and the shipped learned digits model): the
untrained router's fixed pick at each priority is the expert with the smallest worst-case
regret over the two (mean utility of that yardstick's best fixed expert minus its own), and
among the numbers that do that, the prior's quality and cost are closest (least squares) to
the experts' mean outcomes. On the default pool that is SpeedDemon below priority 0.43,
BalancedMaster from 0.43 to 0.455 and QualityMaster above (QualityMaster is the best fixed
expert at priority 0.5 on both yardsticks); the worst regret, averaged over priorities 0-1, is
0.0011 utility on the training contexts (analytic 3,000, learned 100; minimax 0.0010; the
earlier hand-set numbers (2.4, -2.2, 0.1, 0.5, 3.0, 0.1), which picked BalancedMaster from
0.455 to 0.515: 0.0038). The fit on those contexts gives (2.698, -2.425, 0.491, 0.741, 3.0,
0.18); the shipped numbers are its rounding from a fit on the first 1,200 analytic contexts.
The per-group fixed experts of the guarded policy are in :data:`.online.PRIOR_FIXED`.

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

from ..experts.base import DESCRIPTOR_DIM, ExpertDescriptor, features_of
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
PRIOR_INIT = (2.7, -2.43, 0.5, 0.75, 3.0, 0.17)  # fitted, see the module docstring
# Limits on router files, checked before anything is allocated (a router's header is a few KB,
# about 300 bytes per expert descriptor; the default hidden width is 32).
MAX_HEADER_BYTES = 1 << 20
MAX_HIDDEN = 1024
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}  # safetensors dtype -> bytes per element


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

    @staticmethod
    def parameter_shapes(hidden: int) -> dict[str, tuple[int, ...]]:
        """The state_dict's tensor shapes for a hidden width (without building the network)."""
        return {"prior": (len(PRIOR_INIT),),
                "net.0.weight": (hidden, STATE_DIM + DESCRIPTOR_DIM), "net.0.bias": (hidden,),
                "net.2.weight": (hidden, hidden), "net.2.bias": (hidden,),
                "net.4.weight": (2, hidden), "net.4.bias": (2,)}

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
        """An untrained router: the descriptor prior alone (on the default pool SpeedDemon below
        priority 0.43, BalancedMaster to 0.455, QualityMaster above; see the module docstring)."""
        return cls(name="default")

    @torch.no_grad()
    def predict(self, state: Tensor, experts: Sequence[Any]) -> tuple[Tensor, Tensor]:
        """Predicted quality and cost of each expert for one state [64] -> ([N], [N])."""
        state = _check_state(state)
        features = features_of([_descriptor_of(e) for e in experts])
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
    def load(cls, path: str | os.PathLike, label: str | None = None) -> "Router":
        """Load a router saved by :meth:`save`; raises :class:`RouterLoadError` naming the file.

        ``label`` is how errors name the file (default: the path; the nodes pass the file name,
        so no absolute path reaches a browser). Every metadata number is checked against sane
        bounds and the stored tensor shapes before anything is allocated, at most
        :data:`MAX_HEADER_BYTES` of header are read, and weights with NaN/Inf are refused.
        """
        path = Path(path)
        label = label or str(path)
        header = read_header(path, what="router", label=label)
        metadata = header.metadata
        if metadata.get("format") != FORMAT:
            raise RouterLoadError(f"{label} is a safetensors file but not a MoE router (no router metadata)")
        name = metadata.get("name", path.stem)
        version = _metadata_int(metadata, "feature_version", label)
        if version != FEATURE_VERSION:
            raise RouterLoadError(
                f"router {name!r} ({label}) was trained for feature version "
                f"{version}; this pack uses {FEATURE_VERSION}; retrain it"
            )
        for key, expected in (("state_dim", STATE_DIM), ("descriptor_dim", DESCRIPTOR_DIM)):
            if key in metadata and _metadata_int(metadata, key, label) != expected:
                raise RouterLoadError(f"{label}: metadata {key} is {metadata[key]!r}; this pack's router uses "
                                      f"{expected}; retrain it")
        hidden = _metadata_int(metadata, "hidden", label, default=32)
        if not 1 <= hidden <= MAX_HIDDEN:
            raise RouterLoadError(f"{label}: metadata hidden is {hidden}; a router's hidden width must be "
                                  f"from 1 to {MAX_HIDDEN}")
        _check_tensor_entries(header, ExpertScorer.parameter_shapes(hidden), label)
        tensors = _load_tensors(path, what="router", label=label)
        bad = [key for key, value in tensors.items() if not torch.isfinite(value).all()]
        if bad:
            raise RouterLoadError(f"{label}: the router's weights contain NaN or Inf ({', '.join(sorted(bad))}); "
                                  f"it cannot score experts; retrain it")
        scorer = ExpertScorer(hidden=hidden)
        try:
            scorer.load_state_dict(tensors)
        except RuntimeError as exc:
            raise RouterLoadError(f"{label}: weights do not fit this pack's router network: {exc}") from None
        try:
            descriptors = [ExpertDescriptor(**d) for d in json.loads(metadata.get("experts", "[]"))]
            training = json.loads(metadata.get("training", "{}"))
        except (TypeError, ValueError) as exc:
            raise RouterLoadError(f"{label}: unreadable router metadata: {exc}") from None
        return cls(scorer, name=name, training=training, descriptors=descriptors, created=metadata.get("created"))


@dataclasses.dataclass(frozen=True)
class SafetensorsHeader:
    """A safetensors file's JSON header: tensor entries (dtype, shape, data_offsets), metadata, sizes."""

    tensors: dict[str, dict]
    metadata: dict[str, str]
    header_bytes: int
    data_bytes: int


def read_header(path: Path, what: str = "router", label: str | None = None,
                max_header_bytes: int = MAX_HEADER_BYTES) -> SafetensorsHeader:
    """The header of a safetensors file, reading at most ``max_header_bytes`` of it.

    Raises :class:`RouterLoadError` naming ``label`` (default: the path) for a missing file, a
    pickle (recognised, never unpickled), an oversized, truncated or malformed header. Only
    the header is read: nothing is allocated for the tensors.
    """
    label = label or str(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise FileNotFoundError
        with open(path, "rb") as f:
            head = f.read(9)
            # safetensors: u64 little-endian header length, then the JSON header
            length = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
            header_ok = len(head) == 9 and head[8:9] == b"{" and 0 < length <= size - 8
            pickle_protocol = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
            if (head.startswith(b"PK\x03\x04") or pickle_protocol) and not header_ok:  # zip: torch.save's format
                raise RouterLoadError(
                    f"{label} looks like a pickle/torch.save file; {what}s are only read from .safetensors "
                    f"(pickles can run code and are never loaded)"
                )
            if header_ok and length > max_header_bytes:
                raise RouterLoadError(
                    f"{label}: its safetensors header is {length} bytes; a {what}'s header is at most "
                    f"{max_header_bytes} bytes, so it was not read"
                )
            raw = f.read(length - 1) if header_ok else b""
    except (FileNotFoundError, NotADirectoryError):
        raise RouterLoadError(f"{what} file {label} does not exist") from None
    except OSError as exc:
        raise RouterLoadError(f"{what} file {label} cannot be read: {exc.strerror or type(exc).__name__}") from None
    invalid = f"{label} is not a valid safetensors {what} file (corrupt or truncated?)"
    if not header_ok or len(raw) != length - 1:
        raise RouterLoadError(invalid)
    try:
        entries = json.loads(b"{" + raw)
    except (UnicodeDecodeError, ValueError):
        raise RouterLoadError(f"{invalid}: its header is not JSON") from None
    if not isinstance(entries, dict):
        raise RouterLoadError(f"{invalid}: its header is not a JSON object")
    metadata = entries.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise RouterLoadError(f"{invalid}: its metadata is not a map of strings")
    for key, entry in entries.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)):
            raise RouterLoadError(f"{invalid}: tensor {key!r} has a malformed entry")
    return SafetensorsHeader(entries, metadata, length, size - 8 - length)


def _metadata_int(metadata: dict[str, str], key: str, label: str, default: int | None = None) -> int:
    value = metadata.get(key)
    if value is None and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise RouterLoadError(f"{label}: metadata {key} is {value!r}, not a whole number; the file is not a "
                              f"router this pack wrote (retrain it)") from None


def _check_tensor_entries(header: SafetensorsHeader, shapes: dict[str, tuple[int, ...]], label: str) -> None:
    """Names, dtypes, shapes and byte ranges of the stored tensors against ``shapes``."""
    fit = f"{label}: weights do not fit this pack's router network"
    if set(header.tensors) != set(shapes):
        missing, unexpected = sorted(set(shapes) - set(header.tensors)), sorted(set(header.tensors) - set(shapes))
        raise RouterLoadError(f"{fit}: missing {missing}, unexpected {unexpected[:8]}")
    for key, shape in shapes.items():
        entry = header.tensors[key]
        itemsize = FLOAT_DTYPES.get(entry["dtype"])
        if itemsize is None:
            raise RouterLoadError(f"{fit}: {key} has dtype {entry['dtype']}; expected one of {', '.join(FLOAT_DTYPES)}")
        if tuple(entry["shape"]) != shape:
            raise RouterLoadError(f"{fit}: {key} has shape {entry['shape']}, the metadata's hidden width needs "
                                  f"{list(shape)}")
        offsets = entry["data_offsets"]
        if not (len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= header.data_bytes
                and offsets[1] - offsets[0] == math.prod(shape) * itemsize):
            raise RouterLoadError(f"{label} is not a valid safetensors router file (corrupt or truncated?): "
                                  f"{key}'s byte range does not match its shape")


def _load_tensors(path: Path, what: str, label: str) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = (exc.strerror or type(exc).__name__) if isinstance(exc, OSError) else exc  # no path in the text
        raise RouterLoadError(f"{label} is not a valid safetensors {what} file (corrupt or truncated?): {reason}") from None


def read_safetensors(path: Path, what: str, label: str | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with :class:`RouterLoadError` for bad files.

    The header is read first (:func:`read_header`: bounded, pickles refused, never unpickled).
    """
    label = label or str(path)
    header = read_header(path, what=what, label=label)
    return _load_tensors(path, what, label), header.metadata


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
