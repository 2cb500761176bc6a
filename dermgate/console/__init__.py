"""The web console: pages for clinicians (worklist, case, review), compliance officers (audit
trail, disclosures, exports) and IT staff (queues, dead letters, readiness), served by the same
FastAPI app as the JSON API and sharing its core (``dermgate.results``, ``dermgate.review``).

Sign-in is local (``dermgate user ...``, Argon2id) or through the hospital's OpenID Connect
provider; sessions live in the database (``console_sessions``), the cookie holds only a random
token. Pages are rendered on the server (Jinja2); the only scripts are static files, so the
Content-Security-Policy needs no ``'unsafe-inline'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from dermgate.app import Runtime


def install(app: FastAPI, rt: Runtime) -> None:
    """Mount the console (pages, static files, its security headers) on ``app``."""
    if not rt.settings.console.enabled:
        return
    from dermgate.console.web import install as _install
    _install(app, rt)
