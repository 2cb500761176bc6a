"""Simulated result streams for the live-performance alarms: when do they fire, how often falsely?

    python -m dermgate.monitor_sim [--streams 100] [--json]

A stream is 2,000 AI results with outcomes over 200 days (10 a day). The model
is calibrated: the true malignancy logit is N(-2.2, 1.8) (prevalence about
0.2), P(malignant) equals the true probability, and the referral threshold is
set so that sensitivity is 0.97 (the model card's test figure). The model card
compared against is measured on 200,000 cases of the same stable generator.

Degradation at a known day (a new camera the model does not know): from then
on every P(malignant) logit is ``shift`` lower (default 1.5) while the truth is
unchanged: sensitivity falls to about 0.85, calibration drifts, misses rise.

The alarms (``dermgate.monitor.alarms``) are evaluated every ``every`` days on
everything up to that day. Reported: on stable streams, the share of streams
with any alarm in the 200 days and the share of evaluations with an alarm; on
degraded streams, the share that alarm before the change (false) and after it,
and the delay from the change to the first alarm.
"""

from __future__ import annotations

import argparse
import json
import math
from datetime import date, timedelta
from typing import Any

import numpy as np

from dermgate.monitor import AlarmRules, Card, Cases, SUBGROUPS, metrics
from inference.result import CLASSES

START = date(2026, 1, 1)
MU, SD = -2.2, 1.8
CARD_SENSITIVITY = 0.97


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def threshold_and_card(seed: int = 12345, n: int = 200_000) -> tuple[float, Card]:
    rng = np.random.default_rng(seed)
    p = _sigmoid(rng.normal(MU, SD, n))
    y = (rng.random(n) < p).astype(int)
    thr = float(np.quantile(p[y == 1], 1 - CARD_SENSITIVITY))
    c = cases(p, y, p >= thr, np.zeros(n, int))
    m = metrics(c, detail=False)
    return thr, Card("simulated", m["auc_malignant"], m["sensitivity"], m["specificity"], m["ece_malignancy"])


def cases(p: np.ndarray, y: np.ndarray, referred: np.ndarray, day: np.ndarray) -> Cases:
    n = len(p)
    when = np.array([np.datetime64(START, "D") + np.timedelta64(int(d), "D") for d in day], "datetime64[D]")
    return Cases(when, p, referred, y.astype(int), np.full(n, -1), np.full((n, len(CLASSES)), np.nan),
                 {g: np.full(n, "sim", object) for g in SUBGROUPS})


def stream(seed: int, threshold: float, *, n: int = 2000, days: int = 200, change_day: int | None = None,
           shift: float = 1.5) -> Cases:
    rng = np.random.default_rng(seed)
    day = np.sort(rng.integers(0, days, n))
    logit = rng.normal(MU, SD, n)
    y = (rng.random(n) < _sigmoid(logit)).astype(int)
    if change_day is not None:
        logit = np.where(day >= change_day, logit - shift, logit)
    p = _sigmoid(logit)
    return cases(p, y, p >= threshold, day)


def first_alarms(c: Cases, card: Card, rules: AlarmRules, *, days: int = 200, every: int = 1,
                 start: int = 14) -> list[tuple[int, list[str]]]:
    """(day, alarm ids) for every evaluation day with at least one alarm."""
    from dermgate.monitor import alarms
    out = []
    for d in range(start, days, every):
        found = alarms(c, card, rules, START + timedelta(days=d))
        if found:
            out.append((d, sorted({f"{a['kind']}/{a['severity']}" for a in found})))
    return out


def run(streams: int = 100, *, days: int = 200, change_day: int = 100, shift: float = 1.5, every: int = 1,
        rules: AlarmRules | None = None) -> dict[str, Any]:
    rules = rules or AlarmRules()
    thr, card = threshold_and_card()
    stable_critical = 0
    stable_kinds: dict[str, int] = {}
    kinds_after: dict[str, int] = {}
    stable_any, stable_evals, stable_alarm_evals = 0, 0, 0
    before, after, delays = 0, 0, []
    n_evals = len(range(14, days, every))
    for i in range(streams):
        st = first_alarms(stream(1000 + i, thr, days=days), card, rules, days=days, every=every)
        stable_any += bool(st)
        stable_critical += any(k.endswith("/critical") for _, ks in st for k in ks)
        stable_evals += n_evals
        stable_alarm_evals += len(st)
        for _, ks in st:
            for k in ks:
                stable_kinds[k] = stable_kinds.get(k, 0) + 1
        dg = first_alarms(stream(5000 + i, thr, days=days, change_day=change_day, shift=shift), card, rules,
                          days=days, every=every)
        pre = [d for d, _ in dg if d < change_day]
        post = [(d, ks) for d, ks in dg if d >= change_day]
        before += bool(pre)
        if post:
            after += 1
            delays.append(post[0][0] - change_day)
            for k in post[0][1]:
                kinds_after[k] = kinds_after.get(k, 0) + 1
    deg = stream(5000, thr, days=days, change_day=change_day, shift=shift)
    post_m = metrics(deg.subset(deg.when >= np.datetime64(START + timedelta(days=change_day), "D")), detail=False)
    return {
        "streams": streams, "results_per_stream": 2000, "days": days, "evaluated_every_days": every,
        "change_day": change_day, "logit_shift": shift, "referral_threshold": thr, "model_card": card.__dict__,
        "rules": rules.__dict__,
        "degraded_after_change": {"sensitivity": post_m["sensitivity"], "auc_malignant": post_m["auc_malignant"],
                                  "ece_malignancy": post_m["ece_malignancy"]},
        "stable": {"streams_with_any_alarm": stable_any / streams,
                   "streams_with_a_critical_alarm": stable_critical / streams,
                   "evaluations_with_an_alarm": stable_alarm_evals / max(stable_evals, 1),
                   "alarm_evaluations_by_kind": stable_kinds},
        "degraded": {"streams_alarmed_before_change": before / streams,
                     "streams_alarmed_after_change": after / streams,
                     "delay_days_median": float(np.median(delays)) if delays else math.nan,
                     "delay_days_p90": float(np.percentile(delays, 90)) if delays else math.nan,
                     "first_alarm_kinds": kinds_after},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--every", type=int, default=1, help="evaluate the alarms every N days")
    ap.add_argument("--shift", type=float, default=1.5)
    args = ap.parse_args(argv)
    print(json.dumps(run(args.streams, every=args.every, shift=args.shift), indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

