"""Router versions in a farm's PostgreSQL database: one adopted version per model, served to every worker.

:class:`PostgresRegistry` implements the :class:`~moe_sampler.router.versions.RouterRegistry`
interface of :class:`~moe_sampler.router.versions.LocalRegistry` on the stats store's database
(the same URL, the same schema, default ``moe_sampler``)::

    moe_sampler.router_versions  (name, version) primary key, parent, created, worker, model,
                                 training (JSON), data (the safetensors bytes), sha256
    moe_sampler.routers          name primary key, version: the followed (adopted) version

- **Adoption is one transaction** that inserts the version row and moves ``routers.version``
  from the version the candidate was fitted from to the new one (``UPDATE ... WHERE version =
  expected``; the first version inserts the pointer row). Two workers that adopt at once from
  the same version cannot both win: the second finds the pointer moved (or the ``(name,
  version)`` key taken), its transaction is rolled back, and :meth:`PostgresRegistry.publish`
  raises :class:`LostRace` saying which version won. Its candidate was judged against a version
  that is no longer current, so it is dropped; the next update starts from the winner.
- **Every worker follows** the adopted versions without a restart: a daemon thread
  (:meth:`PostgresRegistry.follow`) asks ``SELECT name, version FROM routers`` (one small
  query) at most once per ``poll_seconds`` (``$MOE_SAMPLER_ROUTER_POLL_SECONDS``, default 5) and
  copies each new version into the local routers folder with :class:`LocalRegistry`'s layout
  (``<name>.versions/vNNNN.safetensors`` and the followed ``<name>.safetensors``, each written to
  a temp file and renamed). The sampler keeps reading the local file (its cache and ComfyUI's
  node fingerprint key on the file's mtime), so sampling never waits for the database.
- **A worker that loses the database keeps sampling** with the last version it copied (the
  local file); the follower retries each interval and logs once when the database goes and once
  when it is back. Reads (:meth:`~PostgresRegistry.latest`, :meth:`~PostgresRegistry.load`,
  :meth:`~PostgresRegistry.versions`) fall back to the local copy while the database is down.

The tables are created with ``IF NOT EXISTS`` in one transaction under the stats store's
migration advisory lock (:data:`moe_sampler.stats.postgres_store._LOCK_KEY`), beside the store's
own tables; the SQLite store is untouched. psycopg is imported on first use, so this module
imports without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from ..stats.backend import StatsStoreError
from ..stats.postgres_store import _LOCK_KEY, SCHEMA, _driver, redact
from .model import Router, RouterLoadError
from .versions import EXTENSION, LocalRegistry, VersionInfo, check_registry_name

__all__ = ["LostRace", "PostgresRegistry", "RegistryUnavailable", "shared_registry", "POLL_VARIABLE"]

logger = logging.getLogger(__name__)
POLL_VARIABLE = "MOE_SAMPLER_ROUTER_POLL_SECONDS"
DEFAULT_POLL_SECONDS = 5.0
CONNECT_TIMEOUT = 5  # seconds; the follower runs off the sampling path, a publish in the learner thread
REGISTRY_SCHEMA_VERSION = 1  # meta key 'router_registry_version'


class LostRace(RuntimeError):
    """Another worker adopted a version of this router first; this candidate was not stored."""

    def __init__(self, name: str, expected: int, current: int | None) -> None:
        self.name, self.expected, self.current = name, expected, current
        now = f"v{current}" if current else "another version"
        super().__init__(f"router {name}: lost the race: {now} was adopted by another worker while this candidate "
                         f"was fitted from v{expected}; candidate discarded (the next update starts from {now})")


class RegistryUnavailable(RuntimeError):
    """The database could not be reached or used; the message names the database, not the password."""


def poll_seconds() -> float:
    """``$MOE_SAMPLER_ROUTER_POLL_SECONDS`` (default 5; at least 0.05)."""
    raw = os.environ.get(POLL_VARIABLE, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_POLL_SECONDS
    except ValueError:
        logger.warning("%s=%r is not a number of seconds; using %s", POLL_VARIABLE, raw, DEFAULT_POLL_SECONDS)
        value = DEFAULT_POLL_SECONDS
    return max(value, 0.05)


def _psycopg() -> Any:
    """The driver; :class:`RegistryUnavailable` saying what to install when it is missing."""
    try:
        return _driver()
    except StatsStoreError as exc:
        raise RegistryUnavailable(f"router registry: {exc}") from None


def router_bytes(router: Router) -> bytes:
    """The router as safetensors bytes (exactly what :meth:`Router.save` writes)."""
    with tempfile.TemporaryDirectory(prefix="moe_router_") as folder:
        path = router.save(Path(folder) / ("router" + EXTENSION))
        return path.read_bytes()


class PostgresRegistry:
    """Router versions in PostgreSQL, copied into ``cache_folder`` (a routers folder) for the sampler.

    Args:
        url: the ``postgresql://`` URL (the stats store's).
        cache_folder: the local routers folder (``models/moe_routers``); versions are copied
            there in :class:`LocalRegistry`'s layout and served from there while the database is down.
        schema: the schema of the tables (the stats store's; tests use one of their own).
        poll: seconds between two checks of the adopted versions by :meth:`follow` (default
            :func:`poll_seconds`).
        worker: this worker's name in the version rows (default ``host:pid``).
    """

    def __init__(self, url: str, cache_folder: str | os.PathLike, schema: str = SCHEMA,
                 poll: float | None = None, worker: str | None = None) -> None:
        if not isinstance(schema, str) or not re.fullmatch(r"[a-z_][a-z0-9_]*", schema):
            raise ValueError(f"schema must be a lower-case SQL identifier, got {schema!r}")
        self.url = url.strip()
        self.schema = schema
        self.cache = LocalRegistry(cache_folder)
        self.poll = float(poll) if poll is not None else poll_seconds()
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self._ready = False
        self._setup_lock = threading.Lock()
        self._mirror_lock = threading.Lock()
        self._mirrored: dict[str, int] = {}  # name -> version copied into the cache (this process)
        self._bad: dict[str, int] = {}  # name -> a version whose bytes failed their checksum (warned once)
        self._follow_conn: Any = None
        self._follow_lock = threading.Lock()  # the follower's connection
        self._thread_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.online: bool | None = None  # the follower's last answer: reached the database or not
        self.checks = 0  # follower checks done (tests, status)
        self.last_check: float | None = None  # time.time() of the last successful check
        self.listeners: list[Callable[[str, int], None]] = []  # called after a new version is copied

    def __repr__(self) -> str:
        return f"PostgresRegistry({redact(self.url)!r}, schema={self.schema!r}, cache={str(self.cache.folder)!r})"

    # ------------------------------------------------------------------------------ connections

    def _connect(self) -> Any:
        psycopg = _psycopg()
        try:
            # TCP keepalives: a server machine that vanishes is noticed in about 25 s, not hours
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT, keepalives=1,
                                   keepalives_idle=10, keepalives_interval=5, keepalives_count=3)
        except psycopg.Error as exc:
            raise RegistryUnavailable(self._describe(exc)) from None
        try:
            self._setup(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _describe(self, exc: BaseException) -> str:
        text = " ".join(str(exc).split()) or type(exc).__name__
        return f"router registry in {redact(self.url).split('@')[-1]}: {redact(text)}"

    def _setup(self, conn: Any) -> None:
        """Create the tables once per registry (IF NOT EXISTS, under the store's migration lock)."""
        if self._ready:
            return
        with self._setup_lock:
            if self._ready:
                return
            s = self.schema
            exists = conn.execute("SELECT to_regclass(%s), to_regclass(%s)",
                                  (f"{s}.router_versions", f"{s}.routers")).fetchone()
            if exists[0] is None or exists[1] is None:
                with conn.transaction():
                    conn.execute("SET LOCAL lock_timeout = 0")
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
                    conn.execute(f"CREATE TABLE IF NOT EXISTS {s}.meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                    conn.execute(
                        f"CREATE TABLE IF NOT EXISTS {s}.router_versions (name TEXT NOT NULL, version INTEGER NOT NULL,"
                        " parent INTEGER, created DOUBLE PRECISION NOT NULL, worker TEXT NOT NULL, model TEXT,"
                        " training TEXT NOT NULL, data BYTEA NOT NULL, sha256 TEXT NOT NULL,"
                        " PRIMARY KEY (name, version))")
                    conn.execute(
                        f"CREATE TABLE IF NOT EXISTS {s}.routers (name TEXT PRIMARY KEY, version INTEGER NOT NULL,"
                        " updated DOUBLE PRECISION NOT NULL, worker TEXT NOT NULL)")
                    conn.execute(f"INSERT INTO {s}.meta (key, value) VALUES ('router_registry_version', %s) "
                                 "ON CONFLICT (key) DO NOTHING", (str(REGISTRY_SCHEMA_VERSION),))
            self._ready = True

    def _run(self, work: Callable[[Any], Any]) -> Any:
        """``work(conn)`` on a fresh connection; database faults become :class:`RegistryUnavailable`."""
        psycopg = _psycopg()
        conn = self._connect()
        try:
            return work(conn)
        except psycopg.Error as exc:
            raise RegistryUnavailable(self._describe(exc)) from None
        finally:
            conn.close()

    # ------------------------------------------------------------------------------ the interface

    def followed_path(self, name: str) -> Path:
        """The local copy of the adopted version (what the sampler loads): the cache's followed file."""
        return self.cache.followed_path(name)

    def version_path(self, name: str, version: int) -> Path:
        return self.cache.version_path(name, version)

    def publish(self, name: str, router: Router, expected: int | None = None) -> VersionInfo:
        """Adopt ``router`` as version ``expected + 1`` of ``name`` in one transaction.

        ``expected``: the version the candidate was fitted from and judged against (default: its
        ``training['version']``, 0 for a router without one, as :func:`~.online.update` leaves it).
        Raises :class:`LostRace` when the followed version is no longer ``expected`` (another
        worker adopted first) and :class:`RegistryUnavailable` when the database cannot be used.
        The new version is copied into the local cache before this returns.
        """
        check_registry_name(name)
        if expected is None:
            expected = int(router.training.get("version", 0) or 0)
        version = expected + 1
        router.training = {**router.training, "version": version, "parent": expected or None}
        data = router_bytes(router)
        digest = hashlib.sha256(data).hexdigest()
        training = json.dumps(router.training, default=str)
        model = router.training.get("model")
        s = self.schema

        def adopt(conn: Any) -> bool:
            psycopg = _psycopg()
            try:
                with conn.transaction():
                    conn.execute("SET LOCAL lock_timeout = 30000")  # behind a concurrent adopter
                    if expected == 0:
                        moved = conn.execute(
                            f"INSERT INTO {s}.routers (name, version, updated, worker) VALUES (%s, %s, %s, %s) "
                            "ON CONFLICT (name) DO NOTHING", (name, version, time.time(), self.worker)).rowcount
                    else:
                        moved = conn.execute(
                            f"UPDATE {s}.routers SET version = %s, updated = %s, worker = %s "
                            "WHERE name = %s AND version = %s",
                            (version, time.time(), self.worker, name, expected)).rowcount
                    if moved != 1:
                        raise _Rollback()
                    conn.execute(
                        f"INSERT INTO {s}.router_versions (name, version, parent, created, worker, model, training, "
                        "data, sha256) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        (name, version, expected or None, time.time(), self.worker, model, training, data, digest))
                return True
            except (_Rollback, psycopg.errors.UniqueViolation):
                return False

        if not self._run(adopt):
            current = self._followed_number(name)
            raise LostRace(name, expected, current)
        target = self._mirror(name, version, data)
        logger.info("router %s: version %d adopted in the shared registry by %s", name, version, self.worker)
        return VersionInfo(name, version, target, dict(router.training))

    def latest(self, name: str) -> VersionInfo | None:
        """The adopted version (copied into the cache); the cached one while the database is down."""
        check_registry_name(name)
        try:
            row = self._run(lambda conn: conn.execute(
                f"SELECT v.version, v.data FROM {self.schema}.routers r JOIN {self.schema}.router_versions v "
                "ON v.name = r.name AND v.version = r.version WHERE r.name = %s", (name,)).fetchone())
        except RegistryUnavailable as exc:
            logger.warning("%s; using the local copy of router %s", exc, name)
            return self.cache.latest(name)
        if row is None:
            return None
        path = self._mirror(name, int(row[0]), bytes(row[1]))
        training = Router.load(path, label=f"{name}@v{row[0]}").training
        return VersionInfo(name, int(row[0]), path, dict(training))

    def load(self, name: str, version: int | None = None) -> Router:
        """A version of ``name`` (the adopted one when ``version`` is None), read from the database
        and copied into the cache; from the cache while the database is down."""
        check_registry_name(name)
        if version is None:
            info = self.latest(name)
            if info is None:
                raise RouterLoadError(f"router {name!r} has no adopted version yet")
            return Router.load(info.path, label=f"{name}@v{info.version}")
        path = self.cache.version_path(name, version)
        if not path.is_file():
            try:
                row = self._run(lambda conn: conn.execute(
                    f"SELECT data FROM {self.schema}.router_versions WHERE name = %s AND version = %s",
                    (name, int(version))).fetchone())
            except RegistryUnavailable as exc:
                raise RouterLoadError(f"router {name!r} v{version} is not cached here and {exc}") from None
            if row is None:
                raise RouterLoadError(f"router {name!r} has no version {version}")
            self._write_version(name, int(version), bytes(row[0]))
        return Router.load(path, label=f"{name}@v{version}")

    def versions(self, name: str) -> list[VersionInfo]:
        """Every stored version, oldest first (the cache's while the database is down)."""
        check_registry_name(name)
        try:
            rows = self._run(lambda conn: conn.execute(
                f"SELECT version, training FROM {self.schema}.router_versions WHERE name = %s ORDER BY version",
                (name,)).fetchall())
        except RegistryUnavailable as exc:
            logger.warning("%s; listing the local copies of router %s", exc, name)
            return self.cache.versions(name)
        return [VersionInfo(name, int(v), self.cache.version_path(name, int(v)), json.loads(t)) for v, t in rows]

    # ------------------------------------------------------------------------------ following

    def adopted(self) -> dict[str, int]:
        """``{name: adopted version}`` for every router in the database (one small query)."""
        return dict(self._run(lambda conn: conn.execute(f"SELECT name, version FROM {self.schema}.routers").fetchall()))

    def sync(self) -> list[tuple[str, int]]:
        """Check the adopted versions once and copy every one this worker does not have into the
        cache; returns the ``(name, version)`` pairs copied. Raises :class:`RegistryUnavailable`."""
        psycopg = _psycopg()
        with self._follow_lock:
            try:
                if self._follow_conn is None or self._follow_conn.closed:
                    self._follow_conn = self._connect()
                conn = self._follow_conn
                adopted = dict(conn.execute(f"SELECT name, version FROM {self.schema}.routers").fetchall())
                copied = []
                for name, version in sorted(adopted.items()):
                    if self._cached_number(name) == version:
                        self._mirrored[name] = version
                        continue
                    row = conn.execute(f"SELECT data, sha256 FROM {self.schema}.router_versions WHERE name = %s "
                                       "AND version = %s", (name, version)).fetchone()
                    if row is None:
                        continue
                    data = bytes(row[0])
                    if hashlib.sha256(data).hexdigest() != row[1]:
                        if self._bad.get(name) != version:
                            logger.warning("MoE router %s v%d in the database does not match its checksum; "
                                           "keeping the local copy", name, version)
                            self._bad[name] = version
                        continue
                    self._mirror(name, int(version), data)
                    copied.append((name, int(version)))
            except (psycopg.Error, RegistryUnavailable) as exc:
                self._drop_follow_conn()
                raise exc if isinstance(exc, RegistryUnavailable) else RegistryUnavailable(self._describe(exc)) from None
            self.checks += 1
            self.last_check = time.time()
        return copied

    def follow(self) -> "PostgresRegistry":
        """Start (once) the daemon thread that calls :meth:`sync` every ``poll`` seconds; returns self.
        Never blocks: the first check runs in the thread."""
        with self._thread_lock:  # not _follow_lock: a check hanging on the network must not block a sampler here
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._follow_loop, name="moe-router-follower", daemon=True)
                self._thread.start()
        return self

    def wake(self) -> None:
        """Ask the follower to check now instead of at the end of its interval."""
        self._wake.set()

    def close(self) -> None:
        """Stop the follower (if running) and close its connection."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=CONNECT_TIMEOUT + 5)
        with self._follow_lock:
            self._drop_follow_conn()

    def _drop_follow_conn(self) -> None:
        """Close and forget the follower's connection, if any (the caller holds ``_follow_lock``)."""
        if self._follow_conn is not None:
            try:
                self._follow_conn.close()
            except Exception:
                pass
            self._follow_conn = None

    def _follow_loop(self) -> None:
        while not self._stop.is_set():
            try:
                copied = self.sync()
                if self.online is False:
                    logger.warning("MoE router registry: the database is back; following adopted versions again")
                self.online = True
                for name, version in copied:
                    logger.info("MoE router %s: now following v%d adopted in the farm's registry", name, version)
            except RegistryUnavailable as exc:
                if self.online is not False:
                    logger.warning("MoE router registry: %s; sampling goes on with the local copies of the routers",
                                   exc)
                self.online = False
            except Exception:  # the follower must outlive anything (a full disk, a bad row)
                logger.exception("MoE router registry: following the adopted versions failed")
            self._wake.wait(self.poll)
            self._wake.clear()

    # ------------------------------------------------------------------------------ the local cache

    def _followed_number(self, name: str) -> int | None:
        try:
            row = self._run(lambda conn: conn.execute(f"SELECT version FROM {self.schema}.routers WHERE name = %s",
                                                      (name,)).fetchone())
        except RegistryUnavailable:
            return None
        return None if row is None else int(row[0])

    def _cached_number(self, name: str) -> int | None:
        """The version of the cache's followed file (remembered once copied by this process)."""
        known = self._mirrored.get(name)
        if known is not None and self.cache.followed_path(name).is_file():
            return known
        try:
            info = self.cache.latest(name)
        except (RouterLoadError, OSError):
            return None
        return None if info is None else info.version

    def _write_version(self, name: str, version: int, data: bytes) -> Path:
        target = self.cache.version_path(name, version)
        if target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data:
            return target
        _write_atomic(target, data)
        return target

    def _mirror(self, name: str, version: int, data: bytes) -> Path:
        """Write version ``version`` into the cache and make it the followed file there (both atomic)."""
        with self._mirror_lock:
            target = self._write_version(name, version, data)
            followed = self.cache.followed_path(name)
            if self._mirrored.get(name) != version or not followed.is_file() or followed.read_bytes() != data:
                _write_atomic(followed, data)
                self._mirrored[name] = version
                for listener in list(self.listeners):
                    try:
                        listener(name, version)
                    except Exception:
                        logger.exception("router %s: a version listener failed", name)
        return target


class _Rollback(Exception):
    """Leave the adoption transaction without committing (the pointer had moved)."""


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(temp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    finally:
        try:
            temp.unlink()
        except FileNotFoundError:
            pass


_shared: dict[tuple[str, str, str], PostgresRegistry] = {}
_shared_lock = threading.Lock()


def shared_registry(url: str, cache_folder: str | os.PathLike, schema: str = SCHEMA) -> PostgresRegistry:
    """The process-wide registry for ``(url, cache_folder, schema)``, its follower started (non-blocking)."""
    key = (url.strip(), str(Path(cache_folder)), schema)
    with _shared_lock:
        registry = _shared.get(key)
        if registry is None:
            registry = _shared[key] = PostgresRegistry(url, cache_folder, schema=schema)
    return registry.follow()
