"""Clinician review through the API: the same core (and outbox, and FHIR update) as the console and CLI."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Request, status

from dermgate.api.deps import AUTH_RESPONSES, CONFLICT, NOT_FOUND, RuntimeDep, User, require
from dermgate.api.models import ReviewIn, ReviewOut

router = APIRouter(prefix="/api/v1/results", tags=["review"], responses=AUTH_RESPONSES)


@router.post("/{sop_instance_uid}/review", status_code=201, response_model=ReviewOut,
             responses={**NOT_FOUND, **CONFLICT})
def review(sop_instance_uid: str, request: Request, rt: RuntimeDep, body: Annotated[ReviewIn, Body()],
           user: User = require("clinician")) -> ReviewOut:
    from dermgate.review import ReviewError, submit_review
    if body.decision == "override" and not body.diagnosis:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "an override needs the clinician's diagnosis")
    try:
        out = submit_review(rt, sop_instance_uid, reviewer=user.name, decision=body.decision,
                            diagnosis=body.diagnosis, comment=body.comment,
                            source=request.client.host if request.client else None, role=user.role)
    except ReviewError as exc:
        raise HTTPException(exc.http_status, str(exc)) from exc
    return ReviewOut.model_validate(out)
