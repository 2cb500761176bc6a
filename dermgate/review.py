"""Clinician review: confirm or override an AI result.

The review is stored, audited (DCM 110110 Patient Record, update), and the
report update goes through the same outbox as the report, so it reaches the
EHR once even when the EHR is down: the first sign-off makes the report
``final`` (with the clinician's diagnosis on override), a later review
``amended`` or ``corrected`` (R4), and the Observations follow the report.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from audit.api import AuditEvent, EventType, Outcome
from dermgate.app import Runtime
from dermgate.channels import review_planners
from dermgate.db import Instance, Job, JobState, OutboxItem, Review
from dermgate.records import ImageRef
from inference.result import CLASSES


class ReviewError(Exception):
    def __init__(self, message: str, http_status: int = 400) -> None:
        super().__init__(message)
        self.http_status = http_status


def submit_review(rt: Runtime, sop_instance_uid: str, *, reviewer: str, decision: str,
                  diagnosis: str | None, comment: str | None, source: str | None = None,
                  reviewer_reference: str | None = None, role: str | None = "clinician",
                  channel: str = "api", actor: str | None = None) -> dict[str, Any]:
    """Record one review and queue its report update (one transaction); audited. The JSON API,
    the CLI and the web console all come through here (``channel`` says which). ``reviewer`` is
    the name the report shows; ``actor``, the authenticated account in the audit trail (an API
    token holder, ``os:<user>`` or a console account; default: ``reviewer``); ``role`` the role
    that identity proves (None for an OS user)."""
    if decision not in ("confirm", "override"):
        raise ReviewError("decision must be confirm or override")
    if decision == "override" and diagnosis not in CLASSES:
        raise ReviewError(f"an override needs a diagnosis, one of {', '.join(CLASSES)}")
    from dermgate.api.security import MAX_COMMENT_CHARS
    if comment is not None and len(comment) > MAX_COMMENT_CHARS:
        raise ReviewError(f"the comment is longer than {MAX_COMMENT_CHARS} characters", 422)
    with rt.sessions.begin() as s:
        row = s.execute(select(Instance, Job).join(Job, Job.instance_id == Instance.id)
                        .where(Instance.sop_instance_uid == sop_instance_uid)).first()
        if row is None:
            raise ReviewError("no image with this SOP Instance UID", 404)
        inst, job = row
        if job.result is None or job.state in (JobState.RECEIVED, JobState.CLASSIFIED):
            raise ReviewError("the AI result for this image is not ready yet", 409)
        review = Review(job_id=job.id, reviewer=reviewer, decision=decision,
                        diagnosis=diagnosis if decision == "override" else None, comment=comment,
                        reviewer_reference=reviewer_reference)
        s.add(review)
        s.flush()      # (dermgate.db marks the job reviewed for the worklist)
        image = ImageRef.from_object(inst)
        for planner in review_planners(rt):      # the channels whose table entry says "reviews"
            payload = planner.plan_review(image, review)
            if payload is not None:
                s.add(OutboxItem(job_id=None, channel=planner.channel, kind="review", payload=payload,
                                 business_key=f"{inst.sop_instance_uid}:review:{review.id}"))
        out = {"id": review.id, "decision": decision, "diagnosis": review.diagnosis,
               "sop_instance_uid": inst.sop_instance_uid, "reviewer": reviewer,
               "created_at": review.created_at.isoformat()}
        patient_id, study_uid = inst.patient_id, inst.study_instance_uid
    rt.audit.record(AuditEvent(event=EventType.REVIEW, outcome=Outcome.SUCCESS, actor=actor or reviewer,
                               actor_role=role, action="U", source=source, patient_id=patient_id,
                               study_uid=study_uid, sop_instance_uids=(sop_instance_uid,),
                               detail={"decision": decision, "diagnosis": diagnosis, "via": channel,
                                       "ai_top_class": (job.result or {}).get("top_class")}))
    return out
