"""The results as people and machines look at them: the worklist and one case.

One core for the web console and the JSON API (``GET /api/v1/results``): which results
await review, in which order, filtered and paged; and everything about one case (its
result, reviews, deliveries, the patient's other images). Reads only; callers audit.

Order of the worklist: results awaiting review first; among them High risk, then Not
assessable, then low-confidence results, then Medium and Low; newest first within each.
It sorts and filters on ``jobs.risk`` and ``jobs.low_confidence`` (copies of the result's
fields: reading the JSON of every row would cost more than the page may take), and pages
keys first: the ordering query returns job ids only, then the page's rows are read by id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timezone
from typing import Any

from sqlalchemy import Select, and_, case, func, literal, or_, select
from sqlalchemy.orm import Session, sessionmaker

from dermgate.db import Instance, Job, JobState, OutboxItem, Review

# Worklist states (derived): what a clinician needs to know of each image.
AWAITING = "awaiting review"
REVIEWED = "reviewed"
PROCESSING = "processing"
FAILED = "failed"
STATES = (AWAITING, REVIEWED, PROCESSING, FAILED)
RISKS = ("High", "Medium", "Low", "Not assessable")


@dataclass(frozen=True)
class WorklistFilter:
    state: str | None = None               # one of STATES
    risk: str | None = None                # one of RISKS
    received_from: date | None = None
    received_to: date | None = None
    device: str | None = None              # calling AE title of the dermatoscope / modality
    not_assessable: bool | None = None
    low_confidence: bool | None = None
    patient_id: str | None = None          # exact
    accession_number: str | None = None    # exact

    def describe(self) -> dict[str, Any]:
        """The filters for an audit record's detail, without the patient (it has its own field)."""
        out: dict[str, Any] = {}
        for k in ("state", "risk", "device", "not_assessable", "low_confidence"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        if self.received_from:
            out["received_from"] = self.received_from.isoformat()
        if self.received_to:
            out["received_to"] = self.received_to.isoformat()
        if self.accession_number:
            out["accession_number"] = self.accession_number
        return out


@dataclass(frozen=True)
class WorklistRow:
    job_id: int
    sop_instance_uid: str
    study_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str | None
    accession_number: str | None
    body_site: str | None
    device: str
    received_at: datetime
    job_state: str
    state: str                             # worklist state (STATES)
    top_class: str | None
    risk: str | None
    malignancy_probability: float | None
    low_confidence: bool
    assessable: bool
    decision: str | None                   # latest review
    reviewed_by: str | None
    reviewed_at: datetime | None


@dataclass(frozen=True)
class WorklistPage:
    rows: list[WorklistRow]
    total: int                             # matching the filter
    page: int
    page_size: int
    counts: dict[str, int] = field(default_factory=dict)   # per worklist state, whole worklist

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.page_size))


def _risk() -> Any:
    return Job.risk


def _low_confidence() -> Any:
    return Job.low_confidence


def _latest_review(job_ids: list[int] | None = None) -> Any:
    q = select(Review.job_id, func.max(Review.id).label("review_id"))
    if job_ids is not None:
        q = q.where(Review.job_id.in_(job_ids))
    return q.group_by(Review.job_id).subquery("latest")


_RANK = {AWAITING: 0, PROCESSING: 1, FAILED: 2, REVIEWED: 3}   # the worklist's order of states


def _state_rank() -> Any:
    """The worklist state as its rank (one CASE, the review looked up at most once per row)."""
    return case(
        (Job.state == JobState.FAILED, _RANK[FAILED]),
        (or_(Job.risk.is_(None), Job.state.in_([JobState.RECEIVED, JobState.CLASSIFIED])), _RANK[PROCESSING]),
        (Job.reviewed_at.is_not(None), _RANK[REVIEWED]),
        else_=_RANK[AWAITING])


def _state_expr(latest: Any = None) -> Any:
    return case(*((_state_rank() == rank, literal(name)) for name, rank in _RANK.items()))


def _base(latest: Any) -> Any:   # a Select of (Job, Instance, Review)
    return (select(Job, Instance, Review)
            .join(Instance, Instance.id == Job.instance_id)
            .outerjoin(latest, latest.c.job_id == Job.id)
            .outerjoin(Review, Review.id == latest.c.review_id))


def _where(q: Select[Any], f: WorklistFilter, state: Any) -> Select[Any]:
    if f.state:
        q = q.where(state == _RANK.get(f.state, -1))
    if f.risk:
        q = q.where(_risk() == f.risk)
    if f.device:
        q = q.where(Instance.calling_ae == f.device)
    if f.not_assessable is not None:
        q = q.where(_risk() == "Not assessable") if f.not_assessable else q.where(
            or_(_risk().is_(None), _risk() != "Not assessable"))
    if f.low_confidence is not None:
        q = q.where(_low_confidence() == f.low_confidence)
    if f.patient_id:
        q = q.where(Instance.patient_id == f.patient_id)
    if f.accession_number:
        q = q.where(Instance.accession_number == f.accession_number)
    if f.received_from:
        q = q.where(Instance.received_at >= datetime.combine(f.received_from, time.min, tzinfo=timezone.utc))
    if f.received_to:
        q = q.where(Instance.received_at <= datetime.combine(f.received_to, time.max, tzinfo=timezone.utc))
    return q


def worklist(sessions: sessionmaker, f: WorklistFilter = WorklistFilter(), *, page: int = 1,
             page_size: int = 50) -> WorklistPage:
    """One page of the worklist, the number of matches and the counts per state."""
    page, page_size = max(1, page), max(1, min(page_size, 500))
    state_rank = _state_rank()
    risk_rank = case((_risk() == "High", 0), (_risk() == "Not assessable", 1), (_low_confidence().is_(True), 2),
                     (_risk() == "Medium", 3), else_=4)
    keys = select(Job.id)
    if f.device or f.patient_id or f.accession_number or f.received_from or f.received_to:
        keys = keys.join(Instance, Instance.id == Job.instance_id)
    # Job.created_at is the receipt time (the job is made in the transaction that admits the image).
    keys = _where(keys, f, state_rank).order_by(state_rank, risk_rank, Job.created_at.desc(), Job.id.desc())
    with sessions() as s:
        ids = list(s.scalars(keys.offset((page - 1) * page_size).limit(page_size)))
        rows: list[WorklistRow] = []
        if ids:
            latest = _latest_review(ids)
            found = {job.id: (job, inst, rev, wstate) for job, inst, rev, wstate in s.execute(
                _base(latest).add_columns(_state_expr().label("wstate")).where(Job.id.in_(ids)))}
            rows = [_row(*found[i]) for i in ids]
        if f == WorklistFilter() or (page == 1 and len(ids) < page_size):
            total = None
        else:
            total = int(s.scalar(keys.with_only_columns(func.count()).order_by(None)) or 0)
        counts = {st: 0 for st in STATES}
        names = {rank: name for name, rank in _RANK.items()}
        rank = _state_rank().label("rank")
        for r, n in s.execute(select(rank, func.count()).select_from(Job).group_by(rank)):
            counts[names[int(r)]] = int(n)
    if total is None:
        total = sum(counts.values()) if f == WorklistFilter() else len(ids)
    return WorklistPage(rows, total, page, page_size, counts)


def devices(sessions: sessionmaker) -> list[str]:
    with sessions() as s:
        return list(s.scalars(select(Instance.calling_ae).distinct().order_by(Instance.calling_ae)))


def _row(job: Job, inst: Instance, rev: Review | None, wstate: str) -> WorklistRow:
    r = job.result or {}
    return WorklistRow(
        job_id=job.id, sop_instance_uid=inst.sop_instance_uid, study_instance_uid=inst.study_instance_uid,
        patient_id=inst.patient_id, issuer_of_patient_id=inst.issuer_of_patient_id,
        accession_number=inst.accession_number, body_site=inst.body_site, device=inst.calling_ae,
        received_at=inst.received_at, job_state=job.state.value, state=wstate, top_class=r.get("top_class"),
        risk=r.get("risk"), malignancy_probability=r.get("malignancy_probability"),
        low_confidence=bool(r.get("low_confidence")), assessable=bool(r.get("assessable", True)),
        decision=rev.decision if rev else None, reviewed_by=rev.reviewer if rev else None,
        reviewed_at=rev.created_at if rev else None)


# ---- one case ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Delivery:
    channel: str
    kind: str
    state: str
    attempts: int
    sent_at: datetime | None
    remote_ref: str | None
    last_error: str | None


@dataclass(frozen=True)
class ReviewView:
    id: int
    reviewer: str
    decision: str
    diagnosis: str | None
    comment: str | None
    created_at: datetime
    reviewer_reference: str | None


@dataclass(frozen=True)
class Case:
    row: WorklistRow
    instance: Instance
    job: Job
    reviews: list[ReviewView]
    deliveries: list[Delivery]
    others: list[WorklistRow]              # the patient's other images, newest first


def find_job(s: Session, *, job_id: int | None = None, sop_instance_uid: str | None = None) -> Any:
    q = select(Job, Instance).join(Instance, Instance.id == Job.instance_id)
    q = q.where(Job.id == job_id) if job_id is not None else q.where(Instance.sop_instance_uid == sop_instance_uid)
    return s.execute(q).first()


def case_of(sessions: sessionmaker, job_id: int) -> Case | None:
    latest = _latest_review()
    state = _state_expr(latest)
    with sessions() as s:
        found = s.execute(_base(latest).add_columns(state.label("wstate")).where(Job.id == job_id)).first()
        if found is None:
            return None
        job, inst, rev, wstate = found
        reviews = [ReviewView(r.id, r.reviewer, r.decision, r.diagnosis, r.comment, r.created_at,
                              r.reviewer_reference)
                   for r in s.scalars(select(Review).where(Review.job_id == job.id).order_by(Review.id.desc()))]
        items = s.scalars(select(OutboxItem).where(or_(
            OutboxItem.job_id == job.id,
            and_(OutboxItem.job_id.is_(None), OutboxItem.business_key.like(f"{inst.sop_instance_uid}:%"))))
            .order_by(OutboxItem.id))
        deliveries = [Delivery(o.channel, o.kind, o.state.value, o.attempts, o.sent_at, o.remote_ref, o.last_error)
                      for o in items]
        others = [_row(j, i, r, w) for j, i, r, w in s.execute(
            _base(latest).add_columns(state.label("wstate"))
            .where(Instance.patient_id == inst.patient_id, Job.id != job.id)
            .order_by(Instance.received_at.desc()).limit(50))]
        return Case(_row(job, inst, rev, wstate), inst, job, reviews, deliveries, others)
