"""HTTP routes for outcomes (the truth for a lesion) and live performance.

    GET  /api/v1/outcomes?unlinked=true          list (clinician, compliance, operator)
    POST /api/v1/outcomes                        record one; linked by the rules (clinician, operator)
    POST /api/v1/outcomes/{id}/links             a person links it to a result {"sop_instance_uid": ...}
    DELETE /api/v1/outcomes/{id}/links/{sop}     a person removes a wrong link
    GET  /api/v1/monitor/report?since=DATE       the live performance report (JSON)
    GET  /api/v1/recalls                         model recalls (dermgate model recall)

Mounted by one line in dermgate/api/main.py; every write is audited in dermgate.outcomes.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, HTTPException, Request, status
from pydantic import BaseModel

from dermgate.api.deps import RuntimeDep, User, require
from dermgate.outcomes import SOURCES, OutcomeError, OutcomeIn, link_manual, list_outcomes, record_outcome, unlink

router = APIRouter(tags=["outcomes"])

readers = require("clinician", "compliance", "operator")
writers = require("clinician", "operator")


class OutcomeBody(BaseModel):
    diagnosis: str                                      # one of the 7 classes, benign or malignant (or a name)
    date: date
    source: Literal[SOURCES] = "histopathology"         # type: ignore[valid-type]
    accession_number: str | None = None
    study_instance_uid: str | None = None
    patient_id: str | None = None
    body_site: str | None = None
    lab_reference: str | None = None
    fitzpatrick: str | None = None
    note: str | None = None


class LinkBody(BaseModel):
    sop_instance_uid: str


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


@router.get("/api/v1/outcomes")
def get_outcomes(rt: RuntimeDep, unlinked: bool = False, limit: int = 500,
                 user: User = readers) -> list[dict[str, Any]]:
    return list_outcomes(rt.sessions, unlinked_only=unlinked, limit=min(limit, 5000))


@router.post("/api/v1/outcomes", status_code=201)
def post_outcome(request: Request, rt: RuntimeDep, body: Annotated[OutcomeBody, Body()],
                 user: User = writers) -> dict[str, Any]:
    item = OutcomeIn(diagnosis=body.diagnosis, outcome_date=body.date, source=body.source,
                     accession_number=body.accession_number, study_instance_uid=body.study_instance_uid,
                     patient_id=body.patient_id, body_site=body.body_site, lab_reference=body.lab_reference,
                     fitzpatrick=body.fitzpatrick, note=body.note)
    try:
        rec = record_outcome(rt.sessions, rt.audit, item, actor=user.name,
                             window_days=rt.settings.outcomes.link_window_days, source=_client(request))
    except OutcomeError as exc:
        raise HTTPException(exc.http_status, str(exc)) from exc
    return {"id": rec.outcome_id, "created": rec.created,
            "links": [{"job_id": j, "method": m} for j, m in rec.links], "unlinked_reason": rec.unlinked_reason}


@router.post("/api/v1/outcomes/{outcome_id}/links", status_code=201)
def post_link(outcome_id: int, request: Request, rt: RuntimeDep, body: Annotated[LinkBody, Body()],
              user: User = writers) -> dict[str, Any]:
    try:
        made = link_manual(rt.sessions, rt.audit, outcome_id, body.sop_instance_uid, actor=user.name,
                           source=_client(request))
    except OutcomeError as exc:
        raise HTTPException(exc.http_status, str(exc)) from exc
    return {"outcome_id": outcome_id, "sop_instance_uid": body.sop_instance_uid, "linked": made}


@router.delete("/api/v1/outcomes/{outcome_id}/links/{sop_instance_uid}")
def delete_link(outcome_id: int, sop_instance_uid: str, request: Request, rt: RuntimeDep,
                user: User = writers) -> dict[str, Any]:
    try:
        removed = unlink(rt.sessions, rt.audit, outcome_id, sop_instance_uid, actor=user.name,
                         source=_client(request))
    except OutcomeError as exc:
        raise HTTPException(exc.http_status, str(exc)) from exc
    if not removed:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such link")
    return {"outcome_id": outcome_id, "sop_instance_uid": sop_instance_uid, "unlinked": True}


@router.get("/api/v1/recalls")
def recalls(rt: RuntimeDep, user: User = readers) -> list[dict[str, Any]]:
    from dermgate.recall import list_recalls
    return list_recalls(rt.sessions)


@router.get("/api/v1/monitor/report")
def monitor_report(rt: RuntimeDep, since: date | None = None, user: User = readers) -> dict[str, Any]:
    from dermgate.monitor import build_report, jsonable
    report = build_report(rt, since=since)
    return jsonable(report["summary"] | {"report": report})  # type: ignore[return-value]
