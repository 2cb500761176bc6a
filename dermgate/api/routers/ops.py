"""Health, readiness, metrics and our public keys: unauthenticated, for orchestrators and the EHR."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select

from dermgate import metrics
from dermgate.api.deps import RuntimeDep
from dermgate.api.models import ReadinessOut
from dermgate.db import OutboxItem
from dermgate.health import readiness
from dermgate.pipeline import queue_depth

router = APIRouter(tags=["ops"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz", response_model=ReadinessOut, responses={503: {"model": ReadinessOut,
                                                                     "description": "a dependency is not usable"}})
def readyz(rt: RuntimeDep, request: Request) -> JSONResponse:
    checks = readiness(rt, request.app.state.check_model, getattr(request.app.state, 'check_ehr', False))
    ready = all(c["ok"] for c in checks.values())
    return JSONResponse({"ready": ready, "checks": checks},
                        status_code=status.HTTP_200_OK if ready else status.HTTP_503_SERVICE_UNAVAILABLE)


@router.get("/metrics", response_class=Response)
def prometheus(rt: RuntimeDep) -> Response:
    try:
        for state, n in queue_depth(rt.sessions).items():
            metrics.QUEUE_DEPTH.labels(state).set(n)
        with rt.sessions() as s:
            for ch, st, n in s.execute(select(OutboxItem.channel, OutboxItem.state, func.count())
                                       .group_by(OutboxItem.channel, OutboxItem.state)):
                metrics.OUTBOX.labels(ch.split(":")[0], st.value).set(n)
        from dermgate.monitor_metrics import refresh
        refresh(rt)                        # live performance and drift, at most every few minutes
    except Exception:  # noqa: BLE001 - metrics still served when the database is down
        pass
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.get("/.well-known/jwks.json")
def jwks(rt: RuntimeDep) -> dict[str, Any]:
    """Public keys for the EHR to verify our SMART client assertions (Epic asks for a JWK Set URL)."""
    from dermgate.channels import public_jwks
    keys = public_jwks(rt.settings)
    if keys is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "the FHIR client key is not on this process: "
                                                       "its JWK Set is served where the dispatcher runs")
    return keys
