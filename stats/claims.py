"""Training spread over a farm: a job's contexts claimed one at a time by workers, in the stats store.

A **farm job** is one training run (its key is derived from the trainer's inputs) whose contexts
are numbered ``0 .. contexts - 1``. Workers sharing the store (PostgreSQL for a farm of machines,
the SQLite file for several processes on one machine) each call :meth:`FarmJob.claim` for the next
context, sweep it, and :meth:`FarmJob.complete` it: that context's sweep rows and its "done" mark
are written in **one transaction**, and only while the worker still holds the claim, so

- no context is done twice: a claim carries a random token; the completing ``UPDATE`` matches
  that token and ``state = 'claimed'``, and a worker whose claim was retaken (its lease ran out)
  finds no row to update, rolls back, and its rows are never written;
- no row is lost when a worker dies mid-episode: nothing of the context was written, its claim's
  lease (:attr:`FarmJob.lease`, renewed by :meth:`FarmJob.renew` after every expert run) runs
  out, and the next worker to ask retakes it.

When every context is done, one worker takes the **final update** (:meth:`FarmJob.take_update`,
itself a lease, so a worker that dies while fitting is replaced) and records the adopted router
version with :meth:`FarmJob.finish_update`.

Tables (migration v4 of both backends): ``farm_jobs`` (one row per job: its spec, context count,
the next fresh context, ``state`` sweeping/training/done, the final update's worker, token and
lease, the adopted version) and ``farm_contexts`` (one row per context handed out: claimed or
done, by which worker and token, lease, attempts, rows written). The sweep rows are ordinary
``runs`` rows with ``job`` set. Leases are measured on the database's clock (PostgreSQL's
``clock_timestamp()``; SQLite's own machine), so the workers' clocks need not agree.
Standard library only (psycopg for PostgreSQL).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

from .backend import BUSY, GONE, StatsStoreError
from .records import INSERT_RUNS, SELECT_RUNS, RunRecord, row_to_dict, run_to_row

__all__ = ["Claim", "FarmJob", "FarmProgress", "JobMismatch", "job_key"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_LEASE = 300.0  # seconds a claim lives without renewal (a worker renews after every expert run)
UPDATE_LEASE = 600.0  # seconds the final update may take before another worker retakes it
_NOW = {"sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
        "postgresql": "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"}


class JobMismatch(ValueError):
    """The job's key is taken by a job with another spec (never expected: the key hashes the spec)."""


def job_key(spec: dict[str, Any]) -> str:
    """``farm-<24 hex>``: a stable key of a job's spec (a JSON-able dict of the trainer's inputs)."""
    import hashlib

    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return "farm-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


@dataclass(frozen=True)
class Claim:
    """A context this worker holds: its number, the claim's token, and which attempt this is (1: fresh)."""

    context: int
    token: str
    attempt: int


@dataclass(frozen=True)
class FarmProgress:
    """Where a job stands, as the database says now."""

    contexts: int
    done: int
    claimed: int  # held by a worker whose lease has not run out
    expired: int  # held by a worker whose lease ran out (retaken by the next claim)
    state: str  # "sweeping", "training" or "done"
    rows: int  # sweep rows written
    version: int | None  # the adopted router version once done
    worker: str | None  # the worker that ran (or runs) the final update


class FarmJob:
    """One farm job in ``store``'s database (a :class:`~moe_sampler.stats.store.StatsStore`).

    Args:
        store: the stats store (its backend and database; this object keeps a connection of its own).
        key: the job's key (:func:`job_key` of ``spec``).
        contexts: how many contexts the job has (numbered from 0).
        spec: what the job is (stored with it, shown by reports).
        worker: this worker's name (default ``host:pid``).
        lease: seconds a claim lives without :meth:`renew`.
        timeout: seconds one statement waits for a lock.
    """

    def __init__(self, store: Any, key: str, contexts: int, spec: dict[str, Any] | None = None,
                 worker: str | None = None, lease: float = DEFAULT_LEASE, update_lease: float = UPDATE_LEASE,
                 timeout: float = 30.0) -> None:
        if isinstance(contexts, bool) or not isinstance(contexts, int) or contexts < 1:
            raise ValueError(f"a farm job needs at least one context, got {contexts!r}")
        if not (lease > 0 and update_lease > 0):
            raise ValueError(f"leases must be positive, got {lease!r} and {update_lease!r}")
        self.store, self.backend = store, store.backend
        self.key, self.contexts, self.spec = str(key), contexts, dict(spec or {})
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self.lease, self.update_lease, self.timeout = float(lease), float(update_lease), float(timeout)
        self._conn: Any = None
        self._errors = (StatsStoreError, *self.backend.errors)
        self._opened = False
        self._prepared = False

    def __repr__(self) -> str:
        return f"FarmJob({self.key!r}, contexts={self.contexts}, worker={self.worker!r}, store={self.store.label!r})"

    # ------------------------------------------------------------------------------ plumbing

    def _sql(self, text: str) -> str:
        return self.backend.sql(text.replace("{now}", _NOW[self.backend.kind]))

    def _skip_locked(self) -> str:
        return " FOR UPDATE SKIP LOCKED" if self.backend.kind == "postgresql" else ""

    def _connection(self) -> Any:
        if self._conn is None:
            if not self._prepared:
                notice = self.backend.prepare()  # a SQLite file: its folder made, a damaged file moved aside
                if notice:
                    logger.warning("farm job %s: %s", self.key, notice)
                self._prepared = True
            conn = self.backend.connect(self.timeout, reader=False)
            try:
                self.backend.migrate(conn)
            except BaseException:
                self.backend.close(conn)
                raise
            self._conn = conn
        return self._conn

    def _retry(self, work: Callable[[Any], T]) -> T:
        """``work(conn)``; a dropped connection (a server restart) or a busy lock is retried with a fresh
        connection for up to ``timeout`` seconds; then, or for any other fault, StatsStoreError."""
        delay, deadline = 0.05, time.monotonic() + self.timeout
        while True:
            try:
                return work(self._connection())
            except self._errors as exc:
                kind = self.backend.fault(exc)
                if self._conn is not None and kind == GONE:
                    self.backend.close(self._conn)
                    self._conn = None
                if kind not in (BUSY, GONE) or time.monotonic() + delay > deadline:
                    raise StatsStoreError(f"farm job {self.key} in {self.store.label}: "
                                          f"{self.backend.describe(exc)}") from exc
                logger.info("farm job %s: %s; retrying", self.key, self.backend.describe(exc))
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    @contextlib.contextmanager
    def _transaction(self, conn: Any) -> Iterator[None]:
        with self.backend.transaction(conn):
            yield

    def _one(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = conn.execute(self._sql(sql), tuple(params)).fetchall()  # all: SQLite finishes the statement
        return rows[0] if rows else None

    def _count(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> int:
        cursor = conn.execute(self._sql(sql), tuple(params))
        return int(cursor.rowcount)

    def close(self) -> None:
        """Close this job's connection (the store stays open)."""
        if self._conn is not None:
            self.backend.close(self._conn)
            self._conn = None

    def __enter__(self) -> FarmJob:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ the job

    def open(self) -> FarmProgress:
        """Create the job if no worker has (the first one wins), check it is this job; its progress."""
        spec = json.dumps(self.spec, sort_keys=True, default=str)

        def work(conn: Any) -> None:
            with self._transaction(conn):
                conn.execute(self._sql(
                    "INSERT INTO {schema}.farm_jobs (job, created, spec, contexts, next_context, state) "
                    "VALUES (?, {now}, ?, ?, 0, 'sweeping') ON CONFLICT (job) DO NOTHING"),
                    (self.key, spec, self.contexts))
            row = self._one(conn, "SELECT contexts FROM {schema}.farm_jobs WHERE job = ?", (self.key,))
            if int(row[0]) != self.contexts:
                raise JobMismatch(f"farm job {self.key} has {row[0]} contexts in {self.store.label}, "
                                  f"this worker expects {self.contexts}")

        self._retry(work)
        self._opened = True
        return self.progress()

    def claim(self) -> Claim | None:
        """The next context for this worker: one whose claim's lease ran out (retaken), else a fresh one;
        None when every context is done or held by a live worker."""
        token = secrets.token_hex(8)

        def work(conn: Any) -> Claim | None:
            with self._transaction(conn):
                expired = self._one(
                    conn, "SELECT context, attempts FROM {schema}.farm_contexts WHERE job = ? AND state = 'claimed' "
                    "AND lease < {now} ORDER BY context LIMIT 1" + self._skip_locked(), (self.key,))
                if expired is not None:
                    taken = self._count(
                        conn, "UPDATE {schema}.farm_contexts SET worker = ?, token = ?, lease = {now} + ?, "
                        "attempts = attempts + 1 WHERE job = ? AND context = ? AND state = 'claimed' AND lease < {now}",
                        (self.worker, token, self.lease, self.key, expired[0]))
                    if taken == 1:
                        logger.info("farm job %s: %s retakes context %d (its claim's lease ran out)",
                                    self.key, self.worker, expired[0])
                        return Claim(int(expired[0]), token, int(expired[1]) + 1)
                # No UPDATE ... RETURNING: SQLite has it only from 3.35 (Debian 11 ships 3.34). The row
                # stays this transaction's (PostgreSQL's row lock, SQLite's BEGIN IMMEDIATE) until commit.
                if self._count(conn, "UPDATE {schema}.farm_jobs SET next_context = next_context + 1 "
                               "WHERE job = ? AND next_context < contexts", (self.key,)) != 1:
                    return None
                fresh = self._one(conn, "SELECT next_context FROM {schema}.farm_jobs WHERE job = ?", (self.key,))
                context = int(fresh[0]) - 1
                conn.execute(self._sql(
                    "INSERT INTO {schema}.farm_contexts (job, context, state, worker, token, lease, attempts) "
                    "VALUES (?, ?, 'claimed', ?, ?, {now} + ?, 1)"),
                    (self.key, context, self.worker, token, self.lease))
                return Claim(context, token, 1)

        if not self._opened:
            self.open()
        return self._retry(work)

    def renew(self, claim: Claim) -> bool:
        """Extend the claim's lease; False when it was retaken by another worker (or is done)."""
        return self._retry(lambda conn: self._count(
            conn, "UPDATE {schema}.farm_contexts SET lease = {now} + ? WHERE job = ? AND context = ? AND token = ? "
            "AND state = 'claimed'", (self.lease, self.key, claim.context, claim.token)) == 1)

    def release(self, claim: Claim) -> None:
        """Give the context back at once (its lease ends now), e.g. when this worker was interrupted.
        Never raises: a release that fails leaves the lease to run out."""
        try:
            self._retry(lambda conn: self._count(
                conn, "UPDATE {schema}.farm_contexts SET lease = {now} - 1 WHERE job = ? AND context = ? AND token = ? "
                "AND state = 'claimed'", (self.key, claim.context, claim.token)))
        except Exception:
            logger.warning("farm job %s: could not release context %d; its lease runs out in %g s", self.key,
                           claim.context, self.lease, exc_info=True)

    def complete(self, claim: Claim, runs: Sequence[RunRecord]) -> bool:
        """Write the context's sweep rows (``job`` set to this job) and mark it done, in one transaction.

        False (nothing written) when the claim is no longer this worker's: its lease ran out and
        another worker retook the context. Safe to call again after a dropped connection: a
        transaction that did commit is recognised by its token and not written twice.
        """
        rows = [run_to_row(run if run.job == self.key else _with_job(run, self.key)) for run in runs]
        insert = self.backend.sql(INSERT_RUNS)

        def work(conn: Any) -> bool:
            with self._transaction(conn):
                marked = self._count(
                    conn, "UPDATE {schema}.farm_contexts SET state = 'done', runs = ?, finished = {now}, lease = {now} "
                    "WHERE job = ? AND context = ? AND token = ? AND state = 'claimed'",
                    (len(rows), self.key, claim.context, claim.token))
                if marked == 1:
                    if rows:
                        with contextlib.closing(conn.cursor()) as cursor:
                            cursor.executemany(insert, rows)
                    return True
            row = self._one(conn, "SELECT state, token FROM {schema}.farm_contexts WHERE job = ? AND context = ?",
                            (self.key, claim.context))
            return row is not None and row[0] == "done" and row[1] == claim.token  # committed by an earlier try

        done = self._retry(work)
        if not done:
            logger.warning("farm job %s: context %d was retaken by another worker (this worker's lease ran out); "
                           "its %d rows are discarded", self.key, claim.context, len(rows))
        return done

    def progress(self) -> FarmProgress:
        """How many contexts are done, held and expired; the job's state, rows and adopted version."""

        def work(conn: Any) -> FarmProgress:
            job = self._one(conn, "SELECT state, version, worker FROM {schema}.farm_jobs WHERE job = ?", (self.key,))
            counts = self._one(
                conn, "SELECT SUM(CASE WHEN state = 'done' THEN 1 ELSE 0 END), "
                "SUM(CASE WHEN state = 'claimed' AND lease >= {now} THEN 1 ELSE 0 END), "
                "SUM(CASE WHEN state = 'claimed' AND lease < {now} THEN 1 ELSE 0 END) "
                "FROM {schema}.farm_contexts WHERE job = ?", (self.key,))
            rows = self._one(conn, "SELECT COUNT(*) FROM {table} WHERE job = ?", (self.key,))
            state, version, worker = job if job is not None else ("sweeping", None, None)
            done, claimed, expired = (int(v or 0) for v in counts)
            return FarmProgress(self.contexts, done, claimed, expired, state, int(rows[0]),
                                None if version is None else int(version), worker)

        return self._retry(work)

    def runs(self) -> list[RunRecord]:
        """Every sweep row of the job, oldest first."""
        select = f"{SELECT_RUNS} WHERE job = ? ORDER BY id"
        rows = self._retry(lambda conn: conn.execute(self._sql(select), (self.key,)).fetchall())
        out = []
        for row in rows:
            try:
                out.append(RunRecord(**row_to_dict(row[1:])))
            except ValueError as exc:
                logger.warning("farm job %s: skipping row %d: %s", self.key, row[0], exc)
        return out

    def contexts_done(self) -> dict[int, tuple[str, int, int]]:
        """``{context: (worker, attempts, rows)}`` of the done contexts (reports, tests)."""
        rows = self._retry(lambda conn: conn.execute(self._sql(
            "SELECT context, worker, attempts, runs FROM {schema}.farm_contexts WHERE job = ? AND state = 'done'"),
            (self.key,)).fetchall())
        return {int(c): (str(w), int(a), int(r or 0)) for c, w, a, r in rows}

    # ------------------------------------------------------------------------------ the final update

    def take_update(self) -> str | None:
        """The final update's token when this worker should run it now: every context is done and no
        other worker holds a live update lease. None otherwise."""
        token = secrets.token_hex(8)

        def work(conn: Any) -> str | None:
            with self._transaction(conn):
                lock = " FOR UPDATE" if self.backend.kind == "postgresql" else ""
                job = self._one(conn, "SELECT state FROM {schema}.farm_jobs WHERE job = ?" + lock, (self.key,))
                if job is None or job[0] == "done":
                    return None
                done = self._one(conn, "SELECT COUNT(*) FROM {schema}.farm_contexts WHERE job = ? AND state = 'done'",
                                 (self.key,))
                if int(done[0]) < self.contexts:
                    return None
                taken = self._count(
                    conn, "UPDATE {schema}.farm_jobs SET state = 'training', worker = ?, token = ?, lease = {now} + ? "
                    "WHERE job = ? AND (state = 'sweeping' OR (state = 'training' AND lease < {now}))",
                    (self.worker, token, self.update_lease, self.key))
                return token if taken == 1 else None

        return self._retry(work)

    def renew_update(self, token: str) -> bool:
        """Extend the final update's lease; False when another worker took it over."""
        return self._retry(lambda conn: self._count(
            conn, "UPDATE {schema}.farm_jobs SET lease = {now} + ? WHERE job = ? AND token = ? AND state = 'training'",
            (self.update_lease, self.key, token)) == 1)

    def release_update(self, token: str) -> None:
        """Give the final update back at once (it failed or was interrupted): the next worker to ask takes it.
        Never raises: a release that fails leaves the lease to run out."""
        try:
            self._retry(lambda conn: self._count(
                conn, "UPDATE {schema}.farm_jobs SET lease = {now} - 1 "
                "WHERE job = ? AND token = ? AND state = 'training'", (self.key, token)))
        except Exception:
            logger.warning("farm job %s: could not release the final update; its lease runs out in %g s", self.key,
                           self.update_lease, exc_info=True)

    def finish_update(self, token: str, version: int | None) -> bool:
        """Mark the job done with the adopted ``version``; False when another worker took the update over."""
        return self._retry(lambda conn: self._count(
            conn, "UPDATE {schema}.farm_jobs SET state = 'done', version = ?, finished = {now} "
            "WHERE job = ? AND token = ? AND state = 'training'", (version, self.key, token)) == 1)


def _with_job(run: RunRecord, key: str) -> RunRecord:
    import dataclasses

    return dataclasses.replace(run, job=key)
