"""The MoE Router Trainer spread over a farm: workers sweep their share of a job's contexts, one update learns from all.

A job's contexts are a fixed, numbered list (the same on every worker: the key of the job hashes
everything that makes them). :func:`run_farm_worker` loops: claim the next context
(:class:`~moe_sampler.stats.claims.FarmJob`), sweep every expert of the pool on it
(:func:`sweep_context`, renewing the claim after each expert run), write its rows and mark it
done in one transaction; when nothing is left to claim it waits for the other workers (retaking
the context of one that died once its lease runs out); when every context is done, exactly one
worker trains the router from all the job's rows (:func:`train_from_runs`) and adopts it through
the router registry (:func:`adopt`). The others return the adopted version.

The update is deterministic: rows are ordered by context and pool order and the fit is seeded,
so the adopted router does not depend on which worker swept what, or on the order they finished.
"""

from __future__ import annotations

import inspect
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..experts.base import Expert, features_of
from ..stats.claims import FarmJob
from ..stats.records import RunRecord
from .environment import Outcome, RunReport
from .model import Router
from .policy import cost_from_nfe

__all__ = ["ClaimLost", "FarmResult", "adopt", "context_priority", "run_farm_worker", "sweep_context",
           "train_from_runs"]

logger = logging.getLogger(__name__)
UPDATES_PER_EPISODE = 4  # MoERLTrainer's default: Adam steps per context of the final update
ADOPT_TRIES = 5
FIT_CHUNK = 500  # Adam steps between lease renewals and Cancel checks of the final update


class ClaimLost(RuntimeError):
    """This worker's claim on a context was retaken by another worker (its lease ran out)."""


@dataclass(frozen=True)
class FarmResult:
    """What one worker did in a farm job, and where the job stands at its end."""

    job: str
    contexts: int
    swept: int  # contexts this worker swept and wrote
    lost: int  # contexts this worker swept but another worker had retaken (rows discarded)
    done: int  # contexts the farm has done
    rows: int  # sweep rows of the job in the store
    ran_update: bool  # this worker ran the final update
    version: int | None  # the adopted router version (None until the job is done)
    state: str  # "sweeping", "training" or "done"
    update_worker: str | None  # the worker that ran the final update
    stopped: bool  # ended by should_stop before the job was done
    waited: float  # seconds spent waiting for other workers


def context_priority(key: str, context: int) -> float:
    """The priority a context's rows are recorded at: drawn per context from the job's key, as the
    single-machine trainer draws one per episode (the router learns every priority)."""
    return random.Random(f"{key}:{context}").random()


def sweep_context(environment: Any, context: Any, experts: Sequence[Expert], priority: float, *, job: str,
                  index: int, router_label: str, model: str | None = None,
                  after_run: Callable[[], None] | None = None) -> list[RunRecord]:
    """Run every expert on ``context`` (the environment's reference and scoring) and return the rows.

    ``after_run`` is called after each expert run (renewing the claim; it raises
    :class:`ClaimLost` to stop early). Each row carries the context's state at ``priority``,
    ``quality_source="sweep"``, ``propensity=1``, the job and ``details={"farm": {"context": index}}``.
    """
    reports: dict[str, RunReport] = {}
    previous = getattr(environment, "on_run", None)

    def on_run(report: RunReport) -> None:
        reports[report.expert] = report
        if previous is not None:
            previous(report)

    environment.on_run = on_run
    try:
        outcomes: list[Outcome] = []
        for expert in experts:
            outcomes.extend(environment.evaluate(context, [expert]))
            if after_run is not None:
                after_run()
    finally:
        environment.on_run = previous
    state = environment.state(context, priority)
    state = [float(v) for v in (state.tolist() if hasattr(state, "tolist") else state)]
    seed = getattr(context, "seed", None)
    runs = []
    for outcome in outcomes:
        report = reports.get(outcome.expert)
        error = report.error if report is not None else (None if outcome.success else "failed")
        runs.append(RunRecord(
            expert=outcome.expert, router=router_label, nfe=int(outcome.nfe),
            steps=int(report.steps) if report is not None else 0, seconds=max(float(outcome.seconds), 0.0),
            success=bool(outcome.success), source="training", quality=outcome.quality if outcome.success else None,
            propensity=1.0, priority=priority, state=state, error=error, seed=None if seed is None else int(seed),
            quality_source="sweep", model=model, job=job,
            details={"farm": {"context": index}, **((report.pair_details() if report is not None else None) or {})},
        ))
    return runs


def _context_of(run: RunRecord) -> int:
    details = run.details_dict() or {}
    return int((details.get("farm") or {}).get("context", -1))


def train_from_runs(runs: Sequence[RunRecord], experts: Sequence[Expert], *, steps: int, seed: int = 0,
                    router: Router | None = None, batch_size: int = 64, learning_rate: float = 3e-3,
                    between: Callable[[], None] | None = None) -> Router:
    """A router fitted on sweep rows: ``steps`` Adam steps of the trainer's weighted regression on
    quality (0 for a failed run, as in a sweep episode) and cost. ``between()`` is called every
    :data:`FIT_CHUNK` steps (renew the update's lease, check for Cancel; it may raise to stop);
    the chunks do not change the result.

    Rows of experts outside ``experts`` or without a state are skipped. Rows are ordered by context
    and pool order first, so the result depends on the rows, not on the order they were written.
    """
    from .trainer import MoERLTrainer

    order = {e.name: i for i, e in enumerate(experts)}
    usable = sorted((r for r in runs if r.expert in order and r.state is not None),
                    key=lambda r: (_context_of(r), order[r.expert], r.seed or 0))
    start = router if router is not None else Router.default()
    # No episodes are run, so the trainer needs no environment: only its buffer and fit.
    trainer = MoERLTrainer(None, start, list(experts), seed=seed,  # type: ignore[arg-type]
                           learning_rate=learning_rate, batch_size=batch_size, buffer_size=max(len(usable), 1))
    if usable:
        descriptors = features_of(experts)
        trainer.add_rows(torch.tensor([list(r.state) for r in usable], dtype=torch.float32),
                         descriptors[[order[r.expert] for r in usable]],
                         torch.tensor([float(r.quality or 0.0) if r.success else 0.0 for r in usable]),
                         torch.tensor([float(cost_from_nfe(r.nfe)) for r in usable]),
                         torch.ones(len(usable)))
        for done in range(0, steps, FIT_CHUNK):
            trainer.fit(min(FIT_CHUNK, steps - done))
            if between is not None:
                between()
    trained = trainer.router
    trained.descriptors = tuple(e.descriptor for e in experts)
    trained.training = {**trained.training, "contexts": len({_context_of(r) for r in usable}), "runs": len(usable)}
    # The job's calibration pairs (estimate inputs, true error): the sampler scores its estimates with it.
    from .online import calibrate_rows, rows_from_records

    calibration = calibrate_rows(rows_from_records(usable))[1]
    if calibration is not None:
        trained.training["calibration"] = calibration.to_dict()
    return trained


def adopt(registry: Any, name: str, router: Router, job: str) -> int:
    """Adopt ``router`` as the next version of ``name`` in ``registry`` (a LocalRegistry or the farm's
    PostgresRegistry); its version. A version already adopted for ``job`` (an update that died
    after adopting) is returned as it is, not adopted twice."""
    router.training = {**router.training, "farm_job": job}
    for _ in range(ADOPT_TRIES):
        latest = registry.latest(name)
        if latest is not None and latest.training.get("farm_job") == job:
            return int(latest.version)
        if "expected" in inspect.signature(registry.publish).parameters:
            from .pg_registry import LostRace

            try:
                return int(registry.publish(name, router, expected=latest.version if latest else 0).version)
            except LostRace as exc:
                logger.warning("farm job %s: %s; trying again from the winner", job, exc)
                continue
        return int(registry.publish(name, router).version)
    raise RuntimeError(f"farm job {job}: router {name} could not be adopted: {ADOPT_TRIES} other adoptions won")


def run_farm_worker(job: FarmJob, sweep: Callable[[int, Callable[[], None]], list[RunRecord]],
                    update: Callable[[list[RunRecord]], int | None], *, should_stop: Callable[[], bool] | None = None,
                    poll: float = 1.0, wait: bool = True,
                    on_context: Callable[[int, bool], None] | None = None) -> FarmResult:
    """Work on ``job`` until it is done (or ``should_stop()``; or, without ``wait``, until nothing is
    left to claim).

    ``sweep(context, renew)`` returns the rows of one context and calls ``renew()`` between expert
    runs; ``update(runs, renew)`` trains and adopts the router from all the job's rows, calls
    ``renew()`` now and then (it raises :class:`ClaimLost` once another worker took the update
    over) and returns the adopted version. ``on_context(context, written)`` follows each swept context. An exception in
    ``sweep`` (ComfyUI's interrupt) releases the claim at once, so another worker can take it.
    """
    job.open()
    swept = lost = 0
    ran_update = stopped = False
    waited = 0.0
    while True:
        if should_stop is not None and should_stop():
            stopped = True
            break
        claim = job.claim()
        if claim is not None:
            def renew(claim=claim) -> None:
                if not job.renew(claim):
                    raise ClaimLost(f"context {claim.context} of {job.key} was retaken by another worker")
            try:
                runs = sweep(claim.context, renew)
            except ClaimLost as exc:
                logger.warning("farm job %s: %s; moving on", job.key, exc)
                lost += 1
                continue
            except BaseException:
                job.release(claim)
                raise
            written = job.complete(claim, runs)
            swept += written
            lost += not written
            if on_context is not None:
                on_context(claim.context, written)
            continue
        token = job.take_update()
        if token is not None:
            logger.info("farm job %s: every context is done; %s runs the final update", job.key, job.worker)
            def renew_update(token=token) -> None:
                if not job.renew_update(token):
                    raise ClaimLost(f"the final update of {job.key} was retaken by another worker")
            try:
                version = update(job.runs(), renew_update)
            except ClaimLost as exc:
                logger.warning("farm job %s: %s; it finishes the job", job.key, exc)
                continue
            except BaseException:
                job.release_update(token)  # another worker (or this one, queued again) takes it at once
                raise
            ran_update = job.finish_update(token, version)
            if not ran_update:
                logger.warning("farm job %s: the final update's lease ran out while it ran; another worker "
                               "took it over", job.key)
            continue  # the loop's next pass sees the job done
        progress = job.progress()
        if progress.state == "done" or not wait:
            break
        start = time.monotonic()
        deadline = start + poll
        while time.monotonic() < deadline and not (should_stop is not None and should_stop()):
            time.sleep(min(0.05, poll))
        waited += time.monotonic() - start
    progress = job.progress()
    return FarmResult(job.key, job.contexts, swept, lost, progress.done, progress.rows, ran_update, progress.version,
                      progress.state, progress.worker, stopped and progress.state != "done", waited)
