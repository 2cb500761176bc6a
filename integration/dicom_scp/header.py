"""The header values dermgate carries from a received object: each checked against its VR first.

Modalities send Type 2 attributes absent or empty, and values that do not meet their value
representation: a DA written ``1970-01-31``, a TM ``10:10:10``, a Patient's Sex ``m``, text
with control characters, a character set no one knows. The intake keeps what it records
(:func:`text`, :func:`date`, ...) and the outputs copy the patient and study of their
source (:func:`source_header`); both follow one rule (issue 16):

* carry what is valid, as it is;
* write an unambiguous other spelling of the same value in its DICOM form (ISO 8601 dates
  and times with separators: ``1970-01-31`` -> ``19700131``, ``10:10:10`` -> ``101010``);
* leave out what is not valid: a Type 2 attribute is then present and empty, a Type 3 one
  absent;
* never invent patient data (no placeholder names, dates or sexes).

Nothing here raises for a bad value; :class:`HeaderError` is raised only when an identifier
the outputs must reference (Study, Series, SOP Instance UIDs, SOP Class UID) is not usable.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from datetime import date
from typing import Any, Final

from pydicom import config
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.valuerep import validate_value

UID_MAX_LEN: Final = 64                                       # PS3.5 9.1
# Digits and dots; components with a leading zero (not conformant, PS3.5 9.1) are sent by real
# devices and were always accepted, so they still are.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_DA = re.compile(r"\d{8}")
_DA_SEPARATED = re.compile(r"(\d{4})[-.](\d{2})[-.](\d{2})")   # ISO 8601 / ACR-NEMA spellings
_TM = re.compile(r"([01]\d|2[0-3])([0-5]\d((60|[0-5]\d)(\.\d{1,6})?)?)?")
_TM_SEPARATED = re.compile(r"([01]\d|2[0-3]):([0-5]\d)(?::(60|[0-5]\d)(\.\d{1,6})?)?")
# Control characters other than ESC (code extensions) are never valid in these VRs (PS3.5 6.1.3).
_CONTROL = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f-\x9f]")
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f-\x9f]")  # LT/ST/UT keep TAB CR LF FF
_TEXT_VRS: Final = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC"})
_BULK_VRS: Final = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})

# Enumerated values the IODs define (PS3.3): anything else is not carried.
ENUMERATED: Final[dict[str, frozenset[str]]] = {
    "PatientSex": frozenset({"M", "F", "O"}),                  # C.7.1.1
    "Laterality": frozenset({"R", "L"}),                       # C.7.3.1
    "RecognizableVisualFeatures": frozenset({"YES", "NO"}),    # C.12.1
    "LossyImageCompression": frozenset({"00", "01"}),          # C.7.6.1
}

# Patient (C.7.1.1), General Study (C.7.2.1), Patient Study (C.7.2.2): keyword -> Type.
PATIENT_STUDY: Final[dict[str, int]] = {
    "PatientName": 2, "PatientID": 2, "IssuerOfPatientID": 3, "PatientBirthDate": 2, "PatientSex": 2,
    "StudyDate": 2, "StudyTime": 2, "ReferringPhysicianName": 2, "StudyID": 2, "AccessionNumber": 2,
    "StudyDescription": 3, "PatientAge": 3, "PatientSize": 3, "PatientWeight": 3,
}
PATIENT_STUDY_SEQUENCES: Final = ("IssuerOfPatientIDQualifiersSequence", "OtherPatientIDsSequence",
                                  "IssuerOfAccessionNumberSequence")
# Other attributes the outputs copy or look at (Type 3 unless the output gives its own value).
_CARRIED: Final = ("Laterality", "InstanceNumber", "PatientOrientation", "RecognizableVisualFeatures",
                   "LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod")
_REQUIRED_UIDS: Final = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_PIXEL_DESCRIPTION: Final = ("Rows", "Columns", "SamplesPerPixel", "PixelRepresentation", "BitsAllocated")
# Character sets kept as the source sent them: single-byte or UTF-8/GB, no code extensions.
_KEPT_CHARSETS: Final = frozenset(name for name in python_encoding if name and not name.startswith("ISO 2022"))
UTF8: Final = "ISO_IR 192"


class HeaderError(ValueError):
    """An identifier the outputs must reference is missing or malformed."""


# ---- single values --------------------------------------------------------------------------------

def _single(value: Any) -> Any:
    """The value of a VM 1 attribute; None when absent, empty or multi-valued."""
    if isinstance(value, (MultiValue, list, tuple)):
        if len(value) != 1:
            return None
        value = value[0]
    if value is None:
        return None
    if isinstance(value, bytes):          # an undecodable value pydicom left raw
        return None
    return value


def uid(value: Any) -> str | None:
    text = _single(value)
    text = str(text).strip().rstrip("\x00") if text is not None else ""
    return text if text and len(text) <= UID_MAX_LEN and _UID.fullmatch(text) else None


def date_value(value: Any) -> str | None:
    """A DA as ``YYYYMMDD`` (a real calendar day), from that form or ``YYYY-MM-DD``/``YYYY.MM.DD``."""
    text = _single(value)
    if text is None:
        return None
    text = str(text).strip()
    separated = _DA_SEPARATED.fullmatch(text)
    if separated:
        text = "".join(separated.groups())
    if not _DA.fullmatch(text):
        return None
    try:
        date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None
    return text


def time_value(value: Any) -> str | None:
    """A TM as ``HH[MM[SS[.FFFFFF]]]``, from that form or ``HH:MM[:SS[.F]]``."""
    text = _single(value)
    if text is None:
        return None
    text = str(text).strip()
    separated = _TM_SEPARATED.fullmatch(text)
    if separated:
        hh, mm, ss, frac = separated.groups()
        text = f"{hh}{mm}{ss or ''}{(frac or '') if ss else ''}"
    return text if _TM.fullmatch(text) else None


def text(value: Any, vr: str = "LO", keyword: str | None = None) -> str | None:
    """A valid single value of a string VR (PN, LO, SH, CS, AS, DS, IS, ...), stripped; else None."""
    raw = _single(value)
    if raw is None:
        return None
    out = str(raw).strip(" \x00")
    if not out:
        return None
    pattern = _TEXT_CONTROL if vr in ("LT", "ST", "UT") else _CONTROL
    if pattern.search(out) or ("\\" in out and vr not in ("LT", "ST", "UT")):
        return None
    try:
        validate_value(vr, out, config.RAISE)
    except (ValueError, TypeError):
        return None
    if vr == "IS":
        try:
            int(out)
        except ValueError:
            return None
    if keyword in ENUMERATED and out not in ENUMERATED[keyword]:
        return None
    return out


def value_of(keyword: str, value: Any) -> Any | None:
    """The carried value of ``keyword`` (by its dictionary VR), None when it is not valid."""
    vr = dictionary_VR(keyword)
    if vr == "DA":
        return date_value(value)
    if vr == "TM":
        return time_value(value)
    if vr == "UI":
        return uid(value)
    if vr == "CS" and keyword == "PatientOrientation":      # VM 2
        values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
        cleaned = [text(v, "CS") for v in values if v not in (None, "")]
        return cleaned if len(cleaned) == 2 and all(cleaned) else None
    if keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):   # VM 1-n
        values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
        cleaned = [text(v, vr) for v in values]
        return cleaned if cleaned and all(cleaned) else None
    return text(value, vr, keyword)


# ---- sequences ----------------------------------------------------------------------------------------

def _valid_as_is(ds: Dataset) -> bool:
    """Every element of ``ds`` (and its items, recursively) is a valid value of its VR as it stands."""
    for elem in ds:
        if elem.VR == "SQ":
            if not all(_valid_as_is(item) for item in elem.value):
                return False
            continue
        if elem.VR in _BULK_VRS or elem.value in (None, "", b""):
            continue
        values = list(elem.value) if isinstance(elem.value, (MultiValue, list)) else [elem.value]
        for v in values:
            if elem.VR == "DA":
                ok = date_value(v) == str(v).strip()
            elif elem.VR == "TM":
                ok = time_value(v) == str(v).strip()
            elif elem.VR == "UI":
                ok = uid(v) is not None
            elif elem.VR in _TEXT_VRS or elem.VR in ("CS", "AS", "DS", "IS", "AE"):
                ok = text(v, elem.VR) is not None
            else:
                ok = True
            if not ok:
                return False
    return True


def sequence(value: Any) -> list[Dataset] | None:
    """A copy of a sequence whose every nested value is valid; None (left out) otherwise."""
    if not isinstance(value, Sequence) or len(value) == 0:
        return None
    try:
        return [copy.deepcopy(item) for item in value] if all(_valid_as_is(item) for item in value) else None
    except Exception:                     # noqa: BLE001 - an element pydicom cannot convert: not carried
        return None


# ---- the header the outputs copy ---------------------------------------------------------------------

def _get(ds: Dataset, keyword: str) -> Any:
    """The value of ``keyword`` in ``ds``; None when absent or when pydicom cannot convert it."""
    try:
        return ds.get(keyword)
    except Exception:                     # noqa: BLE001 - a corrupt element reads as absent here
        return None


def _set(ds: Dataset, keyword: str, value: Any) -> None:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    ds[tag] = DataElement(tag, dictionary_VR(tag), value, validation_mode=config.IGNORE)


def source_header(source: Dataset) -> Dataset:
    """A header-only copy of ``source`` holding exactly what the outputs may copy from it.

    The UIDs the outputs reference must be valid (:class:`HeaderError` otherwise). Patient and
    study attributes are carried when valid; the Type 2 ones are present and empty otherwise.
    The image pixel description is kept (highdicom checks it on a source image), without the
    pixel data. The Specific Character Set is the source's when it is a known single character
    set that encodes every carried value, none when all of them are ASCII, else UTF-8.
    """
    view = Dataset()
    meta = getattr(source, "file_meta", None)
    if meta is not None:
        view.file_meta = copy.deepcopy(meta)
    for keyword in _REQUIRED_UIDS:
        value = uid(_get(source, keyword))
        if value is None:
            raise HeaderError(f"source {keyword} missing or malformed")
        _set(view, keyword, value)
    for keyword in _PIXEL_DESCRIPTION:
        value = text(_get(source, keyword), "IS")
        if value is not None:
            _set(view, keyword, int(value))
    frames = frame_count(source)
    if frames > 1:
        _set(view, "NumberOfFrames", frames)
    _set(view, "Modality", value_of("Modality", _get(source, "Modality")) or "")
    for keyword, kind in PATIENT_STUDY.items():
        value = value_of(keyword, _get(source, keyword))
        if value is not None:
            _set(view, keyword, value)
        elif kind == 2:
            _set(view, keyword, None)
    for keyword in PATIENT_STUDY_SEQUENCES:
        items = sequence(_get(source, keyword))
        if items is not None:
            _set(view, keyword, items)
    for keyword in _CARRIED:
        value = value_of(keyword, _get(source, keyword))
        if value is not None:
            _set(view, keyword, value)
    charset = character_set(_get(source, "SpecificCharacterSet"), _texts(view))
    if charset:
        _set(view, "SpecificCharacterSet", charset)
    return view


def frame_count(ds: Dataset) -> int:
    """Number of Frames (1 when absent or not a positive integer)."""
    value = text(_get(ds, "NumberOfFrames"), "IS")
    return int(value) if value is not None and int(value) > 0 else 1


def _texts(ds: Dataset) -> Iterable[str]:
    for elem in ds.iterall():
        if elem.VR in _TEXT_VRS and elem.value not in (None, ""):
            values = elem.value if isinstance(elem.value, (MultiValue, list)) else [elem.value]
            yield from (str(v) for v in values)


def character_set(source_value: Any, texts: Iterable[str]) -> str | None:
    """The Specific Character Set for the carried ``texts`` (see :func:`source_header`)."""
    values = list(texts)
    name = _single(source_value)
    name = str(name).strip() if name is not None else None
    if name in _KEPT_CHARSETS:
        try:
            for v in values:
                v.encode(python_encoding[name])
            return name
        except (UnicodeEncodeError, LookupError):
            pass
    if all(v.isascii() for v in values):
        return None
    return UTF8
