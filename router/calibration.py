"""Calibration of the fidelity estimate: from an expert's own estimate to a predicted error.

Every expert run reports, at no extra model call, a raw estimate of its relative error to the
exact solution and its parts (:mod:`moe_sampler.experts.observer`). A :class:`Calibration` maps
them to a predicted error with an uncertainty, one small linear model per expert in log space:

    log10(error) ~ b0 + b1 log10(estimate) + b2 log10(first_order) + b3 log10(tail)
                   + b4 log(sigma_start) + b5 log(sigma_end) + b6 log(cfg) + b7 log(nfe) + b8 log(scale)
                   + b9 log10(remaining) + b10 log10(local_plain) + b11 log10(local_last)
                   + b12 log10(last_change)

fitted by ridge least squares on pairs ``(inputs, true relative error)`` from sweeps and audits
(the true error needs the reference solution). The uncertainty is the residual standard deviation
of ``log10(error)`` (0.2 means "within a factor 10^0.2 = 1.6 about two times in three"). An
expert with too few pairs gets the intercept-and-slope model (fewer than
``MIN_PAIRS_PER_FEATURE`` pairs per feature; the first features the pairs support when they
support at least ``MIN_PREFIX``) or the pooled model of all experts (fewer than
``MIN_PAIRS``), with its uncertainty widened by the pooled residual spread.

Inputs (:func:`calibration_inputs` builds them from a run report): ``estimate`` (the raw
``error_estimate``), ``first_order`` and ``tail`` (its parts, see
:class:`~moe_sampler.experts.observer.FidelityEstimator`), ``sigma_start`` (first noise level of
the run: img2img starts lower), ``sigma_end`` (the last: an early stop ends higher), ``scale``
(the output's rms), ``nfe`` (model calls) and ``cfg``
(guidance scale; 1 when unknown); ``remaining`` (the change an early stop left out, projected to
the grid's last level; 0 for a full run), ``local_plain`` (local errors without propagation),
``local_last`` (the last step's), ``last_change`` (the last relative change of the
prediction) and ``local_window`` (unpropagated local errors of the middle steps; with
``remaining``, the feature ``log10_stop_total``). A report from before these parts existed
gives 0 for them; a stored fit names its features, so calibrations fitted on fewer features keep
loading and predicting. Measured in docs/EXPERTS.md (``python -m bench.estimate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

FORMAT_VERSION = 1
STOP_WINDOW_WEIGHT = 0.01  # local_window's weight against the early-stop remainder in log10_stop_total
FLOOR = 1e-9  # smallest estimate or error taken into a logarithm
MIN_PAIRS = 8
MIN_PAIRS_PER_FEATURE = 6
RIDGE = 1e-3
POOLED = "*"


def _log10(value: Any) -> float:
    return math.log10(max(float(value), FLOOR))


def _log(value: Any, default: float) -> float:
    value = default if value is None else float(value)
    return math.log(max(value, FLOOR))


# name -> function of the inputs mapping; the full design, in this order, after the intercept.
FEATURES: Mapping[str, Callable[[Mapping[str, Any]], float]] = {
    "log10_estimate": lambda i: _log10(i["estimate"]),
    "log10_first_order": lambda i: _log10(i.get("first_order") or 0.0),
    "log10_tail": lambda i: _log10(i.get("tail") or 0.0),
    "log_sigma_start": lambda i: _log(i.get("sigma_start"), 1.0),
    "log_sigma_end": lambda i: _log(i.get("sigma_end"), 1.0),
    "log_cfg": lambda i: _log(i.get("cfg"), 1.0),
    "log_nfe": lambda i: _log(i.get("nfe"), 1.0),
    "log_scale": lambda i: _log(i.get("scale"), 1.0),
    # The change still to come after an early stop (0, floored, for a run that reached its grid's end).
    "log10_remaining": lambda i: _log10(i.get("remaining") or 0.0),
    "log10_last_change": lambda i: _log10(i.get("last_change") or 0.0),
    "log10_local_plain": lambda i: _log10(i.get("local_plain") or 0.0),
    "log10_local_last": lambda i: _log10(i.get("local_last") or 0.0),
    "log10_local_window": lambda i: _log10(i.get("local_window") or 0.0),
    # An early-stopped run errs by its truncation and its trajectory error together, about
    # sqrt(truncation^2 + trajectory^2) (0.98-1.00 rank on 192 learned-model runs); a log-linear fit
    # cannot add the two in linear space, so this feature does: the remainder plus the middle-window
    # local errors scaled to it (for a run without an early stop, the window term alone).
    "log10_stop_total": lambda i: _log10(math.hypot(float(i.get("remaining") or 0.0),
                                                    STOP_WINDOW_WEIGHT * float(i.get("local_window") or 0.0))),
}
# What :meth:`Calibration.fit` uses unless told (a stored fit names its own features).
# The last five but ``log10_stop_total`` were chosen by 5-fold cross-validation on the training
# pairs of both yardsticks (bench.estimate); held-out: learned mean Spearman 0.67 -> 0.69,
# EarlyStopper 0.36 -> 0.44; analytic 0.84 -> 0.86. ``log10_stop_total`` (tenth, so that 60 pairs
# keep it) and its weight were chosen on the seed-0 learned pairs and checked on fresh seed-1 pairs:
# EarlyStopper 0.55 -> 0.71, mean 0.69 -> 0.74, analytic unchanged (docs/EXPERTS.md).
DEFAULT_FEATURES = ("log10_estimate", "log10_first_order", "log10_tail", "log_sigma_start", "log_sigma_end", "log_cfg",
                    "log_nfe", "log_scale", "log10_remaining", "log10_stop_total", "log10_local_plain",
                    "log10_local_last", "log10_last_change")
# Few pairs: the estimate and the start level (img2img starts lower and errs less for the same
# estimate; without it a calibration fitted mostly on text-to-image runs misjudged img2img runs
# by up to 0.15 in quality, docs/ROUTER.md).
REDUCED = ("log10_estimate", "log_sigma_start")
# With fewer than 6 pairs per feature but at least this many features' worth, an expert gets the
# first features of the list its pairs support (the default list's first eight are the calibration
# of before the early-stop remainder: an expert with 48-71 pairs keeps what it had then).
MIN_PREFIX = 8


def stored_inputs(inputs: Mapping[str, Any]) -> dict[str, float]:
    """Calibration inputs as a stats row keeps them (``details.estimate``): 6 significant digits."""
    return {k: float(f"{float(v):.6g}") for k, v in inputs.items()}


def calibration_inputs(report: Mapping[str, Any], cfg: float | None = None) -> dict[str, float] | None:
    """The calibration inputs of one run from its report (``Expert.__call__``'s or an
    :class:`~moe_sampler.experts.base.ExpertRun`'s fields); None when the run has no estimate."""
    estimate = report.get("error_estimate")
    features = report.get("estimate_features") or {}
    if estimate is None or not math.isfinite(float(estimate)):
        return None
    return {
        "estimate": float(estimate),
        "first_order": float(features.get("first_order", 0.0)),
        "tail": float(features.get("tail", 0.0)),
        # Parts recorded since the learned-yardstick work (older rows lack them: the fit reads 0).
        "remaining": float(features.get("remaining", 0.0)),
        "last_change": float(features.get("last_change", 0.0)),
        "local_plain": float(features.get("local_plain", 0.0)),
        "local_last": float(features.get("local_last", 0.0)),
        "local_window": float(features.get("local_window", 0.0)),
        "sigma_prev_end": float(features.get("sigma_prev_end", 0.0)),
        "sigma_start": float(features.get("sigma_start", 1.0)),
        "sigma_end": float(features.get("sigma_end", 1.0)),
        "scale": float(features.get("scale", 1.0)),
        "nfe": float(report.get("nfe") or 1.0),
        "cfg": 1.0 if cfg is None else float(cfg),
    }


@dataclass(frozen=True)
class ExpertFit:
    """One expert's model: ``log10(error) = coef[0] + sum_j coef[j + 1] * FEATURES[features[j]]``."""

    features: tuple[str, ...]
    coef: tuple[float, ...]
    std: float
    pairs: int

    def predict_log10(self, inputs: Mapping[str, Any]) -> float:
        x = [1.0, *(FEATURES[name](inputs) for name in self.features)]
        return sum(c * v for c, v in zip(self.coef, x))

    def to_dict(self) -> dict:
        return {"features": list(self.features), "coef": [float(c) for c in self.coef], "std": float(self.std),
                "pairs": int(self.pairs)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ExpertFit":
        features = tuple(str(f) for f in data["features"])
        unknown = [f for f in features if f not in FEATURES]
        if unknown or len(data["coef"]) != len(features) + 1:
            raise ValueError(f"calibration entry with unknown features {unknown} or a wrong number of coefficients")
        return cls(features, tuple(float(c) for c in data["coef"]), float(data["std"]), int(data["pairs"]))


def _fit(rows: Sequence[tuple[Mapping[str, Any], float]], features: Sequence[str], ridge: float) -> ExpertFit:
    x = torch.tensor([[1.0, *(FEATURES[f](inputs) for f in features)] for inputs, _ in rows], dtype=torch.float64)
    y = torch.tensor([_log10(error) for _, error in rows], dtype=torch.float64)
    penalty = torch.eye(x.shape[1], dtype=torch.float64) * ridge * len(rows)
    penalty[0, 0] = 0.0  # the intercept is not shrunk
    # Features are centred for the ridge so that the penalty does not depend on their offsets.
    mean = x[:, 1:].mean(0)
    xc = torch.cat([x[:, :1], x[:, 1:] - mean], dim=1)
    beta = torch.linalg.solve(xc.T @ xc + penalty, xc.T @ y)
    coef = torch.cat([(beta[0] - (beta[1:] * mean).sum()).reshape(1), beta[1:]])
    residual = y - x @ coef
    dof = max(len(rows) - x.shape[1], 1)
    std = float(residual.square().sum().div(dof).sqrt())
    return ExpertFit(tuple(features), tuple(float(c) for c in coef), std, len(rows))


@dataclass(frozen=True)
class Calibration:
    """Per-expert calibration of the fidelity estimate (see the module docstring).

    ``fits`` maps expert names (and :data:`POOLED`) to :class:`ExpertFit`.
    """

    fits: Mapping[str, ExpertFit] = field(default_factory=dict)

    @classmethod
    def fit(cls, pairs: Iterable[tuple[str, Mapping[str, Any], float]], features: Sequence[str] = DEFAULT_FEATURES,
            ridge: float = RIDGE) -> "Calibration":
        """Fit from ``(expert, inputs, true relative error)`` triples (non-finite errors and
        inputs without an estimate are skipped)."""
        unknown = [f for f in features if f not in FEATURES]
        if unknown:
            raise ValueError(f"unknown calibration features {unknown}; known: {', '.join(FEATURES)}")
        by_expert: dict[str, list[tuple[Mapping[str, Any], float]]] = {}
        for expert, inputs, error in pairs:
            if inputs is None or not math.isfinite(float(error)) or not math.isfinite(float(inputs["estimate"])):
                continue
            by_expert.setdefault(expert, []).append((inputs, float(error)))
        everything = [row for rows in by_expert.values() for row in rows]
        fits: dict[str, ExpertFit] = {}
        if len(everything) >= MIN_PAIRS:
            fits[POOLED] = _fit(everything, features, ridge)
        for expert, rows in by_expert.items():
            supported = len(rows) // MIN_PAIRS_PER_FEATURE
            if supported >= len(features):
                fits[expert] = _fit(rows, features, ridge)
            elif supported >= MIN_PREFIX:
                fits[expert] = _fit(rows, tuple(features)[:supported], ridge)
            elif len(rows) >= MIN_PAIRS:
                fits[expert] = _fit(rows, REDUCED, ridge)
        return cls(fits)

    def predict_log10(self, expert: str, inputs: Mapping[str, Any]) -> tuple[float, float]:
        """``(log10 predicted error, its standard deviation)``; KeyError when nothing was fitted."""
        fit = self.fits.get(expert)
        if fit is not None:
            return fit.predict_log10(inputs), fit.std
        pooled = self.fits.get(POOLED)
        if pooled is None:
            raise KeyError(f"no calibration for expert {expert!r} and no pooled calibration")
        # An expert never calibrated: the pooled model, its spread widened by the spread of expert offsets.
        return pooled.predict_log10(inputs), math.hypot(pooled.std, 0.5)

    def predict(self, expert: str, inputs: Mapping[str, Any]) -> tuple[float, float]:
        """``(predicted relative error, uncertainty)``: the uncertainty is the standard deviation
        of ``log10(error)`` about the prediction (see the module docstring)."""
        log_error, std = self.predict_log10(expert, inputs)
        return 10.0**log_error, std

    def predict_quality(self, expert: str, inputs: Mapping[str, Any]) -> tuple[float, float]:
        """``(quality score, its standard deviation)`` with the quality map of
        :func:`~moe_sampler.experts.analytic.quality_from_error` (``-log10(err) / 3`` clipped to
        [0, 1]); the deviation is ``std / 3`` (not clipped)."""
        log_error, std = self.predict_log10(expert, inputs)
        return min(max(-log_error / 3.0, 0.0), 1.0), std / 3.0

    def to_dict(self) -> dict:
        """Plain strings, lists and floats (JSON, or safetensors metadata through ``json.dumps``)."""
        return {"version": FORMAT_VERSION, "experts": {name: fit.to_dict() for name, fit in self.fits.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Calibration":
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"calibration format version {data.get('version')!r}; this code reads {FORMAT_VERSION}")
        return cls({str(name): ExpertFit.from_dict(fit) for name, fit in data["experts"].items()})
