"""The FastAPI application: thin routes over the runtime."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Body, FastAPI, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy import select, text

from audit.api import AuditEvent, EventType, Outcome
from dermgate import __version__, metrics
from dermgate.api.deps import RuntimeDep, User, require
from dermgate.app import Runtime
from dermgate.db import Instance, Job, OutboxItem, OutboxState
from dermgate.health import readiness
from dermgate.pipeline import queue_depth
from inference.result import CLASSES, DISCLAIMER


class ResultOut(BaseModel):
    sop_instance_uid: str
    study_instance_uid: str
    state: str
    result: dict[str, Any] | None
    disclaimer: str = DISCLAIMER


class ReviewIn(BaseModel):
    decision: Literal["confirm", "override"]
    diagnosis: Literal[CLASSES] | None = None  # type: ignore[valid-type]
    comment: str | None = None


def create_app(rt: Runtime, *, check_model: bool = True) -> FastAPI:
    app = FastAPI(title="dermgate", version=__version__,
                  description="Dermoscopy AI decision support: results, review, health. " + DISCLAIMER)
    app.state.runtime = rt

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", tags=["ops"])
    def readyz(rt: RuntimeDep) -> JSONResponse:
        checks = readiness(rt, check_model)
        ready = all(c["ok"] for c in checks.values())
        return JSONResponse({"ready": ready, "checks": checks},
                            status_code=status.HTTP_200_OK if ready else status.HTTP_503_SERVICE_UNAVAILABLE)

    @app.get("/metrics", tags=["ops"])
    def prometheus(rt: RuntimeDep) -> Response:
        try:
            for state, n in queue_depth(rt.sessions).items():
                metrics.QUEUE_DEPTH.labels(state).set(n)
            with rt.sessions() as s:
                from sqlalchemy import func
                for ch, st, n in s.execute(select(OutboxItem.channel, OutboxItem.state, func.count())
                                           .group_by(OutboxItem.channel, OutboxItem.state)):
                    metrics.OUTBOX.labels(ch.split(":")[0], st.value).set(n)
        except Exception:  # noqa: BLE001 - metrics still served when the database is down
            pass
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/.well-known/jwks.json", tags=["ops"])
    def jwks(rt: RuntimeDep) -> dict[str, Any]:
        """Public keys for the EHR to verify our SMART client assertions (Epic asks for a JWK Set URL)."""
        from dermgate.channels import public_jwks
        return public_jwks(rt)

    def _audit_read(rt: Runtime, user: User, request: Request, inst: Instance | None, what: str) -> None:
        rt.audit.record(AuditEvent(
            event=EventType.API_ACCESS, outcome=Outcome.SUCCESS if inst else Outcome.MINOR_FAILURE,
            actor=user.name, actor_role=user.role, action="R", purpose=user.purpose,
            source=request.client.host if request.client else None,
            patient_id=inst.patient_id if inst else None, study_uid=inst.study_instance_uid if inst else None,
            sop_instance_uids=(inst.sop_instance_uid,) if inst else (), detail={"what": what}))

    def _find(rt: Runtime, sop_uid: str) -> tuple[Instance, Job] | None:
        with rt.sessions() as s:
            row = s.execute(select(Instance, Job).join(Job, Job.instance_id == Instance.id)
                            .where(Instance.sop_instance_uid == sop_uid)).first()
        return (row[0], row[1]) if row else None

    clinician = require("clinician")

    @app.get("/api/v1/results/{sop_instance_uid}", response_model=ResultOut, tags=["results"])
    def get_result(sop_instance_uid: str, request: Request, rt: RuntimeDep, user: User = clinician) -> ResultOut:
        found = _find(rt, sop_instance_uid)
        _audit_read(rt, user, request, found[0] if found else None, "result")
        if not found:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no image with this SOP Instance UID")
        inst, job = found
        return ResultOut(sop_instance_uid=inst.sop_instance_uid, study_instance_uid=inst.study_instance_uid,
                         state=job.state.value, result=job.result)

    @app.get("/api/v1/results/{sop_instance_uid}/heatmap.png", tags=["results"])
    def heatmap(sop_instance_uid: str, request: Request, rt: RuntimeDep, user: User = clinician) -> Response:
        found = _find(rt, sop_instance_uid)
        _audit_read(rt, user, request, found[0] if found else None, "heatmap")
        png_path = (found[1].outputs or {}).get("cam_png_path") if found else None
        if not png_path:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no heatmap for this image (yet)")
        return Response(rt.store.read(png_path), media_type="image/png")

    @app.post("/api/v1/results/{sop_instance_uid}/review", status_code=201, tags=["review"])
    def review(sop_instance_uid: str, request: Request, rt: RuntimeDep,
               body: Annotated[ReviewIn, Body()], user: User = clinician) -> dict[str, Any]:
        from dermgate.review import ReviewError, submit_review
        if body.decision == "override" and not body.diagnosis:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "an override needs the clinician's diagnosis")
        try:
            return submit_review(rt, sop_instance_uid, reviewer=user.name, decision=body.decision,
                                 diagnosis=body.diagnosis, comment=body.comment,
                                 source=request.client.host if request.client else None)
        except ReviewError as exc:
            raise HTTPException(exc.http_status, str(exc)) from exc

    @app.get("/api/v1/outbox/dead", tags=["ops"])
    def dead_letters(rt: RuntimeDep, user: User = require("operator")) -> list[dict[str, Any]]:
        with rt.sessions() as s:
            rows = s.scalars(select(OutboxItem).where(OutboxItem.state == OutboxState.DEAD).limit(500))
            return [{"id": o.id, "channel": o.channel, "attempts": o.attempts, "last_error": o.last_error}
                    for o in rows]

    from dermgate.console import install as install_console
    install_console(app, rt)
    return app
