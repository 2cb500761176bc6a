"""Plain records passed between the core and the protocol edges.

The core never hands a pydicom Dataset or an HTTP response across a package
boundary; it hands these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol


@dataclass(frozen=True)
class OrderRef:
    """One order (imaging service request) the image was acquired for, from the DICOM header:
    the study's Accession Number and Requested Procedure ID, or an item of the Referenced
    Request Sequence (0040,A370) with its placer / filler order numbers."""
    accession_number: str | None = None
    requested_procedure_id: str | None = None
    placer_order_number: str | None = None     # (0040,2016) Placer Order Number / Imaging Service Request
    filler_order_number: str | None = None     # (0040,2017) Filler Order Number / Imaging Service Request
    study_instance_uid: str | None = None


@dataclass(frozen=True)
class StudyContext:
    """Clinical context read from the image's header by the worker (not a database column):
    what a report needs beyond the identifiers: patient demographics for the printout, the
    timezone of the study's local times, the coded body site, the encounter, the orders."""
    patient_name: str | None = None            # DICOM PN, "Family^Given"
    patient_birth_date: str | None = None      # DICOM DA
    patient_sex: str | None = None
    timezone_offset: str | None = None         # (0008,0201) Timezone Offset From UTC, "+HHMM" / "-HHMM"
    body_site_code: str | None = None          # Anatomic Region Sequence Code Value (SNOMED CT when scheme SCT)
    body_site_scheme: str | None = None        # its Coding Scheme Designator ("SCT")
    body_site_meaning: str | None = None
    laterality: str | None = None             # "L", "R", "B" (from the modifier, Image Laterality or Laterality)
    admission_id: str | None = None            # (0038,0010): the encounter, when the modality knows it
    requested_procedure_id: str | None = None
    orders: tuple[OrderRef, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StudyContext:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["orders"] = tuple(OrderRef(**o) for o in data.get("orders") or ())
        return cls(**values)


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
    context: StudyContext | None = field(default=None, compare=False)   # worker-side only, never a column

    def to_json(self) -> dict[str, Any]:
        """JSON for payloads; without ``context`` when there is none, so the keys are the columns."""
        data = asdict(self)
        if self.context is None:
            data.pop("context")
        else:
            data["context"] = self.context.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageRef:
        ctx = data.get("context")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "context": StudyContext.from_json(ctx) if ctx else None})

    @classmethod
    def from_object(cls, obj: object) -> ImageRef:
        """From anything carrying the same attribute names (the ``instances`` row)."""
        return cls(**{name: getattr(obj, name) for name in cls.__dataclass_fields__ if name != "context"})


@dataclass(frozen=True)
class Outputs:
    """DICOM outputs written for one image (paths relative to the store root)."""
    sc_path: str
    sc_sop_instance_uid: str
    sr_path: str
    sr_sop_instance_uid: str
    cam_png_path: str
    source_frames: int = 1               # frames in the source; only the first is classified

    @property
    def note(self) -> str | None:
        """What every output says about the classified frames (None for a single-frame source)."""
        return self.note_for(self.source_frames)

    @staticmethod
    def note_for(frames: int) -> str | None:
        if frames <= 1:
            return None
        return f"Only frame 1 of {frames} was classified; the other frames were not assessed."


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


def device_label(manufacturer: str | None, model: str | None, station: str | None) -> str:
    """One device, as the DICOM header names it: Manufacturer / Model Name / Station Name."""
    return " / ".join(x or "?" for x in (manufacturer, model, station))
