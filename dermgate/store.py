"""A local (or shared-volume) folder store with atomic, durable writes.

Received objects are content-addressed (``objects/ab/<sha256>.dcm``) so a
different object under a re-used SOP Instance UID can never overwrite the
first. Several SCP processes may share the folder: writes go to a unique
temporary name, are fsynced, then renamed (atomic on POSIX local file systems
and on NFSv4; the shared volume must offer atomic rename). A received object
that arrived as a file (``incoming/``, see integration/dicom_scp/incoming.py)
is hashed as it is read and renamed into place, never held in memory whole.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

from dermgate.durable import TMP_SUFFIX, Orphan, clean_orphans, fsync_dir, owner_tag, write_atomic

_CHUNK = 1 << 20


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

    @staticmethod
    def object_rel(digest: str) -> str:
        return f"objects/{digest[:2]}/{digest}.dcm"

    def put_object(self, data: bytes) -> tuple[str, str]:
        """Store received bytes content-addressed; returns (relative path, sha256)."""
        digest = hashlib.sha256(data).hexdigest()
        rel = self.object_rel(digest)
        if not (self.root / rel).exists():
            self.put(rel, data)
        return rel, digest

    def put_object_file(self, source: Path) -> tuple[str, str, int]:
        """Store a received file content-addressed; returns (relative path, sha256, size).

        The file is read once in chunks (hashed and fsynced), then renamed into place when it is
        on the store's file system, else copied through a temporary file. ``source`` is gone
        afterwards when it was renamed; a duplicate's source is left for its owner to remove.
        """
        digest, size = _sha256_file(source)
        rel = self.object_rel(digest)
        target = self.root / rel
        if target.exists():
            return rel, digest, size
        try:
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            _fsync_file(source)
            try:
                os.chmod(source, 0o640)
                os.replace(source, target)
            except OSError:                      # another file system (EXDEV): copy it over
                _copy_durably(source, target)
            fsync_dir(target.parent)
        except OSError as exc:
            raise StoreError(f"cannot write {rel}: {exc.strerror}") from exc
        return rel, digest, size

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def clean_orphans(self) -> list[Orphan]:
        """Remove temporary files that dead processes left in the store (run at start)."""
        return clean_orphans(self.root)


def _sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fp:
        while chunk := fp.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_durably(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{owner_tag()}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    try:
        with open(source, "rb") as src, open(tmp, "xb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
            dst.flush()
            os.fsync(dst.fileno())
        os.chmod(tmp, 0o640)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
