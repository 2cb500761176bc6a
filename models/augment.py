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
    # "reflect" copies the lesion into the border (the recipe of 1.x);
    # "skin_or_black" pads with the image's own border colour or black, as other
    # scopes frame a smaller lesion.
    zoom_out_fill: str = "reflect"
    zoom_out_max: float = 0.3
    # Camera corruptions (MedMNIST-C's dermatoscopy catalogue), all off by default.
    jpeg_p: float = 0.0          # re-encode at quality 30-90
    rescale_p: float = 0.0       # down to 35-80 %, then back up
    gamma_p: float = 0.0         # gamma 0.6-1.6
    noise_p: float = 0.0         # Gaussian sensor noise, sigma 2-10 grey levels
    dark_corner_p: float = 0.0   # darker corners (lens fall-off), not a hard circle


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


def _zoom_out(img: Image, rng: np.random.Generator, cfg: AugmentConfig) -> Image:
    """Place the image smaller inside a border: the lesion looks smaller in frame."""
    h, w = img.shape[:2]
    pad = int(min(h, w) * rng.uniform(0.1, cfg.zoom_out_max))
    if cfg.zoom_out_fill == "reflect":
        return cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    if rng.random() < 0.5:
        colour = (0, 0, 0)
    else:  # the median colour of the outer ring: the surrounding skin, never the lesion
        ring = np.concatenate([img[:4].reshape(-1, 3), img[-4:].reshape(-1, 3),
                               img[:, :4].reshape(-1, 3), img[:, -4:].reshape(-1, 3)])
        colour = tuple(int(c) for c in np.median(ring, axis=0))
    return cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=colour)


def _jpeg(img: Image, rng: np.random.Generator) -> Image:
    ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(30, 91))])
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]) if ok else img


def _rescale(img: Image, rng: np.random.Generator) -> Image:
    h, w = img.shape[:2]
    f = rng.uniform(0.35, 0.8)
    small = cv2.resize(img, (max(8, int(w * f)), max(8, int(h * f))), interpolation=cv2.INTER_AREA)
    return np.asarray(cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR), dtype=np.uint8)


def _gamma(img: Image, rng: np.random.Generator) -> Image:
    lut = (255.0 * (np.arange(256) / 255.0) ** rng.uniform(0.6, 1.6)).astype(np.uint8)
    return np.asarray(cv2.LUT(img, lut), dtype=np.uint8)


def _noise(img: Image, rng: np.random.Generator) -> Image:
    noisy = img.astype(np.float32) + rng.normal(0, rng.uniform(2, 10), img.shape).astype(np.float32)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _dark_corners(img: Image, rng: np.random.Generator) -> Image:
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = np.sqrt(((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2) / math.sqrt(2)
    fall = 1 - rng.uniform(0.3, 0.8) * np.clip(d, 0, 1) ** 2
    return (img.astype(np.float32) * fall[..., None]).astype(np.uint8)


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
        img = _zoom_out(img, rng, cfg)
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
    # Camera corruptions; each draw happens only when its probability is set, so a
    # 1.x config replays exactly the augmentation stream it was trained with.
    for p, fn in ((cfg.gamma_p, _gamma), (cfg.dark_corner_p, _dark_corners), (cfg.rescale_p, _rescale),
                  (cfg.noise_p, _noise), (cfg.jpeg_p, _jpeg)):
        if p and rng.random() < p:
            img = fn(img, rng)
    return img
