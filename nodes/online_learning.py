"""The learning loop inside ComfyUI: model fingerprints, audits, background updates, MoE Learn From Runs.

- **One router per model.** :func:`model_fingerprint` names a ComfyUI MODEL by its family and a
  cheap fingerprint of a few weight tensors (cached per loaded model). With the sampler's router
  set to :data:`LEARNED_ROUTER` the run uses that model's own router, ``learned/<key>`` in the
  routers folder (:class:`~moe_sampler.router.versions.LocalRegistry`), through the guarded
  policy of :mod:`moe_sampler.router.online`; before its first adopted version the untrained
  router's best fixed expert (the "learning" phase).
- **Audits.** With probability ``audit_rate`` the sampler also runs the reference (the training
  environment's: a Dormand-Prince solve of at most 4 x ``REFERENCE_STEPS`` model calls) from the same noise after
  the expert and scores the run exactly (:func:`run_audit`); the returned latent is the expert's.
  A per-model budget (:func:`audit_budget`, :class:`~moe_sampler.experts.reference.AuditBudget`)
  skips the audit while the model's audits would exceed :data:`AUDIT_SHARE_ENV` (default 4%) of
  its model calls; the decision reads only earlier runs, and the row's ``details.audit`` keeps the
  run's audit probability, the audit's calls and the share (:func:`note_calls`).
- **Background updates.** :class:`OnlineLearner` counts the recorded runs of each model; after
  every ``every`` runs it queues an update for a daemon thread, which reads the model's rows from
  the stats store, fits a candidate, judges it on held-out rows and publishes it as a new version
  only when adopted. The sampler only increments a counter and puts a key in a queue: never a
  wait on the sampling path.
- **MoE Learn From Runs** (``MoELearnFromRuns``): the same update on demand.

ComfyUI modules are imported inside functions; the learner, the fingerprint of plain torch
modules and the record annotation import and test without ComfyUI.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import queue
import random
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)

LEARNED_ROUTER = "(learned for this model)"  # the sampler's dropdown entry for the learning loop
LEARNED_FOLDER = "learned"  # routers of the learning loop: models/moe_routers/learned/<model key>
DEFAULT_AUDIT_RATE = 0.02
UPDATE_EVERY = int(os.environ.get("MOE_SAMPLER_LEARN_EVERY", "25") or 25)  # recorded runs per model between updates
MAX_ROWS = 20_000  # newest rows read for an update
LEARNING_ENV = "MOE_SAMPLER_LEARNING"  # "0" turns the background updates off
AUDIT_SHARE_ENV = "MOE_SAMPLER_AUDIT_SHARE"  # audits' budget, a share of a model's calls ("none": no budget)
AUDIT_STEPS: int | None = None  # the audit reference's reference_steps (budget); None: REFERENCE_STEPS
EXPLORATION: float | None = None  # epsilon of the learned router; None: router.online.EPSILON (5%)
BACKGROUND_PAUSE = 0.002  # seconds a background fit sleeps per Adam step, leaving the CPU to sampling

_fingerprints: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
_fingerprint_lock = threading.Lock()


# ----------------------------------------------------------------------------- which model


def model_fingerprint(model: Any) -> str:
    """``"<family>-<10 hex>"`` for a ComfyUI MODEL (a ModelPatcher) or any torch module.

    The hex part hashes the names, shapes and sums of the first and last 4 parameter tensors of
    the diffusion network (:func:`~moe_sampler.router.online.fingerprint_tensors`), cached per
    loaded network, so it costs a few tensor sums once per checkpoint load. Patches applied on
    top (LoRA) do not change it: a router belongs to the base model.
    """
    from ..router.online import fingerprint_tensors, model_key

    network = _network(model)
    with _fingerprint_lock:
        try:
            cached = _fingerprints.get(network)
        except TypeError:  # not weak-referenceable
            cached = None
    if cached is not None:
        return cached
    family = _family(model)
    try:
        named = list(network.named_parameters()) if hasattr(network, "named_parameters") else []
    except Exception:  # a model whose parameters cannot be listed: fall back to its class name
        named = []
    digest = fingerprint_tensors(named) if named else f"{type(network).__name__}"[:10]
    key = model_key(family, digest)
    with _fingerprint_lock:
        try:
            _fingerprints[network] = key
        except TypeError:
            pass
    return key


def _network(model: Any) -> Any:
    base = getattr(model, "model", model)  # ModelPatcher -> BaseModel
    return getattr(base, "diffusion_model", base)


def _family(model: Any) -> str:
    try:
        from . import comfy_experts

        return comfy_experts.model_family(model)
    except Exception:  # no ComfyUI (tests with a plain module) or an unknown model type
        return "model"


def learned_router_name(key: str) -> str:
    """The registry name of a model's router (``learned/<key>``; its file ``learned/<key>.safetensors``)."""
    return f"{LEARNED_FOLDER}/{key}"


def learned_label(key: str) -> str:
    """How runs of a model's learned router are labelled in the store (its file name)."""
    return learned_router_name(key) + ".safetensors"


def registry() -> Any:
    """The routers folder as a :class:`~moe_sampler.router.versions.LocalRegistry`; with a PostgreSQL
    stats store (a farm), the database's :class:`~moe_sampler.router.pg_registry.PostgresRegistry`
    cached in that folder, its follower thread started (never blocks)."""
    from ..router.versions import LocalRegistry
    from ..stats.postgres_store import is_database_url
    from . import paths

    target = paths.stats_store_target()
    if is_database_url(target):
        from ..router.pg_registry import shared_registry

        return shared_registry(target, paths._router_folders()[0])
    return LocalRegistry(paths._router_folders()[0])


def model_warning(router: Any, key: str, label: str) -> str | None:
    """A warning when ``router`` (a file the user picked) was trained on another model than ``key``."""
    trained = (getattr(router, "training", None) or {}).get("model")
    if trained == key:
        return None
    if trained:
        return (f"router {label} was trained on another model ({trained}; this one is {key}): its picks may not "
                f"fit; use '{LEARNED_ROUTER}' or retrain it on this model")
    return (f"router {label} does not record which model it was trained on (this one is {key}); if it was "
            f"trained on another model (e.g. the analytic demo) its picks may not fit")


# ----------------------------------------------------------------------------- the learned router


@dataclass(frozen=True)
class LearnedPolicy:
    """A model's guarded policy and where it came from (version 0: no adopted version yet)."""

    policy: Any  # router.online.GuardedPolicy
    version: int
    label: str


_policies: dict[str, tuple[Any, Any]] = {}
_policy_lock = threading.Lock()


def learned_policy(key: str, epsilon: float | None = None) -> LearnedPolicy:
    """The guarded policy of the model ``key``: its followed router version (cached per file
    version) or, before the first adoption, the untrained router in its learning phase."""
    from ..router.model import Router
    from ..router.online import EPSILON, GuardedPolicy
    from . import paths

    label = learned_label(key)
    router = None
    if registry().followed_path(learned_router_name(key)).is_file():  # no listing on the hot path
        try:
            router = paths.load_router(label)
        except ValueError as exc:  # an unreadable version: keep sampling with the learning phase
            logger.warning("MoE learned router %s cannot be used (%s); using the best fixed expert", label, exc)
    epsilon = epsilon if epsilon is not None else (EXPLORATION if EXPLORATION is not None else EPSILON)
    with _policy_lock:
        cached = _policies.get(key)
        if cached is None or cached[0] is not router or cached[1].epsilon != epsilon:
            base = router if router is not None else Router.default()
            policy = GuardedPolicy.for_router(base, epsilon=epsilon)
            cached = _policies[key] = (router, policy)
    version = int((router.training.get("version", 0) if router is not None else 0) or 0)
    return LearnedPolicy(cached[1], version, label)


def router_calibration(router: Any) -> Any:
    """The fidelity-estimate calibration a router keeps (``training["calibration"]``, written by
    an online update or a sweep on its model), or None when it has none or it cannot be read."""
    from ..router.calibration import Calibration

    data = (getattr(router, "training", None) or {}).get("calibration")
    if not data:
        return None
    try:
        return Calibration.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        logger.warning("ignoring the unreadable calibration of router %s: %s", getattr(router, "name", "?"), exc)
        return None


def learning_info(choice: Any, learned: LearnedPolicy, learner: "OnlineLearner | None", key: str,
                  calibration: Any) -> dict:
    """The badge's ``learning`` entry: phase, sentence, version, rows, calibrated experts, next
    update. ``calibration``: the router's (:func:`router_calibration`, read once per run)."""
    from ..router.calibration import MIN_PAIRS, POOLED

    policy = learned.policy
    rows = policy.evidence.rows
    calibrated = sorted(name for name in (calibration.fits if calibration is not None else {}) if name != POOLED)
    if choice.phase == "learning":
        # What holds it back, and what speeds it up: estimates count only once calibrated (RAW_BIAS).
        how = (f"calibrated estimates for {', '.join(calibrated)}" if calibrated else
               f"no expert's estimate is calibrated yet: {MIN_PAIRS} audited or swept runs of an expert are "
               f"needed, and a MoE Router Trainer sweep of about 12 contexts gives them at once (the next "
               f"update, or MoE Learn From Runs, uses them)")
        text = (f"using the best fixed expert ({choice.fixed_expert}) until the router has learned enough from "
                f"this model's runs ({rows} rows so far; {how})")
    else:
        text = (f"router v{learned.version} of this model ({rows} rows) deviates from the best fixed expert "
                f"({choice.fixed_expert}) only where the data supports it")
    info = {"phase": choice.phase, "text": text, "version": learned.version, "rows": rows,
            "fixed_expert": choice.fixed_expert, "explored": choice.explored, "epsilon": policy.epsilon,
            "model": key, "calibrated": calibrated}
    if learner is not None:
        info.update(learner.status(key))
    return info


def router_options(names: Sequence[str]) -> list[str]:
    """The sampler's router dropdown: the built-in default, then :data:`LEARNED_ROUTER`, then the files."""
    names = list(names)
    return [*names[:1], LEARNED_ROUTER, *(n for n in names[1:] if n != LEARNED_ROUTER)]


def choice_details(choice: Any, learned: LearnedPolicy) -> dict:
    """What the stats row keeps about a guarded decision (its ``details``)."""
    return {"learning": {"phase": choice.phase, "fixed_expert": choice.fixed_expert,
                         "greedy_expert": choice.greedy_expert, "explored": choice.explored,
                         "epsilon": learned.policy.epsilon, "router_version": learned.version}}


def badge_extras(ui: dict, model: str | None, learning: dict | None, audit: "Audit | None",
                 warning: str | None, audit_info: dict | None = None) -> dict:
    """Add the learning loop to the node's payload: ``model``, ``learning`` (phase and sentence),
    ``audit`` and ``audit_seconds`` (null when not audited), ``audit_share`` (the audits' share of
    the model's model calls after this run, null with audits off), ``audit_skipped`` (the budget
    skipped a drawn audit), ``warning``; one text line each."""
    info = ui["moe_run"][0]
    info["model"] = model
    info["learning"] = learning
    info["audited"] = audit is not None
    info["audit_seconds"] = None if audit is None else round(audit.seconds, 4)
    info["audit"] = None if audit is None else {"quality": audit.quality, "relative_error": audit.relative_error,
                                                 "nfe": audit.nfe, "error": audit.error}
    info["audit_share"] = None if audit_info is None else audit_info["share"]
    info["audit_skipped"] = bool(audit_info and audit_info["skipped"])
    info["warning"] = warning
    lines = []
    if learning is not None:
        lines.append(f"{'learning' if learning['phase'] == 'learning' else 'learned'}: {learning['text']}")
    budget = "" if audit_info is None else (
        f"; audits are {audit_info['share']:.1%} of this model's calls"
        + ("" if audit_info["budget"] is None else f" (budget {audit_info['budget']:.0%})"))
    if audit is not None:
        quality = "failed" if audit.quality is None else f"quality {audit.quality:.2f}"
        lines.append(f"audited: {quality}, +{audit.seconds:.2f} s for the {audit.nfe}-call reference{budget}")
    elif audit_info is not None and audit_info["skipped"]:
        lines.append(f"audit skipped by the budget{budget}")
    if warning:
        lines.append(f"warning: {warning}")
    if lines:
        ui["text"] = ["\n".join([ui["text"][0], *lines]), *ui["text"][1:]]
    return ui


# ----------------------------------------------------------------------------- audits


@dataclass(frozen=True)
class Audit:
    """An audit's result: the run's exact quality and relative error against the reference, the
    reference's model calls and the extra seconds it took (None quality when it failed)."""

    quality: float | None
    relative_error: float | None
    nfe: int
    seconds: float
    error: str | None = None


def draw_audit(audit_rate: float, rng: random.Random | None = None) -> bool:
    """True with probability ``audit_rate`` (fresh entropy unless ``rng`` is given); no budget."""
    from ..experts.reference import check_audit_rate

    if check_audit_rate(audit_rate) <= 0.0:
        return False
    return (rng or random.SystemRandom()).random() < audit_rate


_budget: Any = None
_budget_lock = threading.Lock()


def audit_budget() -> Any:
    """The process's :class:`~moe_sampler.experts.reference.AuditBudget` (one ledger per model key).

    Its share is ``MOE_SAMPLER_AUDIT_SHARE`` (a number in (0, 1]; ``none`` turns the budget off),
    by default :data:`~moe_sampler.experts.reference.AUDIT_SHARE` (4%). A model's first audit is
    counted at the reference's call cap (``CALLS_PER_STEP * REFERENCE_STEPS``), so it comes once
    the model has run that cap over the share in calls (10,000 at 4%)."""
    global _budget
    from ..experts.reference import AUDIT_SHARE, AuditBudget

    first_cost = _audit_call_cap()
    with _budget_lock:
        if _budget is None:
            text = os.environ.get(AUDIT_SHARE_ENV, "").strip().lower()
            try:
                share = None if text in ("none", "off") else float(text) if text else AUDIT_SHARE
                _budget = AuditBudget(share, first_cost)
            except ValueError:
                logger.warning("%s=%r is not a share in (0, 1] or 'none'; using %g", AUDIT_SHARE_ENV, text,
                               AUDIT_SHARE)
                _budget = AuditBudget(AUDIT_SHARE, first_cost)
        return _budget


def _audit_call_cap() -> int:
    """The audit reference's model-call cap: what a model's first audit is counted at."""
    from ..experts.reference import CALLS_PER_STEP
    from .comfy_environment import REFERENCE_STEPS

    return CALLS_PER_STEP * (AUDIT_STEPS or REFERENCE_STEPS)


def decide_audit(key: str, audit_rate: float, rng: random.Random | None = None, budget: Any = None,
                 store: Any = None) -> Any:
    """The audit decision for a run of model ``key`` before it samples: an
    :class:`~moe_sampler.experts.reference.AuditDraw` (a coin with probability ``audit_rate``,
    skipped while the model's audits are over budget; reads only earlier runs). A ValueError
    naming ``audit_rate`` when it is not in [0, 1]. With the process's budget (``budget`` None), a
    model's first run in this process starts its ledger from ``store`` (default: the stats store)."""
    if budget is None:
        budget = audit_budget()
        if not budget.started(key):
            start_from_store(budget, key, store)
    return budget.draw(key, audit_rate, rng)


def start_from_store(budget: Any, key: str, store: Any = None) -> None:
    """Start model ``key``'s ledger from its stored runs (once per process and model), so that a
    ComfyUI restart does not forget the calls and audits before it. An unreadable store starts it
    empty (logged): the budget then counts from this run on."""
    from . import paths

    try:
        expert, audit, audits = (paths.stats_store() if store is None else store).model_calls(
            key, audit_cost=_audit_call_cap())
    except Exception as exc:  # noqa: BLE001 - a run never fails over its audit budget's history
        logger.info("MoE audits: the stored runs of %s could not be read (%s); counting from now", key, exc)
        expert = audit = audits = 0
    budget.start(key, expert, audit, audits)


def note_calls(key: str, attempts: Sequence[Any], audit: "Audit | None", draw: Any, audit_rate: float,
               budget: Any = None) -> dict | None:
    """Add a finished run's model calls (every attempt's) and its audit's to the model's ledger;
    returns what its row keeps under ``details.audit``: ``rate``, ``probability`` (the run's chance
    of an audit given the history: ``rate``, 1 when a coin kept from a skipped run was due, 0 while
    the budget was spent), ``skipped``, ``nfe`` (the audit's model calls, or None), ``share`` (the
    audits' share of the model's calls after this run) and ``budget``; None with audits off
    (``audit_rate`` 0)."""
    budget = audit_budget() if budget is None else budget
    budget.note(key, sum(int(getattr(a, "nfe", 0) or 0) for a in attempts), None if audit is None else audit.nfe)
    if audit_rate <= 0.0:
        return None
    return {"rate": float(audit_rate), "probability": draw.probability, "skipped": draw.skipped,
            "nfe": None if audit is None else audit.nfe, "share": round(budget.share_of(key), 6),
            "budget": budget.share}


def run_audit(model: Any, positive: Any, negative: Any, latent_image: dict, seed: int, cfg: float, denoise: float,
              samples: Any, expert: Any = None) -> Audit:
    """Run the reference from the same noise and score ``samples`` (the expert's output) against it.

    The reference is the training environment's (:func:`~.comfy_environment.reference_expert`
    with :data:`~.comfy_environment.REFERENCE_STEPS`); no previews, no fallback. Given the audited
    ``expert``, it starts where the expert started
    (:func:`~moe_sampler.experts.reference.audit_sigmas`: with img2img each schedule truncates at
    its own level). ComfyUI's interrupt propagates; any other failure gives an :class:`Audit`
    with ``error`` set.
    """
    import torch

    from . import bridge
    from .comfy_environment import REFERENCE_STEPS, quality_from_relative_error, relative_error

    start = time.perf_counter()
    attempts: list = []
    reference_expert = _reference_expert(AUDIT_STEPS or REFERENCE_STEPS)
    try:
        sigmas = None
        if expert is not None:
            from ..experts.reference import audit_sigmas

            schedule = bridge.schedule_for(model)
            sigmas = audit_sigmas(reference_expert, expert.sigmas(schedule, denoise), schedule, denoise)
        with torch.inference_mode():
            latent, report = bridge.sample_with_expert(model, reference_expert, positive, negative, latent_image, seed,
                                                       cfg, denoise, sigmas=sigmas, preview=False, disable_pbar=True,
                                                       fallback=None, attempts=attempts)
    except (RuntimeError, ValueError, ArithmeticError) as exc:  # ComfyUI's interrupt is none of these
        logger.warning("MoE audit failed: %s", exc)
        nfe = attempts[-1].nfe if attempts else 0
        return Audit(None, None, nfe, time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
    error = relative_error(samples.detach().float().cpu(), latent["samples"].detach().float().cpu())
    return Audit(quality_from_relative_error(error), error if math.isfinite(error) else None, report.nfe,
                 time.perf_counter() - start)


def _reference_expert(steps: int) -> Any:
    from .comfy_environment import reference_expert

    return reference_expert(steps)


# ----------------------------------------------------------------------------- store rows


def annotate(records: list, *, model: str | None, audit: Audit | None = None, details: dict | None = None) -> list:
    """The sampler's rows with the learning loop's fields: ``model`` on every row; on the first
    (the routed pick) the audit's exact quality (``quality_source="audit"``) and ``audit_seconds``,
    and ``details`` (phase, exploration, router version). Fields the store does not know are left
    out, so this works with an older ``RunRecord``."""
    if not records:
        return records
    names = {f.name for f in dataclasses.fields(records[0])}
    out = []
    for i, record in enumerate(records):
        fields: dict[str, Any] = {}
        if "model" in names and model is not None:
            fields["model"] = model
        if i == 0:
            extra = dict(details or {})
            if audit is not None:
                if "audit_seconds" in names:
                    fields["audit_seconds"] = max(audit.seconds, 0.0)
                if audit.quality is not None and record.success:
                    fields["quality"] = float(audit.quality)
                    if "quality_source" in names:
                        fields["quality_source"] = "audit"
                    if audit.relative_error is not None:
                        extra["true_error"] = float(audit.relative_error)  # a calibration pair with details.estimate
            if extra and "details" in names:
                fields["details"] = {**_details_dict(record), **extra}
        out.append(dataclasses.replace(record, **fields) if fields else record)
    return out


def _details_dict(record: Any) -> dict:
    getter = getattr(record, "details_dict", None)
    try:
        return dict(getter() or {}) if callable(getter) else {}
    except Exception:
        return {}


# ----------------------------------------------------------------------------- updates


@dataclass(frozen=True)
class LearnOutcome:
    """An update's result: the :class:`~moe_sampler.router.online.UpdateResult` (None when there
    were no rows), the version published (None when not adopted) and a one-line summary."""

    key: str
    result: Any
    version: int | None
    summary: str
    rows: int


def learn_now(key: str, experts: Sequence[Any], store: Any, registry_: Any = None,
              should_stop: Callable[[], bool] | None = None, seed: int = 0, **options: Any) -> LearnOutcome:
    """Update the model ``key``'s router from its logged rows in ``store`` and publish the
    candidate as a new version when it is adopted (see :func:`moe_sampler.router.online.update`,
    which gets ``options``: ``heldout_share``, ``min_heldout``, ``min_rows``, ``steps``)."""
    from ..router.model import Router
    from ..router.online import rows_from_records, update

    registry_ = registry_ if registry_ is not None else registry()
    name = learned_router_name(key)
    pause = options.get("pause")
    checkpoint = pause if callable(pause) else (lambda: None)  # the background's: wait while sampling runs
    flush = getattr(store, "flush", None)
    if callable(flush):
        flush(timeout=10.0)
    checkpoint()
    records = store.runs(limit=MAX_ROWS)
    checkpoint()
    rows = rows_from_records(records, model=key, experts=[getattr(e, "descriptor", e).name for e in experts])
    checkpoint()
    if not rows:
        return LearnOutcome(key, None, None, f"no logged runs with a quality for model {key} yet", 0)
    latest = registry_.latest(name)
    current = registry_.load(name) if latest is not None else Router.default()
    current.name = name
    result = update(current, rows, experts, model=key, should_stop=should_stop, seed=seed, **options)
    version = None
    if result.adopted:
        from ..router.pg_registry import LostRace

        result.candidate.name = name
        try:
            version = registry_.publish(name, result.candidate).version
        except LostRace as exc:  # a farm: another worker adopted a version first
            return LearnOutcome(key, result, None, str(exc), len(rows))
    summary = f"{name}: " + (f"v{version} " if version is not None else "") + result.summary()
    return LearnOutcome(key, result, version, summary, len(rows))


def background_pause() -> None:
    """A background update's checkpoint: a short sleep, then wait while any sampling through
    :func:`~.bridge.sample_with_expert` is in progress (:data:`~.bridge.SAMPLING`)."""
    from . import bridge

    time.sleep(BACKGROUND_PAUSE)
    bridge.SAMPLING.wait_idle()


class OnlineLearner:
    """Background updates: after every ``every`` recorded runs of a model, one update on a daemon
    thread (at most one queued per model; a run never waits for it).

    Args:
        every: recorded runs of a model between updates.
        learn: ``learn(key, experts, store) -> LearnOutcome`` (:func:`learn_now`; tests pass a slow fake).
    """

    def __init__(self, every: int = UPDATE_EVERY, learn: Callable[..., Any] | None = None) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.learn = learn if learn is not None else functools.partial(learn_now, pause=background_pause)
        self.counts: dict[str, int] = {}
        self.last: dict[str, Any] = {}
        self.updates: dict[str, int] = {}
        self._pending: set[str] = set()
        self._running: str | None = None
        self._queue: "queue.SimpleQueue[tuple[str, Sequence[Any], Any]]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def note_run(self, key: str, experts: Sequence[Any], store: Any) -> bool:
        """Count one recorded run of ``key``; queue an update on every ``every``-th. Returns whether
        one was queued. Never blocks on an update."""
        with self._lock:
            count = self.counts[key] = self.counts.get(key, 0) + 1
            if count % self.every or key in self._pending:
                return False
            self._pending.add(key)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="moe-online-learner", daemon=True)
                self._thread.start()
        self._queue.put((key, tuple(experts), store))
        return True

    def status(self, key: str) -> dict:
        """``runs_logged``, ``next_update_in``, ``updating`` and the last update's summary for a model."""
        with self._lock:
            count = self.counts.get(key, 0)
            last = self.last.get(key)
            return {"runs_logged": count, "next_update_in": self.every - count % self.every,
                    "updating": key in self._pending, "last_update": getattr(last, "summary", None)}

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no update is queued or running (tests, shutdown); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending, timeout)

    def _work(self) -> None:
        _lower_thread_priority()
        while True:
            key, experts, store = self._queue.get()
            try:
                outcome = self.learn(key, experts, store)
                logger.info("MoE online update: %s", getattr(outcome, "summary", outcome))
            except Exception as exc:  # the learner must outlive one bad update
                logger.exception("MoE online update of %s failed", key)
                outcome = LearnOutcome(key, None, None, f"update failed: {type(exc).__name__}: {exc}", 0)
            with self._idle:
                self.last[key] = outcome
                self.updates[key] = self.updates.get(key, 0) + 1
                self._pending.discard(key)
                self._idle.notify_all()


def _lower_thread_priority() -> None:
    """Let the OS prefer the sampling threads over this one (Linux: a thread's nice value)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not permitted: the update still runs
        pass


_learner: OnlineLearner | None = None


def learner() -> OnlineLearner | None:
    """The process-wide learner; None when ``MOE_SAMPLER_LEARNING=0`` turns background updates off."""
    global _learner
    if os.environ.get(LEARNING_ENV, "1").strip() in ("0", "false", "off", "no"):
        return None
    if _learner is None:
        _learner = OnlineLearner()
    return _learner


# ----------------------------------------------------------------------------- the on-demand node


@functools.lru_cache(maxsize=None)  # one class per process, however often the node list is built
def _learn_node() -> Any:
    from comfy_api.latest import io

    from ..experts import default_pool
    from . import comfy_experts, paths
    from .sampler_nodes import CATEGORY, ExpertPoolType

    class MoELearnFromRuns(io.ComfyNode):
        """Update this model's learned router from its logged runs now."""

        @classmethod
        def define_schema(cls) -> io.Schema:
            return io.Schema(
                node_id="MoELearnFromRuns",
                display_name="MoE Learn From Runs",
                category=CATEGORY,
                description="Updates the router of this model from its logged MoE Adaptive Sampler runs (the same "
                            "update the sampler runs in the background every few runs): fits a candidate, "
                            "compares it with the current version and the best fixed expert on held-out runs, "
                            "and saves it as a new version only if it is not worse.",
                inputs=[
                    io.Model.Input("model", tooltip="The model whose runs to learn from (its router is "
                                                    "models/moe_routers/learned/<model>.safetensors)."),
                    ExpertPoolType.Input("expert_pool", optional=True,
                                         tooltip="The experts the router chooses from; not connected: the five "
                                                 "main built-in experts."),
                ],
                outputs=[io.String.Output(display_name="report", tooltip="What the update did.")],
                is_output_node=True,  # queued on its own, it must run: its work is the update, not the text
                not_idempotent=True,
            )

        @classmethod
        def execute(cls, model, expert_pool=None) -> io.NodeOutput:
            import comfy.model_management
            import torch

            pool = comfy_experts.check_pool(default_pool() if expert_pool is None else expert_pool)
            key = model_fingerprint(model)
            # ComfyUI runs nodes under torch.inference_mode(), where the fit's backward() cannot work
            with torch.inference_mode(False):
                outcome = learn_now(key, pool, paths.stats_store(),
                                    should_stop=comfy.model_management.processing_interrupted)
            return io.NodeOutput(outcome.summary, ui={"text": [outcome.summary]})

    return MoELearnFromRuns


def nodes() -> list:
    """The module's nodes (built lazily: they need ComfyUI)."""
    return [_learn_node()]
