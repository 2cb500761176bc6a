"""Image preprocessing shared, byte for byte, by training and the service.

Training (``models/train.py``) imports these functions so that the pixels the
model sees in the hospital are prepared exactly as in training.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
import numpy.typing as npt

Image = npt.NDArray[np.uint8]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RGB = 3
_N_LEVELS = 256
_LEVELS = np.arange(_N_LEVELS, dtype=np.float32)   # every uint8 value, as the float32 the arithmetic sees


def shades_of_gray(img: Image, p: int = 6) -> Image:
    """Colour constancy (Finlayson & Trezzi 2004): scale channels so the
    Minkowski p-norm of each is equal, removing the illuminant / camera cast.

    The arithmetic is exactly that of the original (``_shades_of_gray_reference``),
    so the output is uint8-identical, with two cheaper steps: numpy's float32 mean
    over the pixels of a C-contiguous HxWx3 array adds pixel after pixel (no pairwise
    summation), as cv2.reduce's float32 column sum does, without numpy's per-pixel loop;
    and the per-pixel ``clip(v * gain)`` takes only 256 values per channel, so it is
    computed once per value and applied as a lookup table."""
    if not (img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == _RGB and img.size
            and img.flags.c_contiguous):
        return _shades_of_gray_reference(img, p)
    powered = np.power(img.astype(np.float32), p).reshape(-1, _RGB)
    sums = np.asarray(cv2.reduce(powered, 0, cv2.REDUCE_SUM, dtype=cv2.CV_32F), np.float32).reshape(_RGB)
    # as np.mean divides: the float32 sums by an intp count, computed in float64, stored as float32
    mean = np.true_divide(sums, np.intp(len(powered)), out=sums, casting="unsafe")
    norm = np.power(mean, 1.0 / p)
    norm = np.maximum(norm, 1e-6)
    gain = np.sqrt(np.sum(norm**2)) / (norm * np.sqrt(3.0))
    table = np.clip(_LEVELS[:, None] * gain, 0, 255).astype(np.uint8)
    return np.asarray(cv2.LUT(img, table.reshape(_N_LEVELS, 1, _RGB)), dtype=np.uint8)


def _shades_of_gray_reference(img: Image, p: int = 6) -> Image:
    """The original Shades of Gray, for inputs the fast path does not cover."""
    f = img.astype(np.float32)
    norm = np.power(np.mean(np.power(f, p), axis=(0, 1)), 1.0 / p)
    norm = np.maximum(norm, 1e-6)
    gain = np.sqrt(np.sum(norm**2)) / (norm * np.sqrt(3.0))
    return np.clip(f * gain, 0, 255).astype(np.uint8)


def remove_hair(img: Image, kernel: int = 9, threshold: int = 12) -> Image:
    """Hair removal: morphological black-hat finds thin dark strands, then
    inpainting fills them from their surroundings (DullRazor-style)."""
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    se = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel, kernel))
    blackhat = cv2.morphologyEx(grey, cv2.MORPH_BLACKHAT, se)
    _, mask = cv2.threshold(blackhat, threshold, 255, cv2.THRESH_BINARY)
    if not mask.any():
        return img
    return np.asarray(cv2.inpaint(img, mask, 3, cv2.INPAINT_TELEA), dtype=np.uint8)


def resize_square(img: Image, size: int) -> Image:
    """Squash to size x size: the whole field of view is kept, as external sets
    (ISIC 2017, 256x256) were squashed rather than cropped."""
    interp = cv2.INTER_AREA if min(img.shape[:2]) > size else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(img, (size, size), interpolation=interp), dtype=np.uint8)


def normalise(img: Image, mean: tuple[float, ...] = IMAGENET_MEAN,
              std: tuple[float, ...] = IMAGENET_STD,
              out: npt.NDArray[np.float32] | None = None) -> npt.NDArray[np.float32]:
    """uint8 HWC RGB -> float32 CHW, ImageNet-normalised (into ``out``, a CxHxW
    float32 array, when given, e.g. a slot of a batch).

    Each channel takes only 256 values: they are computed once, with the original
    float32 operations (bit-identical), and applied as a lookup table per plane."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != _RGB or len(mean) != _RGB or len(std) != _RGB:
        ref = _normalise_reference(img, mean, std)
        if out is None:
            return ref
        out[...] = ref
        return out
    if out is None:
        out = np.empty((_RGB, *img.shape[:2]), np.float32)
    table = _normalise_table(tuple(mean), tuple(std))
    for c, plane in enumerate(cv2.split(np.ascontiguousarray(img))):
        dst = out[c]
        if dst.flags.c_contiguous:
            cv2.LUT(plane, table[c], dst=dst)
        else:                                  # cv2 writes only into contiguous planes
            dst[...] = cv2.LUT(plane, table[c])
    return out


@functools.lru_cache(maxsize=8)
def _normalise_table(mean: tuple[float, ...], std: tuple[float, ...]) -> npt.NDArray[np.float32]:
    """(C, 256) float32: the normalised value of every uint8 level per channel."""
    levels = np.repeat(_LEVELS.astype(np.uint8)[None, :, None], len(mean), axis=2)   # (1, 256, C)
    table = _normalise_reference(levels, mean, std)[:, 0, :]                         # (C, 256)
    table = np.ascontiguousarray(table)
    table.setflags(write=False)
    return table


def _normalise_reference(img: Image, mean: tuple[float, ...], std: tuple[float, ...]) -> npt.NDArray[np.float32]:
    """The original per-pixel normalisation (also builds the lookup tables)."""
    f = img.astype(np.float32) / np.float32(255.0)
    f = np.divide(np.subtract(f, np.asarray(mean, np.float32)), np.asarray(std, np.float32), dtype=np.float32)
    return np.ascontiguousarray(f.transpose(2, 0, 1), dtype=np.float32)


def prepare(img: Image, size: int, *, colour_constancy: bool = True, hair_removal: bool = False,
            out: npt.NDArray[np.float32] | None = None) -> npt.NDArray[np.float32]:
    """The full deterministic preprocessing of one RGB uint8 image (into ``out``, a
    3 x size x size float32 array, when given)."""
    pixels = resize_square(img, size)
    if hair_removal:
        pixels = remove_hair(pixels)
    if colour_constancy:
        pixels = shades_of_gray(pixels)
    return normalise(pixels, out=out)
