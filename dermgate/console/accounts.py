"""Local console accounts: Argon2id password hashes, lockout after repeated failures, optional TOTP.

The fallback to the hospital's OpenID provider for small sites, and the demo's accounts.
Passwords are hashed with Argon2id (``argon2-cffi``, OWASP parameters); a TOTP secret
is kept encrypted with the console key (``<workdir>/keys/console.key``, 0600, or
``DERMGATE_CONSOLE_KEY``). Every change (add, disable, enable, reset) is audited by the caller.
"""

from __future__ import annotations

import base64
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dermgate.db import Account, utcnow
from dermgate.settings import CONSOLE_ROLES, ConsoleSettings

KEY_ENV = "DERMGATE_CONSOLE_KEY"
KEY_FILE = "console.key"
MIN_PASSWORD_LENGTH = 12

# Argon2id at OWASP's recommended minimum (m=19 MiB, t=2, p=1): about 0.1 s on one core, so a
# sign-in stays quick on a small server while each guess costs an attacker the same.
_hasher = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)
# Verifying an unknown user costs the same as a known one: no user enumeration by timing.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class AccountError(Exception):
    """The account cannot be created or changed as asked."""


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def check_password_policy(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")


def console_key(workdir: Path) -> bytes:
    """32 random bytes for the console's own secrets (TOTP secrets at rest, the OpenID state cookie).
    From ``DERMGATE_CONSOLE_KEY`` (base64) or ``<workdir>/keys/console.key``, made (0600) when missing."""
    env = os.environ.get(KEY_ENV)
    if env:
        return base64.urlsafe_b64decode(env.encode())
    path = workdir / "keys" / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:   # O_EXCL: of processes starting together, one makes the key and the others read it
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(base64.urlsafe_b64encode(secrets.token_bytes(32)))
                fh.flush()
                os.fsync(fh.fileno())
    return base64.urlsafe_b64decode(path.read_bytes().strip())


def _fernet(key: bytes) -> Fernet:
    return Fernet(base64.urlsafe_b64encode(key[:32]))


@dataclass(frozen=True)
class AccountView:
    """What a caller may see of an account (never the hash or the TOTP secret)."""
    username: str
    display_name: str | None
    role: str
    disabled: bool
    locked_until: datetime | None
    totp: bool
    practitioner_reference: str | None
    last_login_at: datetime | None
    created_at: datetime

    @classmethod
    def of(cls, a: Account) -> AccountView:
        return cls(a.username, a.display_name, a.role, a.disabled, a.locked_until, a.totp_secret is not None,
                   a.practitioner_reference, a.last_login_at, a.created_at)


class Accounts:
    """Local accounts in the service database."""

    def __init__(self, sessions: sessionmaker, settings: ConsoleSettings, key: bytes) -> None:
        self.sessions, self.settings, self._fernet = sessions, settings, _fernet(key)

    # ---- administration (the ``dermgate user`` command)

    def add(self, username: str, role: str, password: str, *, display_name: str | None = None,
            practitioner_reference: str | None = None, totp: bool = False) -> str | None:
        """Create an account; returns the TOTP secret (base32) when ``totp``, to enrol once."""
        if role not in CONSOLE_ROLES:
            raise AccountError(f"role must be one of {', '.join(CONSOLE_ROLES)}")
        if not username or len(username) > 128 or not username.isprintable() or username.strip() != username:
            raise AccountError("a user name is 1-128 printable characters without surrounding spaces")
        check_password_policy(password)
        secret = _new_totp_secret() if totp else None
        with self.sessions.begin() as s:
            if s.scalar(select(Account.id).where(Account.username == username)) is not None:
                raise AccountError(f"user {username} exists")
            s.add(Account(username=username, role=role, password_hash=hash_password(password),
                          display_name=display_name, practitioner_reference=practitioner_reference,
                          totp_secret=self._seal(secret) if secret else None, disabled=False, failed_logins=0))
        return secret

    def list(self) -> list[AccountView]:
        with self.sessions() as s:
            return [AccountView.of(a) for a in s.scalars(select(Account).order_by(Account.username))]

    def get(self, username: str) -> AccountView | None:
        with self.sessions() as s:
            a = s.scalar(select(Account).where(Account.username == username))
            return AccountView.of(a) if a else None

    def set_disabled(self, username: str, disabled: bool) -> None:
        with self.sessions.begin() as s:
            a = self._must(s, username)
            a.disabled = disabled

    def reset(self, username: str, password: str, *, totp: bool | None = None) -> str | None:
        """New password; unlocks. ``totp``: True makes a new secret (returned), False removes it."""
        check_password_policy(password)
        secret = _new_totp_secret() if totp else None
        with self.sessions.begin() as s:
            a = self._must(s, username)
            a.password_hash, a.password_changed_at = hash_password(password), utcnow()
            a.failed_logins, a.locked_until = 0, None
            if totp is not None:
                a.totp_secret = self._seal(secret) if secret else None
        return secret

    # ---- sign-in

    def authenticate(self, username: str, password: str, otp: str | None = None,
                     now: datetime | None = None) -> tuple[AccountView | None, str]:
        """(the account, "ok") or (account or None, reason): unknown, disabled, locked, bad-password,
        otp-required, bad-otp, locked-now (this failure locked the account)."""
        now = now or utcnow()
        with self.sessions.begin() as s:
            a = s.scalar(select(Account).where(Account.username == username).with_for_update())
            if a is None:
                _verify(_DUMMY_HASH, password)
                return None, "unknown"
            if a.disabled:
                _verify(_DUMMY_HASH, password)
                return AccountView.of(a), "disabled"
            if a.locked_until is not None and a.locked_until > now:
                _verify(_DUMMY_HASH, password)
                return AccountView.of(a), "locked"
            ok = _verify(a.password_hash, password)
            if ok and a.totp_secret is not None:
                if not otp:
                    return AccountView.of(a), "otp-required"
                ok = _totp_ok(self._open(a.totp_secret), otp, now)
                reason = "bad-otp"
            else:
                reason = "bad-password"
            if not ok:
                a.failed_logins += 1
                if a.failed_logins >= self.settings.lockout_threshold:
                    a.locked_until = now + timedelta(seconds=self.settings.lockout_s)
                    a.failed_logins = 0
                    return AccountView.of(a), "locked-now"
                return AccountView.of(a), reason
            a.failed_logins, a.locked_until, a.last_login_at = 0, None, now
            if _hasher.check_needs_rehash(a.password_hash):
                a.password_hash = hash_password(password)
            return AccountView.of(a), "ok"

    # ---- helpers

    def _must(self, s: Session, username: str) -> Account:
        a = s.scalar(select(Account).where(Account.username == username))
        if a is None:
            raise AccountError(f"no user {username}")
        return a

    def _seal(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode()

    def _open(self, sealed: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except InvalidToken as exc:
            raise AccountError("the TOTP secret does not decrypt with this console key") from exc


def _verify(phc: str, password: str) -> bool:
    try:
        return _hasher.verify(phc, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def _new_totp_secret() -> str:
    import pyotp
    return pyotp.random_base32()


def _totp_ok(secret: str, otp: str, now: datetime) -> bool:
    import pyotp
    return pyotp.TOTP(secret).verify(otp.strip().replace(" ", ""), for_time=now, valid_window=1)


def totp_uri(secret: str, username: str, issuer: str = "dermgate") -> str:
    import pyotp
    return pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name=issuer)
