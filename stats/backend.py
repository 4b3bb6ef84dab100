"""What a database backend gives :class:`~moe_sampler.stats.store.StatsStore`: one interface, two backends.

:mod:`.sqlite_store` (a file, the default) and :mod:`.postgres_store` (a server, for a farm of
workers) implement :class:`Backend`. The store writes its SQL once with ``?`` placeholders and the
table name ``{table}``; :meth:`Backend.sql` adapts it. Standard library only.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Iterator

__all__ = ["BUSY", "DAMAGED", "GONE", "OTHER", "Backend", "StatsStoreError"]

# What went wrong, as far as the store's reaction is concerned.
BUSY = "busy"  # another writer holds the lock: wait, retry later
DAMAGED = "damaged"  # the file is not a valid, complete store: move it aside, start a new one
GONE = "gone"  # the connection broke or the server is unreachable: reconnect later
OTHER = "other"  # anything else (permissions, a full disk, a missing driver): retry later


class StatsStoreError(RuntimeError):
    """A read or export could not use the database; the message names the store (never a full path)."""


class Backend:
    """One kind of database. Connections are DB-API-like: ``execute(sql, params)`` returning a cursor.

    Attributes:
        kind: ``"sqlite"`` or ``"postgresql"``.
        label: how users see the store in messages: a file name or a database name, never an
            absolute server path or a password.
        table: the runs table's name in SQL.
        errors: the exception types the driver raises (caught and classified by :meth:`fault`).
        schema_version_sql: not used by the store; backends keep their own version bookkeeping.
    """

    kind = "abstract"
    label = "the stats store"
    table = "runs"
    prefix = ""  # what ``{schema}.`` becomes in SQL: "" (SQLite) or the PostgreSQL schema and a dot
    placeholder = "?"
    errors: tuple[type[BaseException], ...] = (OSError,)

    def sql(self, text: str) -> str:
        """``text`` with ``{table}`` and ``{schema}.`` filled in and ``?`` placeholders in the driver's style."""
        text = text.replace("{table}", self.table).replace("{schema}.", self.prefix)
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    def prepare(self) -> str | None:
        """Run once before the first connection (checks, repairs); returns a notice for users or None."""
        return None

    def connect(self, timeout: float, reader: bool) -> Any:
        """A new connection; a reader waits at most ``timeout`` for locks, a writer too."""
        raise NotImplementedError

    def close(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            conn.close()

    def migrate(self, conn: Any) -> None:
        """Bring the schema to the current version (one transaction, safe against concurrent migrators)."""
        raise NotImplementedError

    def transaction(self, conn: Any) -> ContextManager[None]:
        """A write transaction that takes the write lock up front."""
        raise NotImplementedError

    def insert(self, conn: Any, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """Insert ``rows`` with ``sql`` in one transaction (all or none)."""
        with self.transaction(conn), contextlib.closing(conn.cursor()) as cursor:
            cursor.executemany(sql, rows)

    def stream(self, conn: Any, sql: str, params: Any = ()) -> ContextManager[Iterator[Any]]:
        """Rows of one consistent snapshot, fetched a batch at a time."""
        raise NotImplementedError

    def write_lock_free(self, conn: Any, wait: float) -> bool:
        """Whether a write could start within ``wait`` seconds (False: another process holds the lock)."""
        return True

    def fault(self, exc: BaseException) -> str:
        """:data:`BUSY`, :data:`DAMAGED`, :data:`GONE` or :data:`OTHER` for a driver exception."""
        return OTHER

    def describe(self, exc: BaseException) -> str:
        """The exception as text for users: no absolute paths, no passwords."""
        return str(exc)

    def recover(self, exc: BaseException) -> str | None:
        """After a :data:`DAMAGED` fault (every connection closed): make the store usable again.

        Returns a notice for users (what was done) or None if nothing could be done.
        """
        return None
