"""The fast preprocessing and TTA paths give exactly what the original code gave.

The reference functions below are verbatim copies of ``inference/preprocess.py``
and ``inference/engine.py`` at m15 (before the fast paths): training used them,
so the served model must keep seeing the same tensors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from inference.postprocess import GateStats, gate_stats
from inference.cam import grad_cam
from inference.engine import _VIEW_FN, D8_VIEWS, TTA_VIEWS, Engine, load_image, tta_batch
from inference.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalise, prepare, resize_square, shades_of_gray
from tests.inference.sampledata import load_samples

INPUT_SIZE = 160
# Float32 rounding of the model's outputs when the same input tensor is laid out differently
PROBABILITY_ATOL = 1e-5
ODD_SIZES = ((1, 1), (7, 3), (64, 65), (97, 131), (150, 200), (161, 159), (450, 600))


def reference_shades_of_gray(img: npt.NDArray[np.uint8], p: int = 6) -> npt.NDArray[np.uint8]:
    f = img.astype(np.float32)
    norm = np.power(np.mean(np.power(f, p), axis=(0, 1)), 1.0 / p)
    norm = np.maximum(norm, 1e-6)
    gain = np.sqrt(np.sum(norm**2)) / (norm * np.sqrt(3.0))
    return np.clip(f * gain, 0, 255).astype(np.uint8)


def reference_normalise(img: npt.NDArray[np.uint8], mean: tuple[float, ...] = IMAGENET_MEAN,
                        std: tuple[float, ...] = IMAGENET_STD) -> npt.NDArray[np.float32]:
    f = img.astype(np.float32) / np.float32(255.0)
    f = np.divide(np.subtract(f, np.asarray(mean, np.float32)), np.asarray(std, np.float32), dtype=np.float32)
    return np.ascontiguousarray(f.transpose(2, 0, 1), dtype=np.float32)


def reference_prepare(img: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.float32]:
    return reference_normalise(reference_shades_of_gray(resize_square(img, size)))


def reference_tta_batch(x: npt.NDArray[np.float32], views: Sequence[str] = TTA_VIEWS) -> npt.NDArray[np.float32]:
    return np.ascontiguousarray(np.concatenate([_VIEW_FN[v](x) for v in views], axis=0))


def reference_gate_stats(image: npt.NDArray[np.uint8]) -> GateStats:
    h, w = image.shape[:2]
    scale = 128 / max(h, w)
    small = np.asarray(cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                                  interpolation=cv2.INTER_AREA), np.uint8) if scale < 1 else image
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    raw = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
    raw_informative = (raw[..., 1] >= 64) & (raw[..., 2] >= 40)
    green = raw_informative & (raw[..., 0] >= 35) & (raw[..., 0] <= 85)
    hsv = cv2.cvtColor(reference_shades_of_gray(small), cv2.COLOR_RGB2HSV)
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    informative = (sat >= 64) & (val >= 40)
    non_skin = informative & (hue >= 35) & (hue <= 150)
    return GateStats(min(h, w), float(grey.std()), float((raw[..., 1] >= 24).mean()),
                     float(green.mean()), float(non_skin.mean()))


def varied_images() -> list[npt.NDArray[np.uint8]]:
    """Real dermoscopy at several sizes, casts, noise, flat and extreme frames."""
    rng = np.random.default_rng(15)
    real = [s.image() for s in load_samples()[:4]]
    out: list[npt.NDArray[np.uint8]] = list(real)
    for k, (h, w) in enumerate(ODD_SIZES):
        base = real[k % len(real)]
        out.append(np.asarray(cv2.resize(base, (w, h), interpolation=cv2.INTER_AREA), np.uint8))
        out.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    cast = real[0].astype(np.float32) * np.array([0.6, 0.9, 1.3], np.float32)
    out.append(np.clip(cast, 0, 255).astype(np.uint8))                       # strong blue cast
    out.append(np.zeros((120, 90, 3), np.uint8))                              # black
    out.append(np.full((120, 90, 3), 255, np.uint8))                          # saturated white
    out.append(np.full((33, 47, 3), (200, 30, 90), np.uint8))                 # flat colour
    out.append(np.ascontiguousarray(real[1][::-1, ::2]))                      # decimated
    return out


@pytest.mark.parametrize("p", [1, 2, 6])
def test_shades_of_gray_is_uint8_identical(p: int) -> None:
    for img in varied_images():
        np.testing.assert_array_equal(shades_of_gray(img, p), reference_shades_of_gray(img, p))


def test_shades_of_gray_non_contiguous_input_is_identical() -> None:
    """Views (flipped, strided) go through the original code and still match."""
    img = load_samples()[0].image()
    for view in (img[::-1], img[:, ::3], img[10:90, 20:140]):
        np.testing.assert_array_equal(shades_of_gray(view), reference_shades_of_gray(view))
    wide = img.astype(np.uint16) * 3                                         # not uint8: the original code
    np.testing.assert_array_equal(shades_of_gray(wide), reference_shades_of_gray(wide))


def test_normalise_is_bit_identical_and_fills_out() -> None:
    for img in varied_images():
        ref = reference_normalise(img)
        np.testing.assert_array_equal(normalise(img), ref)
        slot = np.full((2, *ref.shape), np.nan, np.float32)
        dst = slot[1]
        assert normalise(img, out=dst) is dst
        np.testing.assert_array_equal(slot[1], ref)
        assert np.isnan(slot[0]).all()
    odd = (0.5, 0.25, 0.125), (0.3, 0.2, 0.1)
    img = varied_images()[0]
    np.testing.assert_array_equal(normalise(img, *odd), reference_normalise(img, *odd))
    for view in (img[::-1], img[:, ::3], img[10:90, 20:140]):
        np.testing.assert_array_equal(normalise(view), reference_normalise(view))
    strided = np.zeros((3, img.shape[0], 2 * img.shape[1]), np.float32)[:, :, ::2]
    normalise(img, out=strided)
    np.testing.assert_array_equal(strided, reference_normalise(img))


def test_gate_stats_are_identical() -> None:
    rng = np.random.default_rng(7)
    hues = [np.clip(rng.normal((r, g, b), 25, (40, 60, 3)), 0, 255).astype(np.uint8)
            for r, g, b in ((40, 200, 60), (30, 80, 220), (150, 40, 200), (200, 150, 130))]
    for img in varied_images() + hues:
        assert gate_stats(img) == reference_gate_stats(img)


def test_prepare_matches_reference_within_float32_tolerance() -> None:
    for img in varied_images():
        np.testing.assert_allclose(prepare(img, INPUT_SIZE), reference_prepare(img, INPUT_SIZE), rtol=0, atol=1e-5)


@pytest.mark.parametrize("views", [TTA_VIEWS, D8_VIEWS, ("identity",)])
def test_tta_batch_is_identical(views: tuple[str, ...]) -> None:
    x = np.random.default_rng(3).normal(size=(5, 3, 16, 16)).astype(np.float32)
    got = tta_batch(x, views)
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, reference_tta_batch(x, views))


def test_engine_batch_tensor_matches_reference(engine: Engine) -> None:
    """The tensor the engine feeds the model (preprocessed in place, views filled in) is
    exactly the one the original stack + concatenate built, on every host thread count."""
    images = varied_images()
    ref = reference_tta_batch(np.stack([reference_prepare(im, INPUT_SIZE) for im in images]),
                              engine.manifest.tta_views)
    for threads in (1, 3):
        got = engine.batch_tensor(images, host_threads=threads)
        np.testing.assert_array_equal(got, ref)


def test_predictions_match_reference_on_samples(engine: Engine) -> None:
    """Probabilities from the fast path equal those of the original preprocessing run
    through the same session, on every bundled and test sample."""
    paths = sorted((Path(__file__).resolve().parents[2] / "dermgate" / "samples").glob("*.jpg"))
    images = [load_image(p) for p in paths] + [s.image() for s in load_samples()] + varied_images()[-6:]
    preds = engine.predict(images, cam=False)
    x = np.stack([reference_prepare(im, INPUT_SIZE) for im in images])
    logits, _ = engine.run(reference_tta_batch(x, engine.manifest.tta_views))
    from inference.engine import merge_tta
    probs = engine.calibration.probabilities(merge_tta(logits, len(images)))
    got = np.array([[p.probabilities[c] for c in p.probabilities] for p in preds])
    np.testing.assert_allclose(got, probs, rtol=0, atol=PROBABILITY_ATOL)


def reference_grad_cam(features: npt.NDArray[np.float32], fc_weight: npt.NDArray[np.float32], class_index: int,
                       out_hw: tuple[int, int]) -> npt.NDArray[np.float32]:
    weighted = np.tensordot(fc_weight[class_index].astype(np.float32), features.astype(np.float32), axes=1)
    cam = np.maximum(weighted, 0.0)
    h, w = out_hw
    out = np.asarray(cv2.resize(cam.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR), np.float32)
    peak = float(out.max())
    out = out / peak if peak > 0 else np.zeros_like(out)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def test_grad_cam_is_identical() -> None:
    """The in-place scaling gives the original map, also when no location speaks for the class."""
    rng = np.random.default_rng(11)
    weight = rng.normal(size=(7, 64)).astype(np.float32)
    feats = rng.random((64, 5, 5)).astype(np.float32)
    for k, hw in [(0, (450, 600)), (3, (7, 3)), (6, (150, 200))]:
        got = grad_cam(feats, weight, k, hw)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, reference_grad_cam(feats, weight, k, hw))
    np.testing.assert_array_equal(grad_cam(feats, -np.abs(weight), 0, (9, 11)), np.zeros((9, 11), np.float32))


def test_reused_input_buffer_gives_the_same_predictions(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kept input buffer is fully rewritten each batch: a large batch, then a smaller one with
    other images, give what fresh buffers give."""
    images = varied_images()
    fresh = [engine.predict(b, cam=False) for b in (images[:12], images[12:17])]
    monkeypatch.setattr(engine, "reuse_input_buffer", True)
    reused = [engine.predict(b, cam=False) for b in (images[:12], images[12:17])]
    assert [[p.probabilities for p in b] for b in reused] == [[p.probabilities for p in b] for b in fresh]


def test_host_pool_is_remade_in_a_forked_child(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool inherited through fork has no threads; the engine makes a new one (no hang)."""
    images = varied_images()[:8]
    expected = engine.batch_tensor(images, host_threads=2)
    inherited = engine._host_pool(2)
    monkeypatch.setattr(engine, "_pool_pid", -1)                   # as seen from a forked child
    np.testing.assert_array_equal(engine.batch_tensor(images, host_threads=2), expected)
    assert engine._pool is not inherited
