"""Population drift per device: PSI and OOD-rate alarms (dermgate/drift.py)."""

from __future__ import annotations

import numpy as np

from dermgate.drift import drift_alarms, drift_of
from dermgate.settings import MonitorSettings
from inference.ood import OodStats, reference_bins


def stats() -> OodStats:
    rng = np.random.default_rng(0)
    s = OodStats("x", np.zeros(2), np.eye(2), np.zeros((1, 2)), np.eye(2), 1.0, 0.0, 10.0,
                 meta={"flagged_validation": 0.05})
    s.reference = {"brightness": reference_bins(rng.normal(120, 20, 5000)),
                   "ood_score": reference_bins(rng.normal(8, 2, 5000))}
    s.class_mix = np.array([0.03, 0.05, 0.1, 0.01, 0.11, 0.68, 0.02])
    return s


def test_a_device_with_darker_images_and_more_flags_raises_drift_alarms() -> None:
    rng = np.random.default_rng(1)
    mon = MonitorSettings()
    st = stats()
    same = drift_of({"brightness": rng.normal(120, 20, 400), "ood_score": rng.normal(8, 2, 400)},
                    rng.choice(7, 400, p=st.class_mix), rng.random(400) < 0.05, st)
    assert drift_alarms("device=A", same, st, mon) == []
    dark = drift_of({"brightness": rng.normal(80, 20, 400), "ood_score": rng.normal(11, 2, 400)},
                    rng.choice(7, 400, p=st.class_mix), rng.random(400) < 0.3, st)
    kinds = {(a["kind"], a["evidence"].get("feature")) for a in drift_alarms("device=B", dark, st, mon)}
    assert ("drift_psi", "brightness") in kinds and ("drift_psi", "ood_score") in kinds
    assert ("drift_ood_rate", None) in kinds
    few = drift_of({"brightness": rng.normal(80, 20, 50)}, rng.choice(7, 50), rng.random(50) < 0.5, st)
    assert drift_alarms("device=C", few, st, mon) == []        # too few images to judge
