"""Refresh the live-performance and drift gauges of /metrics from the monitor report.

The report reads every linked outcome, so it is computed at most every
``MIN_INTERVAL_S`` seconds per process, whatever the scrape interval.
Labels carry no PHI: windows, alarm kinds, device names (Manufacturer / Model / Station).
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from dermgate import metrics

MIN_INTERVAL_S = 300.0
_lock = threading.Lock()
_last = [0.0]


def _set(gauge: Any, value: float | None, *labels: str) -> None:
    gauge.labels(*labels).set(float("nan") if value is None or (isinstance(value, float) and math.isnan(value))
                              else value)


def refresh(rt: Any, *, force: bool = False, now: float | None = None) -> bool:
    """Recompute the gauges when the last refresh is older than MIN_INTERVAL_S; True when it ran."""
    now = time.monotonic() if now is None else now
    with _lock:
        if not force and _last[0] and now - _last[0] < MIN_INTERVAL_S:
            return False
        _last[0] = now
    from dermgate.monitor import build_report
    report = build_report(rt)
    for name, m in [("total", report["total"]), *report["windows"].items()]:
        _set(metrics.LIVE_AUC, m["auc_malignant"], name)
        _set(metrics.LIVE_SENSITIVITY, m["sensitivity"], name)
        _set(metrics.LIVE_SENSITIVITY_LOWER, m["sensitivity_ci95"][0], name)
        _set(metrics.LIVE_SPECIFICITY, m["specificity"], name)
        _set(metrics.LIVE_ECE, m["ece_malignancy"], name)
        _set(metrics.LIVE_MALIGNANT, m["n_malignant"], name)
    s = report["summary"]
    metrics.OUTCOMES.labels("linked").set(s["n_outcomes"] - s["n_outcomes_unlinked"])
    metrics.OUTCOMES.labels("unlinked").set(s["n_outcomes_unlinked"])
    metrics.MONITOR_ALARMS.clear()
    for a in s["alarms"]:
        metrics.MONITOR_ALARMS.labels(a["kind"], a["severity"]).inc()
    for dev, d in (report.get("drift") or {}).get("devices", {}).items():
        for feature, value in d["psi"].items():
            _set(metrics.DRIFT_PSI, value, dev, feature)
        _set(metrics.OOD_RATE, d["ood_rate"], dev)
    return True
