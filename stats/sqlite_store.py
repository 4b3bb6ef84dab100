"""The SQLite backend of the stats store: one file, WAL mode, checked before it is written to.

Readers never wait behind writers (WAL; each reader has its own connection with a short busy
timeout). A file that is not a valid, complete store (garbage, cut below one page, cut inside a
page, or failing ``PRAGMA quick_check``) is never written to: it is moved aside, with its
``-wal`` and ``-shm`` files, as ``<name>.damaged-<UTC time>`` (``-wal``/``-shm`` appended), and a
new store is started; :meth:`SQLiteBackend.prepare` returns the sentence that says so.
Standard library only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from .backend import BUSY, DAMAGED, OTHER, Backend, StatsStoreError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SQLiteBackend", "check_file"]

logger = logging.getLogger(__name__)
SCHEMA_VERSION = 5
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
    (
        # Training spread over a farm (stats/claims.py): a job's sweep rows, its contexts' claims.
        "ALTER TABLE runs ADD COLUMN job TEXT",
        "CREATE INDEX runs_by_job ON runs (job)",
        """CREATE TABLE farm_jobs (job TEXT PRIMARY KEY, created REAL NOT NULL, spec TEXT NOT NULL,
        contexts INTEGER NOT NULL, next_context INTEGER NOT NULL, state TEXT NOT NULL, worker TEXT, token TEXT,
        lease REAL, version INTEGER, finished REAL)""",
        """CREATE TABLE farm_contexts (job TEXT NOT NULL, context INTEGER NOT NULL, state TEXT NOT NULL,
        worker TEXT NOT NULL, token TEXT NOT NULL, lease REAL NOT NULL, attempts INTEGER NOT NULL,
        runs INTEGER, finished REAL, PRIMARY KEY (job, context))""",
    ),
    (
        # Idempotent writes: one row per run id, so a write retried after a lost commit answer stores once.
        "ALTER TABLE runs ADD COLUMN run_id TEXT",
        "CREATE UNIQUE INDEX runs_by_run_id ON runs (run_id)",
    ),
)
HEADER = b"SQLite format 3\x00"
MIN_SQLITE = (3, 24, 0)  # the upsert clause of the run ids' insert
QUICK_CHECK_BUDGET = 2.0  # seconds; a bigger store is checked as far as this allows, once per process
_BUSY_CODES = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED
_DAMAGED_CODES = (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB
_checked: set[tuple[str, int, int]] = set()  # (path, device, inode) quick-checked by this process
_checked_lock = threading.Lock()


def _error_code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF  # primary result code; extended codes carry detail in the high bits
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return 5
    if "not a database" in text or "malformed" in text or "disk image" in text:
        return 26
    return None


def check_file(path: Path) -> str | None:
    """Why ``path`` is not a valid, complete SQLite store (cheap: header and size), or None.

    A missing or empty file is fine (a new store). The page count in the header is only
    compared with the size when no ``-wal`` file holds pages that a checkpoint may still add.
    """
    try:
        size = path.stat().st_size
        if size == 0:
            return None
        with open(path, "rb") as handle:
            header = handle.read(100)
    except FileNotFoundError:
        return None
    if len(header) < 100 or not header.startswith(HEADER):
        return f"it is not a SQLite database ({size} bytes without the SQLite header)"
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        return f"its header is damaged (page size {page_size})"
    if size < page_size or size % page_size:
        return f"it is truncated ({size} bytes, not a whole number of {page_size}-byte pages)"
    pages, counter, valid_for = (int.from_bytes(header[i : i + 4], "big") for i in (28, 24, 92))
    wal = path.with_name(path.name + "-wal")
    wal_size = wal.stat().st_size if wal.exists() else 0
    if pages and counter == valid_for and wal_size == 0 and size < pages * page_size:
        return f"it is truncated ({size} bytes; its header says {pages * page_size})"
    return None


def _quick_check(conn: sqlite3.Connection, budget: float) -> str | None:
    """``PRAGMA quick_check`` within ``budget`` seconds: the problem text, or None (also when cut short)."""
    deadline = time.monotonic() + budget
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    try:
        rows = conn.execute("PRAGMA quick_check").fetchall()
    except sqlite3.OperationalError as exc:
        if "interrupt" in str(exc).lower():
            logger.info("MoE stats store: quick_check cut short after %.1f s (a big store); not judged", budget)
            return None
        raise
    finally:
        conn.set_progress_handler(None, 0)
    results = [row[0] for row in rows]
    return None if results == ["ok"] else "PRAGMA quick_check: " + "; ".join(map(str, results[:3]))


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Serialise the move-aside between processes (flock on the folder; nothing on Windows)."""
    try:
        import fcntl
    except ImportError:  # Windows: renaming a file another process has open fails there anyway
        yield
        return
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # closing releases the lock


class SQLiteBackend(Backend):
    """A SQLite file (created with its folder if missing). Messages name the file, never its folder."""

    kind = "sqlite"
    table = "runs"
    placeholder = "?"
    errors = (sqlite3.Error, OSError)

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.label = self.path.name

    # --- opening and checking ---------------------------------------------------------------

    def prepare(self) -> str | None:
        if sqlite3.sqlite_version_info < MIN_SQLITE:  # ON CONFLICT ... DO NOTHING (the run ids) needs it
            raise StatsStoreError(f"the stats store needs SQLite {'.'.join(map(str, MIN_SQLITE))} or newer; this "
                                  f"Python has {sqlite3.sqlite_version} (sampling goes on without stats)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        problem = check_file(self.path)
        if problem is None:
            problem = self._checked_once()
        return None if problem is None else self._move_aside(problem)

    def _checked_once(self) -> str | None:
        """quick_check the file once per process (per path and inode); the problem or None."""
        try:
            status = self.path.stat()
        except FileNotFoundError:
            return None
        key = (str(self.path), status.st_dev, status.st_ino)
        with _checked_lock:
            if key in _checked or status.st_size == 0:
                return None
        conn = sqlite3.connect(self.path, timeout=1.0, isolation_level=None)
        try:
            problem = _quick_check(conn, QUICK_CHECK_BUDGET)
        except sqlite3.DatabaseError as exc:
            if _error_code(exc) not in _DAMAGED_CODES:
                raise
            problem = str(exc)
        finally:
            conn.close()
        if problem is None:
            with _checked_lock:
                _checked.add(key)
        return problem

    def _move_aside(self, problem: str) -> str | None:
        """Move the damaged file (and its -wal/-shm) aside under a folder lock; the notice text."""
        with _folder_lock(self.path.parent):
            # Another process may have moved it already and started a good store: check again.
            again = check_file(self.path)
            if again is None:
                again = self._checked_once() if self.path.exists() else None
            if again is None:
                return None
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
            number = 1
            while aside.exists():
                number += 1
                aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}-{number}")
            for suffix in ("-wal", "-shm"):  # the -wal beside its file, so SQLite still finds it
                companion = self.path.with_name(self.path.name + suffix)
                if companion.exists():
                    os.replace(companion, aside.with_name(aside.name + suffix))
            os.replace(self.path, aside)
        notice = (f"{self.label} was not a valid stats store ({again}); it was moved aside as {aside.name} and a "
                  "new store was started")
        logger.warning("MoE stats store %s: %s", self.path, notice)
        return notice

    def recover(self, exc: BaseException) -> str | None:
        problem = check_file(self.path) or f"SQLite reported: {exc}"
        with _checked_lock:
            _checked.difference_update({key for key in _checked if key[0] == str(self.path)})
        return self._move_aside(problem)

    def connect(self, timeout: float, reader: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        try:
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0].lower()
            if mode != "wal" and not reader:
                if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                    logger.warning("MoE stats store %s cannot use WAL mode; readers will wait", self.path)
            conn.execute("PRAGMA synchronous=NORMAL")  # in WAL: durable across process crashes
        except BaseException:
            conn.close()
            raise
        return conn

    def migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            logger.warning(
                "MoE stats store %s has schema v%d, newer than this version's v%d; writing the columns it knows",
                self.path, version, SCHEMA_VERSION,
            )  # fmt: skip
        if version >= SCHEMA_VERSION:
            return
        with self.transaction(conn):  # every step or none, so a crash mid-migration leaves the old schema
            version = conn.execute("PRAGMA user_version").fetchone()[0]  # another process may have migrated
            for statement in (statement for step in MIGRATIONS[version:] for statement in step):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        logger.info("MoE stats store %s: schema v%d -> v%d", self.path, version, SCHEMA_VERSION)

    # --- using it ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")  # takes the write lock up front, so it cannot deadlock on upgrade
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def stream(self, conn: sqlite3.Connection, sql: str, params: Any = ()) -> Iterator[Any]:
        cursor = conn.execute(sql, params)  # one SELECT is one consistent snapshot
        try:
            yield cursor
        finally:
            cursor.close()

    def write_lock_free(self, conn: sqlite3.Connection, wait: float) -> bool:
        previous = conn.execute("PRAGMA busy_timeout").fetchone()[0]
        conn.execute(f"PRAGMA busy_timeout = {max(int(wait * 1000), 0)}")
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError as exc:
            if _error_code(exc) in _BUSY_CODES:
                return False
            raise
        finally:
            conn.execute(f"PRAGMA busy_timeout = {previous}")

    def fault(self, exc: BaseException) -> str:
        if isinstance(exc, StatsStoreError):
            return OTHER
        code = _error_code(exc) if isinstance(exc, sqlite3.Error) else None
        if code in _BUSY_CODES:
            return BUSY
        if code in _DAMAGED_CODES:
            return DAMAGED
        return OTHER

    def describe(self, exc: BaseException) -> str:
        if isinstance(exc, OSError) and not isinstance(exc, sqlite3.Error):
            name = f" ({Path(exc.filename).name})" if exc.filename else ""
            return f"{exc.strerror or type(exc).__name__}{name}"
        text = str(exc)
        for folder in {str(self.path.parent), str(self.path.parent.resolve())}:
            text = text.replace(folder + os.sep, "").replace(folder, "<store folder>")
        return text
