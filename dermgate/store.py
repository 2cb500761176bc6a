"""A local (or shared-volume) folder store with atomic, durable writes.

Received objects are content-addressed (``objects/ab/<sha256>.dcm``) so a
different object under a re-used SOP Instance UID can never overwrite the
first. Several SCP processes may share the folder: writes go to a unique
temporary name, are fsynced, then renamed (atomic on POSIX local file systems
and on NFSv4; the shared volume must offer atomic rename).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from dermgate.durable import private_dir, write_atomic


class StoreError(Exception):
    """The store cannot take the object (full, unwritable)."""


class ObjectStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        private_dir(self.root)                     # PHI: owner only (0700), files 0600 (write_atomic)

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

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()
