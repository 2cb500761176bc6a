"""Independent evaluation of the engine on a labelled image folder: a stable interface.

    dermgate evaluate --images DIR --labels CSV --out DIR
    python -m inference.evaluate --images DIR --labels CSV --out DIR

CSV columns: ``path`` (relative to DIR), ``dx`` (akiec, bcc, bkl, df, mel, nv,
vasc, or ``benign`` / ``mel`` where only that is known), optional ``malignant``
(0/1, overrides what dx implies) and optional ``lesion_id`` (bootstrap resamples
lesions instead of images when present). Other columns are ignored; an empty or
unknown dx leaves the image predicted but unscored.

Writes to OUT:
  predictions.csv  path, dx, p_akiec ... p_vasc, p_malignant, risk, uncertainty
                   (then top_class, low_confidence, assessable, reason)
  metrics.json     malignancy AUC, melanoma AUC, balanced accuracy over the classes
                   present, sensitivity/specificity at the referral threshold,
                   expected calibration error, confusion matrix, 95% bootstrap CIs
  roc.png, reliability.png, confusion_matrix.png

Every image is scored, including those the quality gate calls not assessable
(their count is reported), so the gate cannot flatter the figures. Files that do
not decode are listed with their error and left out of the metrics.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from inference import postprocess as post
from inference.errors import ImageDecodeError
from inference.result import CLASSES, MALIGNANT, ModelInfo, Prediction

BINARY_LABELS = {"benign": 0, "mel": 1}  # dx values allowed where only this is known
ECE_BINS = 15
BOOTSTRAP_SAMPLES = 1000
CI_LEVEL = 0.95
SPECIFICITY_GOAL = 0.80
PRED_COLUMNS = ["path", "dx", *[f"p_{c}" for c in CLASSES], "p_malignant", "risk", "uncertainty",
                "top_class", "low_confidence", "assessable", "reason"]
MALIGNANT_IDX = [CLASSES.index(c) for c in MALIGNANT]
MEL = CLASSES.index("mel")


class Predictor(Protocol):
    """What evaluation needs from ``inference.engine.Engine`` (a Protocol, so tests can pass a subset)."""
    calibration: post.Calibration
    tta: bool

    @property
    def model_info(self) -> ModelInfo: ...

    def predict(self, images: Sequence[npt.NDArray[np.uint8]], *, cam: bool = True) -> list[Prediction]: ...


# ---------------------------------------------------------------------------- labels
def malignant_label(dx: str, malignant: str | None = None) -> int | None:
    """1 / 0 / None (unknown) from dx, overridden by an explicit 0/1 ``malignant`` value."""
    if malignant not in (None, ""):
        v = str(malignant).strip().lower()
        if v in {"1", "1.0", "true", "yes"}:
            return 1
        if v in {"0", "0.0", "false", "no"}:
            return 0
    if dx in CLASSES:
        return int(dx in MALIGNANT)
    return BINARY_LABELS.get(dx)


def melanoma_label(dx: str) -> int | None:
    if dx in CLASSES or dx in BINARY_LABELS:
        return int(dx == "mel")
    return None


# ---------------------------------------------------------------------------- metrics
def auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC, NaN unless both classes are present."""
    from sklearn.metrics import roc_auc_score
    y = np.asarray(y)
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` (predictions of absent classes count as errors)."""
    present = np.unique(y)
    return float(np.mean([(pred[y == c] == c).mean() for c in present])) if len(present) else float("nan")


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error, equal-width bins (Naeini et al. 2015; Guo et al. 2017)."""
    if len(confidence) == 0:
        return float("nan")
    idx = np.minimum((np.asarray(confidence) * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.mean() * abs(float(np.mean(correct[m])) - float(np.mean(confidence[m])))
    return float(total)


def sens_spec(y: np.ndarray, s: np.ndarray, threshold: float) -> tuple[float, float]:
    pos = s >= threshold
    sens = float(pos[y == 1].mean()) if (y == 1).any() else float("nan")
    spec = float((~pos[y == 0]).mean()) if (y == 0).any() else float("nan")
    return sens, spec


def sensitivity_at_specificity(y: np.ndarray, s: np.ndarray, specificity: float) -> float:
    """Highest sensitivity of any threshold whose specificity is at least ``specificity``."""
    from sklearn.metrics import roc_curve
    if not 0 < y.sum() < len(y):
        return float("nan")
    fpr, tpr, _ = roc_curve(y, s)
    ok = fpr <= 1 - specificity + 1e-12
    return float(tpr[ok].max())


class _Labels:
    """Ground truth arrays, with -1 where a label is unknown."""

    def __init__(self, dx: Sequence[str], malignant: Sequence[str | None] | None = None) -> None:
        mal = malignant or [None] * len(dx)
        self.y7 = np.array([CLASSES.index(d) if d in CLASSES else -1 for d in dx], dtype=int)
        self.y_mal = np.array([-1 if (v := malignant_label(d, m)) is None else v for d, m in zip(dx, mal)],
                              dtype=int)
        self.y_mel = np.array([-1 if (v := melanoma_label(d)) is None else v for d in dx], dtype=int)


def _scalars(lab: _Labels, probs: np.ndarray, threshold: float, idx: np.ndarray) -> dict[str, float]:
    p = probs[idx]
    y7, y_mal, y_mel = lab.y7[idx], lab.y_mal[idx], lab.y_mel[idx]
    p_mal = p[:, MALIGNANT_IDX].sum(1)
    k_mal, k_mel, k7 = y_mal >= 0, y_mel >= 0, y7 >= 0
    sens, spec = sens_spec(y_mal[k_mal], p_mal[k_mal], threshold)
    top = p[k7].argmax(1)
    return {
        "malignancy_auc": auc(y_mal[k_mal], p_mal[k_mal]),
        "melanoma_auc": auc(y_mel[k_mel], p[k_mel, MEL]),
        "balanced_accuracy": balanced_accuracy(y7[k7], top),
        "sensitivity": sens, "specificity": spec,
        "sensitivity_at_specificity_0.80": sensitivity_at_specificity(y_mal[k_mal], p_mal[k_mal], SPECIFICITY_GOAL),
        "ece": ece(p[k7].max(1), (top == y7[k7]).astype(float)),
        # binary reliability of P(malignant): |observed malignant rate - mean P| per bin
        "ece_malignancy": ece(p_mal[k_mal], (y_mal[k_mal] == 1).astype(float)),
    }


def bootstrap_ci(stat: Callable[[np.ndarray], dict[str, float]], n: int, groups: Sequence[str] | None = None,
                 samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict[str, list[float]]:
    """Percentile bootstrap 95% CIs of every value ``stat(indices)`` returns.

    With ``groups`` (e.g. lesion ids) whole groups are resampled, since images of
    one lesion are not independent."""
    rng = np.random.default_rng(seed)
    if groups is not None:
        _, inv = np.unique(np.asarray(groups), return_inverse=True)
        members = [np.flatnonzero(inv == g) for g in range(inv.max() + 1)]
    draws: dict[str, list[float]] = {}
    for _ in range(samples):
        if groups is None:
            idx = rng.integers(0, n, n)
        else:
            idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        for k, v in stat(idx).items():
            draws.setdefault(k, []).append(v)
    lo, hi = (1 - CI_LEVEL) / 2 * 100, (1 + CI_LEVEL) / 2 * 100
    out = {}
    for k, vals in draws.items():
        a = np.asarray(vals, float)
        a = a[~np.isnan(a)]
        out[k] = [float(np.percentile(a, lo)), float(np.percentile(a, hi))] if len(a) else [math.nan, math.nan]
    return out


def confusion(y7: np.ndarray, pred: np.ndarray) -> list[list[int]]:
    m = np.zeros((len(CLASSES), len(CLASSES)), int)
    np.add.at(m, (y7, pred), 1)
    return m.tolist()


def classification_metrics(dx: Sequence[str], probs: np.ndarray, referral_threshold: float,
                           malignant: Sequence[str | None] | None = None, groups: Sequence[str] | None = None,
                           bootstrap: int = 0, seed: int = 0) -> dict:
    """All metrics of the evaluation interface for calibrated probabilities ``probs`` (N, 7)."""
    lab = _Labels([d.strip().lower() for d in dx], malignant)
    probs = np.asarray(probs, np.float64)
    every = np.arange(len(probs))
    out: dict = _scalars(lab, probs, referral_threshold, every)
    k7, k_mal = lab.y7 >= 0, lab.y_mal >= 0
    p_mal = probs[:, MALIGNANT_IDX].sum(1)
    pos = p_mal >= referral_threshold
    out.update({
        "n": int(len(probs)), "n_malignant": int((lab.y_mal == 1).sum()), "n_benign": int((lab.y_mal == 0).sum()),
        "n_melanoma": int((lab.y_mel == 1).sum()), "n_seven_class": int(k7.sum()),
        "classes_present": [CLASSES[c] for c in np.unique(lab.y7[k7])],
        "referral_threshold": float(referral_threshold),
        "malignancy_confusion_at_threshold": {
            "tp": int((pos & (lab.y_mal == 1)).sum()), "fn": int((~pos & (lab.y_mal == 1)).sum()),
            "fp": int((pos & (lab.y_mal == 0)).sum()), "tn": int((~pos & (lab.y_mal == 0)).sum())},
        "confusion_matrix": {"labels": list(CLASSES), "rows": "true", "columns": "predicted",
                             "matrix": confusion(lab.y7[k7], probs[k7].argmax(1))},
    })
    if k_mal.sum() == 0:
        out["note"] = "no malignancy labels"
    if bootstrap:
        out["ci95"] = bootstrap_ci(lambda idx: _scalars(lab, probs, referral_threshold, idx), len(probs),
                                   groups, bootstrap, seed)
        out["ci95"]["method"] = (f"percentile bootstrap, {bootstrap} resamples of "
                                 f"{'lesions' if groups is not None else 'images'}")
    return out


# ---------------------------------------------------------------------------- plots
def _figure(w: float = 5.5, h: float = 5.0):  # noqa: ANN202 - matplotlib Figure without pyplot (thread-safe)
    from matplotlib.figure import Figure
    return Figure(figsize=(w, h), dpi=110)


def plot_roc(lab: _Labels, probs: np.ndarray, threshold: float, path: Path) -> None:
    from sklearn.metrics import roc_curve
    fig = _figure()
    ax = fig.add_subplot()
    p_mal = probs[:, MALIGNANT_IDX].sum(1)
    for name, y, s in (("malignancy", lab.y_mal, p_mal), ("melanoma", lab.y_mel, probs[:, MEL])):
        k = y >= 0
        if 0 < y[k].sum() < k.sum():
            fpr, tpr, _ = roc_curve(y[k], s[k])
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc(y[k], s[k]):.3f}, n={k.sum()})")
    k = lab.y_mal >= 0
    if k.any():
        sens, spec = sens_spec(lab.y_mal[k], p_mal[k], threshold)
        ax.plot([1 - spec], [sens], "ko", label=f"referral threshold {threshold:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, bbox_inches="tight")


def plot_reliability(lab: _Labels, probs: np.ndarray, path: Path) -> None:
    fig = _figure(10, 4.6)
    p_mal = probs[:, MALIGNANT_IDX].sum(1)
    k7, km = lab.y7 >= 0, lab.y_mal >= 0
    panels = (("top class (7-class)", probs[k7].max(1), (probs[k7].argmax(1) == lab.y7[k7]).astype(float)),
              ("P(malignant)", p_mal[km], (lab.y_mal[km] == 1).astype(float)))
    for i, (title, conf, hit) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        if len(conf):
            edges = np.linspace(0, 1, ECE_BINS + 1)
            b = np.minimum((conf * ECE_BINS).astype(int), ECE_BINS - 1)
            xs = [conf[b == j].mean() for j in range(ECE_BINS) if (b == j).any()]
            ys = [hit[b == j].mean() for j in range(ECE_BINS) if (b == j).any()]
            ns = [(b == j).sum() for j in range(ECE_BINS) if (b == j).any()]
            ax.bar(edges[:-1], [hit[b == j].mean() if (b == j).any() else 0 for j in range(ECE_BINS)],
                   width=1 / ECE_BINS, align="edge", alpha=0.3, edgecolor="k")
            ax.plot(xs, ys, "o-")
            for x, y, n in zip(xs, ys, ns):
                ax.annotate(str(n), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
            title += f", ECE {ece(conf, hit):.3f}"
        ax.set(xlabel="predicted probability", ylabel="observed frequency", title=title, xlim=(0, 1), ylim=(0, 1))
    fig.savefig(path, bbox_inches="tight")


def plot_confusion(lab: _Labels, probs: np.ndarray, path: Path) -> None:
    k7 = lab.y7 >= 0
    m = np.asarray(confusion(lab.y7[k7], probs[k7].argmax(1)), float)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig = _figure(6, 5.2)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(CLASSES)):
        for j in range(len(CLASSES)):
            if m[i].sum():
                ax.text(j, i, f"{int(m[i, j])}\n{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(CLASSES)), CLASSES)
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix (n={int(m.sum())}; row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.savefig(path, bbox_inches="tight")


# ---------------------------------------------------------------------------- the command
def read_labels(labels_csv: Path) -> list[dict[str, str]]:
    with Path(labels_csv).open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = {(f or "").strip().lower(): f for f in reader.fieldnames or []}
        missing = {"path", "dx"} - fields.keys()
        if missing:
            raise ValueError(f"{labels_csv}: missing column(s) {sorted(missing)}; has {reader.fieldnames}")
        rows = []
        for r in reader:
            row = {k: (r.get(orig) or "").strip() for k, orig in fields.items()}
            row["dx"] = row["dx"].lower()
            rows.append(row)
    return rows


def _fmt(x: float) -> str:
    return f"{x:.6f}"


def run_evaluate(images_dir: Path, labels_csv: Path, out_dir: Path, engine: Predictor, *,
                 batch_size: int = 32, bootstrap: int = BOOTSTRAP_SAMPLES, progress: bool = True) -> dict:
    """Predict every image listed in ``labels_csv`` and write predictions, metrics and plots.

    Returns the metrics dict also written to ``out_dir/metrics.json``."""
    from inference.engine import load_image
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    rows = read_labels(labels_csv)
    out_dir.mkdir(parents=True, exist_ok=True)
    preds: list[Prediction | None] = []
    errors: dict[int, str] = {}
    bar = tqdm(total=len(rows), desc="evaluate", unit="img", disable=not progress)
    for start in range(0, len(rows), batch_size):
        batch, where = [], []
        for i in range(start, min(start + batch_size, len(rows))):
            try:
                batch.append(load_image(images_dir / rows[i]["path"]))
                where.append(i)
            except ImageDecodeError as exc:
                errors[i] = str(exc)
        got = dict(zip(where, engine.predict(batch, cam=False))) if batch else {}
        preds.extend(got.get(i) for i in range(start, min(start + batch_size, len(rows))))
        bar.update(min(batch_size, len(rows) - start))
    bar.close()

    with (out_dir / "predictions.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(PRED_COLUMNS)
        for i, (row, p) in enumerate(zip(rows, preds)):
            if p is None:
                w.writerow([row["path"], row["dx"], *[""] * (len(CLASSES) + 1), "Error", "", "", "", "false", errors[i]])
                continue
            w.writerow([row["path"], row["dx"], *[_fmt(p.probabilities[c]) for c in CLASSES],
                        _fmt(p.malignancy_probability), p.risk.value, _fmt(p.uncertainty), p.top_class,
                        str(p.low_confidence).lower(), str(p.assessable).lower(), p.reason or ""])

    ok = [i for i, p in enumerate(preds) if p is not None]
    scored: list[Prediction] = [p for p in preds if p is not None]
    probs = np.array([[p.probabilities[c] for c in CLASSES] for p in scored]).reshape(-1, len(CLASSES))
    dx = [rows[i]["dx"] for i in ok]
    mal = [rows[i].get("malignant") for i in ok]
    # rows without a lesion id are their own group
    groups = ([rows[i]["lesion_id"] or f"\0row{i}" for i in ok]
              if rows and "lesion_id" in rows[0] else None)
    threshold = engine.calibration.referral_threshold
    metrics = classification_metrics(dx, probs, threshold, mal, groups, bootstrap)
    metrics.update({
        "n_images": len(rows), "n_decode_errors": len(errors),
        "n_not_assessable": sum(not p.assessable for p in scored),
        "n_low_confidence": sum(p.low_confidence for p in scored),
        "n_unlabelled": int(sum(malignant_label(d, m) is None and d not in CLASSES for d, m in zip(dx, mal))),
        "risk_counts": {r: sum(p.risk.value == r for p in scored)
                        for r in sorted({p.risk.value for p in scored})},
        "model": dict(engine.model_info.__dict__), "tta": engine.tta,
        "calibration": dict(engine.calibration.__dict__),
    })
    lab = _Labels(dx, mal)
    plot_roc(lab, probs, threshold, out_dir / "roc.png")
    plot_reliability(lab, probs, out_dir / "reliability.png")
    plot_confusion(lab, probs, out_dir / "confusion_matrix.png")
    (out_dir / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=1) + "\n")
    return metrics


def _jsonable(x: object) -> object:
    """NaN is not JSON: write null."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=Path, required=True, help="folder the CSV paths are relative to")
    parser.add_argument("--labels", type=Path, required=True, help="CSV with columns path, dx [, malignant]")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--model-dir", type=Path, default=None, help="ONNX + manifest (default: the shipped model)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="flip test-time augmentation (default: as the manifest says)")
    parser.add_argument("--bootstrap", type=int, default=BOOTSTRAP_SAMPLES, help="bootstrap resamples for CIs (0: none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from inference.engine import Engine
    engine = Engine(args.model_dir, intra_op_threads=args.threads, tta=args.tta, batch_size=args.batch_size)
    m = run_evaluate(args.images, args.labels, args.out, engine, batch_size=args.batch_size,
                     bootstrap=args.bootstrap, progress=not args.quiet)
    ci = m.get("ci95", {})

    def show(k: str) -> str:
        v = m[k]
        c = ci.get(k)
        return f"{v:.3f}" + (f" [{c[0]:.3f}, {c[1]:.3f}]" if c and not math.isnan(c[0]) else "")

    print(f"{m['n']} images scored ({m['n_decode_errors']} unreadable, {m['n_not_assessable']} not assessable)")
    for k in ("malignancy_auc", "melanoma_auc", "balanced_accuracy", "sensitivity", "specificity", "ece"):
        print(f"  {k:20s} {show(k)}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    raise SystemExit(main(ap.parse_args()))
