"""One way to put bytes on disk durably, for every package (store, outputs, keys, bundles).

A unique temporary file is created with its final permissions, written,
fsynced, renamed over the target (atomic on POSIX), and the directory is
fsynced so the rename itself survives a power loss. Readers see the old
bytes or the new, never a torn file.

What dermgate writes holds PHI or protects it (images, outputs, bundles, keys,
the audit trail, logs, the database), so files are 0600 and folders 0700 by
default, whatever the process umask: modes are set explicitly, not requested.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


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
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
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
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path
