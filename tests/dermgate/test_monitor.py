"""Live performance figures and alarms: the statistics, and the alarms on simulated streams."""

from __future__ import annotations

import math
from datetime import date, timedelta

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dermgate import monitor_sim as sim
from dermgate.monitor import AlarmRules, alarms, auc_interval, metrics, wilson


def test_wilson_interval_matches_the_textbook_values() -> None:
    lo, hi = wilson(95, 100)
    assert lo == pytest.approx(0.8882, abs=1e-4) and hi == pytest.approx(0.9785, abs=1e-4)
    assert all(math.isnan(v) for v in wilson(0, 0))
    assert wilson(10, 10)[1] == pytest.approx(1.0)


def test_auc_interval_narrows_with_more_cases() -> None:
    small, large = auc_interval(0.9, 20, 80), auc_interval(0.9, 200, 800)
    assert small[0] < large[0] < 0.9 < large[1] < small[1]


def test_metrics_equal_sklearn_and_the_referral_two_by_two() -> None:
    thr, _ = sim.threshold_and_card()
    c = sim.stream(7, thr)
    m = metrics(c)
    assert m["auc_malignant"] == pytest.approx(roc_auc_score(c.y_mal, c.p_mal))
    tp = int(((c.p_mal >= thr) & (c.y_mal == 1)).sum())
    assert m["sensitivity"] == pytest.approx(tp / (c.y_mal == 1).sum())
    assert sum(r["n"] for r in m["reliability"]) == len(c)


def test_a_stable_stream_is_quiet_then_a_degradation_fires_after_the_change() -> None:
    """2,000 results over 200 days, the model degraded on day 100: alarms after the change, none before."""
    thr, card = sim.threshold_and_card()
    rules = AlarmRules()
    degraded = sim.stream(5000, thr, change_day=100)
    fired = sim.first_alarms(degraded, card, rules, every=3)
    assert fired and all(day >= 100 for day, _ in fired), fired
    assert fired[0][0] - 100 <= 30
    critical_after = {k for _, ks in fired for k in ks if k.endswith("/critical")}
    assert critical_after & {"false_negatives_rising/critical", "drop_vs_model_card/critical"}
    stable = sim.first_alarms(sim.stream(1000, thr), card, rules, every=3)
    assert not any(k.endswith("/critical") for _, ks in stable for k in ks), stable


def test_false_alarm_rate_and_detection_measured_over_streams() -> None:
    out = sim.run(streams=4, every=7)
    assert out["degraded"]["streams_alarmed_after_change"] == 1.0
    assert out["degraded"]["streams_alarmed_before_change"] == 0.0
    assert out["stable"]["streams_with_a_critical_alarm"] <= 0.25
    assert 0 <= out["stable"]["evaluations_with_an_alarm"] < 0.25
    assert not math.isnan(out["degraded"]["delay_days_median"])


def test_no_alarm_without_enough_outcomes() -> None:
    thr, card = sim.threshold_and_card()
    c = sim.stream(3, thr, n=40, days=60, change_day=0, shift=3.0)
    assert alarms(c, card, AlarmRules(), sim.START + timedelta(days=59)) == []
    assert isinstance(date.today(), date) and np.isfinite(thr)
