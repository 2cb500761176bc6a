"""Key material for the audit trail: the AES keyring and the Ed25519 checkpoint key.

Keys live in files (0600) or environment variables, never in the database or
the logs; error messages name key ids and paths, never key bytes.

- A *keyring* maps key ids to 256-bit master keys and names the active one.
  Rotation adds a key and makes it active; old keys stay so old records still
  decrypt (nothing is rewritten). Each log derives its own AES-256-GCM key from
  a master key with HKDF (salt = log id), so one master key never encrypts two
  logs under the same key, and the master key itself never touches a record.
- :class:`KeyProvider` is the hook for a KMS: anything that can name the active
  key id and hand over a key by id (e.g. unwrapping data keys with a cloud KMS)
  plugs in; :class:`FileKeyProvider` and :class:`EnvKeyProvider` are the two
  built in.
- A *signing key* (Ed25519) signs the genesis record, checkpoints and repairs;
  verification needs only the public key, so a compliance office can check
  integrity without being able to write.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import stat
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Protocol

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from audit.errors import AuditConfigError, IntegrityError, MissingKeyError, SigningKeyError, WrongKeyError
from audit.format import associated_data, b64d, b64e

KEY_ENV = "DERMGATE_AUDIT_KEY"                   # keyring JSON, base64 of it, or one base64 key
SIGNING_KEY_ENV = "DERMGATE_AUDIT_SIGNING_KEY"   # PEM (PKCS#8) or base64 of the 32-byte seed
KEY_BYTES = 32                                   # AES-256
NONCE_BYTES = 12                                 # GCM standard nonce; random, < 2^32 records per key
KEYRING_FILE = "audit.key"
SIGNING_KEY_FILE = "audit-signing.key"
PUBLIC_KEY_FILE = "audit-signing.pub"
_HKDF_INFO = b"dermgate-audit aes-256-gcm record key v1"
_KCV_LABEL = b"dermgate-audit key check value v1"
_SECRET_MODE_MASK = stat.S_IRWXG | stat.S_IRWXO


class KeyProvider(Protocol):
    """Source of AES master keys; implement this to fetch keys from a KMS."""

    def active_key_id(self) -> str:
        """The key id new records are encrypted under."""
        ...

    def key(self, key_id: str) -> bytes:
        """The 32-byte master key for ``key_id``; raise :class:`MissingKeyError` if unknown."""
        ...


# --- keyrings ------------------------------------------------------------------------------

def new_key_id(clock: datetime | None = None) -> str:
    now = (clock or datetime.now(timezone.utc)).strftime("%Y%m%d%H%M%S")
    return f"k{now}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Keyring:
    """Key ids to master keys, plus the active id. Immutable: rotation returns a new keyring."""
    keys: Mapping[str, bytes]
    active: str

    def __post_init__(self) -> None:
        if self.active not in self.keys:
            raise MissingKeyError(f"active audit key id {self.active!r} is not in the keyring")
        for key_id, key in self.keys.items():
            if len(key) != KEY_BYTES:
                raise AuditConfigError(f"audit key {key_id!r} is {len(key)} bytes; AES-256 needs {KEY_BYTES}")

    def __repr__(self) -> str:                  # never print key bytes
        return f"Keyring(active={self.active!r}, key_ids={sorted(self.keys)!r})"

    @classmethod
    def generate(cls, key_id: str | None = None) -> Keyring:
        kid = key_id or new_key_id()
        return cls({kid: secrets.token_bytes(KEY_BYTES)}, kid)

    def rotated(self, key_id: str | None = None) -> Keyring:
        kid = key_id or new_key_id()
        if kid in self.keys:
            raise AuditConfigError(f"audit key id {kid!r} already exists")
        return Keyring({**self.keys, kid: secrets.token_bytes(KEY_BYTES)}, kid)

    def active_key_id(self) -> str:
        return self.active

    def key(self, key_id: str) -> bytes:
        try:
            return self.keys[key_id]
        except KeyError:
            raise MissingKeyError(
                f"audit key id {key_id!r} is not in the keyring (it holds {sorted(self.keys)}); "
                "restore the keyring that contains it") from None

    def to_json(self) -> str:
        return json.dumps({"version": 1, "active": self.active,
                           "keys": {k: b64e(v) for k, v in sorted(self.keys.items())}}, indent=2) + "\n"

    @classmethod
    def from_text(cls, text: str, *, origin: str) -> Keyring:
        """Parse a keyring (JSON, or base64 of JSON) or a single base64 key."""
        text = text.strip()
        if not text:
            raise MissingKeyError(f"{origin} is empty")
        if not text.startswith("{"):
            try:
                raw = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise AuditConfigError(f"{origin} is neither a keyring (JSON) nor base64") from None
            if len(raw) == KEY_BYTES:
                # one bare key: its id is a fingerprint so it stays stable across restarts
                kid = "k-" + hashlib.sha256(raw).hexdigest()[:12]
                return cls({kid: raw}, kid)
            text = raw.decode("utf-8", errors="replace").strip()
        try:
            data = json.loads(text)
            keys = {str(k): b64d(v) for k, v in data["keys"].items()}
            return cls(keys, str(data["active"]))
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise AuditConfigError(f"{origin} is not a valid audit keyring ({type(exc).__name__})") from None


class FileKeyProvider:
    """Keyring in a 0600 JSON file; re-read when the file changes (rotation by another process)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._ring: Keyring | None = None

    def keyring(self) -> Keyring:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise MissingKeyError(
                f"audit key file {self.path} does not exist; create one with `dermgate audit init-keys` "
                f"or set {KEY_ENV}") from None
        if st.st_mode & _SECRET_MODE_MASK:
            raise AuditConfigError(
                f"audit key file {self.path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
                "run chmod 600 on it")
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if self._ring is None or stamp != self._stamp:
                self._ring = Keyring.from_text(self.path.read_text(encoding="utf-8"), origin=f"audit key file {self.path}")
                self._stamp = stamp
            return self._ring

    def active_key_id(self) -> str:
        return self.keyring().active

    def key(self, key_id: str) -> bytes:
        return self.keyring().key(key_id)

    def rotate(self, key_id: str | None = None) -> tuple[str, str]:
        """Add a fresh key, make it active, keep the old ones; returns (old id, new id)."""
        old = self.keyring()
        new = old.rotated(key_id)
        write_secret(self.path, new.to_json().encode("utf-8"))
        return old.active, new.active


class EnvKeyProvider:
    """Keyring from an environment variable (read once, at construction)."""

    def __init__(self, var: str = KEY_ENV, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        value = env.get(var)
        if not value:
            raise MissingKeyError(f"no audit key: environment variable {var} is not set")
        self._ring = Keyring.from_text(value, origin=f"environment variable {var}")

    def active_key_id(self) -> str:
        return self._ring.active

    def key(self, key_id: str) -> bytes:
        return self._ring.key(key_id)


class NoKeyProvider:
    """Stands in when no key is configured: integrity checks work, anything needing a key says why not."""

    MESSAGE = f"no audit key configured: set {KEY_ENV} or the audit key file (`dermgate audit init-keys`)"

    def active_key_id(self) -> str:
        raise MissingKeyError(self.MESSAGE)

    def key(self, key_id: str) -> bytes:
        raise MissingKeyError(self.MESSAGE)


def key_provider(key_file: Path | None = None, *, environ: Mapping[str, str] | None = None,
                 required: bool = True) -> KeyProvider:
    """``DERMGATE_AUDIT_KEY`` if set, else the key file; a clear error when neither is configured.

    With ``required=False`` a missing configuration yields :class:`NoKeyProvider`
    (for integrity-only verification), raising only when a key is actually needed.
    """
    env = os.environ if environ is None else environ
    if env.get(KEY_ENV):
        return EnvKeyProvider(KEY_ENV, env)
    if key_file is None:
        if not required:
            return NoKeyProvider()
        raise MissingKeyError(NoKeyProvider.MESSAGE)
    return FileKeyProvider(key_file)


# --- per-log record encryption ----------------------------------------------------------------

@dataclass
class RecordCipher:
    """AES-256-GCM for one log: derives the log's key from the master key and checks it on read."""
    provider: KeyProvider
    log_id: str
    _cache: dict[tuple[str, bytes], tuple[AESGCM, str]] = field(default_factory=dict, repr=False)

    def _aead(self, key_id: str) -> tuple[AESGCM, str]:
        master = self.provider.key(key_id)
        tag = hashlib.sha256(master).digest()        # cache key; reload after rotation picks fresh bytes
        hit = self._cache.get((key_id, tag))
        if hit is None:
            derived = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=self.log_id.encode("utf-8"),
                           info=_HKDF_INFO).derive(master)
            kcv = hmac.new(derived, _KCV_LABEL, hashlib.sha256).hexdigest()[:16]
            hit = (AESGCM(derived), kcv)
            self._cache[(key_id, tag)] = hit
        return hit

    def active(self) -> tuple[str, str]:
        """(active key id, its key check value for this log)."""
        kid = self.provider.active_key_id()
        return kid, self._aead(kid)[1]

    def encrypt(self, envelope: dict[str, Any], plaintext: bytes) -> None:
        """Fill ``nonce`` and ``ct``; ``kid``/``kcv`` and the bound fields must already be set."""
        aead, _ = self._aead(envelope["kid"])
        nonce = secrets.token_bytes(NONCE_BYTES)
        envelope["nonce"] = b64e(nonce)
        envelope["ct"] = b64e(aead.encrypt(nonce, plaintext, associated_data(self.log_id, envelope)))

    def decrypt(self, envelope: dict[str, Any]) -> bytes:
        seq, kid = envelope["seq"], envelope["kid"]
        aead, kcv = self._aead(kid)                  # MissingKeyError when the id is unknown
        if not hmac.compare_digest(kcv, str(envelope.get("kcv", ""))):
            raise WrongKeyError(
                f"record {seq}: the keyring's key {kid!r} is not the key this record was encrypted with "
                "(wrong keyring, or a record from another log)")
        try:
            return aead.decrypt(b64d(envelope["nonce"]), b64d(envelope["ct"]), associated_data(self.log_id, envelope))
        except (InvalidTag, ValueError, binascii.Error):
            raise IntegrityError(seq, "authentication tag does not verify: ciphertext or bound fields altered") from None


# --- Ed25519 signing -----------------------------------------------------------------------------

def fingerprint(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:32]


@dataclass(frozen=True)
class Signer:
    """The checkpoint signing key."""
    private_key: Ed25519PrivateKey = field(repr=False)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def sign(self, payload: bytes) -> str:
        return b64e(self.private_key.sign(payload))

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())


class TrustedKeys:
    """Public keys whose checkpoint signatures verify counts as valid, by fingerprint."""

    def __init__(self, keys: list[Ed25519PublicKey]) -> None:
        if not keys:
            raise SigningKeyError("no trusted audit signing public key given")
        self._keys = {fingerprint(k): k for k in keys}

    def __contains__(self, fp: str) -> bool:
        return fp in self._keys

    @property
    def fingerprints(self) -> list[str]:
        return sorted(self._keys)

    def only(self, fp: str) -> TrustedKeys:
        """The subset holding just the key with fingerprint ``fp`` (pinning)."""
        return TrustedKeys([self._keys[fp]])

    def verify(self, fp: str, signature_b64: str, payload: bytes) -> None:
        key = self._keys.get(fp)
        if key is None:
            raise SigningKeyError(f"signed by {fp}, which is not a trusted audit signing key")
        try:
            key.verify(b64d(signature_b64), payload)
        except (InvalidSignature, ValueError, binascii.Error):
            raise SigningKeyError(f"signature does not verify under trusted key {fp}") from None


def _load_private(data: bytes, origin: str) -> Signer:
    text = data.strip()
    try:
        if text.startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(text, password=None)
        else:
            key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(text, validate=True))
    except (ValueError, TypeError, binascii.Error):
        raise SigningKeyError(f"{origin} is not a readable Ed25519 private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{origin} is not an Ed25519 key")
    return Signer(key)


def load_signer(path: Path | None = None, *, environ: Mapping[str, str] | None = None) -> Signer:
    """``DERMGATE_AUDIT_SIGNING_KEY`` if set, else the PEM file at ``path``."""
    env = os.environ if environ is None else environ
    if env.get(SIGNING_KEY_ENV):
        return _load_private(env[SIGNING_KEY_ENV].encode("utf-8"), f"environment variable {SIGNING_KEY_ENV}")
    if path is None:
        raise SigningKeyError(f"no audit signing key configured: set {SIGNING_KEY_ENV} or the signing key file")
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SigningKeyError(f"audit signing key file {path} does not exist; create one with "
                              "`dermgate audit init-keys`") from None
    if st.st_mode & _SECRET_MODE_MASK:
        raise AuditConfigError(f"audit signing key file {path} is readable by group or others; run chmod 600 on it")
    return _load_private(path.read_bytes(), f"audit signing key file {path}")


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise SigningKeyError(f"audit public key file {path} does not exist") from None
    except ValueError:
        raise SigningKeyError(f"{path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path} is not an Ed25519 public key")
    return key


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def private_pem(signer: Signer) -> bytes:
    return signer.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())


# --- files ---------------------------------------------------------------------------------------

def write_secret(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Atomically and durably (re)place ``path`` with ``data``, created with ``mode`` from the start:
    a temporary file (O_EXCL), fsynced, renamed over the target, then the directory fsynced.
    The audit package stands alone, so it carries this rather than import the service's copy."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
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


@dataclass(frozen=True)
class KeyFiles:
    keyring: Path
    signing_key: Path
    public_key: Path


def init_keys(directory: Path, *, force: bool = False) -> KeyFiles:
    """Create a keyring (0600), an Ed25519 signing key (0600) and its public key for a demo/install."""
    directory = Path(directory)
    files = KeyFiles(directory / KEYRING_FILE, directory / SIGNING_KEY_FILE, directory / PUBLIC_KEY_FILE)
    existing = [p for p in (files.keyring, files.signing_key) if p.exists()]
    if existing and not force:
        raise AuditConfigError(f"refusing to overwrite existing key file(s): {', '.join(map(str, existing))}")
    signer = Signer.generate()
    write_secret(files.keyring, Keyring.generate().to_json().encode("utf-8"))
    write_secret(files.signing_key, private_pem(signer))
    write_secret(files.public_key, public_pem(signer.public_key), mode=0o644)
    return files
