"""Population drift, per device and overall, with no outcome needed.

Over the newest ``monitor.drift_window_days`` of results, against the training
reference that ships in the model's OOD statistics (``models/ood_stats.npz``):

- the population stability index (PSI, 10 reference deciles) of the OOD score,
  image size (megapixels), brightness, colourfulness and sharpness;
- the PSI of the predicted class mix against the mix the model predicts on the
  validation split;
- the share of results flagged "outside the training distribution" (about 5%
  expected on images like the training data).

An alarm is raised for a device (or overall) with at least
``monitor.drift_min_images`` results when a PSI reaches ``monitor.psi_alarm``
(0.25, the usual "significant shift" convention), or when the flagged share is
more than twice the expected share and significantly above it (one-sided
binomial test at ``monitor.alpha``).
"""

from __future__ import annotations

import math
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

from inference.ood import DRIFT_FEATURES, STATS_FILE, OodStats, psi, psi_fractions
from inference.result import CLASSES


def drift_of(values: dict[str, np.ndarray], top: np.ndarray, flagged: np.ndarray, stats: OodStats) -> dict[str, Any]:
    out: dict[str, float] = {}
    for f in DRIFT_FEATURES:
        v = values.get(f)
        if f in stats.reference and v is not None and len(v[~np.isnan(v)]):
            edges, frac = stats.reference[f]
            out[f] = psi(frac, edges, v[~np.isnan(v)])
    if len(top) and len(stats.class_mix):
        out["class_mix"] = psi_fractions(stats.class_mix, np.bincount(top, minlength=len(CLASSES)) / len(top))
    return {"n": int(len(top)), "psi": out,
            "ood_rate": float(flagged.mean()) if len(flagged) else math.nan,
            "class_mix": (np.bincount(top, minlength=len(CLASSES)) / max(len(top), 1)).tolist()}


def drift_alarms(scope: str, d: dict[str, Any], stats: OodStats, mon: Any) -> list[dict[str, Any]]:
    from scipy.stats import binom
    out: list[dict[str, Any]] = []
    if d["n"] < mon.drift_min_images:
        return out
    for feature, value in d["psi"].items():
        if value >= mon.psi_alarm:
            out.append({
                "id": f"drift_psi:{scope}:{feature}", "kind": "drift_psi", "severity": "warning", "scope": scope,
                "message": f"{feature} of the last {mon.drift_window_days} days' images differs from the training "
                           f"data (PSI {value:.2f} >= {mon.psi_alarm:.2f}, {d['n']} images)",
                "evidence": {"feature": feature, "psi": value, "n": d["n"], "threshold": mon.psi_alarm},
                "action": "Check the device's settings and images (a new camera, lens, light or software, or a "
                          "different population); performance here is unproven until outcomes confirm it."})
    expected = float(stats.meta.get("flagged_validation", 0.05)) or 0.05
    k = int(round(d["ood_rate"] * d["n"]))
    p_val = float(binom.sf(k - 1, d["n"], expected)) if k else 1.0
    if d["ood_rate"] > 2 * expected and p_val < mon.alpha:
        out.append({
            "id": f"drift_ood_rate:{scope}", "kind": "drift_ood_rate", "severity": "warning", "scope": scope,
            "message": f"{100 * d['ood_rate']:.0f}% of the last {mon.drift_window_days} days' images are outside the "
                       f"training distribution (expected about {100 * expected:.0f}%)",
            "evidence": {"ood_rate": d["ood_rate"], "expected": expected, "n": d["n"], "p_value": p_val},
            "action": "Look at the flagged images: non-dermoscopy images, a new device or a population the model "
                      "was not trained on; train users or restrict the device."})
    return out


def drift_report(rt: Any, manifest: dict[str, Any], *, as_of: date, since: date | None = None) -> dict[str, Any]:
    """Drift per device and overall for a runtime's database (empty when the model has no OOD statistics)."""
    from sqlalchemy import select

    from dermgate.db import Instance, Job
    from dermgate.records import device_label
    from inference.engine import default_model_dir
    from inference.ood import load_for
    mon = rt.settings.monitor
    folder = Path(rt.settings.model.path) if rt.settings.model.path else default_model_dir()
    folder = folder.parent if folder.suffix == ".onnx" else folder
    stats, why = load_for(folder, (manifest.get("onnx") or {}).get("sha256", ""))
    if stats is None:
        return {"note": why or f"no {STATS_FILE}", "devices": {}, "alarms": []}
    end = datetime.combine(as_of, time.max, timezone.utc)
    start = end - timedelta(days=mon.drift_window_days)
    if since is not None:
        start = max(start, datetime.combine(since, time.min, timezone.utc))
    per: dict[str, list[dict[str, Any]]] = {}
    with rt.sessions() as s:
        for job, inst in s.execute(select(Job, Instance).join(Instance, Instance.id == Job.instance_id)
                                   .where(Job.result.is_not(None), Instance.received_at > start,
                                          Instance.received_at <= end)):
            r = job.result or {}
            if (r.get("model") or {}).get("sha256") != stats.onnx_sha256:
                continue                      # another model's scores are on another scale
            dev = device_label(inst.manufacturer, inst.manufacturer_model_name, inst.station_name)
            per.setdefault(dev, []).append(r)
    devices: dict[str, Any] = {}
    alarms: list[dict[str, Any]] = []
    every: list[dict[str, Any]] = []
    for dev, results in sorted(per.items()):
        every += results
        devices[dev] = _drift(results, stats)
        if len(per) > 1:
            alarms += drift_alarms(f"device={dev}", devices[dev], stats, mon)
    overall = _drift(every, stats) if every else None
    if overall is not None:
        alarms += drift_alarms("all devices", overall, stats, mon)
    return {"window_days": mon.drift_window_days, "features": [*DRIFT_FEATURES, "class_mix"], "devices": devices,
            "overall": overall, "threshold": stats.threshold, "alarms": alarms}


def _drift(results: list[dict[str, Any]], stats: OodStats) -> dict[str, Any]:
    values = {f: np.array([(r.get("ood_score") if f == "ood_score" else (r.get("image_stats") or {}).get(f))
                           or math.nan for r in results], float) for f in DRIFT_FEATURES}
    top = np.array([CLASSES.index(r["top_class"]) for r in results if r.get("top_class") in CLASSES], int)
    flagged = np.array([bool(r.get("out_of_distribution")) for r in results])
    return drift_of(values, top, flagged, stats)
