"""A PostgreSQL server for the store tests: ``MOE_SAMPLER_TEST_DATABASE_URL``, or one started here.

:func:`database_url` returns the URL of a server the tests may use, or raises :class:`Unavailable`
with the reason (the caller skips with it). Without the variable, ``.ci/postgres.sh start``
starts a throwaway cluster (non-root user, free local port, a temp folder) once per process,
and stops it and deletes its files at exit. :func:`unique_schema` gives each test its own schema.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / ".ci" / "postgres.sh"
VARIABLE = "MOE_SAMPLER_TEST_DATABASE_URL"
_lock = threading.Lock()
_state: dict[str, object] = {}


class Unavailable(RuntimeError):
    """No PostgreSQL server can be had here; the message says why."""


def have_binaries() -> bool:
    """Whether initdb and pg_ctl exist (on PATH or in Debian's /usr/lib/postgresql/*/bin)."""
    return bool(shutil.which("pg_ctl") and shutil.which("initdb")) or bool(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))


def database_url() -> str:
    """The test server's URL (see the module docstring); raises :class:`Unavailable`."""
    url = os.environ.get(VARIABLE, "").strip()
    if url:
        return url
    with _lock:
        if "url" in _state:
            return str(_state["url"])
        if "error" in _state:
            raise Unavailable(str(_state["error"]))
        try:
            import psycopg  # noqa: F401
        except ImportError:
            _state["error"] = "psycopg is not installed (pip install 'moe-adaptive-sampler[postgres]')"
            raise Unavailable(str(_state["error"])) from None
        if not have_binaries():
            _state["error"] = f"no PostgreSQL server: set {VARIABLE} or install PostgreSQL (initdb, pg_ctl)"
            raise Unavailable(str(_state["error"]))
        folder = tempfile.mkdtemp(prefix="moe_sampler_pg_test.")
        env = {**os.environ, "MOE_SAMPLER_PG_DIR": folder}
        done = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=180)
        if done.returncode != 0 or "export " not in done.stdout:
            _state["error"] = f".ci/postgres.sh start failed: {done.stderr.strip()[-1500:]}"
            raise RuntimeError(_state["error"])  # binaries exist, so this is a failure, not a skip
        _state["url"] = done.stdout.strip().split("=", 1)[1]
        _state["folder"] = folder
        atexit.register(subprocess.run, ["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
        return str(_state["url"])


def restart_server() -> None:
    """Stop and start the test server (same port, same data): the one started here, or CI's
    (``$MOE_SAMPLER_PG_DIR`` of ``.ci/postgres.sh``). Raises :class:`Unavailable` for any other server."""
    control_server("restart")


def halt_server() -> None:
    """Stop the test server, keeping its files (``.ci/postgres.sh halt``): clients find no server
    until :func:`resume_server`. Callers resume it in a ``finally``: later tests need it."""
    control_server("halt")


def resume_server() -> None:
    """Start the halted test server again: same port, same data (``.ci/postgres.sh resume``; a
    running server is left as it is)."""
    control_server("resume")


def control_server(command: str) -> None:
    """Run ``.ci/postgres.sh <command>`` on the test server: the one started here, or CI's
    (``$MOE_SAMPLER_PG_DIR``). Raises :class:`Unavailable` for any other server."""
    folder = _server_folder()
    if not folder:
        raise Unavailable(f"cannot {command} the server of {VARIABLE} (set MOE_SAMPLER_PG_DIR, see .ci/postgres.sh)")
    env = {**os.environ, "MOE_SAMPLER_PG_DIR": str(folder)}
    # Output to a file, not a pipe: a started server inherits the script's stderr and would
    # hold a pipe open for as long as it runs.
    with tempfile.TemporaryFile("w+") as log:
        done = subprocess.run(["bash", str(SCRIPT), command], env=env, stdout=log, stderr=log, timeout=120)
        log.seek(0)
        if done.returncode != 0:
            raise RuntimeError(f".ci/postgres.sh {command} failed: {log.read().strip()[-1500:]}")


def _server_folder() -> str | None:
    """The cluster folder of the test server: the one started here; else, for
    ``$MOE_SAMPLER_TEST_DATABASE_URL``, ``$MOE_SAMPLER_PG_DIR`` or, when the URL is that of
    ``.ci/postgres.sh start`` run without it (the README's command), the script's default folder."""
    if _state.get("folder"):
        return str(_state["folder"])
    url = os.environ.get(VARIABLE, "").strip()
    if not url:
        return None
    if os.environ.get("MOE_SAMPLER_PG_DIR"):
        return os.environ["MOE_SAMPLER_PG_DIR"]
    if not hasattr(os, "getuid"):  # .ci/postgres.sh is a POSIX shell script
        return None
    default = Path("/tmp") / f"moe_sampler_pg-{os.getuid()}"  # the script's default folder
    try:
        port = (default / "port").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return str(default) if url == f"postgresql://moe@127.0.0.1:{port}/moe_sampler_test" else None


def unique_schema() -> str:
    """A fresh schema name, so that each test starts with an empty store in the shared database."""
    return "t_" + uuid.uuid4().hex[:16]


def drop_schema(url: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@contextlib.contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A new database on the tests' server (its URL), dropped afterwards even while clients hold it.

    Raises :class:`Unavailable` (the caller skips) when there is no server."""
    import psycopg

    url = database_url()
    name = prefix + uuid.uuid4().hex[:10]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{url.rpartition('/')[0]}/{name}"
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """``os.environ`` with ``values`` set (a ComfyServer started inside reads them), restored afterwards."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def url_or_skip() -> str:
    """:func:`database_url`, or the calling test skips with the reason (a failure under
    ``MOE_SAMPLER_NO_SKIP=1``, as in CI)."""
    import pytest

    try:
        return database_url()
    except Unavailable as exc:
        pytest.skip(str(exc))


def scratch_database_or_skip(prefix: str) -> Iterator[str]:
    """A module fixture's body: :func:`scratch_database` yielded, or a skip with the reason."""
    import pytest

    try:
        with scratch_database(prefix) as url:
            yield url
    except Unavailable as exc:
        pytest.skip(str(exc))
