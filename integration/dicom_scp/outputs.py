"""The DICOM outputs of one classified image: a Grad-CAM Secondary Capture and an AI-result SR.

Both follow IHE AI Results (AIR): the SR (Comprehensive 3D SR, TID 1500) carries
the machine-readable result; the SC is its human-readable companion. Both name
the algorithm in the Contributing Equipment Sequence with a Device UID that
changes with the model. All UIDs derive from the source instance and the model's
Device UID (2.25 UUID-derived UIDs), so a re-run writes the same instances and a
PACS sees a re-send, not a duplicate.

Errors::

    OutputError                 base; nothing is written when it is raised
    ├── SourceDatasetError      the source lacks what the outputs must copy
    └── OutputVerificationError the written file did not read back as built
"""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID
from pydicom.valuerep import DA, TM

import dermgate
from dermgate.durable import Deferred, sync_all, write_deferred
from dermgate.records import Outputs
from inference.result import CLASSES, DISCLAIMER, Prediction, Risk
from integration.dicom_scp import uids
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

# PS3.3 C.7.1.1 Patient, C.7.2.1 General Study, C.7.2.2 Patient Study: copied as they are.
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
_REQUIRED_SOURCE_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, "dermgate.integration.dicom_scp.outputs")
_UID_SEPARATOR = "\x1f"
_LOSSY_TRANSFER_SYNTAXES = (uids.JPEG_BASELINE, uids.JPEG_EXTENDED, uids.JPEG_2000)
_VERIFIED_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_RISK_CODES = {Risk.LOW: uids.LOW_RISK, Risk.MEDIUM: uids.MODERATE_RISK, Risk.HIGH: uids.HIGH_RISK,
               Risk.NOT_ASSESSABLE: uids.NOT_ASSESSABLE}


class OutputError(Exception):
    """An output could not be built or written."""


class SourceDatasetError(OutputError):
    """The source dataset lacks an attribute the outputs must reference or copy."""


class OutputVerificationError(OutputError):
    """A written output did not read back as it was built."""


@dataclass(frozen=True)
class WrittenOutputs:
    """The files written for one image.

    ``pending`` holds what ``write_outputs(..., sync=False)`` left for the caller to
    fsync (:func:`dermgate.durable.sync_all`), to batch it with other images; empty
    when the files are already durable. ``sc`` and ``sr`` read the files back.
    """
    sc_path: Path
    sr_path: Path
    png_path: Path
    png: bytes
    sc_sop_instance_uid: str
    sr_sop_instance_uid: str
    pending: tuple[Deferred, ...] = ()

    @cached_property
    def sc(self) -> Dataset:
        return dcmread(self.sc_path)

    @cached_property
    def sr(self) -> Dataset:
        return dcmread(self.sr_path)

    def to_record(self, store_root: Path) -> Outputs:
        """The core's record, with paths relative to the store root."""
        return Outputs(
            sc_path=str(self.sc_path.relative_to(store_root)),
            sc_sop_instance_uid=self.sc_sop_instance_uid,
            sr_path=str(self.sr_path.relative_to(store_root)),
            sr_sop_instance_uid=self.sr_sop_instance_uid,
            cam_png_path=str(self.png_path.relative_to(store_root)),
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
    sync: bool = True,
) -> WrittenOutputs:
    """Render, build, encode, write and verify the SC, the SR and the heatmap PNG for one image.

    ``out_dir`` is this image's own folder. ``image_rgb`` is the decoded source
    (RGB); when omitted, the source's pixel data is decoded here. Each object is
    encoded once; what is on disk is then compared byte for byte with it. With
    ``sync=False`` the files are in place but not yet fsynced: the caller syncs
    ``pending`` (several images at once) before it records them anywhere.
    """
    _check_source(source)
    now = now or datetime.now(timezone.utc)
    rgb = image_rgb if image_rgb is not None else _decode_rgb(source)
    rendered = render_heatmap(rgb, prediction)
    sc = build_secondary_capture(source, rendered, prediction, now=now)
    sr = build_ai_sr(source, prediction, sc, now=now)
    png = encode_png(rendered)
    pending: list[Deferred] = []
    try:
        for ds, name in ((sc, SC_FILE), (sr, SR_FILE)):
            pending.append(write_verified(ds, out_dir / name, sync=False))
        pending.append(write_deferred(out_dir / PNG_FILE, png))
        if sync:
            sync_all(pending)
    except BaseException:
        for d in pending:
            d.close()
        raise
    return WrittenOutputs(sc_path=out_dir / SC_FILE, sr_path=out_dir / SR_FILE, png_path=out_dir / PNG_FILE,
                          png=png, sc_sop_instance_uid=str(sc.SOPInstanceUID),
                          sr_sop_instance_uid=str(sr.SOPInstanceUID), pending=() if sync else tuple(pending))


def build_secondary_capture(
    source: Dataset,
    rendered_rgb: npt.NDArray[np.uint8],
    prediction: Prediction,
    series_uid: str | None = None,
    *,
    now: datetime | None = None,
) -> Dataset:
    """The Grad-CAM picture as a Secondary Capture Image (PS3.3 A.8.1) in the source's study."""
    _check_source(source)
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
    ds.DerivationDescription = (
        f"Grad-CAM heatmap of {prediction.model.name} {prediction.model.version} over the source image, "
        "with the AI result burned in as a legend"
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
    ds.PixelData = np.ascontiguousarray(rendered_rgb).tobytes()
    return ds


def build_ai_sr(source: Dataset, prediction: Prediction, sc: Dataset, *, now: datetime | None = None) -> Dataset:
    """The AI result as a Comprehensive 3D SR with a TID 1500 Measurement Report (IHE AIR)."""
    _check_source(source)
    now = now or datetime.now(timezone.utc)
    model = prediction.model
    device_uid = model.device_uid
    observer = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid, name=model.name, manufacturer_name=model.manufacturer, model_name=model.name),
    ))
    report = hd.sr.MeasurementReport(
        observation_context=observer,
        procedure_reported=uids.DERMOSCOPIC_PHOTOGRAPHY_PROCEDURE,
        imaging_measurements=_measurement_groups(source, prediction),
        title=uids.IMAGING_MEASUREMENT_REPORT,
    )
    root = report[0]
    root.ContentSequence.append(_qualitative_evaluations(prediction))
    # highdicom deep-copies and re-parses the content tree it is given and searches it for
    # references (most of the cost of an SR, ~10x the rest): it gets the root container
    # without its items, which then go in as built. The tree only references the source
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
    sr.ContentSequence = root.ContentSequence
    _fill_common(sr, source, prediction, now)
    sr.ContentDate = DA(now.strftime("%Y%m%d"))
    sr.ContentTime = TM(now.strftime("%H%M%S"))
    return sr


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


def write_verified(ds: Dataset, path: Path, *, sync: bool = True) -> Deferred:
    """Write ``ds`` atomically as a DICOM file; what is on disk must be, byte for byte, what was encoded.

    Durable on return with ``sync`` (the default); otherwise the caller syncs the returned
    :class:`~dermgate.durable.Deferred` (and closes it) before relying on the file.
    """
    data = encode(ds)
    written = write_deferred(path, data)
    try:
        if os.pread(written.fd, len(data) + 1, 0) != data:
            raise OutputVerificationError(f"{path.name}: the file did not read back as written")
        if sync:
            sync_all([written])
    except BaseException:
        written.close()
        raise
    return written


# --- the shared helper: modules every output copies or fills -------------------

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


def _check_source(source: Dataset) -> None:
    missing = [k for k in _REQUIRED_SOURCE_KEYWORDS if not source.get(k)]
    if missing:
        raise SourceDatasetError(f"source dataset lacks {', '.join(missing)}")


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
    source_image = hd.sr.SourceImageForMeasurementGroup.from_source_image(source)

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
        measurements = [
            hd.sr.Measurement(name=uids.PROBABILITY_OF_CANCER, value=_percent(prediction.malignancy_probability),
                              unit=uids.UNIT_PERCENT),
            hd.sr.Measurement(name=uids.UNCERTAINTY, value=round(float(prediction.uncertainty), 4),
                              unit=uids.UNIT_NONE),
        ]
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


def _qualitative_evaluations(prediction: Prediction) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: the disclaimer (and why not assessable) as TEXT."""
    container = hd.sr.ContainerContentItem(name=uids.QUALITATIVE_EVALUATIONS,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    items = [hd.sr.TextContentItem(name=uids.DISCLAIMER_TEXT, value=DISCLAIMER,
                                   relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)]
    if not prediction.assessable:
        items.append(hd.sr.TextContentItem(name=uids.NOT_ASSESSABLE_REASON,
                                           value=(prediction.reason or "unspecified")[:1024],
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container
