"""A deterministic fuzz corpus for the SCP: mutants of valid objects, and an SCU that sends them.

Each mutant starts from one of a few small valid objects (JPEG Baseline from dcmtk's
``img2dcm``, native RGB explicit and implicit VR, 16-bit monochrome, palette colour, RLE,
JPEG 2000, a two-frame native object) and gets one to three mutations: on the data set
(Type 2 attributes absent or empty, odd dates and times, junk text, overlong values,
character sets, geometry, transfer syntax relabelled, UIDs, private elements, pixel data
cut or flipped) and on its encoding (flipped bytes, a truncation, a corrupt value
representation or length, inserted bytes). Everything derives from ``random.Random(seed)``
and UIDs from ``generate_uid(entropy_srcs=...)``: the same seed gives the same corpus, byte
for byte, on every machine.

Used by tests/integration/dicom_scp/test_scp_fuzz.py and bench/bench_memory.py.
"""

from __future__ import annotations

import random
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydicom import Dataset, config, dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, JPEG2000Lossless, RLELossless, generate_uid
from pynetdicom import AE, _config

from integration.dicom_scp import uids

BASE_SIZE = (160, 120)                   # width x height of the small base images


@dataclass(frozen=True)
class Mutant:
    """One object to send: what the request announces, and the encoded data set (no file meta)."""
    index: int
    name: str                            # base and mutations, e.g. "jpeg:drop_type2+flip_header"
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    data: bytes


@dataclass(frozen=True)
class Answer:
    """The SCP's answer to one mutant; ``status`` None: no response (the association broke)."""
    status: int | None
    comment: str | None


# ---- the valid objects mutants start from ---------------------------------------------------------

def _put(ds: Dataset, keyword: str, value: object) -> None:
    """Set ``keyword`` without pydicom's value validation (mutants carry invalid values on purpose)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    vr = dictionary_VR(tag)
    try:
        ds[tag] = DataElement(tag, vr, value, validation_mode=config.IGNORE)
    except (ValueError, TypeError, OverflowError):        # pydicom will not hold it: the raw bytes then
        raw = str(value).encode("latin-1", "replace")
        raw += b" " * (len(raw) % 2)
        implicit = ds.file_meta.TransferSyntaxUID.is_implicit_VR if "file_meta" in ds.__dict__ else False
        ds[tag] = RawDataElement(tag, vr, len(raw), raw, 0, implicit, True)  # type: ignore[assignment]


def base_objects(folder: Path, jpeg: Path) -> dict[str, Dataset]:
    """The valid objects, made once from one sample JPEG (``img2dcm`` for the JPEG one)."""
    from tests.peers.dcmtk import img2dcm
    folder.mkdir(parents=True, exist_ok=True)
    small = folder / "small.jpg"
    cv2.imwrite(str(small), cv2.resize(cv2.imread(str(jpeg)), BASE_SIZE, interpolation=cv2.INTER_AREA),
                [cv2.IMWRITE_JPEG_QUALITY, 90])
    jpeg_ds = dcmread(img2dcm(small, folder / "jpeg.dcm", patient_id="FUZZ-0001", patient_name="Fuzz^Base"))
    derm = dcmread(img2dcm(small, folder / "derm.dcm", dermoscopic=True, patient_id="FUZZ-0002"))
    native = dcmread(folder / "jpeg.dcm")
    native.decompress(generate_instance_uid=False)                 # explicit VR LE, RGB
    implicit = _copy(native)
    implicit.file_meta.TransferSyntaxUID = uids.IMPLICIT_VR_LE
    mono = _copy(native)
    grey = native.pixel_array.mean(axis=2).astype(np.uint16) * 257
    mono.SOPClassUID = mono.file_meta.MediaStorageSOPClassUID = uids.SECONDARY_CAPTURE_IMAGE_STORAGE
    mono.PhotometricInterpretation, mono.SamplesPerPixel = "MONOCHROME2", 1
    mono.BitsAllocated, mono.BitsStored, mono.HighBit, mono.PixelRepresentation = 16, 16, 15, 0
    del mono.PlanarConfiguration
    mono.PixelData = grey.tobytes()
    palette = _palette(native)
    rle = _copy(native)
    rle.compress(RLELossless, generate_instance_uid=False)
    j2k = _copy(native)
    j2k.compress(JPEG2000Lossless, generate_instance_uid=False)
    multi = _copy(native)
    multi.NumberOfFrames = 2
    multi.PixelData = native.PixelData + native.PixelData[::-1]
    return {"jpeg": jpeg_ds, "dermoscopic": derm, "native": native, "implicit": implicit, "mono16": mono,
            "palette": palette, "rle": rle, "j2k": j2k, "multiframe": multi}


def _copy(ds: Dataset) -> Dataset:
    import copy
    return copy.deepcopy(ds)


def _palette(native: Dataset) -> Dataset:
    ds = _copy(native)
    rgb = native.pixel_array
    index = (rgb[..., 0] // 32 * 32 + rgb[..., 1] // 64 * 8 + rgb[..., 2] // 32).astype(np.uint8)
    lut = np.arange(256, dtype=np.uint16)
    ds.PhotometricInterpretation, ds.SamplesPerPixel = "PALETTE COLOR", 1
    del ds.PlanarConfiguration
    ds.PixelData = index.tobytes()
    for colour, table in (("Red", (lut & 0xE0) << 8), ("Green", (lut & 0x18) << 11), ("Blue", (lut & 0x07) << 13)):
        ds.add_new(f"{colour}PaletteColorLookupTableDescriptor", "US", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", table.astype("<u2").tobytes())
    return ds


# ---- mutations on the data set ----------------------------------------------------------------------

TYPE2 = ("Modality", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
         "StudyTime", "ReferringPhysicianName", "SeriesNumber", "InstanceNumber", "Laterality",
         "PatientOrientation", "ContentDate", "ContentTime")
ODD_DATES = ("1970-01-31", "1970.01.31", "19701331", "2025", "abcdefgh", " ", "19700101-20000101", "0000000")
ODD_TIMES = ("10:10:10", "25", "1010.5", "abc", "101010.1234567", "24")
TEXT_KEYWORDS = ("PatientName", "PatientID", "AccessionNumber", "StudyID", "StudyDescription",
                 "SeriesDescription", "BodyPartExamined", "PatientSex", "Modality", "ReferringPhysicianName",
                 "InstitutionName", "Manufacturer", "IssuerOfPatientID")
CHARSETS = ("ISO_IR 100", "ISO_IR 192", "GB18030", "ISO 2022 IR 87", "bogus", "ISO_IR 6\\ISO_IR 100", "")
TRANSFER_SYNTAXES = tuple(str(ts) for ts in uids.SCP_TRANSFER_SYNTAXES)


def drop_type2(ds: Dataset, rng: random.Random) -> None:
    for keyword in rng.sample(TYPE2, rng.randint(1, len(TYPE2))):
        ds.pop(keyword, None)


def empty_type2(ds: Dataset, rng: random.Random) -> None:
    for keyword in rng.sample(TYPE2, rng.randint(1, len(TYPE2))):
        _put(ds, keyword, None)


def odd_dates(ds: Dataset, rng: random.Random) -> None:
    for keyword in ("StudyDate", "PatientBirthDate", "ContentDate", "SeriesDate"):
        if rng.random() < 0.6:
            _put(ds, keyword, rng.choice(ODD_DATES))
    for keyword in ("StudyTime", "ContentTime"):
        if rng.random() < 0.5:
            _put(ds, keyword, rng.choice(ODD_TIMES))


def junk_text(ds: Dataset, rng: random.Random) -> None:
    for keyword in rng.sample(TEXT_KEYWORDS, rng.randint(1, 4)):
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 80)))
        _put(ds, keyword, raw.decode("latin-1"))


def long_values(ds: Dataset, rng: random.Random) -> None:
    keyword = rng.choice(("PatientID", "AccessionNumber", "StudyID", "PatientName", "Modality", "StudyTime"))
    _put(ds, keyword, "9" * rng.choice((17, 65, 200, 1000)))


def charset(ds: Dataset, rng: random.Random) -> None:
    _put(ds, "SpecificCharacterSet", rng.choice(CHARSETS))
    _put(ds, "PatientName", rng.choice(("Müller^Jörg", "山田^太郎", "Ωμέγα^Ψ", "plain^name")))


def geometry(ds: Dataset, rng: random.Random) -> None:
    keyword = rng.choice(("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored",
                          "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames",
                          "PixelRepresentation", "HighBit"))
    values: dict[str, tuple[object, ...]] = {
        "Rows": (0, 1, BASE_SIZE[1] - 1, BASE_SIZE[1] + 1, BASE_SIZE[0], 65535),
        "Columns": (0, 1, BASE_SIZE[0] - 1, BASE_SIZE[0] + 1, BASE_SIZE[1], 65535),
        "SamplesPerPixel": (0, 1, 2, 3, 4),
        "BitsAllocated": (1, 8, 12, 16, 32),
        "BitsStored": (0, 1, 7, 8, 12, 16, 17),
        "PhotometricInterpretation": ("RGB", "YBR_FULL", "YBR_FULL_422", "MONOCHROME1", "MONOCHROME2",
                                      "PALETTE COLOR", "YBR_ICT", "CMYK", "", "rgb"),
        "PlanarConfiguration": (0, 1, 2),
        "NumberOfFrames": (0, 1, 2, 3, "x", "-1"),
        "PixelRepresentation": (0, 1),
        "HighBit": (0, 7, 15, 31),
    }
    _put(ds, keyword, rng.choice(values[keyword]))


def relabel_ts(ds: Dataset, rng: random.Random) -> None:
    current = str(ds.file_meta.TransferSyntaxUID)
    ds.file_meta.TransferSyntaxUID = UID(rng.choice([ts for ts in TRANSFER_SYNTAXES if ts != current]))


def bad_uids(ds: Dataset, rng: random.Random) -> None:
    keyword = rng.choice(("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"))
    value = rng.choice(("", "1.2.abc", "1." + "2" * 70, "1.2.840.10008.5.1.4.1.1.2", "0.0", None))
    if value is None:
        ds.pop(keyword, None)
    else:
        _put(ds, keyword, value)


def private_and_sequences(ds: Dataset, rng: random.Random) -> None:
    block = ds.private_block(0x0009, "FUZZ CREATOR", create=True)
    block.add_new(0x01, "LO", "private value")
    block.add_new(0x02, "OB", bytes(rng.randrange(256) for _ in range(rng.randint(0, 300))))
    item = Dataset()
    _put(item, "CodeMeaning", rng.choice(("", "left forearm", "x" * 100)))
    ds.AnatomicRegionSequence = [item] if rng.random() < 0.7 else []
    if rng.random() < 0.5:
        ds.OtherPatientIDsSequence = [Dataset()]


def pixel_data(ds: Dataset, rng: random.Random) -> None:
    """Cut, flip, empty or drop the pixel data (encapsulated or native)."""
    choice = rng.choice(("flip", "cut", "empty", "drop", "extra"))
    if choice == "drop":
        ds.pop("PixelData", None)
        return
    if "PixelData" not in ds:
        return
    encapsulated = ds.file_meta.TransferSyntaxUID.is_compressed
    frames = ([bytearray(f) for f in generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames") or 1))]
              if encapsulated else [bytearray(ds.PixelData)])
    frame = frames[0]
    if choice == "flip" and frame:
        for _ in range(rng.randint(1, 20)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
    elif choice == "cut":
        del frame[rng.randrange(len(frame) + 1):]
    elif choice == "empty":
        frame.clear()
    elif choice == "extra":
        frame.extend(bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))))
    if encapsulated:
        ds.PixelData = encapsulate([bytes(f) or b"\x00\x00" for f in frames])
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = bytes(frame)


def odd_geometry(ds: Dataset, rng: random.Random) -> None:
    """Native pixels cropped to an odd width and an odd height (a valid object)."""
    if ds.file_meta.TransferSyntaxUID.is_compressed or "PixelData" not in ds:
        return
    try:
        arr = ds.pixel_array
    except Exception:                    # noqa: BLE001 - already mutated beyond decoding: leave it
        return
    rows, cols = (arr.shape[0] - 1) | 1, (arr.shape[1] - 1) | 1
    if int(ds.get("NumberOfFrames") or 1) > 1:
        arr = arr[0]
    arr = np.ascontiguousarray(arr[: rows - 2 * rng.randint(0, 3), : cols - 2 * rng.randint(0, 3)])
    ds.pop("NumberOfFrames", None)
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.PixelData = arr.tobytes()


DATASET_MUTATIONS: dict[str, Callable[[Dataset, random.Random], None]] = {
    "drop_type2": drop_type2, "empty_type2": empty_type2, "odd_dates": odd_dates, "junk_text": junk_text,
    "long_values": long_values, "charset": charset, "geometry": geometry, "relabel_ts": relabel_ts,
    "bad_uids": bad_uids, "private_and_sequences": private_and_sequences, "pixel_data": pixel_data,
    "odd_geometry": odd_geometry,
}


# ---- mutations on the encoded data set --------------------------------------------------------------

_VR_BYTES = (b"AE", b"AS", b"CS", b"DA", b"DS", b"IS", b"LO", b"PN", b"SH", b"TM", b"UI", b"US")


def flip_header(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        buf[rng.randrange(min(len(buf), 1024))] = rng.randrange(256)
    return bytes(buf)


def flip_anywhere(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        buf[rng.randrange(len(buf))] = rng.randrange(256)
    return bytes(buf)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(1, len(data))]


def corrupt_vr(data: bytes, rng: random.Random) -> bytes:
    """Replace an explicit VR (two upper-case letters after a tag) with another pair of bytes."""
    positions = [i for vr in _VR_BYTES for i in _find_all(data, vr) if i >= 4]
    if not positions:
        return flip_header(data, rng)
    i = rng.choice(positions)
    new = rng.choice((b"ZZ", b"\x00\x01", b"OB", b"SQ", b"UN", b"FD", b"AT", b"xx", b"UT"))
    return data[:i] + new + data[i + 2:]


def corrupt_length(data: bytes, rng: random.Random) -> bytes:
    positions = [i for vr in _VR_BYTES for i in _find_all(data, vr) if i >= 4]
    if not positions:
        return flip_header(data, rng)
    i = rng.choice(positions) + 2
    new = struct.pack("<H", rng.choice((0, 1, 0xFFFF, 0x7FFF, 3, 255)))
    return data[:i] + new + data[i + 2:]


def insert_bytes(data: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(data))
    return data[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 32))) + data[i:]


def _find_all(data: bytes, needle: bytes, limit: int = 4096) -> Iterator[int]:
    start = 0
    while True:
        i = data.find(needle, start, limit)
        if i < 0:
            return
        yield i
        start = i + 1


BYTE_MUTATIONS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "flip_header": flip_header, "flip_anywhere": flip_anywhere, "truncate": truncate,
    "corrupt_vr": corrupt_vr, "corrupt_length": corrupt_length, "insert_bytes": insert_bytes,
}


# ---- the corpus -----------------------------------------------------------------------------------

def encode(ds: Dataset) -> bytes:
    """The data set encoded in its file meta's transfer syntax, without the file meta."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = ds.file_meta.TransferSyntaxUID.is_implicit_VR
    write_dataset(fp, ds)
    return fp.getvalue()


def corpus(bases: dict[str, Dataset], n: int, seed: int = 16) -> Iterator[Mutant]:
    """``n`` mutants, the same for the same ``bases`` and ``seed``."""
    names = sorted(bases)
    for index in range(n):
        rng = random.Random(f"{seed}:{index}")
        base = rng.choice(names)
        ds = _copy(bases[base])
        sop = generate_uid(entropy_srcs=[f"dermgate-fuzz:{seed}:{index}"])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
        sop_class, ts = str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)
        applied = []
        for name in rng.sample(sorted(DATASET_MUTATIONS), rng.randint(1, 2)):
            try:
                DATASET_MUTATIONS[name](ds, rng)
            except Exception:                              # noqa: BLE001 - not applicable to this object
                continue
            applied.append(name)
        ts = str(ds.file_meta.TransferSyntaxUID)            # relabel_ts announces the new one
        try:
            data = encode(ds)
        except Exception:                                  # noqa: BLE001 - pydicom cannot write it
            ds = _copy(bases[base])
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
            ts = str(ds.file_meta.TransferSyntaxUID)
            data = encode(ds)
            applied.append("unencodable")
        if rng.random() < 0.45:
            name = rng.choice(sorted(BYTE_MUTATIONS))
            data = BYTE_MUTATIONS[name](data, rng)
            applied.append(name)
        yield Mutant(index, f"{base}:{'+'.join(applied)}", sop_class, sop, ts, data)


# ---- the SCU ----------------------------------------------------------------------------------------

def part10(mutant: Mutant) -> bytes:
    """The mutant as a Part 10 stream: preamble, file meta from the request, the data set as it is."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = mutant.sop_class
    meta.MediaStorageSOPInstanceUID = mutant.sop_instance
    meta.TransferSyntaxUID = mutant.transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buf = DicomBytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + buf.getvalue() + mutant.data


def send_all(host: str, port: int, mutants: Iterable[Mutant], *, calling: str, called: str,
             per_association: int = 100) -> Iterator[tuple[Mutant, Answer]]:
    """C-STORE every mutant, ``per_association`` to an association; yields each with its answer.

    pynetdicom's chunked sending streams the file's data set as it is, with the request's
    identifiers from the file meta: the SCP gets the bytes exactly as generated. An
    association that breaks is replaced, and the mutant that broke it answered ``None``.
    """
    contexts = [(cls, ts) for cls in uids.SCP_STORAGE_SOP_CLASSES for ts in uids.SCP_TRANSFER_SYNTAXES]
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for cls, ts in contexts:
        ae.add_requested_context(cls, [ts])
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    assoc = None
    sent = 0
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "mutant.dcm"
            for mutant in mutants:
                if assoc is None or not assoc.is_established or sent >= per_association:
                    if assoc is not None and assoc.is_established:
                        assoc.release()
                    assoc = ae.associate(host, port, ae_title=called)
                    assert assoc.is_established, "association not established"
                    sent = 0
                path.write_bytes(part10(mutant))
                sent += 1
                why = "no response"
                try:
                    rsp = assoc.send_c_store(path)
                except (ValueError, RuntimeError, AttributeError) as exc:
                    rsp, why = Dataset(), f"send failed: {exc!r}"
                if "Status" in rsp:
                    yield mutant, Answer(int(rsp.Status), rsp.get("ErrorComment"))
                else:
                    state = "aborted" if assoc.is_aborted else "released" if assoc.is_released else "open"
                    yield mutant, Answer(None, f"{why} (association {state})")
                    if assoc.is_established:
                        assoc.abort()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        if assoc is not None and assoc.is_established:
            assoc.release()
