"""Pixel data to an RGB image, for the SCP's admission check and the classifier.

The SCP calls :func:`verify_decodable` on every received object before it answers, so an image that cannot be decoded is refused with a
status instead of failing later in the pipeline; the pipeline worker calls
:func:`decode_rgb` again on the stored object.

Colour handling (PS3.5 8.2.1, PS3.3 C.7.6.3.1.2): photographic JPEG arrives as
``YBR_FULL_422``: the compressed stream is YCbCr and must be converted to RGB
once, full-range (JFIF/BT.601). For 8-bit JPEG Baseline/Extended in YBR the
frame is decoded directly by libjpeg-turbo (through Pillow), which applies that
conversion itself; this is about five times faster than the generic path, and
the SCP does it for every image. Every other case goes through
``pydicom.pixels.pixel_array(..., as_rgb=True)`` (pylibjpeg / openjpeg / RLE /
native), which converts YBR_FULL(_422) to RGB and leaves YBR_ICT/RCT to the
J2K codec.

Exceptions::

    DecodeError                  pixel data cannot become an RGB image
     +-- NoPixelData             (7FE0,0010) absent or empty
     +-- UnsupportedImage        dimensions/samples/bits/photometric out of bounds
     +-- CorruptPixelData        the codec failed, the frame is truncated, its size
                                 differs from Rows/Columns, or it is not the codestream
                                 its transfer syntax names
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import apply_color_lut, pixel_array
from pydicom.uid import UID

from integration.dicom_scp.uids import (
    JPEG_2000,
    JPEG_2000_LOSSLESS,
    JPEG_BASELINE,
    JPEG_EXTENDED,
    JPEG_LOSSLESS,
    JPEG_LOSSLESS_SV1,
    RLE_LOSSLESS,
)

RGBImage = npt.NDArray[np.uint8]

MONOCHROME: Final = frozenset({"MONOCHROME1", "MONOCHROME2"})
COLOUR: Final = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
PALETTE: Final = "PALETTE COLOR"
# JPEG streams whose YCbCr -> RGB conversion libjpeg performs itself (no Adobe
# APP14 marker saying otherwise): the fast path below.
_FAST_JPEG_SYNTAXES: Final = frozenset({JPEG_BASELINE, JPEG_EXTENDED})
_FAST_JPEG_PHOTOMETRIC: Final = frozenset({"YBR_FULL_422", "YBR_FULL"})
_ADOBE_TRANSFORM_NONE: Final = 0   # APP14 transform 0: components are stored untransformed (RGB)
# What the first bytes of a frame are for each encapsulated transfer syntax the SCP accepts.
# (Pillow, one of pydicom's decoders, opens whatever it recognises: without this check a JPEG
# Baseline stream labelled JPEG 2000 decodes, is stored, and no other reader can open it.)
_STREAM_KIND: Final = {JPEG_BASELINE: "JPEG", JPEG_EXTENDED: "JPEG", JPEG_LOSSLESS: "JPEG",
                       JPEG_LOSSLESS_SV1: "JPEG", JPEG_2000_LOSSLESS: "JPEG 2000", JPEG_2000: "JPEG 2000",
                       RLE_LOSSLESS: "RLE"}
_JPEG_SOI: Final = b"\xff\xd8"
_J2K_SOC_SIZ: Final = b"\xff\x4f\xff\x51"                             # a J2K codestream
_JP2_SIGNATURE: Final = b"\x00\x00\x00\x0cjP  \r\n\x87\n"              # a JP2 file (tolerated)
_RLE_HEADER: Final = 64


class DecodeError(Exception):
    """The pixel data cannot be turned into an RGB image."""


class NoPixelData(DecodeError):
    """Pixel Data (7FE0,0010) is absent or empty."""


class UnsupportedImage(DecodeError):
    """The image attributes are outside what the service accepts."""


class CorruptPixelData(DecodeError):
    """The pixel data is present but does not decode to the declared image."""


@dataclass(frozen=True)
class ImageGeometry:
    """The Image Pixel module attributes the checks and the decoder rely on."""
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    photometric: str
    frames: int
    transfer_syntax: UID

    @property
    def pixels(self) -> int:
        return self.rows * self.columns * self.frames


def geometry(ds: Dataset) -> ImageGeometry:
    """Read the Image Pixel module; raise :class:`NoPixelData` or :class:`UnsupportedImage`."""
    if not has_pixel_data(ds):
        raise NoPixelData("no pixel data")
    try:
        ts = ds.file_meta.TransferSyntaxUID
    except AttributeError as exc:
        raise UnsupportedImage("no transfer syntax") from exc
    try:
        geo = ImageGeometry(
            rows=int(ds.Rows), columns=int(ds.Columns),
            samples_per_pixel=int(ds.SamplesPerPixel),
            bits_allocated=int(ds.BitsAllocated),
            bits_stored=int(ds.get("BitsStored") or ds.BitsAllocated),
            photometric=str(ds.PhotometricInterpretation).strip(),
            frames=int(ds.get("NumberOfFrames") or 1),
            transfer_syntax=UID(ts),
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise UnsupportedImage(f"image pixel module incomplete: {exc}"[:120]) from exc
    return geo


def has_pixel_data(ds: Dataset) -> bool:
    """Pixel Data is present and not empty, found without reading a deferred value."""
    if "PixelData" not in ds:
        return False
    elem = ds.get_item("PixelData")
    if isinstance(elem, RawDataElement):
        if elem.value is None:                          # deferred: still in the file
            return elem.length != 0
        return len(elem.value) > 0
    return bool(elem.value)


def stream_kind(frame: bytes) -> str | None:
    """Which codestream ``frame`` starts as: "JPEG", "JPEG 2000", "RLE", or None."""
    if frame.startswith(_JPEG_SOI):
        return "JPEG"
    if frame.startswith(_J2K_SOC_SIZ) or frame.startswith(_JP2_SIGNATURE):
        return "JPEG 2000"
    if len(frame) >= _RLE_HEADER:
        segments, first = struct.unpack_from("<2I", frame)
        if 1 <= segments <= 15 and first == _RLE_HEADER:
            return "RLE"
    return None


def check_stream(ds: Dataset, geo: ImageGeometry) -> None:
    """The first frame of encapsulated pixel data is the codestream its transfer syntax names."""
    expected = _STREAM_KIND.get(geo.transfer_syntax)
    if expected is None:
        return
    found = stream_kind(_first_frame(ds, geo))
    if found != expected:
        raise CorruptPixelData(f"pixel data is {'a ' + found + ' stream' if found else 'no known codestream'}, "
                               f"the transfer syntax says {expected}")


def check_image(geo: ImageGeometry, max_pixels: int) -> None:
    """Refuse absurd or unsupported images before any decoding (decompression bombs too)."""
    if geo.rows <= 0 or geo.columns <= 0 or geo.frames <= 0:
        raise UnsupportedImage(f"dimensions {geo.rows}x{geo.columns}x{geo.frames}")
    if geo.pixels > max_pixels:
        raise UnsupportedImage(f"{geo.rows}x{geo.columns}x{geo.frames} exceeds {max_pixels} pixels")
    if geo.samples_per_pixel not in (1, 3):
        raise UnsupportedImage(f"samples per pixel {geo.samples_per_pixel}")
    if geo.samples_per_pixel == 3 and geo.photometric not in COLOUR:
        raise UnsupportedImage(f"photometric {geo.photometric} with 3 samples")
    if geo.samples_per_pixel == 1 and geo.photometric not in MONOCHROME | {PALETTE}:
        raise UnsupportedImage(f"photometric {geo.photometric} with 1 sample")
    allowed_bits = (8, 16) if geo.photometric in MONOCHROME else (8,)
    if geo.bits_allocated not in allowed_bits or not 0 < geo.bits_stored <= geo.bits_allocated:
        raise UnsupportedImage(f"bits allocated {geo.bits_allocated} / stored {geo.bits_stored}"
                               f" with {geo.photometric}")


def decode_rgb(ds: Dataset, *, max_pixels: int | None = None) -> RGBImage:
    """The first frame of ``ds`` as an H x W x 3 uint8 RGB array.

    MONOCHROME images are expanded to three equal channels (MONOCHROME1
    inverted, 16-bit scaled to 8 by Bits Stored), PALETTE COLOR through its LUT,
    YBR converted to RGB. ``max_pixels`` applies :func:`check_image` first.
    """
    geo = geometry(ds)
    if max_pixels is not None:
        check_image(geo, max_pixels)
    check_stream(ds, geo)
    if _fast_jpeg(geo):
        rgb = _decode_jpeg_ybr(ds, geo)
        if rgb is not None:
            return rgb
    return _decode_generic(ds, geo)


def verify_decodable(ds: Dataset, geo: ImageGeometry) -> None:
    """The SCP's admission check: the first frame decodes to the declared image
    (``geo``, from :func:`geometry`, already passed :func:`check_image`).

    For 8-bit YBR JPEG the scan is entropy-decoded in full but reconstructed at
    1/8 scale (libjpeg DCT scaling): corrupt or truncated data fails exactly as
    in a full decode, at a quarter of the cost. Everything else is decoded in full.
    First, the frame must be the codestream its transfer syntax names (:func:`check_stream`).
    """
    check_stream(ds, geo)
    if _fast_jpeg(geo) and _decode_jpeg_ybr(ds, geo, reduce=8) is not None:
        return
    _decode_generic(ds, geo)


def _fast_jpeg(geo: ImageGeometry) -> bool:
    return (geo.transfer_syntax in _FAST_JPEG_SYNTAXES and geo.photometric in _FAST_JPEG_PHOTOMETRIC
            and geo.samples_per_pixel == 3 and geo.bits_allocated == 8)


def _first_frame(ds: Dataset, geo: ImageGeometry) -> bytes:
    try:
        return get_frame(ds.PixelData, 0, number_of_frames=geo.frames)
    except (ValueError, KeyError, IndexError, EOFError) as exc:
        raise CorruptPixelData(f"encapsulated pixel data unreadable: {exc}"[:120]) from exc


def _decode_jpeg_ybr(ds: Dataset, geo: ImageGeometry, reduce: int = 1) -> RGBImage | None:
    """libjpeg-turbo decode with its own YCbCr -> RGB; None to fall back to the generic path.

    ``reduce`` > 1 reconstructs at 1/reduce scale (the whole scan is still decoded)."""
    frame = _first_frame(ds, geo)
    try:
        with Image.open(io.BytesIO(frame), formats=("JPEG",)) as im:
            if im.info.get("adobe_transform") == _ADOBE_TRANSFORM_NONE or im.mode != "RGB":
                return None            # stream not YCbCr as libjpeg sees it: let pydicom decide
            if im.size != (geo.columns, geo.rows):
                raise CorruptPixelData(f"JPEG is {im.size[0]}x{im.size[1]}, header says "
                                       f"{geo.columns}x{geo.rows}")
            if reduce > 1:
                im.draft("RGB", (max(1, geo.columns // reduce), max(1, geo.rows // reduce)))
            im.load()
            return np.asarray(im, dtype=np.uint8)
    except CorruptPixelData:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # Pillow raises OSError for truncated/corrupt streams, UnidentifiedImageError (an
        # OSError) for garbage, SyntaxError for broken markers.
        raise CorruptPixelData(f"JPEG does not decode: {exc}"[:120]) from exc


def _decode_generic(ds: Dataset, geo: ImageGeometry) -> RGBImage:
    try:
        # (no warnings.catch_warnings here: it swaps process-wide filters and is not thread-safe)
        arr = pixel_array(ds, index=0 if geo.frames > 1 else None, as_rgb=True)
    except (NotImplementedError, RuntimeError, ValueError, TypeError, KeyError, IndexError,
            EOFError, OSError, AttributeError) as exc:
        # pydicom raises RuntimeError when every codec plugin failed, ValueError for a
        # short/long native buffer, NotImplementedError for an unsupported syntax.
        raise CorruptPixelData(f"pixel data does not decode: {exc}"[:160]) from exc
    if arr.shape[:2] != (geo.rows, geo.columns):
        raise CorruptPixelData(f"decoded {arr.shape}, header says {geo.rows}x{geo.columns}")
    return _to_rgb8(ds, arr, geo)


def _to_rgb8(ds: Dataset, arr: np.ndarray, geo: ImageGeometry) -> RGBImage:
    if geo.photometric == PALETTE:
        arr = apply_color_lut(arr, ds)
        if arr.dtype != np.uint8:      # 16-bit LUT entries
            arr = (arr >> 8).astype(np.uint8)
        return np.ascontiguousarray(arr[..., :3])
    if arr.ndim == 3 and arr.shape[2] == 3:
        return np.ascontiguousarray(arr.astype(np.uint8, copy=False))
    grey = arr.astype(np.int64)
    if ds.get("PixelRepresentation", 0) == 1:
        grey = grey + (1 << (geo.bits_stored - 1))      # signed -> unsigned range
    if geo.bits_stored > 8:
        grey = grey >> (geo.bits_stored - 8)
    grey8 = np.clip(grey, 0, 255).astype(np.uint8)
    if geo.photometric == "MONOCHROME1":
        grey8 = 255 - grey8
    return np.repeat(grey8[..., None], 3, axis=2)
