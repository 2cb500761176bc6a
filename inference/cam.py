"""Grad-CAM from the exported graph's second output, exact for the served model.

The classifier head is global-average-pool then one linear layer:

    logit_c = b_c + sum_k W_ck * mean_ij A_kij

so d logit_c / d A_kij = W_ck / (h*w) is the same at every position. Grad-CAM's
channel weights (the spatially averaged gradients) are therefore W_ck / (h*w),
and Grad-CAM = ReLU(sum_k W_ck A_k) up to a positive factor, i.e. exactly CAM
(Zhou et al. 2016; Selvaraju et al. 2017, section 3.1). No backward pass and no
framework are needed: the map is the feature map ``A`` (ONNX output
``features``) weighted by the fc row of the class, which the manifest carries
and the engine checks against the graph's own logits at load.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]


def grad_cam(features: FloatArray, fc_weight: FloatArray, class_index: int,
             out_hw: tuple[int, int]) -> FloatArray:
    """Grad-CAM (= CAM here) of ``class_index`` for one image.

    features: (K, h, w) last conv feature map; fc_weight: (C, K).
    Returns (H, W) float32 in [0, 1] at ``out_hw``, the original image's size;
    all zeros when no location speaks for the class."""
    if features.ndim != 3 or fc_weight.shape[1] != features.shape[0]:
        raise ValueError(f"features {features.shape} do not match fc weight {fc_weight.shape}")
    weighted = np.tensordot(fc_weight[class_index].astype(np.float32), features.astype(np.float32), axes=1)
    cam = np.maximum(weighted, 0.0)  # ReLU: keep only evidence for the class
    h, w = out_hw
    # Bilinear upsampling of the coarse (e.g. 5x5) grid to the image, as Grad-CAM does
    # (cubic would overshoot); then scale so the peak is 1.
    out = np.asarray(cv2.resize(cam.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR), np.float32)
    peak = float(out.max())
    if not peak > 0:
        return np.zeros_like(out)
    # in place: the same float32 division and clip as out / peak, without two image-sized copies
    np.divide(out, peak, out=out)
    return np.clip(out, 0.0, 1.0, out=out)


def overlay(image_rgb: npt.NDArray[np.uint8], cam: FloatArray, alpha: float = 0.4) -> npt.NDArray[np.uint8]:
    """Blend a JET heat map of ``cam`` over the image (RGB uint8, same size as the image)."""
    if image_rgb.shape[:2] != cam.shape:
        raise ValueError(f"cam {cam.shape} does not match image {image_rgb.shape[:2]}")
    grey = (np.clip(cam, 0, 1) * 255).astype(np.uint8)
    heat = cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return np.asarray(cv2.addWeighted(image_rgb, 1.0 - alpha, heat, alpha, 0.0), dtype=np.uint8)


def mass_inside(cam: FloatArray, mask: npt.NDArray[np.bool_]) -> float:
    """Share of the positive CAM mass that lies inside ``mask`` (NaN when the map is empty)."""
    total = float(cam.sum())
    return float(cam[mask].sum()) / total if total > 0 else float("nan")
