"""Delivery wiring: which channels exist and what each one is sent for a finished result.

A *planner* turns a result into an outbox payload (stored in the transaction
that records the result); a *channel* delivers a payload. Both are built here
from the settings, so the pipeline knows neither DICOM networking nor HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from audit.api import AuditSink
from dermgate.records import Channel, ImageRef, Outputs
from dermgate.store import ObjectStore
from inference.result import Prediction

if TYPE_CHECKING:
    from dermgate.settings import Settings


@dataclass
class DicomForwardPlanner:
    """Forward the SC and the SR to one PACS destination."""
    channel: str

    def plan(self, image: ImageRef, prediction: Prediction, outputs: Outputs,
             store: ObjectStore) -> dict[str, Any] | None:
        return {"files": [outputs.sc_path, outputs.sr_path], "study_instance_uid": image.study_instance_uid}


def build_channels(s: Settings, audit: AuditSink) -> dict[str, Channel]:
    from integration.dicom_scp.forward import DicomForwardChannel, client_tls_context
    channels: dict[str, Channel] = {}
    for d in s.dicom.destinations:
        tls = None
        if d.tls:
            t = s.dicom.tls
            if t.ca_file is None:
                raise ValueError(f"destination {d.name} uses TLS: set dicom.tls.ca_file to verify the PACS")
            tls = client_tls_context(t.ca_file, t.cert_file, t.key_file)
        ch = DicomForwardChannel(d.name, d.ae_title, d.host, d.port, calling_ae_title=s.dicom.ae_title,
                                 tls=tls, base_dir=s.store_dir, audit=audit)
        channels[ch.name] = ch
    channels.update(_fhir_channels(s, audit))
    return channels


def build_planners(s: Settings) -> list[Any]:
    planners: list[Any] = [DicomForwardPlanner(f"dicom:{d.name}") for d in s.dicom.destinations]
    planners.extend(_fhir_planners(s))
    return planners


FHIR_FILE_CHANNEL = "fhir-file"


@dataclass
class FhirPlanner:
    """The FHIR report (and later review updates) for one image, prepared in the worker."""
    channel: str
    settings: Any   # FhirSettings

    def plan(self, image: ImageRef, prediction: Prediction, outputs: Outputs,
             store: ObjectStore) -> dict[str, Any] | None:
        from integration.fhir.channel import prepare_report_payload
        from dermgate.db import utcnow
        return prepare_report_payload(image, prediction, store.read(outputs.cam_png_path), self.settings,
                                      issued=utcnow())

    def plan_review(self, image: ImageRef, review: Any) -> dict[str, Any]:
        from integration.fhir.channel import prepare_review_payload
        from integration.fhir.resources import Review, ReviewDecision
        r = Review(review_id=str(review.id), decision=ReviewDecision(review.decision), reviewer=review.reviewer,
                   reviewed_at=review.created_at, diagnosis=review.diagnosis, comment=review.comment)
        return prepare_review_payload(image, r, self.settings)


class BundleDirectoryChannel:
    """Writes each FHIR payload's bundle as JSON under a folder: the demo's stand-in for an EHR
    when no FHIR server is given. Idempotent: one file per business key, rewritten atomically."""
    name = FHIR_FILE_CHANNEL

    def __init__(self, folder: Any) -> None:
        self.folder = folder

    def deliver(self, payload: dict[str, Any]) -> Any:
        import json

        from dermgate.durable import write_atomic
        from dermgate.records import DeliveryOutcome
        key = payload["business_key"].replace(":", "_")
        doc = payload.get("bundle") or payload
        write_atomic(self.folder / f"{key}.json", json.dumps(doc, indent=1).encode())
        return DeliveryOutcome(ok=True, remote_ref=f"file:{key}.json")


def _fhir_settings(s: Settings) -> Any:
    from integration.fhir.settings import FhirSettings
    return s.fhir or FhirSettings()


def _fhir_channels(s: Settings, audit: AuditSink) -> dict[str, Channel]:
    out: dict[str, Channel] = {}
    fhir = s.fhir
    if fhir is not None and fhir.base_url:
        from integration.fhir.channel import FhirChannel
        out["fhir"] = FhirChannel.from_settings(fhir, audit)
    if s.fhir_bundle_dir is not None:
        out[FHIR_FILE_CHANNEL] = BundleDirectoryChannel(s.fhir_bundle_dir)
    return out


def _fhir_planners(s: Settings) -> list[Any]:
    fhir = s.fhir
    planners: list[Any] = []
    if fhir is not None and fhir.base_url:
        planners.append(FhirPlanner("fhir", fhir))
    if s.fhir_bundle_dir is not None:
        planners.append(FhirPlanner(FHIR_FILE_CHANNEL, _fhir_settings(s)))
    return planners


def public_jwks(s: Settings) -> dict[str, Any] | None:
    """The JWK Set of our SMART client key (public parts only), served for the EHR; None where this
    process has no key (SCP pods do not get the FHIR key: only the dispatcher's pods do)."""
    fhir = s.fhir
    if fhir is None or fhir.private_key_file is None:
        return {"keys": []}
    if not fhir.private_key_file.exists():
        return None
    from integration.fhir.auth import jwks, load_private_key
    return jwks([load_private_key(fhir.private_key_file, fhir.alg)])


def fhir_token_ready(s: Settings, channels: dict[str, Channel]) -> bool:
    """Readiness of a dispatcher: does it hold an access token for the EHR? The cached token
    counts (no request); only when there is none is one fetched, and then cached for deliveries."""
    from integration.fhir.auth import SmartBackendAuth
    ch = channels.get("fhir")
    auth = getattr(getattr(getattr(ch, "client", None), "http", None), "auth", None)
    if s.fhir is None or not isinstance(auth, SmartBackendAuth):
        return True
    if auth.has_token():
        return True
    from integration.fhir.client import build_http_client
    with build_http_client(s.fhir) as http:
        auth.fetch_token(http)
    return True
