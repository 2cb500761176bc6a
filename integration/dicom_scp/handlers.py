"""DIMSE handlers: C-ECHO and C-STORE, each failure turned into an answered status.

A handler is ``(event, *deps) -> status``; its dependencies arrive through the
handler tuple bound in :mod:`integration.dicom_scp.scp`. C-STORE is an
intervention event: an exception that escaped would make pynetdicom answer
0xC211 or abort, so :func:`handle_store` catches everything and answers with a
named status from :mod:`integration.dicom_scp.status` and an Error Comment.

The received object arrives as a file (:mod:`integration.dicom_scp.incoming`: written
as its fragments come in, refused early when too large) and is parsed once, from the
same Part 10 stream that :class:`~dermgate.intake.Intake` stores and the pipeline worker
reads back, so what is checked here is exactly what is later classified. Every element is
converted here, so an element pydicom cannot read (a corrupt value representation or
length) is refused with 0xC005 now rather than failing the worker later; values too large
to be worth holding (the pixel data) stay in the file until the decode check reads them.

Exceptions (internal; each maps to one status)::

    Refusal(status, reason)      the object is refused with ``status``
     +-- raised for every check below; decode errors from
         integration.dicom_scp.decode are translated into it
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, cast

import structlog
from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from audit.api import AuditEvent, AuditSink, EventType, Outcome
from dermgate import metrics
from dermgate.intake import Intake
from dermgate.records import ImageRef
from dermgate.settings import DicomSettings
from dermgate.store import ObjectStore
from integration.dicom_scp import status as st
from integration.dicom_scp.admission import Refusal, StoreOutcome, admit, received
from integration.dicom_scp.admission import age_years as age_years      # re-exported (tests, callers)
from integration.dicom_scp.admission import image_ref as image_ref
from integration.dicom_scp.admission import parse as parse

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]
ROLE_MODALITY = "modality"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def uid_ref(uid: str | None) -> str | None:
    """A short, non-reversible reference to a UID for application logs (no PHI in logs)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:12] if uid else None


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
      Patient ID not a valid single LO value (longer than 64 characters, control characters).
    * ``0xC002`` Cannot understand: no Pixel Data.
    * ``0xC003`` Cannot understand: image outside bounds (rows/columns <= 0,
      more than ``cfg.max_pixels`` pixels, samples not 1 or 3, bits not 8 (or
      16 for MONOCHROME), unknown photometric interpretation), or the object is
      larger than ``cfg.max_object_bytes``. Both are decided while the object
      arrives: the rest of it is read and dropped, never held.
    * ``0xC004`` Cannot understand: the pixel data does not decode (corrupt or
      truncated JPEG / J2K / RLE frame, native buffer too short, size differs
      from Rows/Columns), or its first frame is not the codestream its transfer
      syntax names (a JPEG Baseline stream labelled JPEG 2000).
    * ``0xC005`` Cannot understand: the data set itself is truncated or unparseable,
      or one of its elements cannot be read (a corrupt value representation or length).
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
    """The received object through the admission checks shared with STOW-RS
    (integration/dicom_scp/admission.py), plus the C-STORE request's own: the data set is the
    instance and class the request announces."""
    details: dict[str, Any] = {}
    try:
        encoded = received(event, details)
    except Refusal as refusal:
        return StoreOutcome(refusal.status, refusal.reason, None, None, details)
    outcome = admit(encoded, calling_ae, intake, cfg, store, check=lambda image: check_sop(image, event))
    outcome.details = {**details, **outcome.details}
    return outcome


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
