"""A synthetic ``Prediction`` for tests of the outputs and their delivery.

The classifier itself is tested in tests/inference; here only the shape of its
result matters, so the numbers are made up and say so.
"""

from __future__ import annotations

import numpy as np

from inference.result import ModelInfo, Prediction, Risk

TEST_MODEL = ModelInfo(manufacturer="dermgate project", name="dermgate-test-model", version="0.0.1-test",
                       sha256="ab" * 32, device_uid="2.25.100000000000000000000000000000000001")
PROBABILITIES = {"akiec": 0.02, "bcc": 0.05, "bkl": 0.08, "df": 0.01, "mel": 0.21, "nv": 0.62, "vasc": 0.01}


def gaussian_cam(height: int, width: int) -> np.ndarray:
    """A CAM that peaks in the image centre and fades to ~0 at the borders."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.exp(-(((yy - height / 2) / (height / 6)) ** 2 + ((xx - width / 2) / (width / 6)) ** 2)).astype(np.float32)


def synthetic_prediction(height: int, width: int, *, assessable: bool = True, low_confidence: bool = False,
                         model: ModelInfo = TEST_MODEL) -> Prediction:
    if not assessable:
        return Prediction(probabilities=dict(PROBABILITIES), malignancy_probability=0.28,
                          risk=Risk.NOT_ASSESSABLE, uncertainty=0.9, low_confidence=True, assessable=False,
                          reason="image too dark to assess (mean brightness 12 of 255)", model=model, cam=None)
    return Prediction(probabilities=dict(PROBABILITIES), malignancy_probability=0.28, risk=Risk.MEDIUM,
                      uncertainty=0.41, low_confidence=low_confidence, assessable=True, reason=None, model=model,
                      cam=gaussian_cam(height, width))
