"""Router versions: every online update writes a new version; older ones stay loadable.

A :class:`RouterRegistry` keeps, per router name, a numbered list of versions and the one the
sampler follows (the latest *adopted* version). :class:`LocalRegistry` is the file-system
implementation used inside ComfyUI, under ``models/moe_routers``::

    <folder>/<name>.safetensors                 the followed version (a copy of the latest adopted)
    <folder>/<name>.versions/v0001.safetensors  every adopted version, never rewritten
    <folder>/<name>.versions/v0002.safetensors

Why this layout: ComfyUI lists every ``.safetensors`` under the routers folder, subfolders
included, so the sampler's ``router`` dropdown offers ``<name>.safetensors`` (follow the latest)
*and* each ``<name>.versions/vNNNN.safetensors`` (pin that version) with no code in the node;
the node's cache and fingerprint key on the followed file's mtime, so a new version is picked up
by the next run. A version is written to a temp file, then hard-linked to its final name (which
fails rather than overwrite if another writer took the number: the writer retries with the
next), then the followed copy is replaced atomically (``os.replace``). A reader never sees a
half-written file.

The version number, its parent, the model it belongs to and the evaluation that adopted it live
in the router's ``training`` metadata (``version``, ``parent``, ``model``, ``online``).

A registry for a farm (for example PostgreSQL rows holding the safetensors bytes) implements the
same four methods.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .model import Router, RouterLoadError

logger = logging.getLogger(__name__)

EXTENSION = ".safetensors"
VERSIONS_SUFFIX = ".versions"
_VERSION_FILE = re.compile(r"^v(\d{4,9})\.safetensors$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")
MAX_TRIES = 50

__all__ = ["LocalRegistry", "RouterRegistry", "VersionInfo", "check_registry_name"]


@dataclass(frozen=True)
class VersionInfo:
    """One stored version: its number, where it is, and its router's ``training`` metadata."""

    name: str
    version: int
    path: Path
    training: dict


class RouterRegistry(Protocol):
    """Where router versions live (a folder here; a database for a farm)."""

    def publish(self, name: str, router: Router) -> VersionInfo:
        """Store ``router`` as the next version of ``name`` and make it the followed one."""
        ...

    def latest(self, name: str) -> VersionInfo | None:
        """The followed (latest adopted) version, or None when ``name`` has none yet."""
        ...

    def load(self, name: str, version: int | None = None) -> Router:
        """A version of ``name`` (the followed one when ``version`` is None)."""
        ...

    def versions(self, name: str) -> list[VersionInfo]:
        """Every stored version, oldest first."""
        ...


def check_registry_name(name: str) -> str:
    """A router name of letters, digits, ``_ . -`` with ``/`` between folders (no ``..``, no
    absolute path, no extension); ValueError otherwise."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name or name.endswith(EXTENSION):
        raise ValueError(f"router name {name!r}: use letters, digits, '_', '.', '-' and '/' between folders, "
                         f"without '..' or the {EXTENSION} extension")
    return name


class LocalRegistry:
    """:class:`RouterRegistry` on a folder (see the module docstring for the layout)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def followed_path(self, name: str) -> Path:
        """``<folder>/<name>.safetensors``: what the sampler's dropdown entry for ``name`` loads."""
        return self.folder / (check_registry_name(name) + EXTENSION)

    def versions_folder(self, name: str) -> Path:
        return self.folder / (check_registry_name(name) + VERSIONS_SUFFIX)

    def version_path(self, name: str, version: int) -> Path:
        return self.versions_folder(name) / f"v{int(version):04d}{EXTENSION}"

    def _numbers(self, name: str) -> list[int]:
        folder = self.versions_folder(name)
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for m in map(_VERSION_FILE.match, os.listdir(folder)) if m)

    def publish(self, name: str, router: Router) -> VersionInfo:
        """Write ``router`` as version ``last + 1`` (atomically, never over another version),
        then replace the followed copy. Sets ``router.training['version']`` and ``['parent']``."""
        folder = self.versions_folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        parent = self._numbers(name)[-1] if self._numbers(name) else None
        temp = folder / f".{uuid.uuid4().hex}.partial"
        try:
            for _ in range(MAX_TRIES):
                version = (parent or 0) + 1
                router.training = {**router.training, "version": version, "parent": parent}
                router.save(temp)
                target = self.version_path(name, version)
                if _link_exclusive(temp, target):
                    break
                parent = self._numbers(name)[-1]  # another writer took the number: next one
            else:
                raise RuntimeError(f"could not find a free version number for router {name!r} in {folder}")
        finally:
            for leftover in (temp, temp.with_name(temp.name + ".tmp")):
                try:
                    leftover.unlink()
                except FileNotFoundError:
                    pass
        followed = self.followed_path(name)
        staging = followed.with_name(f".{followed.name}.{uuid.uuid4().hex}.partial")
        try:
            router.save(staging)  # same bytes as the version file (same metadata)
            os.replace(staging, followed)
        finally:
            for leftover in (staging, staging.with_name(staging.name + ".tmp")):
                try:
                    leftover.unlink()
                except FileNotFoundError:
                    pass
        logger.info("router %s: version %d published (%s)", name, version, target)
        return VersionInfo(name, version, target, dict(router.training))

    def latest(self, name: str) -> VersionInfo | None:
        path = self.followed_path(name)
        if not path.is_file():
            return None
        router = Router.load(path, label=path.name)
        return VersionInfo(name, int(router.training.get("version", 0) or 0), path, dict(router.training))

    def load(self, name: str, version: int | None = None) -> Router:
        path = self.followed_path(name) if version is None else self.version_path(name, version)
        if not path.is_file():
            what = "no adopted version yet" if version is None else f"no version {version}"
            raise RouterLoadError(f"router {name!r} has {what} ({path})")
        return Router.load(path, label=f"{name}@v{version}" if version is not None else path.name)

    def versions(self, name: str) -> list[VersionInfo]:
        out = []
        for number in self._numbers(name):
            path = self.version_path(name, number)
            try:
                training = Router.load(path, label=path.name).training
            except RouterLoadError as exc:
                logger.warning("router %s: skipping unreadable version file %s: %s", name, path, exc)
                continue
            out.append(VersionInfo(name, number, path, dict(training)))
        return out


def _link_exclusive(source: Path, target: Path) -> bool:
    """Give ``source`` the name ``target`` unless ``target`` exists (False then); atomic.

    A hard link fails with EEXIST instead of replacing. Where hard links are not supported
    (FAT, some network shares), fall back to an existence check plus ``os.replace`` (safe with
    one writer per folder, which the background updater guarantees within a process).
    """
    try:
        os.link(source, target)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
    if target.exists():
        return False
    os.replace(source, target)
    return True
