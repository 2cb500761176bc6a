"""A local (or shared-volume) folder store with atomic, durable writes, encrypted at rest when configured.

Received objects are content-addressed (``objects/ab/<sha256>.dcm``, the digest of
the plaintext) so a different object under a re-used SOP Instance UID can never
overwrite the first. Several SCP processes may share the folder: writes go to a
unique temporary name, are fsynced, then renamed (atomic on POSIX local file
systems and on NFSv4; the shared volume must offer atomic rename). A received
object that arrived as a file (``incoming/``, see integration/dicom_scp/incoming.py)
is hashed as it is read and renamed into place (encrypted when a cipher is set),
never held in memory whole when the store is not encrypted.

The SCP's group commit (dermgate/groupcommit.py) and the worker's batches use
the ``stage*`` writers: the file is renamed into place at once but fsynced, with
its folders, in the commit that then answers Success or records the stage, so
that many files share one wait.

Every reader and writer goes through :class:`ObjectStore` -- the SCP's intake,
the worker (source read, SC/SR/PNG written and read back), the FHIR planner,
the DICOM forwarder, the FHIR bundle folder and the API's heatmap -- so with a
:class:`StoreCipher` every file is AES-256-GCM encrypted on disk:

    file = MAGIC "DGS1" | kid length (1 byte) | kid | salt (16) | nonce (12) | ciphertext + tag (16)

The file key is HKDF-SHA256(master key of ``kid``, salt, info), a fresh salt per
file, so no key ever meets 2^32 nonces. The associated data binds the header and
the file's path relative to the store root: a file altered, truncated, or moved
to another object's path does not decrypt. Keys come from a keyring (the audit
trail's format and :class:`~audit.keys.KeyProvider` hook, a separate key:
``DERMGATE_STORE_KEY`` or ``store.key_file``); rotation adds a key, old files
keep decrypting under theirs.

Exceptions::

    StoreError          the store cannot take or give the object (full, unwritable, unreadable)
     +-- StoreIntegrityError   a file does not decrypt (altered, moved, wrong key) or is not encrypted
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import uuid
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dermgate.durable import (PRIVATE_FILE_MODE, TMP_SUFFIX, Deferred, Orphan, clean_orphans, fsync_dir,
                              fsync_path, missing_dirs, owner_tag, private_dir, write_atomic, write_deferred)

if TYPE_CHECKING:
    from audit.keys import KeyProvider
    from dermgate.settings import Settings

MAGIC = b"DGS1"
SALT_BYTES = 16
NONCE_BYTES = 12
KEY_ENV = "DERMGATE_STORE_KEY"                    # keyring JSON, base64 of it, or one base64 AES-256 key
KEYRING_FILE = "store.key"
_INFO = b"dermgate-store aes-256-gcm file key v1"
_CHUNK = 1 << 20

_W = TypeVar("_W")


class StoreError(Exception):
    """The store cannot take the object (full, unwritable) or give it back."""


class StoreIntegrityError(StoreError):
    """A stored file does not decrypt: altered, truncated, moved, wrong key, or not encrypted at all."""


class StoreCipher:
    """AES-256-GCM per file, keys from a :class:`~audit.keys.KeyProvider`."""

    def __init__(self, provider: KeyProvider, *, accept_plaintext: bool = False) -> None:
        self.provider = provider
        self.accept_plaintext = accept_plaintext

    def _aead(self, key_id: str, salt: bytes) -> AESGCM:
        master = self.provider.key(key_id)
        return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_INFO).derive(master))

    def encrypt(self, rel: str, data: bytes) -> bytes:
        kid = self.provider.active_key_id().encode("utf-8")
        if not 0 < len(kid) < 256:
            raise StoreError("store key id must be 1-255 bytes")
        salt, nonce = secrets.token_bytes(SALT_BYTES), secrets.token_bytes(NONCE_BYTES)
        header = MAGIC + bytes([len(kid)]) + kid + salt + nonce
        return header + self._aead(kid.decode(), salt).encrypt(nonce, data, header + rel.encode("utf-8"))

    def decrypt(self, rel: str, blob: bytes) -> bytes:
        if not blob.startswith(MAGIC):
            if self.accept_plaintext:
                return blob
            raise StoreIntegrityError(f"{rel} is not encrypted (store.accept_plaintext is off)")
        try:
            n = blob[len(MAGIC)]
            kid_end = len(MAGIC) + 1 + n
            kid = blob[len(MAGIC) + 1:kid_end].decode("utf-8")
            salt = blob[kid_end:kid_end + SALT_BYTES]
            nonce = blob[kid_end + SALT_BYTES:kid_end + SALT_BYTES + NONCE_BYTES]
            header_end = kid_end + SALT_BYTES + NONCE_BYTES
            if len(blob) < header_end + 16:
                raise ValueError("truncated")
            return self._aead(kid, salt).decrypt(nonce, blob[header_end:], blob[:header_end] + rel.encode("utf-8"))
        except (InvalidTag, ValueError, IndexError, UnicodeDecodeError):
            raise StoreIntegrityError(f"{rel} does not decrypt: altered, truncated, moved or another key") from None


def _is_encrypted(blob: bytes) -> bool:
    return blob.startswith(MAGIC)


class ObjectStore:
    """Files under ``root``; with a ``cipher`` every file is encrypted on disk (see the module docstring)."""

    def __init__(self, root: Path, cipher: StoreCipher | None = None) -> None:
        self.root = Path(root)
        self.cipher = cipher
        private_dir(self.root)                     # PHI: owner only (0700), files 0600 (write_atomic)
        self._abs_root = Path(os.path.abspath(self.root))

    @property
    def encrypted(self) -> bool:
        return self.cipher is not None

    def path(self, rel: str) -> Path:
        return self.root / rel

    def rel(self, path: Path) -> str:
        """``path`` (absolute, or relative to the root) as the root-relative name its encryption is bound to."""
        p = Path(path)
        if p.is_absolute():
            try:
                p = Path(os.path.abspath(p)).relative_to(self._abs_root)
            except ValueError:
                raise StoreError(f"{path} is outside the store {self.root}") from None
        if ".." in p.parts:
            raise StoreError(f"{path} leaves the store")
        return p.as_posix()

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def put(self, rel: str, data: bytes) -> Path:
        """Write ``data`` at ``rel`` atomically and durably (file and directory fsynced), encrypted if configured."""
        return self._write(rel, data, write_atomic)

    def _write(self, rel: str, data: bytes, writer: Callable[[Path, bytes], _W]) -> _W:
        rel = self.rel(Path(rel))
        blob = self.cipher.encrypt(rel, data) if self.cipher else data
        try:
            return writer(self.root / rel, blob)
        except OSError as exc:
            raise StoreError(f"cannot write {rel}: {exc.strerror}") from exc

    @staticmethod
    def object_rel(digest: str) -> str:
        return f"objects/{digest[:2]}/{digest}.dcm"

    def put_object(self, data: bytes) -> tuple[str, str]:
        """Store received bytes content-addressed; returns (relative path, sha256 of the bytes)."""
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
        if self.cipher is not None:                # encrypted at rest: the file is encrypted whole
            self.put(rel, source.read_bytes())
            return rel, digest, size
        try:
            private_dir(target.parent, tighten=False)
            fsync_path(source)
            try:
                os.chmod(source, PRIVATE_FILE_MODE)
                os.replace(source, target)
            except OSError:                      # another file system (EXDEV): copy it over
                _copy_durably(source, target)
            fsync_dir(target.parent)
        except OSError as exc:
            raise StoreError(f"cannot write {rel}: {exc.strerror}") from exc
        return rel, digest, size

    def stage(self, rel: str, data: bytes) -> Deferred:
        """:meth:`put` without its fsyncs: in place at once (atomic), durable once the result is synced."""
        return self._write(rel, data, write_deferred)

    def stage_at(self, path: Path, data: bytes) -> Deferred:
        return self.stage(self.rel(path), data)

    def stage_object(self, encoded: bytes | Path) -> tuple[str, str, int, Deferred]:
        """:meth:`put_object` / :meth:`put_object_file` for a group commit: (relative path, sha256,
        size, the :class:`~dermgate.durable.Deferred` to sync).

        An object already in place is checked against its name first: one renamed but never
        fsynced before a crash may be torn, and is then rewritten (and fsynced anyway, as its
        first writer's fsync may still be in flight).
        """
        if isinstance(encoded, Path):
            digest, size = _sha256_file(encoded)
        else:
            digest, size = hashlib.sha256(encoded).hexdigest(), len(encoded)
        rel = self.object_rel(digest)
        target = self.root / rel
        try:
            fd = self._open_intact(rel, digest)
            if fd is not None:
                return rel, digest, size, Deferred(target, fd, (target.parent,))
            if isinstance(encoded, Path) and self.cipher is None:
                return rel, digest, size, _stage_rename(encoded, target)
            data = encoded.read_bytes() if isinstance(encoded, Path) else encoded
        except OSError as exc:
            raise StoreError(f"cannot write {rel}: {exc.strerror}") from exc
        return rel, digest, size, self.stage(rel, data)

    def _open_intact(self, rel: str, digest: str) -> int | None:
        """A read descriptor on the object at ``rel`` when it is there whole (its sha256 matches)."""
        try:
            fd = os.open(self.root / rel, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            if self.cipher is None:
                intact = _sha256_fd(fd) == digest
            else:
                with os.fdopen(os.dup(fd), "rb") as fp:
                    try:
                        intact = hashlib.sha256(self.cipher.decrypt(rel, fp.read())).hexdigest() == digest
                    except StoreIntegrityError:
                        intact = False
        except BaseException:
            os.close(fd)
            raise
        if not intact:
            os.close(fd)
            return None
        return fd

    def read(self, rel: str) -> bytes:
        """The bytes stored at ``rel``, decrypted and authenticated when the store is encrypted."""
        rel = self.rel(Path(rel))
        blob = (self.root / rel).read_bytes()
        if self.cipher is not None:
            return self.cipher.decrypt(rel, blob)
        if _is_encrypted(blob):
            raise StoreIntegrityError(f"{rel} is encrypted but no store key is configured (store.encrypt)")
        return blob

    # Writers that think in paths (the output writer, the forwarder) use these.
    def write_at(self, path: Path, data: bytes) -> Path:
        return self.put(self.rel(path), data)

    def read_at(self, path: Path) -> bytes:
        return self.read(self.rel(path))

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


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, _CHUNK, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def _stage_rename(source: Path, target: Path) -> Deferred:
    """Rename a received file into place without fsyncs (copied over when on another file system)."""
    created = missing_dirs(target.parent)
    private_dir(target.parent, tighten=False)
    os.chmod(source, PRIVATE_FILE_MODE)
    try:
        os.replace(source, target)
    except OSError:                              # another file system (EXDEV): copy it over
        return write_deferred(target, source.read_bytes())
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    return Deferred(target, fd, (target.parent, *(d.parent for d in created)))


def _copy_durably(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{owner_tag()}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    try:
        with open(source, "rb") as src, open(tmp, "xb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
            dst.flush()
            os.fsync(dst.fileno())
        os.chmod(tmp, PRIVATE_FILE_MODE)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- keys and the store of a configuration ---------------------------------------------------------

class StoreKeyError(StoreError):
    """Encryption is on but no usable store key is configured."""


def store_key_provider(settings: Settings) -> KeyProvider:
    """``DERMGATE_STORE_KEY`` if set, else the keyring file (0600). In development only, a missing
    file is created; production refuses to start without a configured key."""
    from audit.errors import AuditConfigError, MissingKeyError
    from audit.keys import EnvKeyProvider, FileKeyProvider
    if os.environ.get(KEY_ENV):
        try:
            return EnvKeyProvider(KEY_ENV)
        except (AuditConfigError, MissingKeyError) as exc:
            raise StoreKeyError(f"{KEY_ENV}: {exc}") from None
    path = settings.store_key_file
    if not path.exists():
        if settings.environment != "development" or settings.store.key_file is not None:
            raise StoreKeyError(f"store encryption is on but there is no store key: set {KEY_ENV} or create "
                                f"{path} (0600) with `dermgate store init-key`")
        create_store_key(path, exist_ok=True)      # development: made on first use, like the audit keys
    provider = FileKeyProvider(path)
    try:
        provider.active_key_id()
    except (AuditConfigError, MissingKeyError) as exc:
        raise StoreKeyError(f"store key file {path}: {exc}") from None
    return provider


def create_store_key(path: Path, *, exist_ok: bool = False) -> bool:
    """Create a keyring file (0600) at ``path``, never replacing one: two processes racing to create it
    end up with the same key (the second finds the first's). Returns whether this call created it."""
    from audit.keys import Keyring
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(Keyring.generate().to_json().encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)                     # atomic and exclusive: fails if the file exists
        except FileExistsError:
            if not exist_ok:
                raise StoreKeyError(f"refusing to overwrite the store key {path}") from None
            return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def store_cipher(settings: Settings) -> StoreCipher | None:
    """The cipher the settings ask for (``None``: files in the clear, e.g. on an encrypted volume)."""
    if not settings.store_encrypted:
        return None
    return StoreCipher(store_key_provider(settings), accept_plaintext=settings.store.accept_plaintext)
