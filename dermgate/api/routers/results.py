"""AI results for clinicians' systems: the worklist (paged, audited) and one result with its heatmap."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from sqlalchemy import select

from audit.api import AuditEvent, EventType, Outcome
from dermgate.api.deps import AUTH_RESPONSES, NOT_FOUND, RuntimeDep, User, require
from dermgate.api.models import AIResult, LatestReview, ResultOut, ResultsPage, ResultSummary
from dermgate.app import Runtime
from dermgate.db import Instance, Job
from dermgate.results import WorklistFilter, worklist

router = APIRouter(prefix="/api/v1/results", tags=["results"], responses=AUTH_RESPONSES)
clinician = require("clinician")


def audit_read(rt: Runtime, user: User, request: Request, inst: Instance | None, what: str) -> None:
    rt.audit.record(AuditEvent(
        event=EventType.API_ACCESS, outcome=Outcome.SUCCESS if inst else Outcome.MINOR_FAILURE,
        actor=user.name, actor_role=user.role, action="R", purpose=user.purpose,
        source=request.client.host if request.client else None,
        patient_id=inst.patient_id if inst else None, study_uid=inst.study_instance_uid if inst else None,
        sop_instance_uids=(inst.sop_instance_uid,) if inst else (), detail={"what": what}))


def find(rt: Runtime, sop_uid: str) -> tuple[Instance, Job] | None:
    with rt.sessions() as s:
        row = s.execute(select(Instance, Job).join(Job, Job.instance_id == Instance.id)
                        .where(Instance.sop_instance_uid == sop_uid)).first()
    return (row[0], row[1]) if row else None


@router.get("", response_model=ResultsPage)
def list_results(request: Request, rt: RuntimeDep, user: User = clinician,
                 state: Literal["awaiting review", "reviewed", "processing", "failed"] | None = None,
                 risk: Literal["Low", "Medium", "High", "Not assessable"] | None = None,
                 device: Annotated[str | None, Query(max_length=16, description="calling AE title")] = None,
                 received_from: date | None = None, received_to: date | None = None,
                 low_confidence: bool | None = None, not_assessable: bool | None = None,
                 page: Annotated[int, Query(ge=1)] = 1,
                 page_size: Annotated[int, Query(ge=1, le=500)] = 50) -> ResultsPage:
    """The worklist for machine clients: awaiting review first, High risk and low-confidence on top.
    Every call is audited with the patients it returned (no patient data in the URL)."""
    f = WorklistFilter(state=state, risk=risk, device=device, received_from=received_from,
                       received_to=received_to, low_confidence=low_confidence, not_assessable=not_assessable)
    result = worklist(rt.sessions, f, page=page, page_size=page_size)
    rt.audit.record(AuditEvent(
        event=EventType.API_ACCESS, outcome=Outcome.SUCCESS, actor=user.name, actor_role=user.role, action="R",
        purpose=user.purpose, source=request.client.host if request.client else None,
        detail={"what": "results", "page": result.page, "rows": len(result.rows), "total": result.total,
                "patients": sorted({r.patient_id for r in result.rows}), **f.describe()}))
    items = [ResultSummary(
        sop_instance_uid=r.sop_instance_uid, study_instance_uid=r.study_instance_uid, patient_id=r.patient_id,
        issuer_of_patient_id=r.issuer_of_patient_id, accession_number=r.accession_number,
        received_at=r.received_at, device=r.device, body_site=r.body_site, state=r.state,  # type: ignore[arg-type]
        job_state=r.job_state, top_class=r.top_class, risk=r.risk, malignancy_probability=r.malignancy_probability,
        low_confidence=r.low_confidence, assessable=r.assessable,
        review=LatestReview(decision=r.decision, reviewer=r.reviewed_by or "", reviewed_at=r.reviewed_at)
        if r.decision and r.reviewed_at else None) for r in result.rows]
    return ResultsPage(items=items, total=result.total, page=result.page, page_size=result.page_size,
                       pages=result.pages, counts=result.counts)


@router.get("/{sop_instance_uid}", response_model=ResultOut, responses=NOT_FOUND)
def get_result(sop_instance_uid: str, request: Request, rt: RuntimeDep, user: User = clinician) -> ResultOut:
    found = find(rt, sop_instance_uid)
    audit_read(rt, user, request, found[0] if found else None, "result")
    if not found:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no image with this SOP Instance UID")
    inst, job = found
    return ResultOut(sop_instance_uid=inst.sop_instance_uid, study_instance_uid=inst.study_instance_uid,
                     state=job.state.value, result=AIResult.model_validate(job.result) if job.result else None)


@router.get("/{sop_instance_uid}/heatmap.png", response_class=Response,
            responses={**NOT_FOUND, 200: {"content": {"image/png": {}}, "description": "Grad-CAM with legend"}})
def heatmap(sop_instance_uid: str, request: Request, rt: RuntimeDep, user: User = clinician) -> Response:
    found = find(rt, sop_instance_uid)
    audit_read(rt, user, request, found[0] if found else None, "heatmap")
    png_path = (found[1].outputs or {}).get("cam_png_path") if found else None
    if not png_path:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no heatmap for this image (yet)")
    return Response(rt.store.read(png_path), media_type="image/png", headers={"Cache-Control": "no-store"})
