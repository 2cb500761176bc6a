"""A local (or shared-volume) folder store with atomic, durable writes.

Received objects are content-addressed (``objects/ab/<sha256>.dcm``) so a
different object under a re-used SOP Instance UID can never overwrite the
first. Several SCP processes may share the folder: writes go to a unique
temporary name, are fsynced, then renamed (atomic on POSIX local file systems
and on NFSv4; the shared volume must offer atomic rename). The SCP's group
commit uses ``stage_object``: renamed first, fsynced with its folder in the
commit that then answers Success (dermgate/groupcommit.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from dermgate.durable import Deferred, write_atomic, write_deferred


class StoreError(Exception):
    """The store cannot take the object (full, unwritable)."""


class ObjectStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def put(self, rel: str, data: bytes) -> Path:
        """Write ``data`` at ``rel`` atomically and durably (file and directory fsynced)."""
        try:
            return write_atomic(self.root / rel, data)
        except OSError as exc:
            raise StoreError(f"cannot write {rel}: {exc.strerror}") from exc

    def put_object(self, data: bytes) -> tuple[str, str]:
        """Store received bytes content-addressed; returns (relative path, sha256)."""
        digest = hashlib.sha256(data).hexdigest()
        rel = f"objects/{digest[:2]}/{digest}.dcm"
        if not (self.root / rel).exists():
            self.put(rel, data)
        return rel, digest

    def stage_object(self, data: bytes) -> tuple[str, str, Deferred]:
        """``put_object`` for a group commit: the bytes are in place, not yet fsynced.

        Returns (relative path, sha256, the :class:`~dermgate.durable.Deferred` to
        sync). An object already there is checked against its name first: one
        renamed but never fsynced before a crash may be torn, and is rewritten.
        """
        digest = hashlib.sha256(data).hexdigest()
        rel = f"objects/{digest[:2]}/{digest}.dcm"
        path = self.root / rel
        try:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return rel, digest, write_deferred(path, data)
            if _sha256_fd(fd) == digest:
                return rel, digest, Deferred(path, fd, (path.parent,))   # fsync anyway: it may be in flight
            os.close(fd)
            return rel, digest, write_deferred(path, data)
        except OSError as exc:
            raise StoreError(f"cannot write {rel}: {exc.strerror}") from exc

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()
