"""HTTP API security: one pure-ASGI middleware in front of every route, and the offline docs.

Per request, in this order, and nothing of the body read before steps 1-4:

1. **Client address.** ``X-Forwarded-For`` (and ``X-Forwarded-Proto``) count only when
   the peer is in ``api.trusted_proxies``; the client is then the right-most address
   that is not a trusted proxy. ``scope["client"]`` is rewritten, so every route and
   audit record sees that address. (uvicorn's own proxy-header handling is off.)
2. **Lockout.** A source address (IPv6: its /64) or a token that failed
   authentication ``api.auth_failures_before_lockout`` times within
   ``api.auth_failure_window_s`` is answered ``429`` with ``Retry-After`` for
   ``api.lockout_s``.
3. **Authentication** (``/api/`` and ``/dicomweb/`` paths): ``Authorization: Bearer <token>`` -- the
   scheme in any case, the prefix required -- naming an unexpired token of the
   tokens file, else ``401``. Failures are audited (DCM 110114), coalesced per
   source and reason into one record per ``api.audit_coalesce_s`` with their count.
4. **Purpose of use.** ``X-Purpose-Of-Use`` must be one of ``api.purposes_of_use``
   (absent: ``api.default_purpose_of_use``), else ``400``.
5. **Body size.** A ``Content-Length`` above ``api.max_body_bytes`` is answered ``413``
   at once; a body streamed without one is counted and cut with ``413`` as it passes
   the limit.
6. **Response headers** on every answer: ``Cache-Control: no-store``, ``Pragma:
   no-cache``, ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``,
   ``Referrer-Policy: no-referrer``, a ``Content-Security-Policy``, and
   ``Strict-Transport-Security`` when the request came over HTTPS.

Role checks stay in :mod:`dermgate.api.deps` (``403``), and count as failures of the token.
"""

from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import structlog
from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from audit.api import AuditEvent, AuditSink, EventType, Outcome
from dermgate import metrics
from dermgate.api.deps import SCOPE_USER, User, hash_token, load_tokens
from dermgate.settings import ApiSettings
from dermgate.throttle import AuditCoalescer, FailureLimiter, source_key

log = structlog.get_logger("dermgate.api.security")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROTECTED_PREFIXES = ("/api/", "/dicomweb/")   # STOW-RS bodies are PHI too
STOW_PREFIX = "/dicomweb/"
STATIC_PREFIX = "/static/"     # the web console's static files (dermgate/console)
DOCS_STATIC = "/docs/static"
MAX_COMMENT_CHARS = 4000            # a review comment; longer ones are refused (422)
API_CSP = "default-src 'none'; frame-ancestors 'none'"
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'")


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes the limit (FastAPI lets HTTPException through)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


@dataclass(frozen=True)
class TokenCheck:
    """The outcome of reading the Authorization header against the tokens file."""
    user: User | None
    reason: str | None = None                      # why not, for the audit record
    digest: str | None = None                      # sha256 of the presented token: the per-token limit's key
    token_user: str | None = None                  # whose token it was (an expired one)


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def token_expiry(entry: dict[str, Any], lifetime_days: float) -> datetime | None:
    """When a token stops working: its ``expires``, else ``created`` + the configured lifetime
    (tokens issued before lifetimes existed); ``None`` when neither is known (refused)."""
    expires = _parse_time(entry.get("expires"))
    if expires is not None:
        return expires
    created = _parse_time(entry.get("created"))
    return created + timedelta(days=lifetime_days) if created is not None else None


def check_token(authorization: str | None, tokens_file: Path, cfg: ApiSettings, purpose: str,
                now: datetime | None = None) -> TokenCheck:
    """``Authorization: Bearer <token>``: the scheme in any case, the prefix required, one token."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    token = credentials.strip()
    if not authorization or not scheme:
        return TokenCheck(None, "missing Authorization header")
    if scheme.lower() != "bearer":
        return TokenCheck(None, "Authorization scheme is not Bearer")
    if not token or any(c.isspace() for c in token):
        return TokenCheck(None, "malformed bearer token")
    digest = hash_token(token)
    entry = None
    for key, value in load_tokens(tokens_file).items():
        if _same(key, digest):
            entry = value
    if entry is None:
        return TokenCheck(None, "unknown bearer token", digest)
    expiry = token_expiry(entry, cfg.token_lifetime_days)
    if expiry is None or expiry <= (now or datetime.now(timezone.utc)):
        return TokenCheck(None, "bearer token expired" if expiry else "bearer token has no lifetime; reissue it",
                          digest, str(entry.get("user")))
    return TokenCheck(User(str(entry["user"]), str(entry["role"]), purpose), None, digest)


def _same(a: str, b: str) -> bool:
    import hmac
    return hmac.compare_digest(a, b)


def _networks(entries: list[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(e, strict=False) for e in entries)


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(value.strip().strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class ApiSecurity:
    """The state the middleware and the role check share: limits, the audit coalescer, settings."""

    def __init__(self, cfg: ApiSettings, tokens_file: Path, audit: AuditSink) -> None:
        self.cfg, self.tokens_file = cfg, tokens_file
        self.proxies = _networks(cfg.trusted_proxies)
        self.purposes = {p.upper() for p in cfg.purposes_of_use} | {cfg.default_purpose_of_use.upper()}
        self.sources = FailureLimiter(cfg.auth_failures_before_lockout, cfg.auth_failure_window_s, cfg.lockout_s)
        self.tokens = FailureLimiter(cfg.auth_failures_before_lockout, cfg.auth_failure_window_s, cfg.lockout_s)
        self.coalescer = AuditCoalescer(audit, cfg.audit_coalesce_s)

    # -- addresses --------------------------------------------------------------------------------

    def trusted(self, host: str | None) -> bool:
        addr = _ip(host) if host else None
        return addr is not None and any(addr in net for net in self.proxies)

    def client(self, peer: str | None, forwarded_for: str | None) -> str | None:
        """The client address: the peer, or, behind trusted proxies, the right-most untrusted hop."""
        if not forwarded_for or not self.trusted(peer):
            return peer
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        parsed = [_ip(h) for h in hops]
        if not hops or any(p is None for p in parsed):
            log.warning("x_forwarded_for_malformed", peer=peer)
            return peer
        for hop in reversed(hops):
            if not self.trusted(hop):
                return str(_ip(hop))
        return str(_ip(hops[0]))

    # -- failures ---------------------------------------------------------------------------------

    def failure(self, *, source: str | None, reason: str, path: str, status: int, actor: str = "unknown",
                role: str | None = None, digest: str | None = None) -> float:
        """Count and audit (coalesced) one refused request; returns the lockout now in force (s)."""
        metrics.API_AUTH_FAILURES.labels(str(status)).inc()
        lock = self.sources.failure(source_key(source))
        if digest:
            lock = max(lock, self.tokens.failure(digest))
        event = AuditEvent(event=EventType.AUTH_FAILURE, outcome=Outcome.MINOR_FAILURE, actor=actor,
                           actor_role=role, source=source,
                           detail={"path": path, "reason": reason, "status": status,
                                   **({"token_sha256_head": digest[:12]} if digest else {})},
                           time=datetime.now(timezone.utc))
        self.coalescer.record((source_key(source), actor, reason), event)
        return lock

    def locked(self, source: str | None, digest: str | None = None) -> float:
        wait = self.sources.retry_after(source_key(source))
        if digest:
            wait = max(wait, self.tokens.retry_after(digest))
        return wait

    def close(self) -> None:
        self.coalescer.close()


def _header(scope: Scope, name: bytes) -> str | None:
    values = [v for k, v in scope.get("headers", ()) if k.lower() == name]
    return b",".join(values).decode("latin-1") if values else None


async def _json(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class SecurityMiddleware:
    """Pure ASGI (no body buffering, unlike ``BaseHTTPMiddleware``): see the module docstring."""

    def __init__(self, app: ASGIApp, security: ApiSecurity) -> None:
        self.app, self.sec = app, security

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sec, cfg = self.sec, self.sec.cfg
        peer = scope["client"][0] if scope.get("client") else None
        client = sec.client(peer, _header(scope, b"x-forwarded-for"))
        if client != peer:
            scope["client"] = (client, 0)
        https = scope.get("scheme") == "https"
        if sec.trusted(peer):
            proto = (_header(scope, b"x-forwarded-proto") or "").split(",")[-1].strip().lower()
            https = https or proto == "https"
        path = scope.get("path", "")
        send = self._with_headers(send, https, path)

        if path.startswith(PROTECTED_PREFIXES):
            refused = await self._authenticate(scope, client, path, send)
            if refused:
                return
        # STOW-RS carries whole images: its own cap, and only after the token checked out
        limit = cfg.max_stow_bytes if path.startswith(STOW_PREFIX) else cfg.max_body_bytes
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length.split(",")[0])
            except ValueError:
                await _json(send, 400, "malformed Content-Length")
                return
            if declared > limit:
                await _json(send, 413, f"request body larger than {limit} bytes",
                            {"Connection": "close"})
                return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, self._limited(receive, limit), tracking_send)
        except BodyTooLarge as exc:
            if not started:
                await _json(send, 413, str(exc.detail), {"Connection": "close"})

    async def _authenticate(self, scope: Scope, client: str | None, path: str, send: Send) -> bool:
        """Steps 2-4; True when the request was answered (refused) here."""
        sec = self.sec
        authorization = _header(scope, b"authorization")
        raw_purpose = _header(scope, b"x-purpose-of-use")
        purpose = (raw_purpose or sec.cfg.default_purpose_of_use).strip().upper()
        check = await run_in_threadpool(check_token, authorization, sec.tokens_file, sec.cfg, purpose)
        wait = sec.locked(client, check.digest)
        if wait > 0:
            await run_in_threadpool(sec.failure, source=client, reason="locked out after repeated failed "
                                    "authentication", path=path, status=429,
                                    actor=check.user.name if check.user else check.token_user or "unknown")
            await _json(send, 429, "too many failed authentications; try again later",
                        {"Retry-After": str(math.ceil(wait))})
            return True
        if check.user is None:
            reason = check.reason or "not authenticated"
            await run_in_threadpool(sec.failure, source=client, reason=reason, path=path, status=401,
                                    actor=check.token_user or "unknown", digest=check.digest)
            challenge = 'Bearer error="invalid_token"' if check.digest else "Bearer"
            await _json(send, 401, "missing or invalid bearer token", {"WWW-Authenticate": challenge})
            return True
        if purpose not in sec.purposes:
            await run_in_threadpool(sec.failure, source=client, reason="purpose of use not allowed",
                                    path=path, status=400, actor=check.user.name, role=check.user.role,
                                    digest=check.digest)
            await _json(send, 400, f"X-Purpose-Of-Use must be one of {', '.join(sorted(sec.purposes))}")
            return True
        scope[SCOPE_USER] = check.user
        scope["dermgate.token_digest"] = check.digest
        return False

    @staticmethod
    def _limited(receive: Receive, limit: int) -> Receive:
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message
        return counted

    def _with_headers(self, send: Send, https: bool, path: str) -> Send:
        docs = path == "/docs" or path.startswith("/docs/") or path == "/redoc"
        # the console's script and styles carry no PHI and may be cached; everything else may not
        no_store = [] if path.startswith(STATIC_PREFIX) else [(b"cache-control", b"no-store"), (b"pragma", b"no-cache")]
        extra = [*no_store,
                 (b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                 (b"referrer-policy", b"no-referrer"),
                 (b"content-security-policy", (DOCS_CSP if docs else API_CSP).encode())]
        if https:
            extra.append((b"strict-transport-security",
                          f"max-age={self.sec.cfg.hsts_max_age_s}; includeSubDomains".encode()))

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", ())}
                message["headers"] = [*message.get("headers", ()), *[(k, v) for k, v in extra if k not in names]]
            await send(message)
        return secured


# ---- wiring ---------------------------------------------------------------------------------------

def docs_assets() -> Path:
    """Swagger UI and ReDoc files shipped in a Python package (fastapi-offline): no CDN."""
    import fastapi_offline
    return Path(fastapi_offline.__file__).resolve().parent / "static"


def install(app: FastAPI, cfg: ApiSettings, tokens_file: Path, audit: AuditSink) -> ApiSecurity:
    """Add the middleware and the offline ``/docs`` and ``/redoc`` (create the app with ``docs_url=None``)."""
    security = ApiSecurity(cfg, tokens_file, audit)
    app.state.security = security
    app.add_middleware(SecurityMiddleware, security=security)
    app.mount(DOCS_STATIC, StaticFiles(directory=docs_assets()), name="docs-static")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    def swagger(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}{openapi_url}", title=f"{app.title} - API",
                                   swagger_js_url=f"{root}{DOCS_STATIC}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{DOCS_STATIC}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{DOCS_STATIC}/favicon.png",
                                   oauth2_redirect_url=f"{root}/docs/oauth2-redirect")

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def swagger_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=f"{root}{openapi_url}", title=f"{app.title} - API",
                              redoc_js_url=f"{root}{DOCS_STATIC}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{DOCS_STATIC}/favicon.png", with_google_fonts=False)

    return security
