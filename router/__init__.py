"""The router: state features, the expert scorer, selection and training.

Pure torch; no ComfyUI import. The stats store the router learns from is :mod:`moe_sampler.stats`.
Names are imported lazily so that importing one part does not load the others.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "STATE_DIM": ".features",
    "FEATURE_VERSION": ".features",
    "state_from_conditioning": ".features",
    "state_from_analytic": ".features",
    "ExpertScorer": ".model",
    "Router": ".model",
    "RouterLoadError": ".model",
    "Selection": ".policy",
    "lambda_from_priority": ".policy",
    "cost_from_nfe": ".policy",
    "MoERLTrainer": ".trainer",
    "TrainingResult": ".trainer",
    "Environment": ".environment",
    "DenoiserEnvironment": ".environment",
    "PromptContexts": ".environment",
    "DormandPrince": ".environment",
    "RungeKutta4": ".environment",
    "AnalyticEnvironment": ".environment",
    "AnalyticContext": ".environment",
    "Outcome": ".environment",
    "AdvancedExpertSelector": ".compat",
    "MixtureOfExperts": ".compat",
    "ExpertRouter": ".compat",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
