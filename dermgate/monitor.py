"""Live performance: how the AI does in THIS hospital, against outcomes, with alarms.

    dermgate monitor report [--since DATE] [--json] [--out DIR]

Every AI result linked to an outcome (``dermgate.outcomes``) is one scored case:
P(malignant) and the referral decision the clinician saw (risk Medium or High
= referred: P(malignant) at or above the model's referral threshold) against
the outcome's truth. Cases are dated by the image (study date, else reception).

Figures, in total and over rolling windows (``monitor.windows_days``, 30 and 90
days by default), and by device (Manufacturer / Manufacturer's Model Name /
Station Name), body site, age band, sex, Fitzpatrick type and model version:

- malignancy AUC with a 95% interval (Hanley & McNeil 1982),
- sensitivity and specificity at the referral threshold with 95% Wilson intervals,
- calibration of P(malignant): ECE and a reliability table (15 equal-width bins),
- the 7-class confusion matrix (outcomes that carry a class) and the referral 2x2.

The metric functions are the evaluation interface's own (``inference.evaluate``).

Alarms (:func:`alarms`), each with its evidence and a recommended action; the
first three are judged over the longest window (90 days) and in total:

    sensitivity_floor      the sensitivity's 95% lower bound is under ``monitor.sensitivity_floor``
                           (0.90) in a window holding at least ``floor_min_positives`` (150) malignant
                           outcomes: with fewer, no sensitivity near 0.95 has a lower bound above 0.90
    drop_vs_model_card     AUC or sensitivity more than ``max_drop_vs_card`` (5 points) under the
                           model card's test figure, and its one-sided (1 - ``alpha``) upper bound
                           under the card too
    false_negatives_rising the miss rate in the newest window is higher than before it (one-sided
                           Fisher exact test at ``alpha``; against the card's miss rate when there
                           is too little before), with at least 3 misses
    calibration_drift      observed malignant rate differs from the mean P(malignant)
                           (calibration-in-the-large z test at ``alpha`` shared by the windows) and the ECE is more than
                           ``ece_max_increase`` above the card's
    drift_*                population drift without outcomes (``dermgate.drift``)

Their behaviour on simulated streams (detection delay, false-alarm rate) is in
docs/monitoring.md, made by ``python -m dermgate.monitor_sim``.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dermgate.records import device_label
from inference.evaluate import ECE_BINS, auc, confusion, ece
from inference.result import CLASSES, MALIGNANT

MAL_IDX = [CLASSES.index(c) for c in MALIGNANT]
REFERRED = ("Medium", "High")
SUBGROUPS = ("device", "body_site", "age_band", "sex", "fitzpatrick", "model_version")
Z95 = 1.959963984540054


# ---- statistics ---------------------------------------------------------------------------------

def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (Wilson 1927); (nan, nan) when n is 0."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def auc_interval(a: float, n_pos: int, n_neg: int, z: float = Z95) -> tuple[float, float]:
    """95% interval of an AUC from its Hanley & McNeil (1982) standard error."""
    if math.isnan(a) or n_pos == 0 or n_neg == 0:
        return math.nan, math.nan
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    se = math.sqrt(max(var, 0.0))
    return max(0.0, a - z * se), min(1.0, a + z * se)


def reliability_table(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Per equal-width bin of P(malignant): n, mean predicted, observed malignant rate."""
    idx = np.minimum((p * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        if m.any():
            out.append({"bin": [b / bins, (b + 1) / bins], "n": int(m.sum()),
                        "mean_predicted": float(p[m].mean()), "observed": float(y[m].mean())})
    return out


# ---- the cases ----------------------------------------------------------------------------------

@dataclass
class Cases:
    """Scored cases as arrays (one entry per AI result with an outcome)."""
    when: np.ndarray                     # datetime64[D]
    p_mal: np.ndarray                    # float
    referred: np.ndarray                 # bool: risk Medium/High (P >= the model's referral threshold)
    y_mal: np.ndarray                    # int 0/1
    y7: np.ndarray                       # int class index, -1 where the outcome is benign/malignant only
    probs: np.ndarray                    # (n, 7), NaN where not stored
    groups: dict[str, np.ndarray] = field(default_factory=dict)   # subgroup name -> labels (object)

    def __len__(self) -> int:
        return len(self.p_mal)

    def subset(self, mask: np.ndarray) -> Cases:
        return Cases(self.when[mask], self.p_mal[mask], self.referred[mask], self.y_mal[mask], self.y7[mask],
                     self.probs[mask], {k: v[mask] for k, v in self.groups.items()})

    @classmethod
    def empty(cls) -> Cases:
        return cls(np.array([], "datetime64[D]"), np.array([], float), np.array([], bool), np.array([], int),
                   np.array([], int), np.zeros((0, len(CLASSES))), {g: np.array([], object) for g in SUBGROUPS})


def age_band(age: int | None, edges: Sequence[int]) -> str:
    if age is None:
        return "unknown"
    lower = [e for e in sorted(edges) if e <= age]
    if not lower:
        return "unknown"
    lo = lower[-1]
    higher = [e for e in sorted(edges) if e > lo]
    return f"{lo}-{higher[0] - 1}" if higher else f"{lo}+"




def collect(sessions: Any, *, since: date | None = None, age_edges: Sequence[int] = (0, 30, 50, 70)) -> tuple[Cases, dict[str, int]]:
    """The scored cases from the database, and counts (results, outcomes, linked, not assessable)."""
    from sqlalchemy import func, select

    from dermgate.db import Instance, Job, Outcome, OutcomeLink
    from dermgate.outcomes import image_date
    rows: dict[int, tuple[Job, Instance, Outcome]] = {}
    with sessions() as s:
        q = (select(Job, Instance, Outcome).join(Instance, Instance.id == Job.instance_id)
             .join(OutcomeLink, OutcomeLink.job_id == Job.id).join(Outcome, Outcome.id == OutcomeLink.outcome_id)
             .where(Job.result.is_not(None)).order_by(Outcome.outcome_date, Outcome.id))
        for job, inst, o in s.execute(q):
            rows[job.id] = (job, inst, o)          # the newest outcome of a result wins
        n_results = s.scalar(select(func.count()).select_from(Job).where(Job.result.is_not(None))) or 0
        n_outcomes = s.scalar(select(func.count()).select_from(Outcome)) or 0
        n_unlinked = s.scalar(select(func.count()).select_from(Outcome).where(
            ~Outcome.id.in_(select(OutcomeLink.outcome_id)))) or 0
    recs = []
    not_assessable = 0
    for job, inst, o in rows.values():
        r = job.result or {}
        when = image_date(inst)
        if since is not None and when < since:
            continue
        if not r.get("assessable", True):
            not_assessable += 1
            continue
        probs = r.get("probabilities") or {}
        recs.append((when, float(r["malignancy_probability"]), r.get("risk") in REFERRED, int(o.malignant),
                     CLASSES.index(o.diagnosis) if o.diagnosis in CLASSES else -1,
                     [float(probs.get(c, math.nan)) for c in CLASSES],
                     {"device": device_label(inst.manufacturer, inst.manufacturer_model_name, inst.station_name),
                      "body_site": (inst.body_site or "unknown").lower(),
                      "age_band": age_band(inst.patient_age_years, age_edges),
                      "sex": inst.patient_sex or "unknown", "fitzpatrick": o.fitzpatrick or "unknown",
                      "model_version": (r.get("model") or {}).get("version", "unknown")}))
    counts = {"n_results": int(n_results), "n_outcomes": int(n_outcomes), "n_outcomes_unlinked": int(n_unlinked),
              "n_linked_not_assessable": not_assessable}
    if not recs:
        return Cases.empty(), counts
    return Cases(np.array([r[0] for r in recs], "datetime64[D]"), np.array([r[1] for r in recs]),
                 np.array([r[2] for r in recs], bool), np.array([r[3] for r in recs], int),
                 np.array([r[4] for r in recs], int), np.array([r[5] for r in recs], float),
                 {g: np.array([r[6][g] for r in recs], object) for g in SUBGROUPS}), counts


# ---- figures ------------------------------------------------------------------------------------

def metrics(c: Cases, detail: bool = True) -> dict[str, Any]:
    """The figures of one set of cases (``detail``: reliability table and confusion matrices too)."""
    y, p, ref = c.y_mal, c.p_mal, c.referred
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    tp, fn = int((ref & (y == 1)).sum()), int((~ref & (y == 1)).sum())
    fp, tn = int((ref & (y == 0)).sum()), int((~ref & (y == 0)).sum())
    a = auc(y, p) if len(y) else math.nan
    out: dict[str, Any] = {
        "n": len(c), "n_malignant": n_pos, "n_benign": n_neg,
        "auc_malignant": a, "auc_malignant_ci95": list(auc_interval(a, n_pos, n_neg)),
        "sensitivity": tp / n_pos if n_pos else math.nan, "sensitivity_ci95": list(wilson(tp, n_pos)),
        "specificity": tn / n_neg if n_neg else math.nan, "specificity_ci95": list(wilson(tn, n_neg)),
        "false_negatives": fn,
        "ece_malignancy": ece(p, (y == 1).astype(float)) if len(y) else math.nan,
        "mean_p_malignant": float(p.mean()) if len(p) else math.nan,
        "observed_malignant_rate": float(y.mean()) if len(y) else math.nan,
        "referral_confusion": {"tp": tp, "fn": fn, "fp": fp, "tn": tn},
    }
    if detail:
        out["reliability"] = reliability_table(p, (y == 1).astype(float))
        k7 = (c.y7 >= 0) & ~np.isnan(c.probs).any(axis=1)
        out["confusion_matrix"] = {"labels": list(CLASSES), "rows": "true (outcome)", "columns": "predicted",
                                   "n": int(k7.sum()),
                                   "matrix": confusion(c.y7[k7], c.probs[k7].argmax(1)) if k7.any()
                                   else [[0] * len(CLASSES) for _ in CLASSES]}
    return out


def window(c: Cases, as_of: date, days: int | None) -> Cases:
    """Cases dated in (as_of - days, as_of]; all up to as_of when ``days`` is None."""
    end = np.datetime64(as_of, "D")
    m = c.when <= end
    if days is not None:
        m &= c.when > end - np.timedelta64(days, "D")
    return c.subset(m)


# ---- alarms -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Card:
    """The model card's test figures that live performance is compared with."""
    version: str = "unknown"
    auc_malignant: float = math.nan
    sensitivity: float = math.nan
    specificity: float = math.nan
    ece_malignancy: float = math.nan

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> Card:
        t = (manifest.get("metrics") or {}).get("test") or {}
        return cls(str(manifest.get("version", "unknown")), float(t.get("malignancy_auc", math.nan)),
                   float(t.get("sensitivity", math.nan)), float(t.get("specificity", math.nan)),
                   float(t.get("ece_malignancy", math.nan)))


@dataclass(frozen=True)
class AlarmRules:
    windows_days: tuple[int, ...] = (30, 90)
    sensitivity_floor: float = 0.90
    max_drop_vs_card: float = 0.05
    min_positives: int = 30
    min_outcomes: int = 100
    alpha: float = 0.01
    ece_max_increase: float = 0.05
    floor_min_positives: int = 150

    @classmethod
    def from_settings(cls, m: Any) -> AlarmRules:
        return cls(tuple(m.windows_days), m.sensitivity_floor, m.max_drop_vs_card, m.min_positives,
                   m.min_outcomes, m.alpha, m.ece_max_increase, m.floor_min_positives)


def _alarm(kind: str, severity: str, scope: str, message: str, evidence: dict[str, Any], action: str) -> dict[str, Any]:
    return {"id": f"{kind}:{scope}", "kind": kind, "severity": severity, "scope": scope, "message": message,
            "evidence": evidence, "action": action}


def alarms(c: Cases, card: Card, rules: AlarmRules, as_of: date, scope_prefix: str = "") -> list[dict[str, Any]]:
    """Every alarm the cases raise as of ``as_of`` (see the module docstring)."""
    from scipy.stats import fisher_exact, binom, norm
    out: list[dict[str, Any]] = []
    z_alpha = float(norm.ppf(1 - rules.alpha))       # one-sided bound for the drop alarms
    # Sensitivity, AUC and calibration are judged over the longest window and in total (a 30-day window
    # holds too few malignant outcomes at most sites); false negatives over the shortest (below).
    longest = max(rules.windows_days) if rules.windows_days else None
    spans: list[tuple[str, int | None]] = ([(f"{longest}d", longest)] if longest else []) + [("total", None)]
    for label, days in spans:
        w = window(c, as_of, days)
        scope = f"{scope_prefix}{label}"
        m = metrics(w, detail=False)
        n_pos, n_neg = m["n_malignant"], m["n_benign"]
        sens, (s_lo, s_hi) = m["sensitivity"], m["sensitivity_ci95"]
        if n_pos >= rules.floor_min_positives and s_lo < rules.sensitivity_floor:
            out.append(_alarm(
                "sensitivity_floor", "critical" if sens < rules.sensitivity_floor else "warning", scope,
                f"sensitivity {sens:.3f} (95% CI {s_lo:.3f}-{s_hi:.3f}) cannot be shown to reach the floor "
                f"{rules.sensitivity_floor:.2f} over {label}",
                {"sensitivity": sens, "ci95": [s_lo, s_hi], "n_malignant": n_pos,
                 "false_negatives": m["false_negatives"], "floor": rules.sensitivity_floor},
                "Review the missed malignant lesions (outcomes list) with the clinical lead; consider a lower "
                "referral threshold for this site or suspend use for the affected device."))
        s_hi_alpha = wilson(m["referral_confusion"]["tp"], n_pos, z_alpha)[1]
        if n_pos >= rules.min_positives and not math.isnan(card.sensitivity) \
                and sens < card.sensitivity - rules.max_drop_vs_card and s_hi_alpha < card.sensitivity:
            out.append(_alarm(
                "drop_vs_model_card", "critical", f"{scope}:sensitivity",
                f"sensitivity {sens:.3f} is {100 * (card.sensitivity - sens):.1f} points under the model card's "
                f"{card.sensitivity:.3f} over {label}",
                {"metric": "sensitivity", "live": sens, "ci95": [s_lo, s_hi], "card": card.sensitivity,
                 f"upper_bound_{1 - rules.alpha:g}": s_hi_alpha, "n_malignant": n_pos},
                "Notify the manufacturer (post-market surveillance) and the clinical safety officer; check for a "
                "new device or population; consider recalling the model version (dermgate model recall)."))
        a, (a_lo, a_hi) = m["auc_malignant"], m["auc_malignant_ci95"]
        a_hi_alpha = auc_interval(a, n_pos, n_neg, z_alpha)[1]
        if len(w) >= rules.min_outcomes and n_pos >= 10 and n_neg >= 10 and not math.isnan(card.auc_malignant) \
                and a < card.auc_malignant - rules.max_drop_vs_card and a_hi_alpha < card.auc_malignant:
            out.append(_alarm(
                "drop_vs_model_card", "critical", f"{scope}:auc",
                f"malignancy AUC {a:.3f} (95% CI {a_lo:.3f}-{a_hi:.3f}) is {100 * (card.auc_malignant - a):.1f} "
                f"points under the model card's {card.auc_malignant:.3f} over {label}",
                {"metric": "auc_malignant", "live": a, "ci95": [a_lo, a_hi], "card": card.auc_malignant,
                 f"upper_bound_{1 - rules.alpha:g}": a_hi_alpha, "n": len(w)},
                "Notify the manufacturer and the clinical safety officer; compare devices and subgroups in this "
                "report; consider recalling the model version (dermgate model recall)."))
        if len(w) >= rules.min_outcomes and n_pos and n_neg:
            o, e = float(w.y_mal.sum()), float(w.p_mal.sum())
            var = float((w.p_mal * (1 - w.p_mal)).sum())
            z = (o - e) / math.sqrt(var) if var > 0 else 0.0
            p_val = 2 * (1 - norm.cdf(abs(z)))
            e_live = m["ece_malignancy"]
            base = card.ece_malignancy if not math.isnan(card.ece_malignancy) else 0.0
            if p_val < rules.alpha / len(spans) and e_live > base + rules.ece_max_increase:
                out.append(_alarm(
                    "calibration_drift", "warning", scope,
                    f"P(malignant) is {'under' if z > 0 else 'over'}-estimated over {label}: observed malignant "
                    f"rate {o / len(w):.3f} vs mean predicted {e / len(w):.3f}; ECE {e_live:.3f} vs card {base:.3f}",
                    {"observed_rate": o / len(w), "mean_predicted": e / len(w), "z": z, "p_value": p_val,
                     "ece_malignancy": e_live, "card_ece_malignancy": base, "n": len(w)},
                    "Do not read the probabilities at face value at this site; recalibrate on local outcomes "
                    "(new model version) and inform the clinicians."))
    # False negatives rising: the newest window against everything before it (or the card).
    days = min(rules.windows_days) if rules.windows_days else 30
    recent = window(c, as_of, days)
    before = c.subset(c.when <= np.datetime64(as_of, "D") - np.timedelta64(days, "D"))
    r_pos, r_fn = int((recent.y_mal == 1).sum()), int(((recent.y_mal == 1) & ~recent.referred).sum())
    b_pos, b_fn = int((before.y_mal == 1).sum()), int(((before.y_mal == 1) & ~before.referred).sum())
    if r_fn >= 3 and r_pos:
        if b_pos >= rules.min_positives:
            p_val = float(fisher_exact([[r_fn, r_pos - r_fn], [b_fn, b_pos - b_fn]], alternative="greater")[1])
            ref = {"before_false_negatives": b_fn, "before_malignant": b_pos, "test": "one-sided Fisher exact"}
        elif not math.isnan(card.sensitivity):
            p0 = max(1 - card.sensitivity, 1e-3)
            p_val = float(binom.sf(r_fn - 1, r_pos, p0))
            ref = {"card_miss_rate": p0, "test": "one-sided binomial vs the model card"}
        else:
            p_val = 1.0
            ref = {}
        if p_val < rules.alpha:
            out.append(_alarm(
                "false_negatives_rising", "critical", f"{scope_prefix}{days}d",
                f"{r_fn} of {r_pos} malignant lesions were not referred in the last {days} days "
                f"(miss rate {r_fn / r_pos:.3f}; before: {b_fn}/{b_pos})",
                {"false_negatives": r_fn, "malignant": r_pos, "p_value": p_val, **ref},
                "Review each missed lesion now (outcomes list); check the device and image quality of the "
                "misses; escalate to the clinical safety officer."))
    return out


# ---- the report ---------------------------------------------------------------------------------

def load_card(settings: Any) -> tuple[Card, dict[str, Any]]:
    from inference.engine import MANIFEST_FILE, default_model_dir
    path = settings.model.path
    folder = Path(path) if path else default_model_dir()
    folder = folder.parent if folder.suffix == ".onnx" else folder
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return Card(), {}
    return Card.from_manifest(manifest), manifest


def compute_report(c: Cases, counts: dict[str, int], card: Card, rules: AlarmRules, as_of: date,
                   since: date | None = None, referral_threshold: float | None = None,
                   drift: dict[str, Any] | None = None) -> dict[str, Any]:
    total = metrics(window(c, as_of, None))
    windows = {f"{d}d": metrics(window(c, as_of, d)) for d in rules.windows_days}
    by: dict[str, dict[str, Any]] = {}
    for g in SUBGROUPS:
        labels = c.groups.get(g, np.array([], object))
        by[g] = {str(v): metrics(c.subset(labels == v), detail=False) for v in sorted(set(labels.tolist()), key=str)}
    found = alarms(c, card, rules, as_of)
    devices = c.groups.get("device", np.array([], object))
    longest = max(rules.windows_days) if rules.windows_days else None
    for dev in sorted(set(devices.tolist()), key=str):
        if len(set(devices.tolist())) < 2:
            break                    # one device: its alarms are the overall ones
        d_rules = replace(rules, windows_days=(longest,) if longest else ())
        found += [a for a in alarms(c.subset(devices == dev), card, d_rules, as_of, scope_prefix=f"device={dev}:")
                  if not a["scope"].endswith("total") and ":total:" not in a["scope"]]
    if drift:
        found += drift.get("alarms", [])
    summary = {
        "as_of": as_of.isoformat(), "since": since.isoformat() if since else None,
        "n_outcomes_linked": total["n"], **counts,
        "auc_malignant": total["auc_malignant"], "auc_malignant_ci95": total["auc_malignant_ci95"],
        "sensitivity": total["sensitivity"], "sensitivity_ci95": total["sensitivity_ci95"],
        "specificity": total["specificity"], "specificity_ci95": total["specificity_ci95"],
        "ece_malignancy": total["ece_malignancy"], "referral_confusion": total["referral_confusion"],
        "alarms": found,
    }
    return {"summary": summary, "total": total, "windows": windows, "by": by, "trend": trend(c),
            "model_card": card.__dict__, "referral_threshold": referral_threshold, "drift": drift or {},
            "rules": rules.__dict__}


def trend(c: Cases) -> dict[str, list[dict[str, Any]]]:
    """Per device and calendar month: n, AUC, sensitivity, specificity."""
    out: dict[str, list[dict[str, Any]]] = {}
    if not len(c):
        return out
    months = c.when.astype("datetime64[M]")
    devices = c.groups["device"]
    for dev in sorted(set(devices.tolist()), key=str):
        rows = []
        for mo in sorted(set(months[devices == dev].tolist())):
            m = metrics(c.subset((devices == dev) & (months == np.datetime64(mo, "M"))), detail=False)
            rows.append({"month": str(np.datetime64(mo, "M")), "n": m["n"], "auc_malignant": m["auc_malignant"],
                         "sensitivity": m["sensitivity"], "specificity": m["specificity"]})
        out[str(dev)] = rows
    return out


def build_report(rt: Any, *, since: date | None = None, as_of: date | None = None) -> dict[str, Any]:
    """The whole report for a runtime's database (the CLI's and the API's)."""
    mon = rt.settings.monitor
    c, counts = collect(rt.sessions, since=since, age_edges=mon.age_bands)
    card, manifest = load_card(rt.settings)
    cal = ((manifest.get("calibration") or {}).get("tta" if (manifest.get("tta") or {}).get("enabled") else "plain")
           or {})
    as_of = as_of or datetime.now(timezone.utc).date()
    from dermgate.drift import drift_report
    drift = drift_report(rt, manifest, as_of=as_of, since=since)
    report = compute_report(c, counts, card, AlarmRules.from_settings(mon), as_of, since,
                            cal.get("referral_threshold"), drift)
    report["_cases"] = c
    return report


def jsonable(x: Any) -> Any:
    """NaN and infinities are not JSON: null. Private keys (``_...``) are left out."""
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, (np.floating,)):
        return jsonable(float(x))
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (date, datetime)):
        return x.isoformat()
    return x


def _fmt(v: Any, ci: Sequence[float] | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    s = f"{v:.3f}" if isinstance(v, float) else str(v)
    if ci and not any(x is None or math.isnan(x) for x in ci):
        s += f" ({ci[0]:.3f}-{ci[1]:.3f})"
    return s


def text_summary(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [f"live performance as of {s['as_of']}: {s['n_outcomes_linked']} results with outcomes "
             f"({s['n_results']} results, {s['n_outcomes']} outcomes, {s['n_outcomes_unlinked']} unlinked)"]
    for name, m in [("total", report["total"]), *report["windows"].items()]:
        lines.append(f"  {name:6s} n={m['n']:5d}  AUC {_fmt(m['auc_malignant'], m['auc_malignant_ci95'])}  "
                     f"sens {_fmt(m['sensitivity'], m['sensitivity_ci95'])}  "
                     f"spec {_fmt(m['specificity'], m['specificity_ci95'])}  ECE {_fmt(m['ece_malignancy'])}")
    lines.append(f"alarms: {len(s['alarms'])}")
    lines += [f"  [{a['severity']}] {a['kind']} ({a['scope']}): {a['message']}\n      -> {a['action']}"
              for a in s["alarms"]]
    return "\n".join(lines)


# ---- the HTML report with plots -----------------------------------------------------------------

def _figure(w: float = 5.5, h: float = 4.5) -> Any:
    from matplotlib.figure import Figure
    return Figure(figsize=(w, h), dpi=100)


def _plot_roc(c: Cases, report: dict[str, Any], path: Path) -> None:
    from sklearn.metrics import roc_curve
    fig = _figure()
    ax = fig.add_subplot()
    as_of = date.fromisoformat(report["summary"]["as_of"])
    for label, days in [("total", None), *[(k, int(k[:-1])) for k in report["windows"]]]:
        w = window(c, as_of, days)
        if 0 < w.y_mal.sum() < len(w):
            fpr, tpr, _ = roc_curve(w.y_mal, w.p_mal)
            ax.plot(fpr, tpr, label=f"{label} (AUC {auc(w.y_mal, w.p_mal):.3f}, n={len(w)})")
    t = report["total"]
    if not math.isnan(t["sensitivity"]) and not math.isnan(t["specificity"]):
        ax.plot([1 - t["specificity"]], [t["sensitivity"]], "ko", label="referral threshold (total)")
    card = report["model_card"]
    if not math.isnan(card["sensitivity"]):
        ax.plot([1 - card["specificity"]], [card["sensitivity"]], "r^", label="model card (test split)")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC, P(malignant) vs outcome", xlim=(0, 1),
           ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=7)
    fig.savefig(path, bbox_inches="tight")


def _plot_reliability(report: dict[str, Any], path: Path) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ":", color="grey")
    rel = report["total"]["reliability"]
    if rel:
        xs, ys, ns = [r["mean_predicted"] for r in rel], [r["observed"] for r in rel], [r["n"] for r in rel]
        ax.plot(xs, ys, "o-")
        for x, y, n in zip(xs, ys, ns):
            ax.annotate(str(n), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set(xlabel="mean P(malignant)", ylabel="observed malignant rate", xlim=(0, 1), ylim=(0, 1),
           title=f"reliability, ECE {_fmt(report['total']['ece_malignancy'])}")
    fig.savefig(path, bbox_inches="tight")


def _plot_trend(report: dict[str, Any], path: Path) -> None:
    fig = _figure(9, 4.5)
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    for dev, rows in report["trend"].items():
        xs = [r["month"] for r in rows]
        for ax, key in zip(axes, ("sensitivity", "auc_malignant")):
            ax.plot(xs, [r[key] for r in rows], "o-", label=dev[:40])
    for ax, key in zip(axes, ("sensitivity", "malignancy AUC")):
        ax.set(title=f"{key} per month and device", ylim=(0, 1.02))
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    axes[0].legend(fontsize=6)
    fig.savefig(path, bbox_inches="tight")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    """report.html with roc.png, reliability.png, trend.png and report.json, for a quality committee."""
    out_dir.mkdir(parents=True, exist_ok=True)
    c: Cases = report.get("_cases") or Cases.empty()
    _plot_roc(c, report, out_dir / "roc.png")
    _plot_reliability(report, out_dir / "reliability.png")
    _plot_trend(report, out_dir / "trend.png")
    (out_dir / "report.json").write_text(json.dumps(jsonable(report), indent=1) + "\n")
    s = report["summary"]

    def row(name: str, m: dict[str, Any]) -> list[str]:
        return [name, str(m["n"]), str(m["n_malignant"]), _fmt(m["auc_malignant"], m["auc_malignant_ci95"]),
                _fmt(m["sensitivity"], m["sensitivity_ci95"]), _fmt(m["specificity"], m["specificity_ci95"]),
                _fmt(m["ece_malignancy"]), str(m["false_negatives"])]
    heads = ["", "n", "malignant", "AUC (95% CI)", "sensitivity (95% CI)", "specificity (95% CI)", "ECE", "missed"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>dermgate live performance</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #999;padding:3px 8px;font-size:90%}.critical{color:#b00}.warning{color:#a60}"
        "</style></head><body>",
        "<h1>dermgate: live performance against outcomes</h1>",
        f"<p>As of {s['as_of']}{' since ' + s['since'] if s['since'] else ''}: {s['n_outcomes_linked']} AI results "
        f"with an outcome; {s['n_results']} results, {s['n_outcomes']} outcomes ({s['n_outcomes_unlinked']} "
        "unlinked, waiting for a person). Decision support, not a diagnosis: these figures say how far the "
        "AI's output can be trusted here.</p>",
        f"<h2>Alarms ({len(s['alarms'])})</h2>",
        "<ul>" + "".join(f"<li class='{a['severity']}'><b>{html.escape(a['kind'])}</b> ({html.escape(a['scope'])}): "
                         f"{html.escape(a['message'])}<br><i>Action:</i> {html.escape(a['action'])}<br>"
                         f"<small>evidence: {html.escape(json.dumps(jsonable(a['evidence'])))}</small></li>"
                         for a in s["alarms"]) + "</ul>" if s["alarms"] else "<p>None.</p>",
        "<h2>Performance</h2>",
        _table(heads, [row("total", report["total"]), *[row(k, m) for k, m in report["windows"].items()],
                       row(f"model card {report['model_card']['version']}", {
                           "n": "-", "n_malignant": "-", "auc_malignant": report["model_card"]["auc_malignant"],
                           "auc_malignant_ci95": None, "sensitivity": report["model_card"]["sensitivity"],
                           "sensitivity_ci95": None, "specificity": report["model_card"]["specificity"],
                           "specificity_ci95": None, "ece_malignancy": report["model_card"]["ece_malignancy"],
                           "false_negatives": "-"})]),
        "<img src='roc.png'> <img src='reliability.png'>",
        "<h2>Trend per device</h2><img src='trend.png'>",
    ]
    for g, groups in report["by"].items():
        parts.append(f"<h3>By {g.replace('_', ' ')}</h3>")
        parts.append(_table(heads, [row(k, m) for k, m in groups.items()]))
    rel = report["total"]["reliability"]
    parts.append("<h2>Reliability table (P(malignant))</h2>")
    parts.append(_table(["bin", "n", "mean predicted", "observed"],
                        [[f"{r['bin'][0]:.2f}-{r['bin'][1]:.2f}", r["n"], f"{r['mean_predicted']:.3f}",
                          f"{r['observed']:.3f}"] for r in rel]))
    cm = report["total"]["confusion_matrix"]
    parts.append(f"<h2>Confusion matrix (outcomes with a class, n={cm['n']}; rows: truth)</h2>")
    parts.append(_table(["", *cm["labels"]], [[lab, *r] for lab, r in zip(cm["labels"], cm["matrix"])]))
    rc = report["total"]["referral_confusion"]
    parts.append(_table(["", "malignant", "benign"], [["referred", rc["tp"], rc["fp"]],
                                                      ["not referred", rc["fn"], rc["tn"]]]))
    drift = report.get("drift") or {}
    if drift.get("devices"):
        parts.append("<h2>Population drift (no outcomes needed; PSI against the training reference)</h2>")
        feats = drift.get("features", [])
        parts.append(_table(["device", "images", *feats],
                            [[d, v["n"], *[_fmt(v["psi"].get(f)) for f in feats]] for d, v in drift["devices"].items()]))
    parts.append("</body></html>")
    path = out_dir / "report.html"
    path.write_text("\n".join(parts))
    return path

