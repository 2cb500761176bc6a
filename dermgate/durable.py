"""One way to put bytes on disk durably, for every package (store, outputs, keys, bundles).

A unique temporary file is created with its final permissions, written,
fsynced, renamed over the target (atomic on POSIX), and the directory is
fsynced so the rename itself survives a power loss. Readers see the old
bytes or the new, never a torn file.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, mode: int = 0o640, dir_mode: int = 0o750) -> Path:
    """Durably replace ``path`` with ``data``; raises OSError (callers translate it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=dir_mode)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


class Deferred:
    """Bytes renamed into place but not yet fsynced: ``write_deferred``'s half of ``write_atomic``.

    The caller makes them durable with :meth:`sync` (file, then every folder the
    rename or a new sub-folder touched) before it acknowledges anything, and
    always :meth:`close`\\ s it. Used by the intake's group commit, which fsyncs
    many of these at once, alongside the database commit.
    """

    def __init__(self, path: Path, fd: int, dirs: tuple[Path, ...]) -> None:
        self.path, self.fd, self.dirs = path, fd, dirs

    def sync_file(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def write_deferred(path: Path, data: bytes, *, mode: int = 0o640, dir_mode: int = 0o750) -> Deferred:
    """``write_atomic`` without its fsyncs: a unique temporary file, written, renamed over ``path``.

    Readers see the whole new file or nothing, but it is durable only after
    ``sync_file()`` and ``fsync_dir()`` of each of ``.dirs``.
    """
    path = Path(path)
    created = _mkdirs(path.parent, dir_mode)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    # the rename lives in the parent; each folder made here lives in its own parent
    return Deferred(path, fd, (path.parent, *(d.parent for d in created)))


def sync_all(items: Iterable[Deferred]) -> None:
    """Make every ``item`` durable (file and folders), the fsyncs in flight together, then close them.

    Concurrent fsyncs on one file system share journal commits, so many files
    cost about one fsync's wait instead of one each. Raises the first OSError
    after every fsync has finished.
    """
    items = list(items)
    try:
        dirs = {d for item in items for d in item.dirs}
        futures = [_pool().submit(item.sync_file) for item in items]
        futures += [_pool().submit(fsync_dir, d) for d in dirs]
        errors = [f.exception() for f in futures]
    finally:
        for item in items:
            item.close()
    for error in errors:
        if error is not None:
            raise error


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")
        return _POOL


def fsync_dir(directory: Path) -> None:
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _mkdirs(directory: Path, mode: int) -> list[Path]:
    """``mkdir -p``; returns the folders it created (their parents' entries need an fsync too)."""
    if directory.is_dir():
        return []
    created = _mkdirs(directory.parent, mode)
    try:
        directory.mkdir(mode=mode)
        created.append(directory)
    except FileExistsError:
        pass
    return created
