"""Farm claims on a SQLite older than 3.35 (no ``UPDATE ... RETURNING``): Debian 11's libsqlite3
3.34 (the python:3.10-bullseye images) and Ubuntu 20.04's 3.31. ``ON CONFLICT ... DO NOTHING``
(3.24) is fine there; RETURNING is not, so a claim must not use it."""

from __future__ import annotations

import sqlite3

from moe_sampler.stats import sqlite_store
from moe_sampler.stats.claims import FarmJob
from moe_sampler.stats.store import StatsStore


class _Sqlite334:
    """A connection that refuses RETURNING, as SQLite before 3.35 does."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, *args):
        if "RETURNING" in sql.upper():
            raise sqlite3.OperationalError('near "RETURNING": syntax error')
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self._conn, name)


def test_claims_work_without_returning(tmp_path, monkeypatch):
    connect = sqlite_store.SQLiteBackend.connect
    monkeypatch.setattr(sqlite_store.SQLiteBackend, "connect",
                        lambda self, timeout, reader: _Sqlite334(connect(self, timeout, reader)))
    with StatsStore(str(tmp_path / "stats.sqlite3")) as store, FarmJob(store, "farm-old", 3, worker="w") as job:
        claims = [job.claim() for _ in range(4)]
        assert [c.context for c in claims[:3]] == [0, 1, 2] and claims[3] is None
        assert all(job.complete(c, []) for c in claims[:3])
        assert job.progress().done == 3
