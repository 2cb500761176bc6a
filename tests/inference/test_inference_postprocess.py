"""Post-processing: temperature scaling, entropy, malignancy and the documented risk cut-offs."""

from __future__ import annotations

import numpy as np
import pytest

from inference.postprocess import Calibration, calibrated, malignancy, normalised_entropy, risk_level, softmax
from inference.result import CLASSES, Risk

CAL = Calibration(temperature=1.5, referral_threshold=0.1, high_risk_threshold=0.5, low_confidence_threshold=0.5)


def test_temperature_softens_without_changing_the_ranking() -> None:
    logits = np.array([[2.0, 1.0, 0.0, -1.0, 0.5, 3.0, -2.0]], np.float32)
    p1, p2 = softmax(logits, 1.0), softmax(logits, 2.0)
    assert p1.sum() == pytest.approx(1.0) and p2.sum() == pytest.approx(1.0)
    assert (p1.argsort() == p2.argsort()).all()
    assert p2.max() < p1.max()


def test_malignancy_bias_moves_mass_between_groups_only() -> None:
    """The bias changes P(malignant) but keeps it the sum of mel, bcc and akiec,
    keeps the ratios within each group, and is a no-op at zero."""
    logits = np.random.default_rng(0).normal(0, 2, size=(50, 7))
    plain, shifted = calibrated(logits, 1.2), calibrated(logits, 1.2, -0.8)
    np.testing.assert_allclose(plain, softmax(logits, 1.2), rtol=1e-6)
    np.testing.assert_allclose(shifted.sum(1), 1.0, rtol=1e-6)
    assert (malignancy(shifted) < malignancy(plain)).all()
    mel, bcc, nv, bkl = (CLASSES.index(c) for c in ("mel", "bcc", "nv", "bkl"))
    np.testing.assert_allclose(shifted[:, mel] / shifted[:, bcc], plain[:, mel] / plain[:, bcc], rtol=1e-5)
    np.testing.assert_allclose(shifted[:, nv] / shifted[:, bkl], plain[:, nv] / plain[:, bkl], rtol=1e-5)
    cal = Calibration(1.2, 0.1, 0.5, 0.5, malignancy_bias=-0.8)
    np.testing.assert_allclose(cal.probabilities(logits), shifted)
    assert Calibration.from_json({"temperature": 1.2, "referral_threshold": 0.1, "high_risk_threshold": 0.5,
                                  "low_confidence_threshold": 0.5}).malignancy_bias == 0.0


def test_softmax_is_stable_for_huge_logits() -> None:
    p = softmax(np.array([[1e4, 0, 0, 0, 0, 0, 0]], np.float32))
    assert np.isfinite(p).all() and p[0, 0] == pytest.approx(1.0)


def test_normalised_entropy_is_zero_for_certainty_and_one_for_uniform() -> None:
    assert normalised_entropy(np.eye(7)[:1])[0] == pytest.approx(0.0, abs=1e-6)
    assert normalised_entropy(np.full((1, 7), 1 / 7))[0] == pytest.approx(1.0)


def test_malignancy_is_mel_plus_bcc_plus_akiec() -> None:
    p = np.array([[0.1, 0.2, 0.05, 0.05, 0.3, 0.25, 0.05]])
    assert dict(zip(CLASSES, p[0]))["mel"] == 0.3
    assert malignancy(p)[0] == pytest.approx(0.6)


@pytest.mark.parametrize("p, risk", [(0.0, Risk.LOW), (0.0999, Risk.LOW), (0.1, Risk.MEDIUM),
                                     (0.4999, Risk.MEDIUM), (0.5, Risk.HIGH), (1.0, Risk.HIGH)])
def test_risk_levels_follow_the_cut_offs(p: float, risk: Risk) -> None:
    assert risk_level(p, CAL) is risk
