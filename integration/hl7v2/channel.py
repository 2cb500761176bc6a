"""HL7 v2 results over MLLP: the planner builds the message in the worker, the channel sends it.

The message is built once, when the result is recorded (the outbox payload holds the
ER7 text), so every retry sends the same bytes with the same MSH-10; the interface
engine recognises a repeat by MSH-10 and files it once.

Outcome mapping (original acknowledgment mode, MSA-1)::

    AA / CA                    sent
    AE / CE                    retry with back-off (the engine had a problem)
    AR / CR                    dead letter (the engine refuses the message)
    MSA-2 is another message   retry (a stale ACK on this connection)
    refused, reset, timed out, closed before the ACK      retry

Every attempt is audited (hl7.delivery, DCM 110106 Export) with the ACK's MSA and ERR.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

import structlog

from audit.api import AuditEvent, AuditSink, EventType, Outcome
from dermgate.records import DeliveryOutcome, ImageRef, Outputs
from dermgate.store import ObjectStore
from inference.result import Prediction
from integration.hl7v2.message import Ack, build_message, parse_ack
from integration.hl7v2.settings import Hl7Settings

log = structlog.get_logger(__name__)

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
MAX_ACK_BYTES = 1 << 20
ACTOR = "dermgate"


def frame(er7: str) -> bytes:
    """MLLP framing (HL7 v2 Appendix C): <VT> message <FS><CR>."""
    return VT + er7.encode("utf-8") + FS + CR


@dataclass
class Hl7Planner:
    """The result message for one image, built in the worker (with the PDF the FHIR report also carries)."""
    channel: str
    settings: Hl7Settings
    fhir: Any = None                      # FhirSettings: the site zone for times without a DICOM offset
    thresholds: Any = None                # () -> Thresholds | None

    def plan(self, image: ImageRef, prediction: Prediction, outputs: Outputs,
             store: ObjectStore) -> dict[str, Any] | None:
        from dermgate.db import utcnow
        from integration.fhir.pdf import render_report_pdf
        from integration.fhir.resources import study_datetime
        issued = utcnow()
        thresholds = self.thresholds() if self.thresholds else None
        pdf = render_report_pdf(image, prediction, store.read(outputs.cam_png_path), issued=issued,
                                thresholds=thresholds) if self.settings.include_pdf else None
        zone = self.fhir.local_timezone if self.fhir is not None else "UTC"
        key = f"{image.sop_instance_uid}:report"
        built = build_message(image, prediction, pdf, self.settings, issued=issued, business_key=key,
                              study_time=study_datetime(image, zone), thresholds=thresholds)
        return {"kind": "report", "business_key": key, "message_type": built.message_type,
                "control_id": built.control_id, "message": built.er7,
                "image": {k: v for k, v in image.to_json().items() if k != "context"}}


class MllpChannel:
    """Channel ``hl7v2``: one connection per message (engines often close idle ones)."""

    name = "hl7v2"

    def __init__(self, settings: Hl7Settings, audit: AuditSink) -> None:
        if not settings.host:
            raise ValueError("hl7.host is not set")
        self.settings = settings
        self.audit = audit

    @property
    def destination(self) -> str:
        return f"mllp://{self.settings.host}:{self.settings.port}"

    def deliver(self, payload: dict[str, Any]) -> DeliveryOutcome:
        started = time.monotonic()
        detail: dict[str, Any] = {"message_type": payload.get("message_type"), "control_id": payload.get("control_id")}
        try:
            ack = self._exchange(payload["message"])
        except (OSError, ValueError) as exc:
            outcome = DeliveryOutcome(ok=False, retryable=True, reason=f"{type(exc).__name__}: {exc}"[:500])
        else:
            detail["msa"] = {"code": ack.code, "control_id": ack.control_id, "text": ack.text}
            if ack.errors:
                detail["err"] = list(ack.errors)[:5]
            outcome = _outcome(ack, payload.get("control_id"))
        self._audit(payload, outcome, detail, started)
        log.info("hl7_delivery", ok=outcome.ok, retryable=outcome.retryable, ack=detail.get("msa", {}).get("code"),
                 ms=round(1000 * (time.monotonic() - started), 1))
        return outcome

    def _exchange(self, er7: str) -> Ack:
        s = self.settings
        with socket.create_connection((s.host, s.port), timeout=s.connect_timeout_s) as sock:
            sock.settimeout(s.ack_timeout_s)
            sock.sendall(frame(er7))
            buf = b""
            while FS + CR not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("connection closed before the ACK")
                buf += chunk
                if len(buf) > MAX_ACK_BYTES:
                    raise ValueError("ACK too long")
        start = buf.find(VT)
        body = buf[start + 1 if start >= 0 else 0: buf.find(FS + CR)]
        return parse_ack(body.decode("utf-8", errors="replace"))

    def _audit(self, payload: dict[str, Any], outcome: DeliveryOutcome, detail: dict[str, Any],
               started: float) -> None:
        image = payload.get("image") or {}
        result = Outcome.SUCCESS if outcome.ok else (
            Outcome.MINOR_FAILURE if outcome.retryable else Outcome.SERIOUS_FAILURE)
        event_detail = {**detail, "ok": outcome.ok, "retryable": outcome.retryable, "reason": outcome.reason,
                        "business_key": payload.get("business_key"),
                        "ms": round(1000 * (time.monotonic() - started), 1)}
        self.audit.record(AuditEvent(
            event=EventType.HL7_DELIVERY, outcome=result, actor=ACTOR, action="C", destination=self.destination,
            patient_id=image.get("patient_id"), study_uid=image.get("study_instance_uid"),
            sop_instance_uids=(image["sop_instance_uid"],) if image.get("sop_instance_uid") else (),
            detail={k: v for k, v in event_detail.items() if v is not None}))


def _outcome(ack: Ack, control: str | None) -> DeliveryOutcome:
    text = f"MSA {ack.code} {ack.text}".strip() + (f"; {ack.errors[0]}" if ack.errors else "")
    if control and ack.control_id != control:
        return DeliveryOutcome(ok=False, retryable=True, reason=f"ACK for another message ({ack.control_id})")
    if ack.code in ("AA", "CA"):
        return DeliveryOutcome(ok=True, remote_ref=f"MSH-10 {ack.control_id}")
    if ack.code in ("AR", "CR"):
        return DeliveryOutcome(ok=False, retryable=False, reason=f"rejected: {text}"[:500])
    return DeliveryOutcome(ok=False, retryable=True, reason=f"application error: {text}"[:500])
