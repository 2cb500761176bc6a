"""Outcomes: the truth for a lesion, and which AI results it is the truth for.

An outcome is a histopathology result (or a follow-up or consensus diagnosis)
with its date and source: one of the 7 HAM10000 classes, or only ``benign`` /
``malignant`` where that is all the report says. It comes from a CSV file
(``dermgate outcomes import``), the HTTP API (``POST /api/v1/outcomes``) or the
EHR (``dermgate outcomes pull-fhir``, :mod:`dermgate.outcomes_fhir`).

Linking, tried in this order, the first rule that finds anything wins:

    accession     the outcome's accession number is an image's (0008,0050)
    study_uid     the outcome's Study Instance UID is an image's
    patient_body_site
                  same patient and same body site (case and spaces ignored), the
                  image's study date at most ``outcomes.link_window_days`` from the
                  outcome date, and all the candidates in ONE study: candidates in
                  several studies are ambiguous and left for a person
    manual        a person links it (``dermgate outcomes link OUTCOME SOP_UID``)

An outcome that links to nothing is kept, unlinked, for a person to link;
``dermgate outcomes link --auto`` retries the rules (images may arrive after
the pathology). Every outcome recorded, every link and unlink is an audit
event (``outcome.link``, DCM 110110 Patient Record).

Imports are idempotent: each outcome carries an ``external_ref`` (the FHIR
report's id, or a digest of the CSV row), and a second import of the same row
changes nothing.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from audit.api import AuditEvent, AuditSink, EventType, Outcome as AuditOutcome
from dermgate.db import Instance, Job, Outcome, OutcomeLink
from inference.result import CLASSES, MALIGNANT

BINARY = ("benign", "malignant")
DIAGNOSES = (*CLASSES, *BINARY)
SOURCES = ("histopathology", "follow-up", "consensus")
METHODS = ("accession", "study_uid", "patient_body_site", "manual")
FITZPATRICK = ("I", "II", "III", "IV", "V", "VI")
CSV_REQUIRED = ("accession_number", "diagnosis", "date")
CSV_OPTIONAL = ("source", "fitzpatrick", "study_instance_uid", "patient_id", "body_site", "lab_reference", "note")

# Free-text names of the classes (pathology conclusions, spreadsheets), first match wins; a site adds
# its own with ``outcomes.fhir_pull.text_map``. Order matters: "melanocytic naevus" is no melanoma,
# "in situ" squamous carcinoma (Bowen) is akiec as in HAM10000.
TEXT_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\b(no|without)\s+(evidence\s+of\s+)?malignan", "benign"),
    (r"\b(melanocytic\s+)?na?evus|na?evi\b|\bnevus\b", "nv"),
    (r"\bmelanoma|lentigo\s+maligna\b", "mel"),
    (r"\bbasal\s*cell|\bbcc\b|basalioma", "bcc"),
    (r"actinic|solar\s+keratos|bowen|intra-?epidermal\s+carcinoma|squamous\s+cell\s+carcinoma\s+in\s+situ"
     r"|\bakiec\b", "akiec"),
    (r"seborrh|lentigo\s+(simplex|solaris|senilis)|solar\s+lentigo|lichen(oid)?\s+planus-like"
     r"|\bbkl\b|benign\s+keratos", "bkl"),
    (r"dermatofibroma|fibrous\s+histiocytoma|\bdf\b", "df"),
    (r"angioma|angiokeratoma|pyogenic\s+granuloma|haemorrhage|hemorrhage|vascular|\bvasc\b", "vasc"),
    (r"\bmalignan", "malignant"),
    (r"\bbenign\b", "benign"),
)


class OutcomeError(Exception):
    """An outcome that cannot be recorded or linked as asked (bad value, unknown id)."""

    def __init__(self, message: str, http_status: int = 400) -> None:
        super().__init__(message)
        self.http_status = http_status


# ---- values -------------------------------------------------------------------------------------

def normalise_diagnosis(value: str, text_map: dict[str, str] | None = None) -> str:
    """One of the 7 classes, ``benign`` or ``malignant``, from a code or a name (OutcomeError if none)."""
    v = (value or "").strip().lower()
    if v in DIAGNOSES:
        return v
    mapped = diagnosis_from_text(v, text_map)
    if mapped is None:
        raise OutcomeError(f"diagnosis {value!r} is none of {', '.join(DIAGNOSES)} and names none of them")
    return mapped


def diagnosis_from_text(text: str, text_map: dict[str, str] | None = None) -> str | None:
    """The class a free text names (site patterns first, then :data:`TEXT_PATTERNS`), or None."""
    t = (text or "").lower()
    for pattern, dx in [*(text_map or {}).items(), *TEXT_PATTERNS]:
        if re.search(pattern, t, flags=re.IGNORECASE):
            if dx not in DIAGNOSES:
                raise OutcomeError(f"text map {pattern!r} -> {dx!r}: not one of {', '.join(DIAGNOSES)}")
            return dx
    return None


def is_malignant(diagnosis: str) -> bool:
    return diagnosis == "malignant" or diagnosis in MALIGNANT


def parse_date(value: str | date) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    v = (value or "").strip()
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.strptime(v[:10] if fmt == "%Y-%m-%d" else v, fmt).date()
        except ValueError:
            continue
    raise OutcomeError(f"date {value!r} is not YYYY-MM-DD or YYYYMMDD")


def normalise_fitzpatrick(value: str | None) -> str | None:
    v = (value or "").strip().upper().removeprefix("TYPE").strip()
    if not v:
        return None
    if v.isdigit() and 1 <= int(v) <= 6:
        return FITZPATRICK[int(v) - 1]
    if v in FITZPATRICK:
        return v
    raise OutcomeError(f"Fitzpatrick type {value!r} is not I-VI (or 1-6)")


def site_key(body_site: str | None) -> str:
    """Body sites compare without case, spaces or punctuation ("Upper back" == "UPPERBACK")."""
    return re.sub(r"[^a-z0-9]", "", (body_site or "").lower())


def image_date(inst: Instance) -> date:
    if inst.study_date and len(inst.study_date) == 8 and inst.study_date.isdigit():
        return datetime.strptime(inst.study_date, "%Y%m%d").date()
    return inst.received_at.date()


@dataclass(frozen=True)
class OutcomeIn:
    """An outcome as a source hands it in (validated by :func:`validated`)."""
    diagnosis: str
    outcome_date: date
    source: str = "histopathology"
    accession_number: str | None = None
    study_instance_uid: str | None = None
    patient_id: str | None = None
    body_site: str | None = None
    lab_reference: str | None = None
    fitzpatrick: str | None = None
    note: str | None = None
    external_ref: str | None = None       # default: a digest of the identifying fields

    def validated(self, text_map: dict[str, str] | None = None) -> OutcomeIn:
        dx = normalise_diagnosis(self.diagnosis, text_map)
        if self.source not in SOURCES:
            raise OutcomeError(f"source {self.source!r} is none of {', '.join(SOURCES)}")
        if not (self.accession_number or self.study_instance_uid or self.patient_id):
            raise OutcomeError("an outcome needs an accession number, a Study Instance UID or a patient id")
        ref = self.external_ref or "row:" + hashlib.sha256("|".join(
            str(x or "") for x in (self.accession_number, self.study_instance_uid, self.patient_id,
                                   site_key(self.body_site), self.outcome_date, dx, self.source,
                                   self.lab_reference)).encode()).hexdigest()[:40]
        return OutcomeIn(dx, parse_date(self.outcome_date), self.source,
                         (self.accession_number or "").strip()[:16] or None,
                         (self.study_instance_uid or "").strip() or None,
                         (self.patient_id or "").strip() or None,
                         (self.body_site or "").strip()[:64] or None,
                         (self.lab_reference or "").strip()[:128] or None,
                         normalise_fitzpatrick(self.fitzpatrick), self.note, ref[:255])


@dataclass
class Recorded:
    """What recording one outcome did."""
    outcome_id: int
    created: bool                                   # False: the same external_ref was recorded before
    links: list[tuple[int, str]] = field(default_factory=list)   # (job id, method) made now
    unlinked_reason: str | None = None


def outcome_json(o: Outcome, links: Sequence[tuple[OutcomeLink, Instance]] = ()) -> dict[str, Any]:
    return {"id": o.id, "diagnosis": o.diagnosis, "malignant": o.malignant, "date": o.outcome_date.isoformat(),
            "source": o.source, "accession_number": o.accession_number,
            "study_instance_uid": o.study_instance_uid, "patient_id": o.patient_id, "body_site": o.body_site,
            "lab_reference": o.lab_reference, "fitzpatrick": o.fitzpatrick, "external_ref": o.external_ref,
            "created_by": o.created_by, "created_at": o.created_at.isoformat() if o.created_at else None,
            "links": [{"job_id": lk.job_id, "sop_instance_uid": inst.sop_instance_uid, "method": lk.method,
                       "linked_by": lk.linked_by} for lk, inst in links]}


# ---- linking ------------------------------------------------------------------------------------

def find_candidates(s: Session, o: Outcome, window_days: int) -> tuple[str | None, list[tuple[Job, Instance]], str | None]:
    """(method, [(job, instance)], why none) by the first rule that finds anything."""
    base = select(Job, Instance).join(Instance, Instance.id == Job.instance_id)
    rows: Any
    if o.accession_number:
        rows = [tuple(r) for r in s.execute(base.where(Instance.accession_number == o.accession_number))]
        if rows:
            return "accession", rows, None  # type: ignore[return-value]
    if o.study_instance_uid:
        rows = [tuple(r) for r in s.execute(base.where(Instance.study_instance_uid == o.study_instance_uid))]
        if rows:
            return "study_uid", rows, None  # type: ignore[return-value]
    if o.patient_id and o.body_site:
        key = site_key(o.body_site)
        rows = [(j, i) for j, i in s.execute(base.where(Instance.patient_id == o.patient_id))
                if site_key(i.body_site) == key and abs((o.outcome_date - image_date(i)).days) <= window_days]
        studies = {i.study_instance_uid for _, i in rows}
        if len(studies) == 1:
            return "patient_body_site", rows, None
        if len(studies) > 1:
            return None, [], f"ambiguous: {len(studies)} studies of this patient and body site in the window"
    return None, [], "no image matches its accession number, study or patient and body site"


def _link(s: Session, o: Outcome, rows: Iterable[tuple[Job, Instance]], method: str, actor: str) -> list[tuple[Job, Instance]]:
    have = set(s.scalars(select(OutcomeLink.job_id).where(OutcomeLink.outcome_id == o.id)))
    made = []
    for job, inst in rows:
        if job.id in have:
            continue
        s.add(OutcomeLink(outcome_id=o.id, job_id=job.id, method=method, linked_by=actor))
        have.add(job.id)
        made.append((job, inst))
    s.flush()
    return made


def _audit_links(audit: AuditSink, o: Outcome, made: Sequence[tuple[Job, Instance]], method: str, actor: str,
                 source: str | None, action: str = "C") -> None:
    for job, inst in made:
        audit.record(AuditEvent(
            event=EventType.OUTCOME, outcome=AuditOutcome.SUCCESS, actor=actor, action=action, source=source,
            actor_role="operator" if method == "manual" else None, patient_id=inst.patient_id,
            study_uid=inst.study_instance_uid, sop_instance_uids=(inst.sop_instance_uid,),
            detail={"outcome_id": o.id, "link": "unlinked" if action == "D" else method, "job_id": job.id,
                    "diagnosis": o.diagnosis, "outcome_source": o.source,
                    "ai_top_class": (job.result or {}).get("top_class")}))


def record_outcome(sessions: sessionmaker, audit: AuditSink, item: OutcomeIn, *, actor: str,
                   window_days: int = 90, text_map: dict[str, str] | None = None,
                   source: str | None = None) -> Recorded:
    """Store one outcome (idempotent on its external_ref) and link it by the rules; all audited."""
    v = item.validated(text_map)
    with sessions.begin() as s:
        o = s.scalar(select(Outcome).where(Outcome.external_ref == v.external_ref))
        if o is not None:
            return Recorded(o.id, created=False)
        o = Outcome(accession_number=v.accession_number, study_instance_uid=v.study_instance_uid,
                    patient_id=v.patient_id, body_site=v.body_site, diagnosis=v.diagnosis,
                    malignant=is_malignant(v.diagnosis), outcome_date=v.outcome_date, source=v.source,
                    lab_reference=v.lab_reference, fitzpatrick=v.fitzpatrick, external_ref=v.external_ref,
                    note=v.note, created_by=actor)
        s.add(o)
        s.flush()
        method, rows, why = find_candidates(s, o, window_days)
        made = _link(s, o, rows, method, actor) if method else []
        patient = o.patient_id or (made[0][1].patient_id if made else None)
    audit.record(AuditEvent(
        event=EventType.OUTCOME, outcome=AuditOutcome.SUCCESS, actor=actor, action="C", source=source,
        patient_id=patient, detail={"outcome_id": o.id, "recorded": v.source, "diagnosis": v.diagnosis,
                                    "external_ref": v.external_ref, "linked": len(made), "unlinked_reason": why}))
    _audit_links(audit, o, made, method or "", actor, source)
    return Recorded(o.id, True, [(j.id, method or "") for j, _ in made], why if not made else None)


def relink(sessions: sessionmaker, audit: AuditSink, *, actor: str, window_days: int = 90) -> dict[str, int]:
    """Try the rules again for every outcome without a link (images may come after the pathology)."""
    linked = still = 0
    with sessions() as s:
        ids = list(s.scalars(select(Outcome.id).where(~Outcome.id.in_(select(OutcomeLink.outcome_id)))))
    for oid in ids:
        with sessions.begin() as s:
            o = s.get(Outcome, oid)
            assert o is not None
            method, rows, _ = find_candidates(s, o, window_days)
            made = _link(s, o, rows, method, actor) if method else []
        _audit_links(audit, o, made, method or "", actor, None)
        linked, still = linked + bool(made), still + (not made)
    return {"linked": linked, "unlinked": still}


def _job_of(s: Session, sop_instance_uid: str) -> tuple[Job, Instance]:
    row = s.execute(select(Job, Instance).join(Instance, Instance.id == Job.instance_id)
                    .where(Instance.sop_instance_uid == sop_instance_uid)).first()
    if row is None:
        raise OutcomeError("no image with this SOP Instance UID", 404)
    return row[0], row[1]


def link_manual(sessions: sessionmaker, audit: AuditSink, outcome_id: int, sop_instance_uid: str, *,
                actor: str, source: str | None = None) -> bool:
    """A person links an outcome to one AI result; False when that link existed already."""
    with sessions.begin() as s:
        o = s.get(Outcome, outcome_id)
        if o is None:
            raise OutcomeError(f"no outcome {outcome_id}", 404)
        made = _link(s, o, [_job_of(s, sop_instance_uid)], "manual", actor)
    _audit_links(audit, o, made, "manual", actor, source)
    return bool(made)


def unlink(sessions: sessionmaker, audit: AuditSink, outcome_id: int, sop_instance_uid: str, *,
           actor: str, source: str | None = None) -> bool:
    """A person removes a wrong link; False when there was none."""
    with sessions.begin() as s:
        o = s.get(Outcome, outcome_id)
        if o is None:
            raise OutcomeError(f"no outcome {outcome_id}", 404)
        job, inst = _job_of(s, sop_instance_uid)
        link = s.scalar(select(OutcomeLink).where(OutcomeLink.outcome_id == o.id, OutcomeLink.job_id == job.id))
        if link is None:
            return False
        s.delete(link)
    _audit_links(audit, o, [(job, inst)], "manual", actor, source, action="D")
    return True


def list_outcomes(sessions: sessionmaker, *, unlinked_only: bool = False, limit: int = 500) -> list[dict[str, Any]]:
    with sessions() as s:
        q = select(Outcome).order_by(Outcome.id)
        if unlinked_only:
            q = q.where(~Outcome.id.in_(select(OutcomeLink.outcome_id)))
        outcomes = list(s.scalars(q.limit(limit)))
        links: dict[int, list[tuple[OutcomeLink, Instance]]] = {}
        if outcomes:
            for lk, inst in s.execute(select(OutcomeLink, Instance).join(Job, Job.id == OutcomeLink.job_id)
                                      .join(Instance, Instance.id == Job.instance_id)
                                      .where(OutcomeLink.outcome_id.in_([o.id for o in outcomes]))):
                links.setdefault(lk.outcome_id, []).append((lk, inst))
        return [outcome_json(o, links.get(o.id, [])) for o in outcomes]


# ---- CSV import ---------------------------------------------------------------------------------

@dataclass
class ImportReport:
    created: int = 0
    duplicates: int = 0
    linked: int = 0
    unlinked: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)   # (line, why)

    def to_json(self) -> dict[str, Any]:
        return {"created": self.created, "duplicates": self.duplicates, "linked": self.linked,
                "unlinked": self.unlinked, "errors": [{"line": n, "error": e} for n, e in self.errors]}


def import_csv(sessions: sessionmaker, audit: AuditSink, path: Path, *, actor: str,
               window_days: int = 90) -> ImportReport:
    """Import ``accession_number, diagnosis, date[, source, fitzpatrick, ...]`` rows; bad rows are
    reported by line and skipped, the others recorded (a re-import changes nothing)."""
    report = ImportReport()
    with Path(path).open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = {(c or "").strip().lower(): c for c in reader.fieldnames or []}
        missing = [c for c in CSV_REQUIRED if c not in cols]
        if missing:
            raise OutcomeError(f"{path}: missing column(s) {missing}; has {reader.fieldnames}")
        for line, raw in enumerate(reader, start=2):
            row = {k: (raw.get(orig) or "").strip() for k, orig in cols.items()}
            try:
                item = OutcomeIn(diagnosis=row["diagnosis"], outcome_date=parse_date(row["date"]),
                                 source=(row.get("source") or "histopathology").lower(),
                                 accession_number=row.get("accession_number") or None,
                                 study_instance_uid=row.get("study_instance_uid") or None,
                                 patient_id=row.get("patient_id") or None, body_site=row.get("body_site") or None,
                                 lab_reference=row.get("lab_reference") or None,
                                 fitzpatrick=row.get("fitzpatrick") or None, note=row.get("note") or None)
                rec = record_outcome(sessions, audit, item, actor=actor, window_days=window_days)
            except OutcomeError as exc:
                report.errors.append((line, str(exc)))
                continue
            if not rec.created:
                report.duplicates += 1
                continue
            report.created += 1
            report.linked += bool(rec.links)
            report.unlinked += not rec.links
    return report
