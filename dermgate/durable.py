"""One way to put bytes on disk durably, for every package (store, outputs, keys, bundles).

A unique temporary file is created with its final permissions, written,
fsynced, renamed over the target (atomic on POSIX), and the directory is
fsynced so the rename itself survives a power loss. Readers see the old
bytes or the new, never a torn file.
"""

from __future__ import annotations

import os
import uuid
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
