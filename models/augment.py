"""Training augmentations that mimic other clinics' dermatoscopes.

Geometry (crops, zoom-out, rotation, flips), colour, blur and circular
field-of-view vignettes. Applied before the shared deterministic preprocessing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from inference.preprocess import Image


@dataclass(frozen=True)
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.333)
    rotate: bool = True
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.03
    vignette_p: float = 0.3
    blur_p: float = 0.2
    zoom_out_p: float = 0.15


def _random_crop(img: Image, rng: np.random.Generator, cfg: AugmentConfig) -> Image:
    h, w = img.shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*cfg.crop_scale)
        ratio = math.exp(rng.uniform(math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])))
        cw = int(round(math.sqrt(target * ratio)))
        ch = int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x = int(rng.integers(0, w - cw + 1))
            y = int(rng.integers(0, h - ch + 1))
            return img[y:y + ch, x:x + cw]
    return img


def _zoom_out(img: Image, rng: np.random.Generator) -> Image:
    """Place the image smaller inside a border of its own reflected skin."""
    h, w = img.shape[:2]
    pad = int(min(h, w) * rng.uniform(0.1, 0.3))
    return cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)


def _rotate(img: Image, rng: np.random.Generator) -> Image:
    k = int(rng.integers(0, 4))
    img = np.rot90(img, k).copy()
    angle = rng.uniform(-30, 30)
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    return cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REFLECT_101)


def _colour(img: Image, rng: np.random.Generator, cfg: AugmentConfig) -> Image:
    f = img.astype(np.float32)
    f *= rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    mean = f.mean()
    f = (f - mean) * rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) + mean
    f = np.clip(f, 0, 255).astype(np.uint8)
    hsv = cv2.cvtColor(f, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-cfg.hue, cfg.hue) * 180) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1 - cfg.saturation, 1 + cfg.saturation), 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def _vignette(img: Image, rng: np.random.Generator) -> Image:
    """Black outside a circle: the round field of view of many contact scopes."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = w / 2 + rng.uniform(-0.05, 0.05) * w, h / 2 + rng.uniform(-0.05, 0.05) * h
    r = rng.uniform(0.45, 0.62) * math.hypot(w, h)
    dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    mask = np.clip((r - dist) / (0.03 * r), 0, 1)[..., None]
    return (img.astype(np.float32) * mask).astype(np.uint8)


def augment(img: Image, rng: np.random.Generator, cfg: AugmentConfig) -> Image:
    if rng.random() < cfg.zoom_out_p:
        img = _zoom_out(img, rng)
    img = _random_crop(img, rng, cfg)
    if cfg.rotate:
        img = _rotate(img, rng)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    img = _colour(np.ascontiguousarray(img), rng, cfg)
    if rng.random() < cfg.blur_p:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 1.2))
    if rng.random() < cfg.vignette_p:
        img = _vignette(img, rng)
    return img
