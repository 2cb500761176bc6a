"""Request dependencies: the runtime, and the authenticated user.

Users present a bearer token (declared in OpenAPI as the ``bearer`` HTTP security
scheme); the tokens file maps the token's sha256 to a user name and a role
(clinician, compliance, operator), so no token is stored in the clear.
Authentication failures are audited (DCM 110114) and answered 401 inside the
dependency; routes stay thin.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from audit.api import AuditEvent, EventType, Outcome
from dermgate.app import Runtime

ROLES = ("clinician", "compliance", "operator")


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
    token = credentials.credentials.strip() if credentials else ""
    digest = hash_token(token) if token else ""
    entry = next((v for k, v in load_tokens(rt.settings.api_tokens_file).items() if token and hmac.compare_digest(k, digest)), None)
    if entry is None:
        rt.audit.record(AuditEvent(event=EventType.AUTH_FAILURE, outcome=Outcome.MINOR_FAILURE,
                                   actor="unknown", source=request.client.host if request.client else None,
                                   detail={"path": request.url.path, "reason": "missing or unknown bearer token"}))
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    return User(entry["user"], entry["role"], x_purpose_of_use or "TREAT")


CurrentUser = Annotated[User, Depends(current_user)]


def require(*roles: str):  # noqa: ANN201 - returns a FastAPI dependency
    def _check(user: CurrentUser, request: Request, rt: RuntimeDep) -> User:
        if user.role not in roles:
            rt.audit.record(AuditEvent(event=EventType.AUTH_FAILURE, outcome=Outcome.MINOR_FAILURE,
                                       actor=user.name, actor_role=user.role,
                                       source=request.client.host if request.client else None,
                                       detail={"path": request.url.path, "reason": f"role {user.role} not allowed"}))
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"role '{user.role}' may not do this")
        return user
    return Depends(_check)


def _error(description: str) -> dict[str, object]:
    from dermgate.api.models import ErrorOut
    return {"model": ErrorOut, "description": description}


AUTH_RESPONSES: dict[int | str, dict[str, object]] = {
    401: _error("no bearer token, or an unknown or revoked one (audited)"),
    403: _error("the token's role may not do this (audited)"),
}
NOT_FOUND = {404: _error("no image with this SOP Instance UID")}
CONFLICT = {409: _error("the AI result for this image is not ready yet")}

