"""Out-of-distribution score and drift statistics (inference/ood.py) and the engine's use of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.ood import STATS_FILE, fit, image_stats, load_for, psi, reference_bins


def blobs(rng: np.random.Generator, n: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 3, n)
    centres = np.eye(3, 40) * 6
    return centres[y] + rng.normal(0, 1, (n, 40)) + shift, y


def test_mahalanobis_score_separates_shifted_features_and_survives_a_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = blobs(rng, 2000)
    stats = fit(x, y, 3, dims=8, onnx_sha256="ab" * 32)
    inside, outside = stats.score(blobs(rng, 300)[0]), stats.score(blobs(rng, 300, shift=2.5)[0])
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(np.r_[np.zeros(300), np.ones(300)], np.r_[inside, outside]) > 0.95
    stats.threshold = float(np.percentile(inside, 95))
    stats.reference["brightness"] = reference_bins(rng.normal(120, 20, 1000))
    stats.class_mix = np.array([0.5, 0.3, 0.2])
    stats.save(tmp_path / STATS_FILE)
    again, why = load_for(tmp_path, "ab" * 32)
    assert why is None and again is not None
    assert np.allclose(again.score(x[:10]), stats.score(x[:10]), rtol=1e-5)
    assert again.threshold == stats.threshold
    other, why = load_for(tmp_path, "cd" * 32)
    assert other is None and "another model" in (why or "")


def test_psi_is_small_for_the_same_population_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(1)
    edges, frac = reference_bins(rng.normal(0, 1, 5000))
    assert psi(frac, edges, rng.normal(0, 1, 1000)) < 0.05
    assert psi(frac, edges, rng.normal(1, 1, 1000)) > 0.25


def test_image_stats_do_not_depend_on_resolution() -> None:
    rng = np.random.default_rng(2)
    small = rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)
    import cv2
    big = cv2.resize(small, (800, 600), interpolation=cv2.INTER_NEAREST)
    a, b = image_stats(small), image_stats(big)
    assert b["megapixels"] == pytest.approx(0.48)
    assert a["brightness"] == pytest.approx(b["brightness"], rel=0.05)


def test_the_shipped_model_flags_a_blank_frame_and_not_a_dermoscopy_sample() -> None:
    from inference.engine import Engine, default_model_dir, load_image
    if not (default_model_dir() / STATS_FILE).exists():
        pytest.skip("no OOD statistics beside the model")
    eng = Engine(intra_op_threads=2)
    if eng.ood is None:
        pytest.skip("the OOD statistics belong to another model: run python -m models.ood_stats")
    root = Path(__file__).resolve().parents[2]
    lesion = load_image(root / "dermgate" / "samples" / "ISIC_0024309.jpg")
    text = np.full((450, 600, 3), 245, np.uint8)
    import cv2
    for row in range(30, 440, 28):
        cv2.putText(text, "the quick brown fox jumps over the lazy dog", (10, row), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                    (20, 20, 20), 1)
    p_lesion, p_text = eng.predict([lesion, text], cam=False)
    assert p_lesion.ood_score is not None and not p_lesion.out_of_distribution
    assert p_text.out_of_distribution and p_text.ood_score > p_lesion.ood_score
    assert set(p_lesion.to_json()["image_stats"]) == {"megapixels", "brightness", "colourfulness", "sharpness"}
