"""Turn raw logits into what a clinician is shown: calibrated probabilities,
malignancy probability, risk level, uncertainty; and the quality gate that says
"not assessable" for images the model was never meant to see.

Risk levels (cut-offs chosen on the validation split by ``models/export.py``
and stored in the manifest):

    Low     p_malignant <  referral_threshold   (threshold gives >= 0.95 validation sensitivity)
    Medium  referral_threshold <= p_malignant < high_risk_threshold
    High    p_malignant >= high_risk_threshold  (max(0.5, the threshold at 0.95 validation specificity))
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from inference.errors import InvalidInputError
from inference.preprocess import shades_of_gray
from inference.result import CLASSES, MALIGNANT, Risk

FloatArray = npt.NDArray[np.float32]

# Quality gate, checked against all of HAM10000 (10,015) and ISIC 2017 (2,750):
# every one of those images passes, with the margins noted (models/MODEL_CARD.md).
MIN_SIDE_PX = 64               # smaller carries no dermoscopic structure (data: >= 150)
MIN_GREY_STD = 3.0             # blank or uniform; JPEG noise alone gives ~1 (data: >= 4.7)
MIN_COLOURED_FRACTION = 0.01   # greyscale scans, radiographs, documents (data: >= 0.015)
MAX_NON_SKIN_FRACTION = 0.75   # saturated green/cyan/blue/violet pixels after colour constancy
                               # (data: <= 0.59, a blue naevus)
MAX_GREEN_FRACTION = 0.5       # saturated green pixels as captured: skin under any dermatoscope
                               # light is never green, unlike a blue cast (data: <= 0.26, 99.9% <= 0.1)
_GREEN_HUE = (35, 85)          # OpenCV hue: 70-170 degrees
_COLOURED_SATURATION = 24    # OpenCV saturation (0-255) above which a pixel counts as coloured
_GATE_SIDE = 128             # the colour/contrast checks run on a downscaled copy: cheap, size-independent
_NON_SKIN_HUE = (35, 150)    # OpenCV hue (0-180): 70-300 degrees; skin, blood and pigment lie outside
_MIN_SATURATION = 64         # below this a pixel is greyish and says nothing about hue
_MIN_VALUE = 40              # the black field-of-view corners of many dermatoscopes
_HSV_MAX = 255               # the top of OpenCV's 8-bit H, S and V ranges (inRange's open upper bound)


@dataclass(frozen=True)
class Calibration:
    """Temperature, malignancy bias and risk cut-offs for one inference mode (plain or TTA)."""
    temperature: float
    referral_threshold: float
    high_risk_threshold: float
    low_confidence_threshold: float
    malignancy_bias: float = 0.0

    @classmethod
    def from_json(cls, d: dict) -> Calibration:
        return cls(float(d["temperature"]), float(d["referral_threshold"]),
                   float(d["high_risk_threshold"]), float(d["low_confidence_threshold"]),
                   float(d.get("malignancy_bias", 0.0)))

    def probabilities(self, logits: FloatArray) -> FloatArray:
        """Calibrated 7-class probabilities of raw ``logits``."""
        return calibrated(logits, self.temperature, self.malignancy_bias)


def softmax(logits: npt.ArrayLike, temperature: float = 1.0) -> FloatArray:
    """Row-wise softmax of ``logits / temperature`` (temperature scaling, Guo et al. 2017)."""
    z = np.asarray(logits, np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def calibrated(logits: FloatArray, temperature: float, malignancy_bias: float = 0.0) -> FloatArray:
    """softmax(logits / T + b * [class is malignant]).

    The temperature calibrates confidence over the 7 classes; the bias, one
    number added to the mel, bcc and akiec logits, calibrates P(malignant),
    which a class-weighted loss inflates. It moves mass between the malignant
    and benign groups only: P(malignant) stays the sum of its three classes,
    its ranking (AUC) is unchanged, and ratios within each group are kept."""
    z = np.asarray(logits, np.float64) / temperature
    if malignancy_bias:
        z = z.copy()
        z[..., MALIGNANT_IDX] += malignancy_bias
    return softmax(z)


def normalised_entropy(p: FloatArray) -> FloatArray:
    """Shannon entropy divided by log(K): 0 = certain, 1 = uniform over the K classes."""
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1.0)
    h = -(p * np.log(p)).sum(axis=-1) / np.log(p.shape[-1])
    return np.clip(h, 0.0, 1.0).astype(np.float32)


MALIGNANT_IDX = [CLASSES.index(c) for c in MALIGNANT]


def malignancy(p: FloatArray) -> FloatArray:
    """P(malignant) = P(mel) + P(bcc) + P(akiec)."""
    return np.asarray(p)[..., MALIGNANT_IDX].sum(axis=-1)


def risk_level(p_malignant: float, cal: Calibration) -> Risk:
    if p_malignant >= cal.high_risk_threshold:
        return Risk.HIGH
    if p_malignant >= cal.referral_threshold:
        return Risk.MEDIUM
    return Risk.LOW


def check_image(image: object) -> npt.NDArray[np.uint8]:
    """Return ``image`` if it is an HxWx3 uint8 array, else raise InvalidInputError."""
    if not isinstance(image, np.ndarray):
        raise InvalidInputError(f"expected a numpy array (HxWx3 uint8 RGB), got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InvalidInputError(f"expected dtype uint8 (RGB 0-255), got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidInputError(f"expected shape HxWx3 (RGB), got {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InvalidInputError(f"empty image {image.shape}")
    return image


@dataclass(frozen=True)
class GateStats:
    """The numbers the quality gate decides on (kept for calibration and the model card)."""
    min_side: int
    grey_std: float
    coloured_fraction: float
    green_fraction: float
    non_skin_fraction: float


def gate_stats(image: npt.NDArray[np.uint8]) -> GateStats:
    h, w = image.shape[:2]
    scale = _GATE_SIDE / max(h, w)
    small = np.asarray(cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                                  interpolation=cv2.INTER_AREA), np.uint8) if scale < 1 else image
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    raw = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
    # Each mask is one cv2.inRange over (hue, saturation, value); a fraction is its count over all pixels.
    green = cv2.inRange(raw, (_GREEN_HUE[0], _MIN_SATURATION, _MIN_VALUE), (_GREEN_HUE[1], _HSV_MAX, _HSV_MAX))
    coloured = cv2.inRange(raw, (0, _COLOURED_SATURATION, 0), (_HSV_MAX, _HSV_MAX, _HSV_MAX))
    # Hue is judged after colour constancy too, as the model sees it: many older
    # dermatoscopes give skin a strong blue cast that Shades of Gray removes (but it
    # also neutralises a uniformly green frame, hence the raw green check).
    hsv = cv2.cvtColor(shades_of_gray(small), cv2.COLOR_RGB2HSV)
    non_skin = cv2.inRange(hsv, (_NON_SKIN_HUE[0], _MIN_SATURATION, _MIN_VALUE),
                           (_NON_SKIN_HUE[1], _HSV_MAX, _HSV_MAX))
    # Fractions of ALL pixels: a greyish image with a few blue pixels is not "non-skin".
    n = grey.size
    return GateStats(min(h, w), float(grey.std()), cv2.countNonZero(coloured) / n,
                     cv2.countNonZero(green) / n, cv2.countNonZero(non_skin) / n)


def assess(image: npt.NDArray[np.uint8]) -> str | None:
    """Why this image is not dermoscopy-like, or None when it may be classified.

    Deliberately simple heuristics, each a documented named constant: a model
    answer on a blank frame, a greyscale scan or a photo of a green wall is worse
    than no answer. It is no out-of-distribution detector: a clinical close-up of
    skin passes."""
    s = gate_stats(image)
    if s.min_side < MIN_SIDE_PX:
        return f"image too small ({image.shape[1]}x{image.shape[0]} px; at least {MIN_SIDE_PX} px a side)"
    if s.grey_std < MIN_GREY_STD:
        return f"blank or near-uniform image (grey std {s.grey_std:.1f} < {MIN_GREY_STD})"
    if s.coloured_fraction < MIN_COLOURED_FRACTION:
        return (f"greyscale or colourless image ({s.coloured_fraction:.0%} of pixels coloured); "
                "dermoscopy images are colour photographs")
    if s.green_fraction > MAX_GREEN_FRACTION:
        return f"mostly green ({s.green_fraction:.0%} of pixels); not a dermoscopy image of skin"
    if s.non_skin_fraction > MAX_NON_SKIN_FRACTION:
        return (f"mostly non-skin colours ({s.non_skin_fraction:.0%} of pixels green/blue/violet "
                "after colour constancy); not a dermoscopy image")
    return None
