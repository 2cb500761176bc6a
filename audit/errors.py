"""Exceptions raised by the audit package.

Every failure has a name and a message that says what to do; a wrong or
missing key never yields garbage, it raises::

    AuditError
    ├── AuditConfigError      unusable configuration (directory, options, arguments)
    ├── AuditKeyError         key material
    │   ├── MissingKeyError   no key configured, or a key id absent from the keyring
    │   ├── WrongKeyError     a key is there but is not the one that encrypted the record
    │   └── SigningKeyError   Ed25519 signing/verifying key missing, unreadable or untrusted
    ├── AuditWriteError       a record could not be made durable: do not acknowledge the action
    ├── TornTailError         the log ends in an incomplete record (crash mid-write): run repair
    └── IntegrityError        a record fails its chain, hash, signature or tag check
        └── TruncatedError    the trail is missing, shorter, or other than its outside anchor says
"""

from __future__ import annotations


class AuditError(Exception):
    """Root of the audit package's exceptions."""


class AuditConfigError(AuditError):
    """The trail cannot be opened or used as configured."""


class AuditKeyError(AuditError):
    """A problem with key material (never carries the key itself)."""


class MissingKeyError(AuditKeyError):
    """No key configured, or the key id a record names is not in the keyring."""


class WrongKeyError(AuditKeyError):
    """The keyring holds a key under that id, but not the one the record was encrypted with."""


class SigningKeyError(AuditKeyError):
    """The Ed25519 key is missing, unreadable, or not among the trusted keys."""


class AuditWriteError(AuditError):
    """The record is not durable; the caller must not acknowledge the audited action."""


class TornTailError(AuditError):
    """The log ends in an incomplete record; ``dermgate audit repair`` seals it."""

    def __init__(self, message: str, *, offset: int, length: int) -> None:
        super().__init__(message)
        self.offset = offset
        self.length = length


class IntegrityError(AuditError):
    """A record fails verification; ``seq`` is the position where the log stops being trustworthy."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"record {seq}: {reason}")
        self.seq = seq
        self.reason = reason


class TruncatedError(IntegrityError):
    """The trail is missing, ends before, or differs from the head its outside anchor (database, syslog) records."""
