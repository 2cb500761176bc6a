"""Plain records passed between the core and the protocol edges.

The core never hands a pydicom Dataset or an HTTP response across a package
boundary; it hands these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class ImageRef:
    """What the service keeps about one received image (from its DICOM header)."""
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str                      # PHI: database and encrypted audit only
    issuer_of_patient_id: str | None
    accession_number: str | None
    study_date: str | None               # DICOM DA, YYYYMMDD
    study_time: str | None               # DICOM TM
    modality: str | None
    body_site: str | None                # free text from Anatomic Region Sequence / Body Part Examined
    calling_ae: str
    # Device and population (issue 11: performance by subgroup); absent in older payloads.
    manufacturer: str | None = None            # (0008,0070)
    manufacturer_model_name: str | None = None  # (0008,1090)
    station_name: str | None = None            # (0008,1010)
    patient_sex: str | None = None             # (0010,0040) M | F | O
    patient_age_years: int | None = None       # (0010,1010), else Patient's Birth Date to Study Date

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageRef:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    @classmethod
    def from_object(cls, obj: object) -> ImageRef:
        """From anything carrying the same attribute names (the ``instances`` row)."""
        return cls(**{name: getattr(obj, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Outputs:
    """DICOM outputs written for one image (paths relative to the store root)."""
    sc_path: str
    sc_sop_instance_uid: str
    sr_path: str
    sr_sop_instance_uid: str
    cam_png_path: str


@dataclass(frozen=True)
class DeliveryOutcome:
    """Result of one delivery attempt, as a channel reports it to the outbox."""
    ok: bool
    retryable: bool = True               # False -> dead letter at once
    retry_after_s: float | None = None   # honoured from 429/503 Retry-After
    reason: str | None = None
    remote_ref: str | None = None        # e.g. DiagnosticReport/123, or the remote SOP UID
    log_reason: str | None = None        # for the application log when ``reason`` quotes the peer's free text


class Channel(Protocol):
    """A delivery channel (DICOM forward, FHIR). ``deliver`` must be idempotent:
    the outbox delivers at least once, the channel makes it exactly once.

    A channel that talks to a peer also offers ``max_delivery_s``: the longest one
    ``deliver`` can take by its timeouts, from which the outbox derives its lease."""
    name: str

    def deliver(self, payload: dict[str, Any]) -> DeliveryOutcome: ...
