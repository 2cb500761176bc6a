"""One way to put bytes on disk durably, for every package (store, outputs, keys, bundles).

A unique temporary file is created with its final permissions, written,
fsynced, renamed over the target (atomic on POSIX), and the directory is
fsynced so the rename itself survives a power loss. Readers see the old
bytes or the new, never a torn file.

A process killed between create and rename leaves its temporary file behind.
Its name says who wrote it (``.<name>.<host>+<pid>.<random>.tmp``), so that
:func:`clean_orphans`, run at start, removes the leftovers of dead processes on
this host at once and never a file a live process is still writing.

What dermgate writes holds PHI or protects it (images, outputs, bundles, keys,
the audit trail, logs, the database), so files are 0600 and folders 0700 by
default, whatever the process umask: modes are set explicitly, not requested.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

TMP_SUFFIX = ".tmp"
STARTED = time.time()                     # this process's start, near enough (module import)
# Another host's leftovers (a shared volume) go once they are this old: no write takes a day.
FOREIGN_GRACE_S = 24 * 3600.0
_OWNER = re.compile(r"\.(?P<host>[A-Za-z0-9-]+)\+(?P<pid>\d+)\.")


def host_tag() -> str:
    """This host's name as it appears in temporary file names and lease owners."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:28] or "host"


def owner_tag() -> str:
    """``<host>+<pid>``: who is writing a temporary file."""
    return f"{host_tag()}+{os.getpid()}"


PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def private_dir(path: Path, *, mode: int = PRIVATE_DIR_MODE, tighten: bool = True) -> Path:
    """``mkdir -p`` whose every created folder gets ``mode`` (a plain ``mkdir(mode=...)`` is masked by the
    umask, and ``parents=True`` ignores ``mode`` for the parents). ``tighten`` also sets ``mode`` on
    ``path`` when it already exists (a folder an older release made 0755); its parents are left alone."""
    path = Path(path)
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=mode)
        except FileExistsError:                     # another process made it meanwhile
            pass
        os.chmod(folder, mode)
    if tighten and not missing:
        os.chmod(path, mode)
    return path


def private_file(path: Path, *, mode: int = PRIVATE_FILE_MODE) -> Path:
    """Create ``path`` empty with ``mode`` if missing (else set ``mode``), e.g. before SQLite or a log opens it."""
    path = Path(path)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, mode))
    os.chmod(path, mode)
    return path


def write_atomic(path: Path, data: bytes, *, mode: int = PRIVATE_FILE_MODE,
                 dir_mode: int = PRIVATE_DIR_MODE) -> Path:
    """Durably replace ``path`` with ``data``; raises OSError (callers translate it)."""
    path = Path(path)
    private_dir(path.parent, mode=dir_mode, tighten=False)
    tmp = path.with_name(f".{path.name}.{owner_tag()}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)                     # exactly ``mode``, whatever the umask
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
    fsync_dir(path.parent)
    return path


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder (its entries: what was renamed into it), by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_path


class Deferred:
    """Bytes renamed into place but not yet fsynced: ``write_deferred``'s half of ``write_atomic``.

    The caller makes them durable (:meth:`sync_file`, then :func:`fsync_dir` of every
    folder in :attr:`dirs`: the rename's and each new sub-folder's parent) before it
    acknowledges anything, and always :meth:`close`\\ s it. The intake's group commit
    and the worker's batches fsync many of these at once (:func:`sync_all`).
    """

    def __init__(self, path: Path, fd: int, dirs: tuple[Path, ...]) -> None:
        self.path, self.fd, self.dirs = path, fd, dirs

    def sync_file(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def missing_dirs(folder: Path) -> list[Path]:
    """The folders ``mkdir -p folder`` would create, outermost first."""
    missing: list[Path] = []
    probe = Path(folder)
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    return missing[::-1]


def write_deferred(path: Path, data: bytes, *, mode: int = PRIVATE_FILE_MODE,
                   dir_mode: int = PRIVATE_DIR_MODE) -> Deferred:
    """``write_atomic`` without its fsyncs: a unique temporary file, written, renamed over ``path``.

    Readers see the whole new file or nothing, but it is durable only once the
    returned :class:`Deferred` is synced (file and folders).
    """
    path = Path(path)
    created = missing_dirs(path.parent)
    private_dir(path.parent, mode=dir_mode, tighten=False)
    tmp = path.with_name(f".{path.name}.{owner_tag()}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return Deferred(path, fd, (path.parent, *(d.parent for d in created)))


def sync_all(items: Iterable[Deferred]) -> None:
    """Make every ``item`` durable (file and folders), the fsyncs in flight together, then close them.

    Concurrent fsyncs on one file system share journal commits, so many files cost
    about one fsync's wait instead of one each. Raises the first OSError once every
    fsync has finished.
    """
    items = list(items)
    try:
        dirs = {d for item in items for d in item.dirs}
        futures = [fsync_pool().submit(item.sync_file) for item in items]
        futures += [fsync_pool().submit(fsync_dir, d) for d in dirs]
        errors = [f.exception() for f in futures]
    finally:
        for item in items:
            item.close()
    for error in errors:
        if error is not None:
            raise error


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
FSYNC_THREADS = 8                         # fsyncs in flight at once (they share journal commits)


def fsync_pool() -> ThreadPoolExecutor:
    """The process's threads for fsyncs in flight together (the intake's group commit, ``sync_all``)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=FSYNC_THREADS, thread_name_prefix="fsync")
        return _POOL


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (a zombie counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Orphan:
    path: Path
    why: str


def orphans(root: Path, *, now: float | None = None, grace_s: float = FOREIGN_GRACE_S) -> Iterator[Orphan]:
    """Temporary files under ``root`` that no live writer will finish.

    Written on this host by a process that is gone, or by an earlier process with this
    process's id (a container restarted as pid 1) before this one started: orphaned at once.
    Written on another host, or named by an older release: orphaned once ``grace_s`` old.
    A live process's file is never one.
    """
    now = now or time.time()
    host, me = host_tag(), os.getpid()
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(TMP_SUFFIX):
                continue
            path = Path(folder) / name
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue                 # renamed or removed meanwhile: not ours to judge
            m = _OWNER.search(name)
            if m and m["host"] == host:
                pid = int(m["pid"])
                if pid == me and mtime < STARTED:
                    yield Orphan(path, "left by an earlier process with this process id")
                elif pid != me and not pid_alive(pid):
                    yield Orphan(path, f"left by process {pid}, which is gone")
            elif now - mtime > grace_s:
                yield Orphan(path, f"written by {m['host'] if m else 'an unknown writer'} over {grace_s:.0f} s ago")


def clean_orphans(root: Path, **kwargs: float) -> list[Orphan]:
    """Remove the :func:`orphans` under ``root``; returns what was removed."""
    removed = []
    for orphan in orphans(root, **kwargs):
        try:
            orphan.path.unlink()
        except FileNotFoundError:
            continue
        removed.append(orphan)
    return removed
