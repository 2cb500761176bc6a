"""Delivery wiring: which channels exist and what each one is sent for a finished result.

A *planner* turns a result into an outbox payload (stored in the transaction
that records the result); a *channel* delivers a payload. Both are built here
from the settings, so the pipeline knows neither DICOM networking nor HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dermgate.records import Channel, ImageRef, Outputs
from dermgate.store import ObjectStore
from inference.result import Prediction

if TYPE_CHECKING:
    from dermgate.app import Runtime


@dataclass
class DicomForwardPlanner:
    """Forward the SC and the SR to one PACS destination."""
    channel: str

    def plan(self, image: ImageRef, prediction: Prediction, outputs: Outputs,
             store: ObjectStore) -> dict[str, Any] | None:
        return {"files": [outputs.sc_path, outputs.sr_path], "study_instance_uid": image.study_instance_uid}


def build_channels(rt: Runtime) -> dict[str, Channel]:
    from integration.dicom_scp.forward import DicomForwardChannel, client_tls_context
    s = rt.settings
    channels: dict[str, Channel] = {}
    for d in s.dicom.destinations:
        tls = None
        if d.tls:
            t = s.dicom.tls
            if t.ca_file is None:
                raise ValueError(f"destination {d.name} uses TLS: set dicom.tls.ca_file to verify the PACS")
            tls = client_tls_context(t.ca_file, t.cert_file, t.key_file)
        ch = DicomForwardChannel(d.name, d.ae_title, d.host, d.port, calling_ae_title=s.dicom.ae_title,
                                 tls=tls, base_dir=s.store_dir, audit=rt.audit)
        channels[ch.name] = ch
    channels.update(_fhir_channels(rt))
    return channels


def build_planners(rt: Runtime) -> list[Any]:
    planners: list[Any] = [DicomForwardPlanner(f"dicom:{d.name}") for d in rt.settings.dicom.destinations]
    planners.extend(_fhir_planners(rt))
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
                   reviewed_at=review.created_at, diagnosis=review.diagnosis, comment=review.comment,
                   reviewer_reference=getattr(review, "reviewer_reference", None))
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


def _fhir_settings(rt: Runtime) -> Any:
    from integration.fhir.settings import FhirSettings
    return rt.settings.fhir or FhirSettings()


def _fhir_channels(rt: Runtime) -> dict[str, Channel]:
    out: dict[str, Channel] = {}
    fhir = rt.settings.fhir
    if fhir is not None and fhir.base_url:
        from integration.fhir.channel import FhirChannel
        out["fhir"] = FhirChannel.from_settings(fhir, rt.audit)
    if rt.settings.fhir_bundle_dir is not None:
        out[FHIR_FILE_CHANNEL] = BundleDirectoryChannel(rt.settings.fhir_bundle_dir)
    return out


def _fhir_planners(rt: Runtime) -> list[Any]:
    fhir = rt.settings.fhir
    planners: list[Any] = []
    if fhir is not None and fhir.base_url:
        planners.append(FhirPlanner("fhir", fhir))
    if rt.settings.fhir_bundle_dir is not None:
        planners.append(FhirPlanner(FHIR_FILE_CHANNEL, _fhir_settings(rt)))
    return planners


def public_jwks(rt: Runtime) -> dict[str, Any]:
    """The JWK Set of our SMART client key (public parts only), served for the EHR."""
    fhir = rt.settings.fhir
    if fhir is None or fhir.private_key_file is None:
        return {"keys": []}
    from integration.fhir.auth import jwks, load_private_key
    return jwks([load_private_key(fhir.private_key_file, fhir.alg)])


def fhir_token_obtainable(rt: Runtime) -> bool:
    """Readiness: can we get an access token from the EHR's token endpoint right now?"""
    from integration.fhir.auth import SmartBackendAuth
    fhir = rt.settings.fhir
    ch = rt.channels.get("fhir")
    auth = getattr(getattr(getattr(ch, "client", None), "http", None), "auth", None)
    if fhir is None or not isinstance(auth, SmartBackendAuth):
        return True
    from integration.fhir.client import build_http_client
    with build_http_client(fhir) as http:
        auth.fetch_token(http)
    return True
