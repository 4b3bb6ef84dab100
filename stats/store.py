"""The persisted stats store: one SQLite row per run; per-expert aggregates are SQL queries.

Safe for several writing processes (WAL, busy timeout, short ``BEGIN IMMEDIATE`` transactions,
retry with backoff); a process killed mid-write loses at most the row it was writing.
:meth:`StatsStore.record` never raises for a database fault: it logs a warning and returns False
so that sampling goes on. A damaged file is never overwritten or deleted: the store reports
``healthy=False`` with the reason and leaves the file for the user. Score definitions: docs/STATS.md.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import functools
import json
import logging
import os
import queue
import random
import sqlite3
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO, TypeVar

from .records import COLUMNS, ExpertStats, RunRecord, row_to_dict, run_to_row, score_experts

__all__ = [
    "SCHEMA_VERSION",
    "ExpertStats",
    "RunRecord",
    "StatsStore",
    "StatsStoreError",
    "default_store_path",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")
SCHEMA_VERSION = 3
# MIGRATIONS[i] takes a database from schema v{i} to v{i + 1}. Append steps; never edit a shipped one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL,
        source TEXT NOT NULL, expert TEXT NOT NULL, router TEXT NOT NULL, state BLOB, priority REAL,
        nfe INTEGER NOT NULL, steps INTEGER NOT NULL, seconds REAL NOT NULL, quality REAL,
        success INTEGER NOT NULL, confidence REAL, propensity REAL, error TEXT)""",
    ),
    (
        # Decimal TEXT: ComfyUI seeds reach 2**64 - 1, past SQLite's signed 64-bit INTEGER.
        "ALTER TABLE runs ADD COLUMN seed TEXT",
        "CREATE INDEX runs_by_expert ON runs (expert)",
        "CREATE INDEX runs_by_router ON runs (router, source)",
    ),
    (
        # Online learning and audits: where quality came from, the raw estimate, the model, why.
        "ALTER TABLE runs ADD COLUMN quality_source TEXT",
        "ALTER TABLE runs ADD COLUMN error_estimate REAL",
        "ALTER TABLE runs ADD COLUMN model TEXT",
        "ALTER TABLE runs ADD COLUMN details TEXT",
        "ALTER TABLE runs ADD COLUMN audit_seconds REAL",
        "CREATE INDEX runs_by_model ON runs (model, router)",
    ),
)
_BUSY_CODES = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED
_DAMAGED_CODES = (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB
_STOP = object()
_INSERT = f"INSERT INTO runs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_AGGREGATE = """SELECT expert, COUNT(*), AVG(success), AVG(CASE WHEN success THEN quality END),
    AVG(confidence), AVG(CASE WHEN success THEN nfe END), AVG(CASE WHEN success THEN seconds END)
    FROM runs{where} GROUP BY expert ORDER BY expert"""


class StatsStoreError(RuntimeError):
    """A read or export could not use the database; the message names the file and the reason."""


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


def _error_code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF  # primary result code; extended codes carry detail in the high bits
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return 5
    if "not a database" in text or "malformed" in text:
        return 26
    return None


@dataclass
class _Health:
    problem: str | None = None
    permanent: bool = False
    last_warning: str | None = None
    dropped: int = 0


class StatsStore:
    """SQLite stats store at ``path`` (its folder is created if missing).

    Args:
        path: the database file; ComfyUI nodes pass one under the user directory,
            standalone code can use :func:`default_store_path`.
        timeout: seconds a write waits for other writers before the run is dropped.
        max_pending: runs :meth:`record_async` may queue before it drops new ones.
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = 5.0, max_pending: int = 10_000) -> None:
        self.path = Path(path)
        self.timeout = float(timeout)
        self.max_pending = int(max_pending)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._health = _Health()
        self._closed = False
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pending = 0
        self._idle = threading.Condition()
        self._writer: threading.Thread | None = None
        self._accepting = True
        self._exit_hook = functools.partial(_close_at_exit, weakref.ref(self))

    def check(self) -> bool:
        """Open (create, migrate) the database now; True if usable, else :attr:`problem` says why.

        The store otherwise opens lazily on first use, so that constructing one never waits.
        """
        try:
            self._read(lambda conn: None)
        except StatsStoreError as exc:
            self._warn(str(exc), dropped=False)
        return self.healthy

    @property
    def healthy(self) -> bool:
        """False while the database cannot be used; :attr:`problem` says why."""
        return self._health.problem is None

    @property
    def problem(self) -> str | None:
        """Why the store is unhealthy, or None."""
        return self._health.problem

    @property
    def dropped(self) -> int:
        """How many runs this store could not record."""
        return self._health.dropped

    def record(self, run: RunRecord) -> bool:
        """Insert one run in its own short transaction; True if committed, False (logged) on a fault."""
        if not isinstance(run, RunRecord):
            raise TypeError(f"record() takes a RunRecord, got {type(run).__name__}")
        if self._closed:
            self._warn("the store is closed")
            return False
        try:
            self._with_retry(lambda conn: conn.execute(_INSERT, run_to_row(run)), write=True)
        except (sqlite3.Error, OSError, StatsStoreError) as exc:
            self._warn(self._classify(exc))
            return False
        if not self._health.permanent:
            self._health.problem = self._health.last_warning = None
        return True

    def record_async(self, run: RunRecord) -> bool:
        """Queue ``run`` for the background writer so the caller never waits on the disk.

        Returns False (logged) if the store is closed or ``max_pending`` runs are already queued.
        :meth:`flush` waits for the queue; :meth:`close` drains it.
        """
        if not isinstance(run, RunRecord):
            raise TypeError(f"record_async() takes a RunRecord, got {type(run).__name__}")
        with self._idle:
            if not self._accepting or self._pending >= self.max_pending:
                self._warn("the store is closed" if not self._accepting else f"{self._pending} runs already queued")
                return False
            self._pending += 1
            if self._writer is None:
                self._writer = threading.Thread(target=self._drain, name="moe-stats-writer", daemon=True)
                self._writer.start()
                atexit.register(self._exit_hook)
        self._queue.put(run)
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued run is written (or dropped); False if ``timeout`` ran out first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Drain the background writer, then close the database. Idempotent."""
        with self._idle:
            if not self._accepting:
                return
            self._accepting = False
            writer = self._writer
        if writer is not None:
            self._queue.put(_STOP)
            writer.join(timeout)
            atexit.unregister(self._exit_hook)
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> StatsStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def runs(
        self, expert: str | None = None, router: str | None = None, source: str | None = None, limit: int | None = None
    ) -> list[RunRecord]:
        """Stored runs matching every filter given, oldest first; with ``limit``, the newest ``limit``.

        Raises :class:`StatsStoreError` if the database cannot be read.
        """
        where, params = _where(expert=expert, router=router, source=source)
        sql = f"SELECT id, {', '.join(COLUMNS)} FROM runs{where} ORDER BY id"
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
            sql = f"SELECT * FROM ({sql} DESC LIMIT ?) ORDER BY id"
            params.append(limit)
        runs = []
        for row in self._read(lambda conn: conn.execute(sql, params).fetchall()):
            try:
                runs.append(RunRecord(**row_to_dict(row[1:])))
            except ValueError as exc:  # a foreign writer's row; exports still carry it
                logger.warning("MoE stats store %s: skipping row %d: %s", self.path, row[0], exc)
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
        rows = self._read(lambda conn: conn.execute(_AGGREGATE.format(where=where), params).fetchall())
        if experts is not None:
            by_name = {row[0]: row for row in rows}
            rows = [by_name.get(name, (name, 0, None, None, None, None, None)) for name in experts]
        return score_experts(rows)

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

        def stream(conn: sqlite3.Connection) -> int:
            # One SELECT is one consistent snapshot; rows stream to the file instead of into memory.
            rows = conn.execute(f"SELECT id, {', '.join(COLUMNS)} FROM runs ORDER BY id")
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

    def _connection(self) -> sqlite3.Connection:
        if self._health.permanent:
            raise StatsStoreError(self._health.problem)
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
            try:
                if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                    logger.warning("MoE stats store %s cannot use WAL mode; concurrent writers will wait", self.path)
                conn.execute("PRAGMA synchronous=NORMAL")  # in WAL: durable across process crashes
                _migrate(conn, self.path)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _with_retry(self, work: Callable[[sqlite3.Connection], T], write: bool) -> T:
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while True:
            try:
                with self._lock:
                    conn = self._connection()
                    if not write:
                        return work(conn)
                    with _transaction(conn):
                        return work(conn)
            except sqlite3.OperationalError as exc:
                if _error_code(exc) not in _BUSY_CODES or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay * random.uniform(0.5, 1.5))  # jitter so waiting writers do not retry in step
            delay = min(delay * 2, 0.25)

    def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StatsStoreError(f"the stats store {self.path} is closed")
        try:
            return self._with_retry(work, write=False)
        except (sqlite3.Error, OSError) as exc:
            raise StatsStoreError(self._classify(exc)) from exc

    def _classify(self, exc: BaseException) -> str:
        """Turn a fault into a sentence; a damaged file disables this store for good, left untouched."""
        if isinstance(exc, StatsStoreError):
            return str(exc)
        code = _error_code(exc)
        if code in _BUSY_CODES:
            return f"{self.path} stayed locked by another writer for more than {self.timeout:g} s"
        if code in _DAMAGED_CODES:
            reason = (
                f"{self.path} is damaged or not a stats database ({exc}); it is left untouched: "
                "move it aside to start a new store"
            )
            self._health.permanent = True
        else:
            reason = f"cannot use {self.path}: {exc}"
        self._health.problem = reason
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        return reason

    def _warn(self, reason: str, dropped: bool = True) -> None:
        self._health.dropped += dropped
        # Warn once per distinct fault; a store that stays broken must not flood the log.
        log = logger.debug if reason == self._health.last_warning else logger.warning
        log("MoE stats store: %s%s", reason, "; the run was not recorded (sampling goes on)" if dropped else "")
        self._health.last_warning = reason

    def _drain(self) -> None:
        while True:
            run = self._queue.get()
            if run is _STOP:
                return
            try:
                self.record(run)
            except Exception:
                # The writer must outlive any one bad run, or every later run would be lost.
                logger.exception("MoE stats store: unexpected error while recording a run")
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()


def _close_at_exit(ref: weakref.ref[StatsStore]) -> None:
    store = ref()
    if store is not None:
        store.close(timeout=store.timeout)


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        logger.warning(
            "MoE stats store %s has schema v%d, newer than this version's v%d; writing the columns it knows",
            path, version, SCHEMA_VERSION,
        )  # fmt: skip
    if version >= SCHEMA_VERSION:
        return
    with _transaction(conn):  # every step or none, so a crash mid-migration leaves the old schema
        version = conn.execute("PRAGMA user_version").fetchone()[0]  # another process may have migrated
        for statement in (statement for step in MIGRATIONS[version:] for statement in step):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    logger.info("MoE stats store %s: schema v%d -> v%d", path, version, SCHEMA_VERSION)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that takes the write lock up front, so it cannot deadlock on upgrade."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def _where(experts: list[str] | None = None, **equal: str | None) -> tuple[str, list[Any]]:
    clauses = [f"{name} = ?" for name, value in equal.items() if value is not None]
    params: list[Any] = [value for value in equal.values() if value is not None]
    if experts is not None:
        clauses.append(f"expert IN ({', '.join('?' * len(experts))})")
        params.extend(experts)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

