"""Where the pack keeps files inside a ComfyUI install, and the checks on names users type.

- Routers: ``models/moe_routers/*.safetensors``, registered as the ComfyUI model folder
  ``moe_routers`` (``extra_model_paths.yaml`` may add more folders under that key).
- Stats store: ``user/__moe_sampler/stats.sqlite3``, ComfyUI's internal user directory, which
  ComfyUI never serves over HTTP. Never the pack folder, ``output/``, ``input/`` or ``temp/``.

``folder_paths`` is imported inside functions, so the name checks here import and test without
ComfyUI.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path, PurePosixPath
from typing import Any

from ..stats.report import BUILTIN_ROUTER, is_label

ROUTER_FOLDER = "moe_routers"
ROUTER_EXTENSION = ".safetensors"
STORE_USER = "moe_sampler"
STORE_FILENAME = "stats.sqlite3"
MAX_NAME_LENGTH = 100
_SAVE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
# Windows device names: "con", "NUL.safetensors", "com1.anything" open a device, not a file.
_WINDOWS_DEVICE = re.compile(r"(con|prn|aux|nul|conin\$|conout\$|(com|lpt)[0-9\u00b9\u00b2\u00b3])(\..*)?",
                             re.IGNORECASE)


def is_windows_device_name(part: str) -> bool:
    """Whether a file name is reserved for a device on Windows (``con``, ``NUL.txt``, ``com1.x``, any case;
    Windows ignores trailing spaces and dots before matching)."""
    return bool(_WINDOWS_DEVICE.fullmatch(part.rstrip(" .")))


def check_router_name(name: Any, input_name: str = "router") -> str:
    """Validate a router file name picked from the dropdown (or typed into an API prompt).

    A relative path inside the routers folder, ``/``-separated subfolders allowed, ending in
    ``.safetensors``. Absolute paths, drive letters, backslashes, ``..`` and empty parts are
    refused with a ValueError that names ``input_name``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{input_name}: pick a router file or {BUILTIN_ROUTER!r}, got {name!r}")
    problem = None
    if "\x00" in name or "\\" in name:
        problem = "contains a backslash or NUL character"
    elif name.startswith("/") or _WINDOWS_DRIVE.match(name) or os.path.isabs(name):
        problem = "is an absolute path"
    elif any(part in ("", ".", "..") for part in name.split("/")):
        problem = "has an empty, '.' or '..' path component"
    elif any(is_windows_device_name(part) for part in name.split("/")):
        problem = "names a Windows device (con, nul, aux, prn, com1-9, lpt1-9)"
    elif not name.lower().endswith(ROUTER_EXTENSION):
        problem = f"does not end in {ROUTER_EXTENSION} (routers are only read from safetensors files)"
    if problem:
        raise ValueError(
            f"{input_name}: {name!r} {problem}; routers are files inside the {ROUTER_FOLDER} models "
            f"folder, named relative to it (e.g. 'my_router.safetensors')"
        )
    return name


def check_router_filter(router: Any, input_name: str = "router") -> str:
    """A stats filter a user may pass: ``(all)``, the built-in router, ``default``, ``manual`` or a
    router file name (checked like one, so no value can name a path outside the routers folder)."""
    if is_label(router):
        return router
    return check_router_name(router, input_name)


def check_save_name(name: Any, input_name: str = "router_name") -> str:
    """Validate a new router name and return it with ``.safetensors`` appended once.

    Letters, digits, ``-``, ``_`` and ``.`` only, not starting with ``.`` or ``-``, at most
    100 characters; so the file can only land directly in the routers folder.
    """
    if not isinstance(name, str):
        raise ValueError(f"{input_name}: expected a file name, got {type(name).__name__}")
    stem = name.strip()
    if stem.lower().endswith(ROUTER_EXTENSION):
        stem = stem[: -len(ROUTER_EXTENSION)]
    if not stem or len(stem) > MAX_NAME_LENGTH or not _SAVE_NAME.fullmatch(stem) or ".." in stem:
        raise ValueError(
            f"{input_name}: {name!r} is not a valid router name; use 1-{MAX_NAME_LENGTH} letters, digits, "
            f"'-', '_' or '.', not starting with '.' or '-' and without '..' (no folders)"
        )
    if is_windows_device_name(stem):
        raise ValueError(f"{input_name}: {name!r} is a Windows device name (con, nul, aux, prn, com1-9, lpt1-9), "
                         f"not usable as a file name; pick another router name")
    return stem + ROUTER_EXTENSION


def is_inside(folder: str | os.PathLike, candidate: str | os.PathLike) -> bool:
    """Whether ``candidate`` lies inside ``folder`` after normalising ``..`` (lexically)."""
    folder_abs = os.path.normpath(os.path.abspath(folder))
    candidate_abs = os.path.normpath(os.path.abspath(candidate))
    return os.path.commonpath([folder_abs, candidate_abs]) == folder_abs and candidate_abs != folder_abs


def register_folders() -> Path:
    """Register ``models/moe_routers`` (safetensors only) as the first ``moe_routers`` folder.

    Folders added from ``extra_model_paths.yaml`` under the same key are kept. Returns the
    default folder (it is created when a router is first saved).
    """
    import folder_paths

    default = os.path.join(folder_paths.models_dir, ROUTER_FOLDER)
    folder_paths.add_model_folder_path(ROUTER_FOLDER, default, is_default=True)
    folders, _ = folder_paths.folder_names_and_paths[ROUTER_FOLDER]
    folder_paths.folder_names_and_paths[ROUTER_FOLDER] = (folders, {ROUTER_EXTENSION})
    return Path(default)


def _router_folders() -> list[str]:
    import folder_paths

    if ROUTER_FOLDER not in folder_paths.folder_names_and_paths:
        register_folders()
    return list(folder_paths.get_folder_paths(ROUTER_FOLDER))


def router_names() -> list[str]:
    """Dropdown values: the built-in default router first, then every router file found."""
    import folder_paths

    _router_folders()
    return [BUILTIN_ROUTER, *folder_paths.get_filename_list(ROUTER_FOLDER)]


def resolve_router(name: str, input_name: str = "router") -> Path | None:
    """The file behind a dropdown value; None for the built-in default.

    Raises ValueError naming ``input_name`` for names that would leave the routers folder or
    that match no file.
    """
    if name == BUILTIN_ROUTER:
        return None
    check_router_name(name, input_name)
    folders = _router_folders()
    for folder in folders:
        candidate = os.path.join(folder, *PurePosixPath(name).parts)
        if is_inside(folder, candidate) and os.path.isfile(candidate):
            return Path(candidate)
    known = router_names()
    listing = ", ".join(repr(n) for n in known[:12]) + (" ..." if len(known) > 12 else "")
    raise ValueError(  # the folders' names only: this message reaches the browser
        f"{input_name}: router file {name!r} not found in the {ROUTER_FOLDER} models folder"
        f"{'s' if len(folders) > 1 else ''}; available: {listing}"
    )


def router_save_path(name: str, input_name: str = "router_name") -> Path:
    """Where a router called ``name`` is saved: the first ``moe_routers`` folder."""
    filename = check_save_name(name, input_name)
    return Path(_router_folders()[0]) / filename


def router_mtime(name: str) -> float | None:
    """Modification time of a router file (for node fingerprints); None for the default or a missing file."""
    try:
        path = resolve_router(name)
    except ValueError:
        return None
    return None if path is None else path.stat().st_mtime


_router_cache: dict[str, tuple[tuple[float, int], Any]] = {}
_router_lock = threading.Lock()


def load_router(name: str, input_name: str = "router"):
    """The :class:`~moe_sampler.router.model.Router` behind a dropdown value, cached per file.

    The cache key includes the file's mtime and size, so a retrained router is picked up; the
    built-in default is built once (building it costs more than a routing decision). Callers
    only read the router (``select``); training builds a router of its own. Errors (missing,
    corrupt, wrong feature version) are ValueErrors naming ``input_name`` and the file by its
    name in the folder, never by its absolute path (they reach the browser).
    """
    from ..router.model import Router, RouterLoadError

    path = resolve_router(name, input_name)
    if path is None:
        with _router_lock:
            cached = _router_cache.get(BUILTIN_ROUTER)
            if cached is None:
                cached = _router_cache[BUILTIN_ROUTER] = ((0.0, 0), Router.default())
            return cached[1]
    stat = path.stat()
    key = (stat.st_mtime, stat.st_size)
    with _router_lock:
        cached = _router_cache.get(str(path))
        if cached is not None and cached[0] == key:
            return cached[1]
    try:
        router = Router.load(path, label=name)
    except RouterLoadError as exc:
        raise RouterLoadError(f"{input_name}: {exc}") from None
    with _router_lock:
        _router_cache[str(path)] = (key, router)
    return router


def stats_store_path() -> Path:
    """``<ComfyUI user dir>/__moe_sampler/stats.sqlite3`` (internal, not served over HTTP)."""
    import folder_paths

    return Path(folder_paths.get_system_user_directory(STORE_USER)) / STORE_FILENAME


DATABASE_URL_VARIABLE = "MOE_SAMPLER_DATABASE_URL"
DATABASE_SETTING = "database.json"


def stats_store_target() -> str:
    """Where the stats go: a PostgreSQL URL if one is configured, else :func:`stats_store_path`.

    ``$MOE_SAMPLER_DATABASE_URL`` first, then ``{"url": "postgresql://..."}`` in
    ``<ComfyUI user dir>/__moe_sampler/database.json``; neither set (the default): the SQLite file.
    An unreadable setting file is logged and ignored (the SQLite file is used).
    """
    url = os.environ.get(DATABASE_URL_VARIABLE, "").strip()
    if url:
        return url
    path = stats_store_path()
    setting = path.with_name(DATABASE_SETTING)
    if setting.is_file():
        import json
        import logging

        try:
            url = str(json.loads(setting.read_text(encoding="utf-8")).get("url") or "").strip()
        except (OSError, ValueError, AttributeError) as exc:
            logging.getLogger(__name__).warning("MoE stats: ignoring %s (%s); using %s", setting, exc, path.name)
            url = ""
        if url:
            return url
    return str(path)


_stores: dict[str, Any] = {}
_store_lock = threading.Lock()


def stats_store():
    """The process-wide :class:`~moe_sampler.stats.store.StatsStore` for :func:`stats_store_target`.

    One instance per target, shared by every node and route of this process (a test that moves
    ComfyUI's user directory gets a store of its own).
    """
    from ..stats.store import StatsStore

    target = stats_store_target()
    with _store_lock:
        store = _stores.get(target)
        if store is None:
            store = _stores[target] = StatsStore(target)
        return store
