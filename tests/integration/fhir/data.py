"""Test data for the FHIR tests: an ImageRef as the SCP would record it, and a Grad-CAM PNG."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np

from dermgate.records import ImageRef
from tests.peers.results import gaussian_cam, synthetic_prediction  # noqa: F401  (re-exported)

PATIENT_SYSTEM = "urn:oid:1.2.826.0.1.3680043.10.1099.1"   # the test hospital's MRN namespace
ISSUER = "TESTHOSP"                                         # its Issuer of Patient ID
STUDY_UID = "1.2.826.0.1.3680043.10.1099.2.1"
DMS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.7"   # Dermoscopic Photography Image Storage


def image_ref(n: int = 1, **changes: object) -> ImageRef:
    """The n-th test image of one study (patient MRN-0001 at the test hospital)."""
    ref = ImageRef(sop_instance_uid=f"1.2.826.0.1.3680043.10.1099.3.{n}", sop_class_uid=DMS_SOP_CLASS,
                   study_instance_uid=STUDY_UID, series_instance_uid=f"{STUDY_UID}.1", patient_id="MRN-0001",
                   issuer_of_patient_id=ISSUER, accession_number="ACC0001", study_date="20260312",
                   study_time="101530.25", modality="DMS", body_site="Upper back", calling_ae="DERMSCOPE")
    return replace(ref, **changes)  # type: ignore[arg-type]


def patient_resource(mrn: str = "MRN-0001") -> dict[str, object]:
    """The test patient as the EHR registers it (the tests create it on the server)."""
    return {"resourceType": "Patient", "identifier": [{"system": PATIENT_SYSTEM, "value": mrn}],
            "name": [{"family": "Test", "given": ["Pat"]}], "gender": "unknown"}


def cam_png(size: int = 64) -> bytes:
    """A small heatmap PNG like the one the renderer writes."""
    cam = (255 * gaussian_cam(size, size)).astype(np.uint8)
    ok, buf = cv2.imencode(".png", cv2.applyColorMap(cam, cv2.COLORMAP_JET))
    assert ok
    return buf.tobytes()
