"""Who runs a ``dermgate`` command, for the audit trail (HIPAA 164.312(a)(2)(i), (d)).

A name typed on the command line proves nothing, so the CLI records one of two
authenticated identities, never a claim:

- the operating-system user that runs the process, recorded as ``os:<user>``
  (the login already authenticated them; the host's own logs tie it to a person);
- the holder of an API token given in ``$DERMGATE_API_TOKEN`` (the same tokens
  as the HTTP API: name and role come from the tokens file, never from the
  command line).

Options that name a person or a role (``--reviewer``, ``--as``, ``--role``,
``--user``) are accepted only when they agree with the token; without a token,
only the OS user's own name is accepted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

TOKEN_ENV = "DERMGATE_API_TOKEN"
OS_PREFIX = "os:"


class IdentityError(Exception):
    """The command line claims an identity the caller has not proved."""


@dataclass(frozen=True)
class Identity:
    actor: str                      # "os:<user>" or the token's user name
    role: str | None                # the token's role; None for an OS user (a role is not proved by a login)
    via: str                        # "os" or "token"


def os_user() -> str:
    """The login name of the process's real uid, from the password database (not ``$USER``, which
    anyone can set); ``uid<N>`` in a container without a passwd entry."""
    import pwd
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid{os.getuid()}"


def resolve(tokens_file: Path | None, *, claimed_user: str | None = None, claimed_role: str | None = None,
            environ: Mapping[str, str] | None = None, option: str = "--as") -> Identity:
    """The caller's identity: the token's holder if ``$DERMGATE_API_TOKEN`` is set, else the OS user.

    Raises :class:`IdentityError` when ``claimed_user``/``claimed_role`` (what
    was typed) differ from what the token or the login proves.
    """
    env = os.environ if environ is None else environ
    token = (env.get(TOKEN_ENV) or "").strip()
    if token:
        digest = hashlib.sha256(token.encode()).hexdigest()   # the tokens file keys (dermgate api-token)
        tokens = (json.loads(tokens_file.read_text())
                  if tokens_file is not None and tokens_file.exists() else {})
        entry = next((v for k, v in tokens.items() if hmac.compare_digest(k, digest)), None)
        if entry is None:
            raise IdentityError(f"{TOKEN_ENV} is not a valid API token (unknown or revoked)")
        expires = entry.get("expires")
        if expires and datetime.fromisoformat(expires) <= datetime.now(timezone.utc):
            raise IdentityError(f"the API token in {TOKEN_ENV} expired at {expires}")
        if claimed_user and claimed_user != entry["user"]:
            raise IdentityError(f"{option} {claimed_user!r}: the API token in {TOKEN_ENV} belongs to "
                                f"{entry['user']!r}; one person cannot act as another")
        if claimed_role and claimed_role != entry["role"]:
            raise IdentityError(f"--role {claimed_role!r}: the API token in {TOKEN_ENV} has role {entry['role']!r}")
        return Identity(entry["user"], entry["role"], "token")
    user = os_user()
    if claimed_user and claimed_user not in (user, OS_PREFIX + user):
        raise IdentityError(f"{option} {claimed_user!r} names another person: set {TOKEN_ENV} to that person's "
                            f"API token, or leave {option} out to act as {OS_PREFIX}{user}")
    if claimed_role:
        raise IdentityError(f"--role {claimed_role!r} cannot be proved by a login: set {TOKEN_ENV} to an API token "
                            "that has this role, or leave --role out")
    return Identity(OS_PREFIX + user, None, "os")
