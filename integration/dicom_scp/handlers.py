"""DIMSE handlers: C-ECHO and C-STORE, each failure turned into an answered status.

A handler is ``(event, *deps) -> status``; its dependencies arrive through the
handler tuple bound in :mod:`integration.dicom_scp.scp`. C-STORE is an
intervention event: an exception that escaped would make pynetdicom answer
0xC211 or abort, so :func:`handle_store` catches everything and answers with a
named status from :mod:`integration.dicom_scp.status` and an Error Comment.

The received bytes are parsed once, from the same Part 10 stream that
:class:`~dermgate.intake.Intake` stores and the pipeline worker reads back, so
what is checked here is exactly what is later classified.

Exceptions (internal; each maps to one status)::

    Refusal(status, reason)      the object is refused with ``status``
     +-- raised for every check below; decode errors from
         integration.dicom_scp.decode are translated into it
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from io import BytesIO
from typing import Any, cast

import structlog
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from sqlalchemy.exc import OperationalError

from audit.api import AuditEvent, AuditSink, EventType, Outcome
from dermgate import metrics
from dermgate.intake import Intake, IntakeResult
from dermgate.records import ImageRef
from dermgate.settings import DicomSettings
from dermgate.store import ObjectStore, StoreError
from integration.dicom_scp import status as st
from integration.dicom_scp.decode import CorruptPixelData, DecodeError, NoPixelData, UnsupportedImage

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]
ROLE_MODALITY = "modality"
UID_MAX_LEN = 64                 # PS3.5 9.1
_UNDEFINED_LENGTH = 0xFFFFFFFF


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def uid_ref(uid: str | None) -> str | None:
    """A short, non-reversible reference to a UID for application logs (no PHI in logs)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:12] if uid else None


class Refusal(Exception):
    """The object is refused with ``status``; ``reason`` becomes the Error Comment."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class StoreOutcome:
    """What happened to one C-STORE, for the response, the audit record and the log."""
    status: int
    reason: str | None = None
    image: ImageRef | None = None
    result: IntakeResult | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.result is not None and self.status == st.SUCCESS:
            return self.result.status.value            # accepted | duplicate
        return "refused"


# ---- C-ECHO --------------------------------------------------------------------------------------

def handle_echo(event: Event, audit: AuditSink, clock: Clock = utcnow) -> int:
    """C-ECHO (PS3.4 A.4): always ``0x0000`` Success, once the echo is audited.

    An audit failure is logged and still answered Success: Verification touches
    no patient data, and a modality probing connectivity should not see the
    audit trail's state.
    """
    assoc = event.assoc
    try:
        audit.record(AuditEvent(event=EventType.ECHO, outcome=Outcome.SUCCESS, actor=assoc.requestor.ae_title,
                                actor_role=ROLE_MODALITY, source=assoc.requestor.address,
                                destination=assoc.acceptor.ae_title, time=clock()))
    except Exception:
        log.exception("echo_audit_failed")
    return st.SUCCESS


# ---- C-STORE -------------------------------------------------------------------------------------

def handle_store(event: Event, intake: Intake, audit: AuditSink, cfg: DicomSettings, store: ObjectStore,
                 clock: Clock = utcnow) -> Dataset:
    """C-STORE (PS3.4 B.2.3): check, make durable, audit, answer. Never raises.

    Statuses (Error Comment (0000,0902) carries the reason on every failure):

    * ``0x0000`` Success -- the object and its database row + job are committed
      (fsynced) and the reception audited; also for a re-sent identical object
      (same SOP Instance UID, same bytes): nothing is processed twice.
    * ``0xA700`` Refused: Out of Resources -- free space below
      ``cfg.min_free_bytes``, the store or the database cannot write, or the
      audit trail cannot record the reception. Transient: the SCU may retry.
    * ``0xA900`` Error: Data Set does not match SOP Class -- the data set's SOP
      Class UID differs from the presentation context / request, or its SOP
      Instance UID from the request's Affected SOP Instance UID.
    * ``0xC001`` Cannot understand: a required attribute is missing (Patient ID,
      Study/Series/SOP Instance UID) or a UID is malformed.
    * ``0xC002`` Cannot understand: no Pixel Data.
    * ``0xC003`` Cannot understand: image outside bounds (rows/columns <= 0,
      more than ``cfg.max_pixels`` pixels, samples not 1 or 3, bits not 8 (or
      16 for MONOCHROME), unknown photometric interpretation).
    * ``0xC004`` Cannot understand: the pixel data does not decode (corrupt or
      truncated JPEG / J2K / RLE frame, native buffer too short, size differs
      from Rows/Columns).
    * ``0xC005`` Cannot understand: the data set itself is truncated or unparseable.
    * ``0xC006`` Cannot understand: the SOP Instance UID was already received with
      different content; the first object is kept (see ``status.py``).
    * ``0xC000`` Cannot understand: any unexpected error (logged with its trace).
    """
    started = time.perf_counter()
    assoc = event.assoc
    calling_ae, host = assoc.requestor.ae_title, assoc.requestor.address
    try:
        outcome = _receive(event, intake, cfg, store, calling_ae)
    except Exception as exc:                       # the contract: an answer, never an abort
        log.exception("cstore_unexpected_error")
        outcome = StoreOutcome(st.CANNOT_UNDERSTAND, f"internal error: {type(exc).__name__}")
    outcome = _audit_store(audit, outcome, event, calling_ae, host, clock)
    metrics.CSTORES.labels(status=st.status_name(outcome.status)).inc()
    log.info("cstore", status=f"0x{outcome.status:04X}", result=outcome.label, reason=outcome.reason,
             calling_ae=calling_ae, sop_ref=uid_ref(_request_uid(event)),
             job_id=outcome.result.job_id if outcome.result else None,
             correlation_id=outcome.result.correlation_id if outcome.result else None,
             ms=round((time.perf_counter() - started) * 1000, 2))
    return _response(outcome)


def _receive(event: Event, intake: Intake, cfg: DicomSettings, store: ObjectStore, calling_ae: str) -> StoreOutcome:
    """The admission checks shared with STOW-RS (integration/dicom_scp/admission.py), plus the
    C-STORE request's own: the data set is the instance and class the request announces."""
    from integration.dicom_scp.admission import admit
    return admit(event.encoded_dataset(include_meta=True), calling_ae, intake, cfg, store,
                 check=lambda image: check_sop(image, event))


def _decode_status(exc: DecodeError) -> int:
    if isinstance(exc, NoPixelData):
        return st.NO_PIXEL_DATA
    if isinstance(exc, UnsupportedImage):
        return st.UNSUPPORTED_IMAGE
    if isinstance(exc, CorruptPixelData):
        return st.UNDECODABLE_PIXEL_DATA
    return st.CANNOT_UNDERSTAND


def _accept(intake: Intake, encoded: bytes, image: ImageRef, transfer_syntax: str) -> IntakeResult:
    try:
        return intake.accept(encoded, image, transfer_syntax)
    except StoreError as exc:
        raise Refusal(st.OUT_OF_RESOURCES, f"store cannot write: {exc}") from exc
    except OSError as exc:                         # e.g. the store's folders cannot be created
        raise Refusal(st.OUT_OF_RESOURCES, f"store cannot write: {exc.strerror or type(exc).__name__}") from exc
    except OperationalError as exc:                # database locked / unavailable / disk full
        log.warning("cstore_database_unavailable", error=type(exc.orig).__name__ if exc.orig else "")
        raise Refusal(st.OUT_OF_RESOURCES, "database unavailable") from exc


# ---- checks --------------------------------------------------------------------------------------

def parse(encoded: bytes) -> Dataset:
    """Parse a Part 10 stream, refusing truncated ones (pydicom reads those silently)."""
    fp = BytesIO(encoded)
    try:
        ds = dcmread(fp)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, RecursionError) as exc:
        # RecursionError: sequences nested beyond reason (a known parser bomb)
        raise Refusal(st.UNREADABLE_DATASET, f"data set cannot be parsed: {type(exc).__name__}") from exc
    # pydicom stops at an undefined-length element with no delimiter (rewinding to
    # its start) and keeps short values: both are truncations.
    if fp.tell() != len(encoded):
        raise Refusal(st.UNREADABLE_DATASET, "data set truncated (undefined-length element not closed)")
    last_end = 0
    for tag in ds.keys():
        raw = ds.get_item(tag)
        if not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED_LENGTH:
            continue
        if isinstance(raw.value, bytes) and len(raw.value) < raw.length:
            raise Refusal(st.UNREADABLE_DATASET, f"data set truncated in element {raw.tag}")
        last_end = max(last_end, raw.value_tell + raw.length)
    if last_end and last_end < len(encoded) and not _ends_with_undefined_length(ds):
        raise Refusal(st.UNREADABLE_DATASET, "data set truncated (trailing partial element)")
    return ds


def _ends_with_undefined_length(ds: Dataset) -> bool:
    tags = list(ds.keys())
    if not tags:
        return False
    raw = ds.get_item(tags[-1])
    return not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED_LENGTH


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _required(ds: Dataset, keyword: str) -> str:
    value = _text(ds, keyword)
    if value is None:
        raise Refusal(st.MISSING_ATTRIBUTE, f"{keyword} missing")
    return value


def _uid(ds: Dataset, keyword: str) -> str:
    value = _required(ds, keyword)
    if len(value) > UID_MAX_LEN or not all(part.isdigit() for part in value.split(".")):
        raise Refusal(st.MISSING_ATTRIBUTE, f"{keyword} malformed")
    return value


def _body_site(ds: Dataset) -> str | None:
    region = ds.get("AnatomicRegionSequence")
    if region:
        meaning = _text(region[0], "CodeMeaning")
        if meaning:
            return meaning[:64]
    part = _text(ds, "BodyPartExamined")
    return part[:64] if part else None


def _clip(value: str | None, n: int) -> str | None:
    return value[:n] if value else None


def age_years(age: str | None, birth_date: str | None, study_date: str | None) -> int | None:
    """Age in whole years from Patient's Age (AS: 045Y, 006M, 003W, 010D), else from the
    birth date to the study date; None when neither is usable (never a refusal)."""
    if age and len(age) == 4 and age[:3].isdigit() and age[3] in "YMWD":
        n = int(age[:3])
        return {"Y": n, "M": n // 12, "W": n // 52, "D": n // 365}[age[3]]
    if birth_date and study_date and len(birth_date) == 8 and len(study_date) == 8 \
            and birth_date.isdigit() and study_date.isdigit():
        b, s = (int(birth_date[:4]), int(birth_date[4:6]), int(birth_date[6:])), \
            (int(study_date[:4]), int(study_date[4:6]), int(study_date[6:]))
        years = s[0] - b[0] - ((s[1], s[2]) < (b[1], b[2]))
        return years if 0 <= years < 150 else None
    return None


def image_ref(ds: Dataset, calling_ae: str) -> ImageRef:
    """The header fields the service keeps; refuses objects without the identifiers it needs."""
    try:
        return ImageRef(
            sop_instance_uid=_uid(ds, "SOPInstanceUID"),
            sop_class_uid=_uid(ds, "SOPClassUID"),
            study_instance_uid=_uid(ds, "StudyInstanceUID"),
            series_instance_uid=_uid(ds, "SeriesInstanceUID"),
            patient_id=_required(ds, "PatientID"),
            issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
            accession_number=_text(ds, "AccessionNumber"),
            study_date=_text(ds, "StudyDate"),
            study_time=_text(ds, "StudyTime"),
            modality=_text(ds, "Modality"),
            body_site=_body_site(ds),
            calling_ae=calling_ae,
            manufacturer=_clip(_text(ds, "Manufacturer"), 64),
            manufacturer_model_name=_clip(_text(ds, "ManufacturerModelName"), 64),
            station_name=_clip(_text(ds, "StationName"), 16),
            patient_sex=_clip(_text(ds, "PatientSex"), 16),
            patient_age_years=age_years(_text(ds, "PatientAge"), _text(ds, "PatientBirthDate"),
                                        _text(ds, "StudyDate")),
        )
    except Refusal:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        # a value pydicom cannot convert (wrong VR, bad character set) in one of these elements
        raise Refusal(st.UNREADABLE_DATASET, f"header element unreadable: {type(exc).__name__}") from exc


def check_sop(image: ImageRef, event: Event) -> None:
    """The data set must be the instance and class that the request and its context announce."""
    request = cast(C_STORE, event.request)
    context_class = str(event.context.abstract_syntax)
    if image.sop_class_uid != context_class or str(request.AffectedSOPClassUID) != context_class:
        raise Refusal(st.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                      "SOP Class UID differs from the presentation context")
    if image.sop_instance_uid != str(request.AffectedSOPInstanceUID):
        raise Refusal(st.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                      "SOP Instance UID differs from the request")


# ---- audit and response --------------------------------------------------------------------------

def _audit_store(audit: AuditSink, outcome: StoreOutcome, event: Event, calling_ae: str, host: str,
                 clock: Clock) -> StoreOutcome:
    """Record the C-STORE durably before answering; no audit record, no Success."""
    image = outcome.image
    sop_uid = image.sop_instance_uid if image else _request_uid(event)
    detail: dict[str, Any] = {
        "status": f"0x{outcome.status:04X}", "status_name": st.status_name(outcome.status),
        "result": outcome.label, "sop_class_uid": str(event.context.abstract_syntax),
        "transfer_syntax_uid": str(event.context.transfer_syntax), **outcome.details,
    }
    if outcome.reason:
        detail["reason"] = outcome.reason
    if outcome.result is not None:
        detail.update(sha256=outcome.result.sha256, job_id=outcome.result.job_id,
                      correlation_id=outcome.result.correlation_id)
    record = AuditEvent(
        event=EventType.STORE_RECEIVED,
        outcome=Outcome.SUCCESS if outcome.status == st.SUCCESS else Outcome.MINOR_FAILURE,
        actor=calling_ae, action="C", actor_role=ROLE_MODALITY, source=host,
        destination=event.assoc.acceptor.ae_title,
        patient_id=image.patient_id if image else None,
        study_uid=image.study_instance_uid if image else None,
        sop_instance_uids=(sop_uid,) if sop_uid else (),
        detail=detail, time=clock())
    try:
        audit.record(record)
    except Exception:
        log.exception("cstore_audit_failed", sop_ref=uid_ref(sop_uid))
        if outcome.status == st.SUCCESS:
            # The object is durable; the SCU's retry will be answered as a duplicate and audited then.
            return StoreOutcome(st.OUT_OF_RESOURCES, "audit trail unavailable", image, outcome.result)
    return outcome


def _request_uid(event: Event) -> str | None:
    uid = getattr(event.request, "AffectedSOPInstanceUID", None)
    return str(uid) if uid else None


def _response(outcome: StoreOutcome) -> Dataset:
    rsp = Dataset()
    rsp.Status = outcome.status
    if outcome.status != st.SUCCESS and outcome.reason:
        rsp.ErrorComment = outcome.reason[: st.ERROR_COMMENT_MAX]
    return rsp
