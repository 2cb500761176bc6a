"""Admission of one received DICOM object, whatever carried it (C-STORE or STOW-RS).

The same checks, in order of cost, for every transport: parse the Part 10 stream
(refusing truncations), read the identifiers the service needs, let the transport
check what only it knows (the C-STORE request's SOP Class/Instance, the STOW-RS
URL's study), check the image geometry, the store's free-space reserve, that the
pixels decode, and only then make the object durable and queue its job
(:class:`~dermgate.intake.Intake`). The result is a DICOM status with its reason:
C-STORE answers it, STOW-RS reports it per instance (PS3.18 Failure Reason).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import IO, Any

import structlog
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom.events import Event
from sqlalchemy.exc import OperationalError

from dermgate.intake import Intake, IntakeResult, IntakeStatus
from dermgate.records import ImageRef
from dermgate.settings import DicomSettings
from dermgate.store import ObjectStore, StoreError
from integration.dicom_scp import header
from integration.dicom_scp import status as st
from integration.dicom_scp.decode import (CorruptPixelData, DecodeError, NoPixelData, UnsupportedImage,
                                          check_image, geometry, verify_decodable)
from integration.dicom_scp.incoming import IncomingFile

log = structlog.get_logger(__name__)

UID_MAX_LEN = header.UID_MAX_LEN
_UNDEFINED_LENGTH = 0xFFFFFFFF
DEFER_BYTES = 1 << 20            # values larger than this stay in the file until read (the pixel data)


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



def _decode_status(exc: DecodeError) -> int:
    if isinstance(exc, NoPixelData):
        return st.NO_PIXEL_DATA
    if isinstance(exc, UnsupportedImage):
        return st.UNSUPPORTED_IMAGE
    if isinstance(exc, CorruptPixelData):
        return st.UNDECODABLE_PIXEL_DATA
    return st.CANNOT_UNDERSTAND


def received(event: Event, details: dict[str, Any]) -> bytes | Path:
    """The received object: the file it arrived in, or (receiving into memory) its bytes.

    A refusal decided while the object arrived (too large, see ``incoming.py``) is raised here.
    """
    request = event.request
    spool = getattr(request, "_dataset_file", None)
    if isinstance(spool, IncomingFile):
        details["bytes"] = spool.size
        if spool.refusal is not None:
            raise Refusal(*spool.refusal)
        spool.flush()
        return Path(spool.name)
    path = getattr(request, "_dataset_path", None)
    if isinstance(path, Path):               # pynetdicom's own temporary file
        return path
    return event.encoded_dataset(include_meta=True)


def _accept(intake: Intake, encoded: bytes | Path, image: ImageRef, transfer_syntax: str) -> IntakeResult:
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

def parse(encoded: bytes | Path) -> Dataset:
    """Parse a Part 10 stream (bytes, or the file it was received into), refusing truncated
    ones (pydicom reads those silently) and ones with an element that cannot be read."""
    if isinstance(encoded, Path):
        with open(encoded, "rb") as fp:
            return _parse(fp, os.fstat(fp.fileno()).st_size)
    return _parse(BytesIO(encoded), len(encoded))


def _parse(fp: IO[bytes], size: int) -> Dataset:
    try:
        ds = dcmread(fp, defer_size=DEFER_BYTES)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, RecursionError,
            NotImplementedError) as exc:
        # RecursionError: sequences nested beyond reason (a known parser bomb)
        raise Refusal(st.UNREADABLE_DATASET, f"data set cannot be parsed: {type(exc).__name__}") from exc
    # pydicom stops at an undefined-length element with no delimiter (rewinding to its
    # start), keeps short values, and seeks past the end for a deferred value: all truncations.
    if fp.tell() != size:
        raise Refusal(st.UNREADABLE_DATASET, "data set truncated (an element runs past the end)")
    last_end = 0
    for tag in ds.keys():
        raw = ds.get_item(tag)
        if not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED_LENGTH:
            continue
        if isinstance(raw.value, bytes) and len(raw.value) < raw.length:
            raise Refusal(st.UNREADABLE_DATASET, f"data set truncated in element {raw.tag}")
        last_end = max(last_end, raw.value_tell + raw.length)
    if last_end and last_end < size and not _ends_with_undefined_length(ds):
        raise Refusal(st.UNREADABLE_DATASET, "data set truncated (trailing partial element)")
    _convert_all(ds)
    return ds


def _deferred(raw: Any) -> bool:
    return isinstance(raw, RawDataElement) and raw.value is None and raw.length not in (0, _UNDEFINED_LENGTH)


def _convert_all(ds: Dataset) -> None:
    """Convert every element (in sequences too) but the deferred ones: pydicom converts lazily,
    so a corrupt value representation or length would otherwise surface at whatever first
    reads it, here or in the worker. NotImplementedError: a VR pydicom does not know."""
    for tag in list(ds.keys()):
        try:
            if _deferred(ds.get_item(tag)):
                continue
            elem = ds[tag]
            if elem.VR == "SQ":
                for item in elem.value:
                    _convert_all(item)
        except Refusal:
            raise
        except Exception as exc:         # noqa: BLE001 - whatever pydicom raises for a bad element
            raise Refusal(st.UNREADABLE_DATASET,
                          f"element {tag} unreadable: {type(exc).__name__}") from exc


def _ends_with_undefined_length(ds: Dataset) -> bool:
    tags = list(ds.keys())
    if not tags:
        return False
    raw = ds.get_item(tags[-1])
    return not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED_LENGTH


def _present(ds: Dataset, keyword: str) -> bool:
    value = ds.get(keyword)
    return value is not None and str(value).strip(" \x00") != ""


def _required(ds: Dataset, keyword: str, vr: str = "LO") -> str:
    value = header.text(ds.get(keyword), vr)
    if value is None:
        raise Refusal(st.MISSING_ATTRIBUTE, f"{keyword} {'invalid' if _present(ds, keyword) else 'missing'}")
    return value


def _uid(ds: Dataset, keyword: str) -> str:
    value = header.uid(ds.get(keyword))
    if value is None:
        raise Refusal(st.MISSING_ATTRIBUTE, f"{keyword} {'malformed' if _present(ds, keyword) else 'missing'}")
    return value


def _body_site(ds: Dataset) -> str | None:
    region = ds.get("AnatomicRegionSequence")
    if region:
        meaning = header.text(region[0].get("CodeMeaning"), "LO")
        if meaning:
            return meaning
    return header.text(ds.get("BodyPartExamined"), "CS")


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
    """The header fields the service keeps; refuses objects without the identifiers it needs.

    The identifiers must be valid (UIDs, and the Patient ID: a report for a patient id that
    is not one cannot be filed); the other fields are kept when valid and None otherwise
    (``header.py``: carry what is valid, a date in its DICOM form, never invent).
    """
    try:
        return ImageRef(
            sop_instance_uid=_uid(ds, "SOPInstanceUID"),
            sop_class_uid=_uid(ds, "SOPClassUID"),
            study_instance_uid=_uid(ds, "StudyInstanceUID"),
            series_instance_uid=_uid(ds, "SeriesInstanceUID"),
            patient_id=_required(ds, "PatientID"),
            issuer_of_patient_id=header.text(ds.get("IssuerOfPatientID"), "LO"),
            accession_number=header.text(ds.get("AccessionNumber"), "SH"),
            study_date=header.date_value(ds.get("StudyDate")),
            study_time=header.time_value(ds.get("StudyTime")),
            modality=header.text(ds.get("Modality"), "CS"),
            body_site=_body_site(ds),
            calling_ae=calling_ae,
            manufacturer=_clip(header.text(ds.get("Manufacturer"), "LO"), 64),
            manufacturer_model_name=_clip(header.text(ds.get("ManufacturerModelName"), "LO"), 64),
            station_name=_clip(header.text(ds.get("StationName"), "SH"), 16),
            patient_sex=_clip(header.text(ds.get("PatientSex"), "CS"), 16),
            patient_age_years=age_years(header.text(ds.get("PatientAge"), "AS"), header.date_value(ds.get("PatientBirthDate")),
                                        header.date_value(ds.get("StudyDate"))),
        )
    except Refusal:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        # a value pydicom cannot convert (wrong VR, bad character set) in one of these elements
        raise Refusal(st.UNREADABLE_DATASET, f"header element unreadable: {type(exc).__name__}") from exc


def admit(encoded: bytes | Path, calling_ae: str, intake: Intake, cfg: DicomSettings, store: ObjectStore, *,
          check: Callable[[ImageRef], None] | None = None) -> StoreOutcome:
    """One object (its bytes, or the file it was received into) through every admission check.
    ``check(image)`` raises ``Refusal`` for a transport-specific mismatch."""
    image: ImageRef | None = None
    details: dict[str, Any] = {}
    try:
        ds = parse(encoded)
        image = image_ref(ds, calling_ae)
        if check is not None:
            check(image)
        geo = geometry(ds)
        details.update(rows=geo.rows, columns=geo.columns, photometric=geo.photometric)
        check_image(geo, cfg.max_pixels)
        if store.free_bytes() < cfg.min_free_bytes:
            raise Refusal(st.OUT_OF_RESOURCES, "storage below its free-space reserve")
        verify_decodable(ds, geo)
        result = _accept(intake, encoded, image, geo.transfer_syntax)
    except Refusal as refusal:
        return StoreOutcome(refusal.status, refusal.reason, image, None, details)
    except DecodeError as exc:
        return StoreOutcome(_decode_status(exc), str(exc), image, None, details)
    if result.status is IntakeStatus.CONFLICT:
        return StoreOutcome(st.SOP_INSTANCE_CONFLICT, "SOP Instance UID already received with other content",
                            image, result, details)
    return StoreOutcome(st.SUCCESS, None, image, result, details)
