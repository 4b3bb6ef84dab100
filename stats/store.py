"""The persisted stats store: one row per run; per-expert aggregates are SQL queries.

One interface, two backends: a SQLite file (the default, :mod:`.sqlite_store`) or a PostgreSQL
database given by URL (:mod:`.postgres_store`, for a farm of workers). Safe for several writing
processes; a process killed mid-write loses at most the rows it was writing.

- Writes never raise for a database fault and never block sampling: :meth:`StatsStore.record_async`
  queues the run for a background writer. A run that cannot be written now (the database is
  locked, unreachable or unusable) is kept in memory (at most ``max_pending`` runs) and retried
  with backoff; only runs beyond that bound, or still unwritten when the process exits, are
  dropped, and :attr:`StatsStore.dropped` counts them.
- Readers never wait behind the writer: each read uses its own connection with a short timeout
  (``read_timeout``), and :meth:`StatsStore.health` says quickly whether writes are getting through.
- A SQLite file that is not a valid, complete store is moved aside and a new one started;
  :attr:`StatsStore.notice` says so.

Score definitions: docs/STATS.md.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import csv
import functools
import json
import logging
import math
import os
import queue
import random
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, TextIO, TypeVar

from .backend import BUSY, DAMAGED, GONE, Backend, StatsStoreError
from .postgres_store import PostgresBackend, is_database_url, redact
from .records import (COLUMNS, INSERT_RUNS, SELECT_RUNS, ExpertStats, RunRecord, row_to_dict, run_to_row,
                      score_experts)
from .sqlite_store import MIGRATIONS, SCHEMA_VERSION, SQLiteBackend

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "ExpertStats",
    "RunRecord",
    "StatsStore",
    "StatsStoreError",
    "default_store_path",
    "is_database_url",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")
_STOP = object()
BATCH = 256  # runs per write transaction when the background writer catches up
MAX_BACKOFF = 5.0  # seconds between retries of a write that keeps failing
PROBE_WAIT = 0.25  # seconds health() waits for the write lock before calling the store locked
PROBE_REUSE = 1.0  # seconds a probe that found the store locked is reused
_REAL = "CAST({} AS DOUBLE PRECISION)"  # AVG of integers is a float in SQLite but a decimal in PostgreSQL
_AGGREGATE = (
    "SELECT expert, COUNT(*), AVG(" + _REAL.format("success") + "), AVG(CASE WHEN success = 1 THEN quality END), "
    "AVG(confidence), AVG(CASE WHEN success = 1 THEN " + _REAL.format("nfe") + " END), "
    "AVG(CASE WHEN success = 1 THEN seconds END) FROM {table}{where} GROUP BY expert ORDER BY expert"
)


def default_store_path() -> Path:
    """Where a standalone (non-ComfyUI) session keeps its stats; ComfyUI nodes pass their own.

    ``$MOE_SAMPLER_HOME/stats.sqlite3`` if set, else the user's data directory:
    ``$XDG_DATA_HOME`` or ``~/.local/share`` on Linux, ``~/Library/Application Support`` on
    macOS, ``%LOCALAPPDATA%`` on Windows, each with a ``moe_sampler`` folder.
    """
    home = os.environ.get("MOE_SAMPLER_HOME")
    if home:
        return Path(home).expanduser() / "stats.sqlite3"
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        xdg = os.environ.get("XDG_DATA_HOME", "")
        base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "moe_sampler" / "stats.sqlite3"


class StatsStore:
    """The stats store at ``target``: a SQLite file path, or a ``postgresql://`` URL.

    Args:
        target: a database file (its folder is created if missing; ComfyUI nodes pass one under
            the user directory, standalone code can use :func:`default_store_path`), or a
            PostgreSQL connection URL (needs ``pip install 'moe-adaptive-sampler[postgres]'``).
        timeout: seconds one write attempt waits for other writers before it is retried later.
        max_pending: runs kept in memory (queued or waiting for a retry) before new ones are dropped.
        read_timeout: seconds a read waits for a lock or a connection before it reports the store
            as unavailable; readers never wait behind this store's own writer.
        schema: PostgreSQL only: the schema holding the tables (several farms in one database).
    """

    def __init__(self, target: str | os.PathLike[str], timeout: float = 5.0, max_pending: int = 10_000,
                 read_timeout: float = 0.5, schema: str = "moe_sampler") -> None:
        self.timeout = float(timeout)
        self.read_timeout = float(read_timeout)
        self.max_pending = int(max_pending)
        self.backend: Backend
        if is_database_url(target):
            self.url: str | None = str(target).strip()
            self.path: Path | None = None
            self.backend = PostgresBackend(self.url, schema)
        else:
            self.url, self.path = None, Path(target)
            self.backend = SQLiteBackend(self.path)
        self._errors: tuple[type[BaseException], ...] = (StatsStoreError, *self.backend.errors)
        self._setup_lock = threading.Lock()
        self._ready = False
        self._write_lock = threading.Lock()
        self._writer_conn: Any = None
        self._readers: list[Any] = []  # idle read connections
        self._readers_lock = threading.Lock()
        self._generation = 0  # bumped when connections are dropped (a damaged file moved aside)
        self._closed = False
        self._fault: str | None = None  # why writes are failing now
        self._notice: str | None = None  # what the store did that users should know (a file moved aside)
        self._last_warning: str | None = None
        self._dropped = 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._backlog: collections.deque[RunRecord] = collections.deque()  # the writer thread's own
        self._pending = 0  # queued + backlog
        self._idle = threading.Condition()
        self._writer: threading.Thread | None = None
        self._accepting = True
        self._probed: tuple[float, bool] = (-math.inf, True)  # (when, write lock free) of the last probe
        self._exit_hook = functools.partial(_close_at_exit, weakref.ref(self))

    def __repr__(self) -> str:
        where = redact(self.url) if self.url else str(self.path)
        return f"StatsStore({where!r}, backend={self.backend.kind})"

    # --- health ------------------------------------------------------------------------------------

    @property
    def label(self) -> str:
        """How messages name the store: the file name or the database name (never a full path)."""
        return self.backend.label

    @property
    def healthy(self) -> bool:
        """False while writes are failing; :attr:`problem` says why."""
        return self._fault is None

    @property
    def problem(self) -> str | None:
        """Why writes are failing (with how many runs wait in memory), or None."""
        fault = self._fault
        if fault is None:
            return None
        waiting = self.waiting
        return fault + (f"; {waiting} run{'s' if waiting != 1 else ''} kept in memory, retried" if waiting else "")

    @property
    def notice(self) -> str | None:
        """What the store did that users should know, e.g. a damaged file moved aside; or None."""
        return self._notice

    @property
    def dropped(self) -> int:
        """How many runs this store lost (memory bound exceeded, store closed, unwritten at exit)."""
        return self._dropped

    @property
    def waiting(self) -> int:
        """Runs held in memory, queued or waiting for a retry."""
        return self._pending

    def check(self) -> bool:
        """Open (create, migrate) the database now; True if usable, else :attr:`problem` says why.

        The store otherwise opens lazily on first use, so that constructing one never waits.
        """
        try:
            self._read(lambda conn: None)
        except StatsStoreError as exc:
            self._set_fault(str(exc))
            return False
        if self._fault is not None and not self.waiting:
            self._fault = None
        return self._fault is None

    def health(self, probe: bool = True) -> dict[str, Any]:
        """``{"healthy", "problem", "notice", "dropped", "waiting"}``, fast (well under a second).

        With ``probe``, a store whose writes are not failing yet is also asked whether the write
        lock can be had within a quarter second; if another process holds it, the store is
        reported locked. Never raises.
        """
        problem = self.problem
        if problem is None and probe and not self._closed:
            checked, free = self._probed
            # "Locked" took PROBE_WAIT to learn and is reused briefly (the node's fingerprint and its run
            # share one probe); "free" is learnt at once and never reused.
            if free or time.monotonic() - checked > PROBE_REUSE:
                try:
                    free = self._read(lambda conn: self.backend.write_lock_free(conn, PROBE_WAIT))
                except StatsStoreError as exc:
                    problem = str(exc)
                self._probed = (time.monotonic(), free)
            if problem is None and not free:
                problem = f"{self.label} is locked by another process; runs are kept in memory until it is free"
        return {"healthy": problem is None, "problem": problem, "notice": self._notice, "dropped": self._dropped,
                "waiting": self.waiting}

    # --- writing -----------------------------------------------------------------------------------

    def record(self, run: RunRecord) -> bool:
        """Write one run now (its own short transaction); True if committed.

        On a database fault it returns False (logged once per distinct fault) and the run is kept
        in memory and retried by the background writer (see :attr:`waiting`, :attr:`dropped`).
        """
        if not isinstance(run, RunRecord):
            raise TypeError(f"record() takes a RunRecord, got {type(run).__name__}")
        if self._closed:
            self._drop(1, "the store is closed")
            return False
        if self._write([run]):
            return True
        self._enqueue(run, retry=True)
        return False

    def record_async(self, run: RunRecord) -> bool:
        """Queue ``run`` for the background writer so the caller never waits on the disk.

        Returns False (logged) if the store is closed or ``max_pending`` runs are already held.
        :meth:`flush` waits for the queue; :meth:`close` drains it.
        """
        if not isinstance(run, RunRecord):
            raise TypeError(f"record_async() takes a RunRecord, got {type(run).__name__}")
        return self._enqueue(run, retry=False)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every held run is written (or dropped); False if ``timeout`` ran out first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Drain the background writer (one last try for runs held in memory), then close. Idempotent."""
        with self._idle:
            if not self._accepting:
                return
            self._accepting = False
            writer = self._writer
        if writer is not None:
            self._queue.put(_STOP)
            writer.join(timeout)
            atexit.unregister(self._exit_hook)
        self._closed = True
        with self._write_lock:
            if self._writer_conn is not None:
                self.backend.close(self._writer_conn)
                self._writer_conn = None
        self._close_readers()

    def __enter__(self) -> StatsStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _enqueue(self, run: RunRecord, retry: bool) -> bool:
        with self._idle:
            if not self._accepting:
                self._drop(1, "the store is closed")
                return False
            if self._pending >= self.max_pending:
                self._drop(1, f"{self._pending} runs are already held in memory (max_pending)")
                return False
            self._pending += 1
            if self._writer is None:
                self._writer = threading.Thread(target=self._drain, name="moe-stats-writer", daemon=True)
                self._writer.start()
                atexit.register(self._exit_hook)
        self._queue.put((run, retry))
        return True

    def _write(self, runs: list[RunRecord]) -> bool:
        """Insert ``runs`` in one transaction, waiting up to ``timeout`` for the lock; True if committed."""
        rows = [run_to_row(run) for run in runs]
        sql = self.backend.sql(INSERT_RUNS)
        deadline = time.monotonic() + self.timeout
        delay, recovered = 0.005, False
        with self._write_lock:
            while True:
                try:
                    if self._closed:
                        raise StatsStoreError(f"the stats store {self.label} is closed")
                    self._ensure_ready(self.timeout)
                    if self._writer_conn is None:
                        self._writer_conn = self.backend.connect(self.timeout, reader=False)
                    conn = self._writer_conn
                    self.backend.insert(conn, sql, rows)
                    break
                except self._errors as exc:
                    kind = self._kind(exc)
                    if kind == DAMAGED and not recovered:
                        recovered = True
                        self._recover(exc)
                        continue
                    if kind == GONE and self._writer_conn is not None:
                        self.backend.close(self._writer_conn)
                        self._writer_conn = None
                    if kind in (BUSY, GONE) and time.monotonic() + delay < deadline:
                        time.sleep(delay * random.uniform(0.5, 1.5))  # jitter: waiting writers do not retry in step
                        delay = min(delay * 2, 0.25)
                        continue
                    self._set_fault(self._describe(exc, kind))
                    return False
        if self._fault is not None:
            logger.info("MoE stats store %s: writes get through again", self.label)
        self._fault = self._last_warning = None
        return True

    def _drain(self) -> None:
        backlog = self._backlog
        failures, retry_at, stopping = 0, 0.0, False
        while True:
            if not stopping:
                wait = None if not backlog else max(0.0, retry_at - time.monotonic())
                try:
                    item = self._queue.get(timeout=wait)
                except queue.Empty:
                    item = None
                while item is not None:  # take whatever else is queued, without waiting
                    if item is _STOP:
                        stopping = True
                    else:
                        backlog.append(item[0])
                        if item[1]:  # record() already failed on it: wait for the backoff
                            retry_at = max(retry_at, time.monotonic() + 0.05)
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        item = None
            if backlog and (stopping or time.monotonic() >= retry_at):
                batch = [backlog[i] for i in range(min(BATCH, len(backlog)))]
                try:
                    ok = self._write(batch)
                except Exception:  # the writer must outlive any one bad run, or every later run would be lost
                    logger.exception("MoE stats store: unexpected error while recording %d runs", len(batch))
                    backlog.popleft()  # drop the oldest run and go on
                    self._drop(1, "an unexpected error (see the log)")
                    self._release(1)
                    continue
                if ok:
                    for _ in batch:
                        backlog.popleft()
                    self._release(len(batch))
                    failures, retry_at = 0, 0.0
                    continue
                failures += 1
                retry_at = time.monotonic() + min(0.05 * 2**failures, MAX_BACKOFF) * random.uniform(0.75, 1.25)
                if stopping:  # one last try failed: what is left is lost
                    self._drop(len(backlog), "the process is ending and the store is still unusable")
                    self._release(len(backlog))
                    backlog.clear()
            if stopping and not backlog:
                return

    def _release(self, count: int) -> None:
        with self._idle:
            self._pending -= count
            self._idle.notify_all()

    def _drop(self, count: int, why: str) -> None:
        self._dropped += count
        reason = f"{count} run{'s' if count != 1 else ''} not recorded: {why}"
        log = logger.debug if why == self._last_warning else logger.warning
        log("MoE stats store %s: %s (sampling goes on)", self.label, reason)
        self._last_warning = why

    def _set_fault(self, reason: str) -> None:
        log = logger.debug if reason == self._last_warning else logger.warning
        log("MoE stats store: %s; runs are kept in memory and retried (sampling goes on)", reason)
        self._fault = self._last_warning = reason

    # --- reading -----------------------------------------------------------------------------------

    def runs(
        self, expert: str | None = None, router: str | None = None, source: str | None = None, limit: int | None = None
    ) -> list[RunRecord]:
        """Stored runs matching every filter given, oldest first; with ``limit``, the newest ``limit``.

        Raises :class:`StatsStoreError` if the database cannot be read.
        """
        where, params = _where(expert=expert, router=router, source=source)
        sql = f"{SELECT_RUNS}{where} ORDER BY id"
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
            sql = f"SELECT * FROM ({sql} DESC LIMIT ?) AS newest ORDER BY id"
            params.append(limit)
        runs = []
        for row in self._read(lambda conn: conn.execute(self.backend.sql(sql), params).fetchall()):
            try:
                runs.append(RunRecord(**row_to_dict(row[1:])))
            except ValueError as exc:  # a foreign writer's row; exports still carry it
                logger.warning("MoE stats store %s: skipping row %d: %s", self.label, row[0], exc)
        return runs

    def expert_stats(
        self, router: str | None = None, source: str | None = None, experts: list[str] | None = None
    ) -> list[ExpertStats]:
        """Per-expert aggregates over the matching runs (definitions in docs/STATS.md).

        Speed and efficiency are relative to the experts in this result. With ``experts``, the
        result follows that order and lists experts without runs (``runs=0``, scores None);
        otherwise it holds every expert with runs, by name.
        """
        where, params = _where(router=router, source=source, experts=experts)
        sql = self.backend.sql(_AGGREGATE.replace("{where}", where))
        rows = self._read(lambda conn: conn.execute(sql, params).fetchall())
        if experts is not None:
            by_name = {row[0]: row for row in rows}
            rows = [by_name.get(name, (name, 0, None, None, None, None, None)) for name in experts]
        return score_experts(rows)

    def model_calls(self, model: str, audit_cost: int = 0) -> tuple[int, int, int]:
        """``(expert calls, audit calls, audits)`` of the sampler's stored runs of ``model``: what
        the audit budget (:class:`~moe_sampler.experts.reference.AuditBudget`) starts from when
        ComfyUI starts again. An audited row's calls are its ``details.audit.nfe``, or
        ``audit_cost`` where a row does not say. Raises :class:`StatsStoreError` if unreadable."""
        where, params = _where(model=model, source="sampling")

        def work(conn: Any) -> tuple[Any, list]:
            total = conn.execute(self.backend.sql(f"SELECT COALESCE(SUM(nfe), 0) FROM {{table}}{where}"),
                                 params).fetchone()
            audited = conn.execute(self.backend.sql(
                f"SELECT details FROM {{table}}{where} AND audit_seconds IS NOT NULL"), params).fetchall()
            return total[0], audited

        total, audited = self._read(work)
        calls = 0
        for (details,) in audited:
            try:
                nfe = (json.loads(details or "{}").get("audit") or {}).get("nfe")
            except (ValueError, AttributeError):
                nfe = None
            calls += int(nfe) if isinstance(nfe, int) and nfe >= 0 else int(audit_cost)
        return int(total or 0), calls, len(audited)

    def export_json(self, path: str | os.PathLike[str]) -> int:
        """Write every run (with its row ``id``) as JSON; atomic (temp file + ``os.replace``). Returns the count."""

        def write(out: TextIO, rows: Any) -> int:
            out.write(f'{{"schema_version": {SCHEMA_VERSION}, "runs": [')
            count = 0
            for row in rows:
                entry = {"id": row[0], **row_to_dict(row[1:])}
                if isinstance(entry["details"], str):  # a JSON object in the export, not its text
                    with contextlib.suppress(ValueError):
                        entry["details"] = json.loads(entry["details"])
                out.write(("," if count else "") + "\n  " + json.dumps(entry))
                count += 1
            out.write("\n]}\n")
            return count

        return self._export(path, write, newline=None)

    def export_csv(self, path: str | os.PathLike[str]) -> int:
        """Write every run as CSV: ``state`` a JSON list, ``success`` 1/0, None as an empty cell. Atomic."""

        def write(out: TextIO, rows: Any) -> int:
            writer = csv.writer(out)
            writer.writerow(("id", *COLUMNS))
            count = 0
            for row in rows:
                entry = row_to_dict(row[1:])
                entry["state"] = None if entry["state"] is None else json.dumps(entry["state"])
                entry["success"] = int(entry["success"])
                writer.writerow((row[0], *("" if entry[name] is None else entry[name] for name in COLUMNS)))
                count += 1
            return count

        return self._export(path, write, newline="")

    def _export(self, path: str | os.PathLike[str], write: Callable[[TextIO, Any], int], newline: str | None) -> int:
        target = Path(path)

        def stream(conn: Any) -> int:
            with self.backend.stream(conn, self.backend.sql(f"{SELECT_RUNS} ORDER BY id")) as rows:
                handle, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
                try:
                    os.chmod(temp, 0o644)  # mkstemp makes 0600; an export is meant to be shared
                    with os.fdopen(handle, "w", encoding="utf-8", newline=newline) as out:
                        count = write(out, rows)
                        out.flush()
                        os.fsync(out.fileno())
                    os.replace(temp, target)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(temp)
                    raise
            return count

        return self._read(stream)

    def _read(self, work: Callable[[Any], T]) -> T:
        """Run ``work`` on a read connection of its own (never the writer's); StatsStoreError on a fault."""
        recovered = False
        while True:
            if self._closed:
                raise StatsStoreError(f"the stats store {self.label} is closed")
            try:
                self._ensure_ready(self.read_timeout)
                conn, generation = self._take_reader()
                try:
                    result = work(conn)
                except BaseException:
                    self.backend.close(conn)  # it may be mid-transaction or broken: never reuse it
                    raise
                self._give_back_reader(conn, generation)
                return result
            except self._errors as exc:
                kind = self._kind(exc)
                if kind == DAMAGED and not recovered:
                    recovered = True
                    with self._write_lock:
                        self._recover(exc)
                    continue
                if kind == GONE and not recovered:  # a pooled connection the server ended: once more, fresh
                    recovered = True
                    self._close_readers()
                    continue
                raise StatsStoreError(self._describe(exc, kind)) from exc

    def _take_reader(self) -> tuple[Any, int]:
        with self._readers_lock:
            generation = self._generation
            if self._readers:
                return self._readers.pop(), generation
        return self.backend.connect(self.read_timeout, reader=True), generation

    def _give_back_reader(self, conn: Any, generation: int) -> None:
        with self._readers_lock:
            if generation == self._generation and not self._closed and len(self._readers) < 4:
                self._readers.append(conn)
                return
        self.backend.close(conn)

    def _close_readers(self) -> None:
        with self._readers_lock:
            readers, self._readers = self._readers, []
            self._generation += 1
        for conn in readers:
            self.backend.close(conn)

    # --- opening, faults ---------------------------------------------------------------------------

    def _ensure_ready(self, timeout: float) -> None:
        """Once: check the database (move a damaged file aside), create and migrate it."""
        if self._ready:
            return
        if not self._setup_lock.acquire(timeout=timeout):
            raise StatsStoreError(f"{self.label} is still being opened (another thread waits for its lock)")
        try:
            if self._ready:
                return
            notice = self.backend.prepare()
            if notice:
                self._notice = notice
            conn = self.backend.connect(timeout, reader=False)
            try:
                self.backend.migrate(conn)
            finally:
                self.backend.close(conn)
            self._ready = True
        finally:
            self._setup_lock.release()

    def _recover(self, exc: BaseException) -> None:
        """A damaged file: drop every connection (caller holds the write lock), move it aside, reopen."""
        if self._writer_conn is not None:
            self.backend.close(self._writer_conn)
            self._writer_conn = None
        self._close_readers()
        with self._setup_lock:
            try:
                notice = self.backend.recover(exc)
            except OSError as error:
                logger.warning("MoE stats store %s: could not move the damaged file aside: %s", self.label, error)
                notice = None
            if notice:
                self._notice = notice
            self._ready = False

    def _kind(self, exc: BaseException) -> str:
        return "closed" if isinstance(exc, StatsStoreError) else self.backend.fault(exc)

    def _describe(self, exc: BaseException, kind: str) -> str:
        if isinstance(exc, StatsStoreError):
            return str(exc)
        if kind == BUSY:
            return f"{self.label} is locked by another process (a write waited more than {self.timeout:g} s)"
        if kind == GONE:
            return f"cannot reach {self.label}: {self.backend.describe(exc)}"
        if kind == DAMAGED:
            return f"{self.label} is damaged and could not be moved aside: {self.backend.describe(exc)}"
        return f"cannot use {self.label}: {self.backend.describe(exc)}"


def _close_at_exit(ref: weakref.ref[StatsStore]) -> None:
    store = ref()
    if store is not None:
        store.close(timeout=store.timeout + 1)


def _where(experts: list[str] | None = None, **equal: str | None) -> tuple[str, list[Any]]:
    clauses = [f"{name} = ?" for name, value in equal.items() if value is not None]
    params: list[Any] = [value for value in equal.values() if value is not None]
    if experts is not None:
        if not experts:
            return " WHERE 1 = 0", []
        clauses.append(f"expert IN ({', '.join('?' * len(experts))})")
        params.extend(experts)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params
