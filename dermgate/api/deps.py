"""Request dependencies: the runtime, and the authenticated user.

Users present a bearer token (declared in OpenAPI as the ``bearer`` HTTP security
scheme); the tokens file maps the token's sha256 to a
user name, a role (clinician, compliance, operator) and an expiry, so no token
is stored in the clear. Authentication happens before any route runs or any
body is read, in :mod:`dermgate.api.security`, which leaves the user in the
request scope; here it is picked up, and roles are checked (403, audited and
counted against the token like a failed authentication). Routes stay thin.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from audit.api import AuditEvent, EventType, Outcome
from dermgate.app import Runtime

ROLES = ("clinician", "compliance", "operator", "modality")   # modality: STOW-RS senders
SCOPE_USER = "dermgate.user"          # set by the security middleware once the bearer token checked out


@dataclass(frozen=True)
class User:
    name: str
    role: str
    purpose: str


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def load_tokens(path: Path) -> dict[str, dict[str, str]]:
    """sha256(token) -> {user, role, created}; read per request so a revocation takes effect at once."""
    return json.loads(path.read_text()) if path.exists() else {}


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


bearer = HTTPBearer(scheme_name="bearer", auto_error=False,
                    description="API token issued by `dermgate api-token add` (sent as `Authorization: Bearer ...`)")


def current_user(request: Request, rt: RuntimeDep,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None,
                 x_purpose_of_use: Annotated[str | None, Header(description="v3 PurposeOfUse, default TREAT")] = None
                 ) -> User:
    """The user the security middleware authenticated (``credentials`` (the ``bearer`` scheme) and
    ``x_purpose_of_use`` are declared for the OpenAPI description; the middleware has checked them)."""
    user = request.scope.get(SCOPE_USER)
    if isinstance(user, User):
        return user
    # Only a route outside /api/ (or an app built without the middleware) gets here: fail closed.
    raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token",
                        headers={"WWW-Authenticate": "Bearer"})


CurrentUser = Annotated[User, Depends(current_user)]


def require(*roles: str):  # noqa: ANN201 - returns a FastAPI dependency
    def _check(user: CurrentUser, request: Request, rt: RuntimeDep) -> User:
        if user.role not in roles:
            source = request.client.host if request.client else None
            reason = f"role {user.role} not allowed"
            security = getattr(request.app.state, "security", None)
            if security is not None:       # counted against the token and source, audited coalesced
                security.failure(source=source, reason=reason, path=request.url.path, status=403,
                                 actor=user.name, role=user.role, digest=request.scope.get("dermgate.token_digest"))
            else:
                rt.audit.record(AuditEvent(event=EventType.AUTH_FAILURE, outcome=Outcome.MINOR_FAILURE,
                                           actor=user.name, actor_role=user.role, source=source,
                                           detail={"path": request.url.path, "reason": reason}))
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"role '{user.role}' may not do this")
        return user
    return Depends(_check)


def _error(description: str) -> dict[str, Any]:
    from dermgate.api.models import ErrorOut
    return {"model": ErrorOut, "description": description}


AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _error("no bearer token, or an unknown or revoked one (audited)"),
    403: _error("the token's role may not do this (audited)"),
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: _error("no image with this SOP Instance UID")}
CONFLICT: dict[int | str, dict[str, Any]] = {409: _error("the AI result for this image is not ready yet")}

