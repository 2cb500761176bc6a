"""The human-readable companion of the AI result: Grad-CAM over the lesion plus a legend.

The legend is burned into the pixels (hence Burned In Annotation YES on the
Secondary Capture), so it must stay legible on any viewer: small images are
upscaled first and the font is sized to the image. Only ASCII text is drawn
(OpenCV's Hershey fonts have no other glyphs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from inference.result import CLASS_NAMES, Prediction

RGBImage = npt.NDArray[np.uint8]  # H x W x 3, RGB order

MIN_WIDTH = 600                   # upscale narrower images so the legend text is readable
MAX_TEXT_SCALE = 1.4
MIN_TEXT_SCALE = 0.45
TOP_K = 3
ALPHA_FLOOR = 0.15                # heatmap weight where CAM = 0 ...
ALPHA_GAIN = 0.45                 # ... plus this much at CAM = 1: the lesion stays visible
BLEND_ROWS = 256                  # the blend runs in bands of rows: float32 temporaries stay small
# zlib level 1 with run-length strategy: about 1.6x faster than OpenCV's default (level 3) and
# smaller too, on these flat-coloured renderings (legend panel, colour map).
PNG_COMPRESSION = 1
PNG_STRATEGY = cv2.IMWRITE_PNG_STRATEGY_RLE
FONT = cv2.FONT_HERSHEY_SIMPLEX
LEGEND_TITLE = "AI result, not a diagnosis"
HEATMAP_NOTE = "Heatmap: red = regions that most drove the top class"

_PANEL_BG = (24, 24, 24)
_TEXT = (235, 235, 235)
_WARN = (255, 190, 60)
_ALERT_BG = (170, 20, 20)
_RISK_COLOURS = {"Low": (120, 210, 120), "Medium": (255, 200, 60), "High": (255, 90, 80)}


class RenderError(ValueError):
    """The image cannot be rendered (not an RGB uint8 array)."""


@dataclass(frozen=True)
class _Line:
    text: str
    colour: tuple[int, int, int] = _TEXT


def render_heatmap(image_rgb: npt.NDArray[np.uint8], prediction: Prediction, notes: Sequence[str] = ()) -> RGBImage:
    """Blend the Grad-CAM over the lesion and add the legend panel below it.

    A not-assessable prediction renders the original image with a banner that
    says why; there is no heatmap to show then. ``notes`` (e.g. that only the first
    frame of a multi-frame source was classified) are added to the legend, highlighted.
    """
    image = _upscaled(_checked_rgb(image_rgb))
    if prediction.assessable and prediction.cam is not None:
        image = _overlay(image, prediction.cam)
    if not prediction.assessable:
        _banner(image, f"NOT ASSESSABLE: {prediction.reason or 'unspecified reason'}")
    lines = _legend_lines(prediction) + [_Line(note.encode("ascii", "replace").decode(), _WARN) for note in notes]
    return np.vstack([image, _legend_panel(image.shape[1], lines)])


def encode_png(rgb: npt.NDArray[np.uint8]) -> bytes:
    """Lossless PNG of an RGB image (for the FHIR report and the web UI)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(_checked_rgb(rgb), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION, cv2.IMWRITE_PNG_STRATEGY, PNG_STRATEGY])
    if not ok:
        raise RenderError("PNG encoding failed")
    return buf.tobytes()


def _checked_rgb(image: npt.NDArray[np.uint8]) -> RGBImage:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
        raise RenderError(f"expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
    return np.ascontiguousarray(image)


def _upscaled(image: RGBImage) -> RGBImage:
    h, w = image.shape[:2]
    if w >= MIN_WIDTH:
        return image.copy()
    factor = MIN_WIDTH / w
    resized = cv2.resize(image, (MIN_WIDTH, max(1, round(h * factor))), interpolation=cv2.INTER_CUBIC)
    return np.asarray(resized, dtype=np.uint8)


def _overlay(image: RGBImage, cam: npt.NDArray[np.float32]) -> RGBImage:
    """Alpha-blend the JET-coloured CAM over ``image``, band by band: a 4000 x 4000 image blended
    in one go held about 50 bytes of float32 temporaries per pixel (+840 MiB), now about 7."""
    h, w = image.shape[:2]
    clean = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float32), nan=0.0), 0.0, 1.0)
    weight = np.asarray(cv2.resize(clean, (w, h), interpolation=cv2.INTER_LINEAR), dtype=np.float32)
    out = np.empty_like(image)
    for top in range(0, h, BLEND_ROWS):
        band = weight[top:top + BLEND_ROWS]
        heat_bgr = cv2.applyColorMap(np.round(band * 255).astype(np.uint8), cv2.COLORMAP_JET)
        heat = cv2.cvtColor(heat_bgr, cv2.COLOR_BGR2RGB).astype(np.float32)
        alpha = (ALPHA_FLOOR + ALPHA_GAIN * band)[..., None]
        blended = (1.0 - alpha) * image[top:top + BLEND_ROWS].astype(np.float32) + alpha * heat
        out[top:top + BLEND_ROWS] = np.clip(blended, 0, 255).astype(np.uint8)
    return out


OOD_NOTE = "Outside the training distribution: interpret with care"


def _legend_lines(p: Prediction) -> list[_Line]:
    model = f"Model: {p.model.name} {p.model.version}"
    if not p.assessable:
        return [_Line(LEGEND_TITLE, _WARN), _Line(f"Not assessable: {p.reason or 'unspecified reason'}", _WARN),
                _Line(model)]
    lines = [_Line(LEGEND_TITLE, _WARN)]
    for rank, (cls, prob) in enumerate(p.ranked()[:TOP_K], start=1):
        lines.append(_Line(f"{rank}. {CLASS_NAMES.get(cls, cls)} ({cls}): {prob * 100:.1f}%"))
    lines.append(_Line(f"Malignancy probability: {p.malignancy_probability * 100:.1f}%"))
    lines.append(_Line(f"Risk level: {p.risk.value}", _RISK_COLOURS.get(p.risk.value, _TEXT)))
    if p.low_confidence:
        lines.append(_Line(f"Low confidence (uncertainty {p.uncertainty:.2f})", _WARN))
    if p.out_of_distribution:
        lines.append(_Line(OOD_NOTE, _WARN))
    lines.append(_Line(HEATMAP_NOTE if p.cam is not None else "Heatmap unavailable"))
    lines.append(_Line(model))
    return lines


def _base_scale(width: int) -> float:
    return min(MAX_TEXT_SCALE, max(MIN_TEXT_SCALE, width / 1000.0))


def _fit_scale(texts: list[str], width: int, margin: int) -> float:
    """The largest font scale at which every line fits the panel width."""
    scale = _base_scale(width)
    for text in texts:
        (tw, _), _ = cv2.getTextSize(text, FONT, 1.0, 1)
        scale = min(scale, (width - 2 * margin) / max(tw, 1) * 0.98)
    return max(scale, 0.3)


def _wrap(text: str, width: int, scale: float, thickness: int) -> list[str]:
    words, out, current = text.split(), [], ""
    for word in words:
        candidate = f"{current} {word}".strip()
        if current and cv2.getTextSize(candidate, FONT, scale, thickness)[0][0] > width:
            out.append(current)
            current = word
        else:
            current = candidate
    return out + ([current] if current else [])


def _legend_panel(width: int, lines: list[_Line]) -> RGBImage:
    margin = max(8, width // 50)
    base = _base_scale(width)
    thickness = max(1, round(base * 1.6))
    # Wrap long lines at the base scale first, then shrink only if a single word is too wide.
    wrapped = [_Line(part, ln.colour) for ln in lines for part in _wrap(ln.text, width - 2 * margin, base, thickness)]
    scale = _fit_scale([ln.text for ln in wrapped], width, margin)
    thickness = max(1, round(scale * 1.6))
    (_, text_h), baseline = cv2.getTextSize("Ag", FONT, scale, thickness)
    step = math.ceil((text_h + baseline) * 1.5)
    panel = np.full((step * len(wrapped) + 2 * margin, width, 3), _PANEL_BG, dtype=np.uint8)
    y = margin + text_h
    for ln in wrapped:
        cv2.putText(panel, ln.text, (margin, y), FONT, scale, ln.colour, thickness, cv2.LINE_AA)
        y += step
    return panel


def _banner(image: RGBImage, text: str) -> None:
    """Draw a red banner across the top of ``image`` (in place)."""
    width = image.shape[1]
    margin = max(8, width // 50)
    scale = _base_scale(width)
    thickness = max(1, round(scale * 1.6))
    parts = _wrap(text, width - 2 * margin, scale, thickness)
    scale = _fit_scale(parts, width, margin)
    (_, text_h), baseline = cv2.getTextSize("Ag", FONT, scale, thickness)
    step = math.ceil((text_h + baseline) * 1.5)
    height = min(image.shape[0], step * len(parts) + 2 * margin)
    image[:height] = _ALERT_BG
    y = margin + text_h
    for part in parts:
        cv2.putText(image, part, (margin, y), FONT, scale, (255, 255, 255), thickness, cv2.LINE_AA)
        y += step
