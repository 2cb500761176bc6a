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


def _fhir_channels(rt: Runtime) -> dict[str, Channel]:
    return {}


def _fhir_planners(rt: Runtime) -> list[Any]:
    return []


def public_jwks(rt: Runtime) -> dict[str, Any]:
    return {"keys": []}
