"""Image preprocessing shared, byte for byte, by training and the service.

Training (``models/train.py``) imports these functions so that the pixels the
model sees in the hospital are prepared exactly as in training.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

Image = npt.NDArray[np.uint8]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def shades_of_gray(img: Image, p: int = 6) -> Image:
    """Colour constancy (Finlayson & Trezzi 2004): scale channels so the
    Minkowski p-norm of each is equal, removing the illuminant / camera cast."""
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
              std: tuple[float, ...] = IMAGENET_STD) -> npt.NDArray[np.float32]:
    """uint8 HWC RGB -> float32 CHW, ImageNet-normalised."""
    f = img.astype(np.float32) / np.float32(255.0)
    f = np.divide(np.subtract(f, np.asarray(mean, np.float32)), np.asarray(std, np.float32), dtype=np.float32)
    return np.ascontiguousarray(f.transpose(2, 0, 1), dtype=np.float32)


def prepare(img: Image, size: int, *, colour_constancy: bool = True,
            hair_removal: bool = False) -> npt.NDArray[np.float32]:
    """The full deterministic preprocessing of one RGB uint8 image."""
    out = resize_square(img, size)
    if hair_removal:
        out = remove_hair(out)
    if colour_constancy:
        out = shades_of_gray(out)
    return normalise(out)
