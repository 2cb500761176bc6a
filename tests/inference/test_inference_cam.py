"""Grad-CAM from the exported feature map: exactness, shape, range, and that it lands on the lesion."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from inference.cam import grad_cam, mass_inside, overlay
from inference.engine import Engine
from tests.inference.sampledata import Sample

MASK_THRESHOLD = 128


def test_cam_equals_grad_cam_of_a_gap_linear_head() -> None:
    """For logit_c = b_c + W_c . mean(A), d logit / dA_k = W_ck / (h*w) everywhere, so Grad-CAM
    (gradient-weighted channels, ReLU) is ReLU(sum_k W_ck A_k) up to scale: checked by finite differences."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(16, 5, 5)).astype(np.float64)
    w = rng.normal(size=(3, 16))
    b = rng.normal(size=3)

    def logit(a: np.ndarray, c: int) -> float:
        return float(w[c] @ a.mean(axis=(1, 2)) + b[c])

    c, eps = 1, 1e-6
    grads = np.zeros_like(feats)
    for idx in np.ndindex(*feats.shape):
        d = np.zeros_like(feats)
        d[idx] = eps
        grads[idx] = (logit(feats + d, c) - logit(feats - d, c)) / (2 * eps)
    alpha = grads.mean(axis=(1, 2))
    reference = np.maximum((alpha[:, None, None] * feats).sum(0), 0)
    reference = cv2.resize(reference.astype(np.float32), (5, 5))
    ours = grad_cam(feats.astype(np.float32), w.astype(np.float32), c, (5, 5))
    np.testing.assert_allclose(ours, reference / reference.max(), atol=1e-4)


def test_cam_has_the_image_size_and_unit_range(engine: Engine, samples: list[Sample]) -> None:
    images = [s.image() for s in samples[:6]]
    for img, p in zip(images, engine.predict(images, cam=True)):
        assert p.cam is not None and p.cam.dtype == np.float32
        assert p.cam.shape == img.shape[:2]
        assert p.cam.min() >= 0.0 and p.cam.max() == pytest.approx(1.0)


def test_cam_is_zero_when_nothing_speaks_for_the_class() -> None:
    feats = np.ones((4, 3, 3), np.float32)
    w = -np.ones((2, 4), np.float32)
    assert not grad_cam(feats, w, 0, (30, 30)).any()


def test_cam_lands_on_the_lesion_more_than_a_uniform_map_would(engine: Engine, samples: list[Sample]) -> None:
    """Mean share of CAM mass inside the lesion mask beats the mask's share of the image
    (what a flat map scores) on the committed samples."""
    preds = engine.predict([s.image() for s in samples], cam=True)
    shares, areas = [], []
    for s, p in zip(samples, preds):
        mask = cv2.imread(str(s.mask), cv2.IMREAD_GRAYSCALE) >= MASK_THRESHOLD
        shares.append(mass_inside(p.cam, mask))
        areas.append(mask.mean())
    assert np.mean(shares) > np.mean(areas) + 0.1, (np.mean(shares), np.mean(areas))


def test_overlay_blends_a_heat_map_of_the_same_size(samples: list[Sample]) -> None:
    img = samples[0].image()
    cam = np.zeros(img.shape[:2], np.float32)
    cam[: img.shape[0] // 2] = 1.0
    out = overlay(img, cam)
    assert out.shape == img.shape and out.dtype == np.uint8
    # JET: hot (red) where cam = 1, cold (blue) where cam = 0
    top, bottom = out[: img.shape[0] // 2].astype(int), out[img.shape[0] // 2:].astype(int)
    assert (top[..., 0] - img[: img.shape[0] // 2, :, 0]).mean() > (bottom[..., 0] - img[img.shape[0] // 2:, :, 0]).mean()
    with pytest.raises(ValueError, match="does not match"):
        overlay(img, cam[:10])
