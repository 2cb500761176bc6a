"""The DICOM outputs of one classified image: a Grad-CAM Secondary Capture and an AI-result SR.

Both follow IHE AI Results (AIR): the SR (Comprehensive 3D SR, TID 1500) carries
the machine-readable result; the SC is its human-readable companion. Both name
the algorithm in the Contributing Equipment Sequence with a Device UID that
changes with the model. All UIDs derive from the source instance and the model's
Device UID (2.25 UUID-derived UIDs), so a re-run writes the same instances and a
PACS sees a re-send, not a duplicate.

They are written for any object the SCP accepts: the patient and study attributes come from
:func:`integration.dicom_scp.header.source_header`, which carries what is valid, fills the
Type 2 attributes empty and invents nothing. Of a multi-frame source only the first frame is
classified; the SC legend, the SC's derivation description and the SR say so.

Errors::

    OutputError                 base; nothing is written when it is raised
    ├── SourceDatasetError      the source lacks what the outputs must copy
    └── OutputVerificationError the written file did not read back as built
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import uuid
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom import Dataset, dcmread
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID
from pydicom.valuerep import DA, DS, TM

import dermgate
from dermgate.durable import Deferred, private_dir, sync_all, write_atomic, write_deferred
from dermgate.records import Outputs
from inference.result import CLASSES, DISCLAIMER, Prediction, Risk
from integration.dicom_scp import uids
from integration.dicom_scp.header import HeaderError, frame_count, source_header
from integration.dicom_scp.render import encode_png, render_heatmap

# General Equipment of the instances we create (the algorithm is Contributing Equipment).
EQUIPMENT_MANUFACTURER = "dermgate project"
EQUIPMENT_MODEL = "dermgate"
SC_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902
SC_MODALITY = "OT"                   # General Series: a derived picture, not an acquisition
SC_FILE = "sc.dcm"
SR_FILE = "sr.dcm"
PNG_FILE = "heatmap.png"

# PS3.3 C.7.1.1 Patient, C.7.2.1 General Study, C.7.2.2 Patient Study: copied from the
# source header (valid values as they are; Type 2 ones present, empty when not valid).
_PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthDate", "PatientSex", "OtherPatientIDsSequence",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
    "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyDescription",
    "PatientAge", "PatientSize", "PatientWeight",
)
# Type 2 among them: present, empty when the source has no value.
_TYPE2_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, "dermgate.integration.dicom_scp.outputs")
_UID_SEPARATOR = "\x1f"
_LOSSY_TRANSFER_SYNTAXES = (uids.JPEG_BASELINE, uids.JPEG_EXTENDED, uids.JPEG_2000)
_VERIFIED_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_RISK_CODES = {Risk.LOW: uids.LOW_RISK, Risk.MEDIUM: uids.MODERATE_RISK, Risk.HIGH: uids.HIGH_RISK,
               Risk.NOT_ASSESSABLE: uids.NOT_ASSESSABLE}


class Files(Protocol):
    """Where outputs are written and read back: plain files, or the (encrypting) object store."""

    def write_at(self, path: Path, data: bytes) -> Path: ...

    def read_at(self, path: Path) -> bytes: ...

    def stage_at(self, path: Path, data: bytes) -> Deferred:
        """``write_at`` without the fsyncs: in place at once, durable once the result is synced."""
        ...


class PlainFiles:
    """Files in the clear, written atomically and durably."""

    def write_at(self, path: Path, data: bytes) -> Path:
        return write_atomic(path, data)

    def stage_at(self, path: Path, data: bytes) -> Deferred:
        return write_deferred(path, data)

    def read_at(self, path: Path) -> bytes:
        return Path(path).read_bytes()


class OutputError(Exception):
    """An output could not be built or written."""


class SourceDatasetError(OutputError):
    """The source dataset lacks an attribute the outputs must reference or copy."""


class OutputVerificationError(OutputError):
    """A written output did not read back as it was built."""


@dataclass(frozen=True)
class WrittenOutputs:
    """The files written for one image; ``sc`` and ``sr`` parse them back when asked (tests, tools)."""
    sc_path: Path
    sr_path: Path
    png_path: Path
    png: bytes
    sc_sop_instance_uid: str
    sr_sop_instance_uid: str
    files: Files = dataclasses.field(default_factory=PlainFiles, repr=False, compare=False)
    source_frames: int = 1
    pending: tuple[Deferred, ...] = ()

    @cached_property
    def sc(self) -> Dataset:
        return dcmread(BytesIO(self.files.read_at(self.sc_path)))

    @cached_property
    def sr(self) -> Dataset:
        return dcmread(BytesIO(self.files.read_at(self.sr_path)))

    def to_record(self, store_root: Path) -> Outputs:
        """The core's record, with paths relative to the store root."""
        return Outputs(
            sc_path=str(self.sc_path.relative_to(store_root)),
            sc_sop_instance_uid=self.sc_sop_instance_uid,
            sr_path=str(self.sr_path.relative_to(store_root)),
            sr_sop_instance_uid=self.sr_sop_instance_uid,
            cam_png_path=str(self.png_path.relative_to(store_root)),
            source_frames=self.source_frames,
        )


def derived_uid(*parts: str) -> UID:
    """A UUID-derived UID (PS3.5 B.2) that is a pure function of ``parts``.

    Name-based UUID (RFC 9562 v5) in this product's namespace, so a re-run gives
    the same UID. (pydicom's ``generate_uid(prefix=None)`` is random whatever
    its entropy sources, hence not used here.)
    """
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, _UID_SEPARATOR.join(parts)).int}")


def write_outputs(
    source: Dataset,
    prediction: Prediction,
    out_dir: Path,
    *,
    image_rgb: npt.NDArray[np.uint8] | None = None,
    now: datetime | None = None,
    files: Files | None = None,
    sync: bool = True,
) -> WrittenOutputs:
    """Render, build, encode, write and verify the SC, the SR and the heatmap PNG for one image.

    ``out_dir`` is this image's own folder. ``image_rgb`` is the decoded source (RGB,
    its first frame); when omitted, the source's pixel data is decoded here. ``files``
    writes and reads them back (the object store, which encrypts when configured);
    plain files when omitted. Each object is encoded once; what reads back from disk is
    then compared byte for byte with it. With ``sync=False`` the files are in place but
    not yet fsynced: the caller syncs ``pending`` (several images at once) before it
    records them anywhere.
    """
    files = files or PlainFiles()
    header = _header(source)
    now = now or datetime.now(timezone.utc)
    rgb = image_rgb if image_rgb is not None else _decode_rgb(source)
    frames = frame_count(header)
    note = Outputs.note_for(frames)
    rendered = render_heatmap(rgb, prediction, notes=[note] if note else [])
    sc = build_secondary_capture(header, rendered, prediction, now=now)
    sr_bytes = encode_ai_sr(header, prediction, sc, now=now)
    sr_uid = derived_uid(header.SOPInstanceUID, prediction.model.device_uid, "sr")
    png = encode_png(rendered)
    private_dir(out_dir)
    pending: list[Deferred] = []
    try:
        pending.append(write_checked(encode(sc), out_dir / SC_FILE, files))
        pending.append(write_checked(sr_bytes, out_dir / SR_FILE, files))
        pending.append(files.stage_at(out_dir / PNG_FILE, png))
        if sync:
            sync_all(pending)
    except BaseException:
        for d in pending:
            d.close()
        raise
    return WrittenOutputs(sc_path=out_dir / SC_FILE, sr_path=out_dir / SR_FILE, png_path=out_dir / PNG_FILE,
                          png=png, sc_sop_instance_uid=str(sc.SOPInstanceUID), sr_sop_instance_uid=str(sr_uid),
                          files=files, source_frames=frames, pending=() if sync else tuple(pending))


def build_secondary_capture(
    source: Dataset,
    rendered_rgb: npt.NDArray[np.uint8],
    prediction: Prediction,
    series_uid: str | None = None,
    *,
    now: datetime | None = None,
) -> Dataset:
    """The Grad-CAM picture as a Secondary Capture Image (PS3.3 A.8.1) in the source's study."""
    source = _header(source)
    if rendered_rgb.ndim != 3 or rendered_rgb.shape[2] != 3 or rendered_rgb.dtype != np.uint8:
        raise OutputError(f"rendered image must be HxWx3 uint8, got {rendered_rgb.shape} {rendered_rgb.dtype}")
    now = now or datetime.now(timezone.utc)
    device_uid = prediction.model.device_uid
    ds = _new_instance(
        source, prediction, now,
        sop_class_uid=uids.SECONDARY_CAPTURE_IMAGE_STORAGE,
        sop_instance_uid=derived_uid(source.SOPInstanceUID, device_uid, "sc"),
        series_uid=series_uid or derived_uid(source.SeriesInstanceUID, device_uid, "sc-series"),
        series_number=SC_SERIES_NUMBER,
        modality=SC_MODALITY,
        series_description=f"AI heatmap ({prediction.model.name})",
    )
    # SC Equipment (C.8.6.1): captured by a workstation.
    ds.ConversionType = "WSD"
    # SC Image (C.8.6.2).
    ds.DateOfSecondaryCapture = now.strftime("%Y%m%d")
    ds.TimeOfSecondaryCapture = now.strftime("%H%M%S")
    # General Image (C.7.6.1).
    ds.InstanceNumber = source.get("InstanceNumber") or 1
    ds.PatientOrientation = source.get("PatientOrientation", "")
    ds.ContentDate = ds.DateOfSecondaryCapture
    ds.ContentTime = ds.TimeOfSecondaryCapture
    ds.ImageType = ["DERIVED", "SECONDARY"]
    frames = frame_count(source)
    ds.DerivationDescription = (
        f"Grad-CAM heatmap of {prediction.model.name} {prediction.model.version} over the source image"
        + (f" (frame 1 of {frames}: only that frame was classified)" if frames > 1 else "")
        + ", with the AI result burned in as a legend"
    )[:1024]
    ds.SourceImageSequence = [_source_image_item(source)]
    ds.BurnedInAnnotation = "YES"            # the legend is text in the pixels
    if "RecognizableVisualFeatures" in source:
        ds.RecognizableVisualFeatures = source.RecognizableVisualFeatures
    _copy_lossy_history(source, ds)
    # Image Pixel (C.7.6.3): RGB, 8 bits, colour-by-pixel.
    rows, cols = rendered_rgb.shape[:2]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    pixels = np.ascontiguousarray(rendered_rgb).tobytes()
    # OB/OW values have an even length (PS3.5 7.1.1): an odd width x odd height pads one byte,
    # as pydicom would on writing; padded here, the data set reads back as it was built.
    ds.PixelData = pixels + b"\x00" if len(pixels) % 2 else pixels
    return ds


def build_ai_sr(source: Dataset, prediction: Prediction, sc: Dataset, *, now: datetime | None = None) -> Dataset:
    """The AI result as a Comprehensive 3D SR with a TID 1500 Measurement Report (IHE AIR).

    Every sequence and item has undefined length (delimited), so each part of the
    tree encodes the same wherever it stands; :func:`encode_ai_sr` relies on that.
    """
    source = _header(source)
    now = now or datetime.now(timezone.utc)
    root = _sr_content(source, prediction)
    sr = _sr_document(source, prediction, sc, now, root)
    sr.ContentSequence = root.ContentSequence
    _undefined_lengths(sr)
    return sr


def encode_ai_sr(source: Dataset, prediction: Prediction, sc: Dataset, *, now: datetime | None = None) -> bytes:
    """``encode(build_ai_sr(...))``, byte for byte, at a fraction of the cost.

    The content tree (TID 1500: observer, 8 measurement groups, evaluations) is most of an
    SR's cost to build and to encode, and for one model it takes a handful of shapes (top
    class, risk, flags, source SOP class, frames, character set). Each shape is built once
    with highdicom from the first image that has it, encoded, and the bytes of its
    per-image values (tracking UIDs, source reference, probabilities, scores, the
    not-assessable reason) located; an image then costs its document module (highdicom,
    without the tree) plus those few values spliced in. tests/integration/dicom_scp/
    test_outputs.py compares the two paths on many predictions.
    """
    source = _header(source)
    now = now or datetime.now(timezone.utc)
    template = _ContentTemplate.for_image(source, prediction)
    hd.sr.SourceImageForMeasurementGroup.from_source_image(source)     # highdicom's checks of the source
    sr = _sr_document(source, prediction, sc, now, template.shell)
    sr.ContentSequence = []
    _undefined_lengths(sr)
    document = encode(sr)
    empty = _element_bytes(sr["ContentSequence"], [])
    head, found, tail = document.partition(empty)
    if not found or empty in tail:
        raise OutputError("SR document encoding has no single empty content sequence to fill")
    return head + template.render(source, prediction) + tail


def _sr_content(source: Dataset, prediction: Prediction) -> Dataset:
    """The root CONTAINER of the SR: observation context, measurement groups, qualitative evaluations."""
    model = prediction.model
    observer = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model.device_uid, name=model.name, manufacturer_name=model.manufacturer, model_name=model.name),
    ))
    report = hd.sr.MeasurementReport(
        observation_context=observer,
        procedure_reported=uids.DERMOSCOPIC_PHOTOGRAPHY_PROCEDURE,
        imaging_measurements=_measurement_groups(source, prediction),
        title=uids.IMAGING_MEASUREMENT_REPORT,
    )
    root = report[0]
    root.ContentSequence.append(_qualitative_evaluations(prediction, frame_count(source)))
    return root


def _sr_document(source: Dataset, prediction: Prediction, sc: Dataset, now: datetime, root: Dataset) -> Dataset:
    """The SR document around ``root``'s container attributes; its content items are not copied in."""
    model = prediction.model
    device_uid = model.device_uid
    # highdicom deep-copies and re-parses the content tree it is given and searches it for
    # references (most of the cost of an SR, ~10x the rest): it gets the root container
    # without its items, which the caller then puts in. The tree only references the source
    # image, which is evidence, so what highdicom checks there holds by construction.
    shell = Dataset()
    for element in root:
        if element.keyword != "ContentSequence":
            shell.add(element)
    shell.ContentSequence = []
    # The SC is evidence, not a source: it lists in the Current Requested Procedure
    # Evidence Sequence as an instance created for this procedure (PS3.3 C.17.2.3).
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source, sc],
        content=shell,
        series_instance_uid=derived_uid(source.SeriesInstanceUID, device_uid, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(source.SOPInstanceUID, device_uid, "sr"),
        instance_number=int(source.get("InstanceNumber") or 1),
        manufacturer=EQUIPMENT_MANUFACTURER,
        is_complete=True,                 # CompletionFlag COMPLETE
        is_final=False,                   # PreliminaryFlag PRELIMINARY: awaits clinician review
        is_verified=False,                # VerificationFlag UNVERIFIED
        series_description=f"AI result ({model.name})",
    )
    _fill_common(sr, source, prediction, now)
    sr.ContentDate = DA(now.strftime("%Y%m%d"))
    sr.ContentTime = TM(now.strftime("%H%M%S"))
    return sr


def _undefined_lengths(ds: Dataset) -> None:
    """Every sequence and item of ``ds`` written with undefined length (delimiters), recursively."""
    for element in ds:
        if element.VR == "SQ":
            element.is_undefined_length = True
            for item in element.value:
                item.is_undefined_length_sequence_item = True
                _undefined_lengths(item)


def _element_bytes(element: Any, encodings: list[str]) -> bytes:
    """One data element encoded on its own (Explicit VR Little Endian): with undefined-length
    sequences and items, exactly the bytes it has inside any data set."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, element, encodings or [default_encoding])
    return fp.getvalue()


_SENTINEL_SOURCE_UID = "1.2.826.0.1.3680043.10.1099.999999.424242.1"
_SENTINEL_REASON = "dermgate sentinel: not-assessable reason, replaced per image"


class _ContentTemplate:
    """The encoded content sequence of one SR shape, and where its per-image values sit in it."""

    _cache: dict[tuple[Any, ...], _ContentTemplate] = {}
    _lock = threading.Lock()
    MAX_SHAPES = 4096

    @classmethod
    def key(cls, source: Dataset, prediction: Prediction) -> tuple[Any, ...]:
        return (prediction.model, prediction.assessable, prediction.top_class if prediction.assessable else None,
                prediction.risk, prediction.low_confidence, prediction.reason is not None, tuple(prediction.probabilities),
                prediction.ood_score is not None, prediction.out_of_distribution, frame_count(source),
                str(source.SOPClassUID), str(source.get("SpecificCharacterSet", "")))

    @classmethod
    def for_image(cls, source: Dataset, prediction: Prediction) -> _ContentTemplate:
        key = cls.key(source, prediction)
        with cls._lock:
            found = cls._cache.get(key)
        if found is None:
            found = cls(source, prediction)
            with cls._lock:
                if len(cls._cache) >= cls.MAX_SHAPES:
                    cls._cache.clear()
                cls._cache[key] = found
        return found

    def __init__(self, source: Dataset, prediction: Prediction) -> None:
        self.encodings = convert_encodings(source.get("SpecificCharacterSet"))
        fake_source = Dataset()
        for element in source:                           # the header: what the content tree may look at
            if element.tag < 0x7FE00000 and element.keyword != "SOPInstanceUID":
                fake_source.add(element)
        fake_source.SOPInstanceUID = _SENTINEL_SOURCE_UID   # a new element: the source's is shared
        fake = _sentinel_prediction(prediction)
        root = _sr_content(fake_source, fake)
        self.shell = Dataset()
        for element in root:
            if element.keyword != "ContentSequence":
                self.shell.add(element)
        _undefined_lengths(root)
        content = root["ContentSequence"]
        template = _element_bytes(content, self.encodings)
        wanted = {(tag, str(value)): slot for slot, (tag, value) in _slot_values(fake_source, fake).items()}
        found: dict[bytes, tuple[str, int, str]] = {}     # element bytes -> (slot, tag, VR)
        for element in _walk(root):
            slot = wanted.get((int(element.tag), str(element.value)))
            if slot is not None:
                found[_element_bytes(element, self.encodings)] = (slot, int(element.tag), element.VR)
        cuts: list[tuple[int, int, str, int, str]] = []
        for blob, (slot, tag, vr) in found.items():
            start = template.find(blob)
            while start >= 0:
                cuts.append((start, start + len(blob), slot, tag, vr))
                start = template.find(blob, start + len(blob))
        cuts.sort()
        if any(a[1] > b[0] for a, b in zip(cuts, cuts[1:])):
            raise OutputError("SR template: overlapping value slots")
        missing = set(wanted.values()) - {c[2] for c in cuts}
        if missing:
            raise OutputError(f"SR template: values not found in the encoded tree: {sorted(missing)}")
        self.pieces: list[bytes] = []
        self.slots: list[tuple[str, int, str]] = []
        at = 0
        for start, end, slot, tag, vr in cuts:
            self.pieces.append(template[at:start])
            self.slots.append((slot, tag, vr))
            at = end
        self.pieces.append(template[at:])

    def render(self, source: Dataset, prediction: Prediction) -> bytes:
        values = {slot: value for slot, (_, value) in _slot_values(source, prediction).items()}
        out = [self.pieces[0]]
        for (slot, tag, vr), piece in zip(self.slots, self.pieces[1:]):
            out.append(_element_bytes(DataElement(tag, vr, values[slot]), self.encodings))
            out.append(piece)
        return b"".join(out)


def _sentinel_prediction(p: Prediction) -> Prediction:
    """``p`` with every number and the reason replaced by values found nowhere else in an SR,
    keeping what decides the tree's shape (top class, risk, flags)."""
    top = p.top_class
    probabilities = {c: (0.6 + 0.0001 * i if c == top else 0.011 + 0.0111 * i)
                     for i, c in enumerate(p.probabilities)}
    return dataclasses.replace(p, probabilities=probabilities, malignancy_probability=0.1234567,
                               uncertainty=0.7654321, reason=_SENTINEL_REASON if p.reason is not None else None,
                               ood_score=0.2345678 if p.ood_score is not None else None, cam=None)


def _slot_values(source: Dataset, p: Prediction) -> dict[str, tuple[int, Any]]:
    """The per-image values of the content tree, by slot: (tag, value as highdicom sets it)."""
    device = p.model.device_uid
    sop = str(source.SOPInstanceUID)
    values: dict[str, tuple[int, Any]] = {"source": (0x00081155, sop)}          # ReferencedSOPInstanceUID
    labels = ["summary"] + ([f"class {c}" for c in CLASSES if c in p.probabilities] if p.assessable else [])
    for label in labels:
        values[f"tracking {label}"] = (0x0040A124, str(derived_uid(sop, device, "tracking", label)))   # UID
    if p.assessable:
        numbers = {"malignancy": _percent(p.malignancy_probability), "uncertainty": round(float(p.uncertainty), 4),
                   **{f"class {c}": _percent(p.probabilities[c]) for c in CLASSES if c in p.probabilities}}
        if p.ood_score is not None:
            numbers["ood"] = round(float(p.ood_score), 4)
        for name, number in numbers.items():
            values[f"ds {name}"] = (0x0040A30A, DS(number, auto_format=True))        # NumericValue
            values[f"fd {name}"] = (0x0040A161, number)                            # FloatingPointValue
    elif p.reason is not None:
        values["reason"] = (0x0040A160, (p.reason or "unspecified")[:1024])         # TextValue
    return values


def _walk(ds: Dataset) -> Iterable[Any]:
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                yield from _walk(item)
        else:
            yield element


def encode(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file, checked by parsing its identifying attributes back."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    back = dcmread(BytesIO(data), specific_tags=list(_VERIFIED_KEYWORDS))
    for keyword in _VERIFIED_KEYWORDS:
        if back.get(keyword) != ds.get(keyword):
            raise OutputVerificationError(f"{keyword} did not encode as built")
    return data


def write_verified(ds: Dataset, path: Path, files: Files | None = None, *, sync: bool = True) -> Deferred:
    """Write ``ds`` atomically as a DICOM file; what is on disk must be, byte for byte, what was encoded.

    Durable on return with ``sync`` (the default); otherwise the caller syncs the returned
    :class:`~dermgate.durable.Deferred` (and closes it) before relying on the file.
    """
    written = write_checked(encode(ds), path, files)
    if sync:
        sync_all([written])
    return written


def write_checked(data: bytes, path: Path, files: Files | None = None) -> Deferred:
    """Put ``data`` at ``path`` through ``files`` (renamed into place, not yet fsynced) and read it
    back: it must be byte for byte what was encoded (decrypted first when the store encrypts)."""
    files = files or PlainFiles()
    written = files.stage_at(path, data)
    try:
        if files.read_at(path) != data:
            raise OutputVerificationError(f"{path.name}: the file did not read back as written")
    except BaseException:
        written.close()
        raise
    return written


def _new_instance(source: Dataset, prediction: Prediction, now: datetime, *, sop_class_uid: str,
                  sop_instance_uid: str, series_uid: str, series_number: int, modality: str,
                  series_description: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uids.EXPLICIT_VR_LE
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    # General Series (C.7.3.1): a new series in the source's study.
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.Laterality = source.get("Laterality") or ""   # type 2C; empty: unknown (skin is mostly unpaired)
    _fill_common(ds, source, prediction, now)
    return ds


def _fill_common(ds: Dataset, source: Dataset, prediction: Prediction, now: datetime) -> None:
    """Patient/Study copied from the source; General Equipment; SOP Common with the algorithm.

    Contributing Equipment per IHE AIR: Purpose of Reference (Newcode1, 99IHE,
    "Processing Algorithm"), manufacturer, model name, software version and the
    model's Device UID (PS3.3 C.12.1, Contributing Equipment Sequence).
    """
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    for keyword in _PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            setattr(ds, keyword, copy.deepcopy(source[keyword].value))
        elif keyword in _TYPE2_KEYWORDS:
            setattr(ds, keyword, None)
    # General Equipment (C.7.5.1): the service that wrote this instance.
    ds.Manufacturer = EQUIPMENT_MANUFACTURER
    ds.ManufacturerModelName = EQUIPMENT_MODEL
    ds.SoftwareVersions = dermgate.__version__
    # SOP Common (C.12.1).
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    offset = now.utcoffset()
    if offset is not None:
        minutes = int(offset.total_seconds() // 60)
        ds.TimezoneOffsetFromUTC = f"{'+' if minutes >= 0 else '-'}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    existing = [item for item in ds.get("ContributingEquipmentSequence", [])
                if item.get("DeviceUID") != prediction.model.device_uid]
    ds.ContributingEquipmentSequence = [_algorithm_equipment(prediction, now), *existing]
    ds.CodingSchemeIdentificationSequence = _coding_schemes(ds.get("CodingSchemeIdentificationSequence", []))


def _algorithm_equipment(prediction: Prediction, now: datetime) -> Dataset:
    model = prediction.model
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [_code_item(uids.PROCESSING_ALGORITHM)]
    item.Manufacturer = model.manufacturer
    item.ManufacturerModelName = model.name
    item.SoftwareVersions = model.version
    item.DeviceUID = model.device_uid
    item.ContributionDateTime = now.strftime("%Y%m%d%H%M%S")
    item.ContributionDescription = f"AI classification of dermoscopy image; model sha256 {model.sha256}"
    return item


def _coding_schemes(existing: Iterable[Dataset]) -> list[Dataset]:
    items = {item.CodingSchemeDesignator: item for item in existing}
    for designator, (name, org) in uids.PRIVATE_CODING_SCHEMES.items():
        item = Dataset()
        item.CodingSchemeDesignator = designator
        item.CodingSchemeName = name
        item.CodingSchemeResponsibleOrganization = org
        items.setdefault(designator, item)
    return list(items.values())


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _source_image_item(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame_count(source) > 1:
        item.ReferencedFrameNumber = 1                # the frame that was classified
    item.PurposeOfReferenceCodeSequence = [_code_item(uids.SOURCE_IMAGE_FOR_PROCESSING)]
    return item


def _copy_lossy_history(source: Dataset, ds: Dataset) -> None:
    """Lossy Image Compression stays 01 once an ancestor was lossy (C.7.6.1.1.5)."""
    meta = getattr(source, "file_meta", None)
    lossy = source.get("LossyImageCompression") == "01" or (
        meta is not None and meta.get("TransferSyntaxUID") in _LOSSY_TRANSFER_SYNTAXES)
    if not lossy:
        ds.LossyImageCompression = "00"
        return
    ds.LossyImageCompression = "01"
    for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if keyword in source:
            setattr(ds, keyword, copy.deepcopy(source[keyword].value))


def _header(source: Dataset) -> Dataset:
    """What the outputs may copy from ``source`` (see :func:`~integration.dicom_scp.header.source_header`).

    A header made here is returned as it is when it comes back (write_outputs hands it to
    each builder): building one costs about as much as encoding a small data set."""
    if _HEADERS.get(id(source)) is source:
        return source
    try:
        header = source_header(source)
    except HeaderError as exc:
        raise SourceDatasetError(str(exc)) from exc
    _HEADERS[id(header)] = header
    return header


# Headers made by _header, by id, held weakly: an id is only trusted while its header lives.
_HEADERS: weakref.WeakValueDictionary[int, Dataset] = weakref.WeakValueDictionary()


def _decode_rgb(source: Dataset) -> npt.NDArray[np.uint8]:
    try:
        arr = source.pixel_array      # pydicom converts YBR to RGB for photographic images
    except Exception as exc:          # noqa: BLE001 - any decoder failure is one kind of error here
        raise SourceDatasetError(f"source pixel data cannot be decoded: {exc}") from exc
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise SourceDatasetError(f"source is not a single-frame colour or grey image: {arr.shape}")
    return arr.astype(np.uint8, copy=False)


# --- SR content -------------------------------------------------------------------

def _percent(p: float) -> float:
    return round(float(p) * 100.0, 3)


def _measurement_groups(source: Dataset, prediction: Prediction) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """TID 1501 groups: one summary group, then one group per class with its probability."""
    model = prediction.model
    algorithm = hd.sr.AlgorithmIdentification(name=model.name, version=model.version,
                                              manufacturer=model.manufacturer)
    try:                                     # only the first frame of a multi-frame source is classified
        source_image = hd.sr.SourceImageForMeasurementGroup.from_source_image(
            source, referenced_frame_numbers=[1] if frame_count(source) > 1 else None)
    except TypeError:                        # frames in an IOD that has none (VL Photographic, SC): the
        source_image = hd.sr.SourceImageForMeasurementGroup.from_source_image(source)   # instance, then

    def tracking(label: str) -> hd.sr.TrackingIdentifier:
        return hd.sr.TrackingIdentifier(
            uid=derived_uid(source.SOPInstanceUID, model.device_uid, "tracking", label),
            identifier=f"dermgate {label}")

    evaluations = [
        hd.sr.QualitativeEvaluation(name=uids.RISK_CATEGORY, value=_RISK_CODES[prediction.risk]),
    ]
    measurements: list[hd.sr.Measurement] = []
    if prediction.assessable:
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=uids.LOW_CONFIDENCE, value=uids.YES if prediction.low_confidence else uids.NO))
        if prediction.ood_score is not None:
            evaluations.append(hd.sr.QualitativeEvaluation(
                name=uids.OUT_OF_DISTRIBUTION, value=uids.YES if prediction.out_of_distribution else uids.NO))
        measurements = [
            hd.sr.Measurement(name=uids.PROBABILITY_OF_CANCER, value=_percent(prediction.malignancy_probability),
                              unit=uids.UNIT_PERCENT),
            hd.sr.Measurement(name=uids.UNCERTAINTY, value=round(float(prediction.uncertainty), 4),
                              unit=uids.UNIT_NONE),
        ]
        if prediction.ood_score is not None:
            measurements.append(hd.sr.Measurement(name=uids.OOD_SCORE, value=round(float(prediction.ood_score), 4),
                                                  unit=uids.UNIT_NONE))
    groups = [hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking("summary"),
        finding_type=uids.FINDING_CODES[prediction.top_class] if prediction.assessable else None,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[source_image],
    )]
    if not prediction.assessable:
        return groups
    for cls in CLASSES:
        if cls not in prediction.probabilities:
            continue
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking(f"class {cls}"),
            finding_type=uids.FINDING_CODES[cls],
            algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(name=uids.PROBABILITY, value=_percent(prediction.probabilities[cls]),
                                            unit=uids.UNIT_PERCENT)],
            source_images=[source_image],
        ))
    return groups


def _qualitative_evaluations(prediction: Prediction, frames: int = 1) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: the disclaimer (why not assessable, which frames were classified) as TEXT."""
    container = hd.sr.ContainerContentItem(name=uids.QUALITATIVE_EVALUATIONS,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    items = [hd.sr.TextContentItem(name=uids.DISCLAIMER_TEXT, value=DISCLAIMER,
                                   relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)]
    note = Outputs.note_for(frames)
    if note:
        items.append(hd.sr.TextContentItem(name=uids.CLASSIFIED_FRAMES, value=note,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    if not prediction.assessable:
        items.append(hd.sr.TextContentItem(name=uids.NOT_ASSESSABLE_REASON,
                                           value=(prediction.reason or "unspecified")[:1024],
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container
