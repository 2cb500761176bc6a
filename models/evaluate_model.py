"""Measure the exported model for its model card: held-out test split, external ISIC 2017
test split, the hard cases (melanoma against histopathology-confirmed naevi), subgroups,
Grad-CAM localisation, TTA on/off; figures under ``models/card/``.

    python -m models.evaluate_model [--ham ../shared/data/ham10000] [--isic ../shared/data/isic2017]

Everything runs through the shipped engine and the public evaluation interface
(``inference.evaluate.run_evaluate``), so the card measures what the service
does. Nothing here feeds back into the model: the ISIC 2017 test split is external
validation only (its train and val splits are training and selection data since
recipe 2.x, so they are never scored as external), and the test split was not used for any choice (``models/export.py``
chooses on validation). The test and ISIC metrics are written into
``models/manifest.json`` under ``metrics`` (the ONNX file, hence its sha256, is untouched).
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from inference.cam import mass_inside
from inference.engine import MANIFEST_FILE, Engine, default_model_dir, load_image
from inference.evaluate import _jsonable, classification_metrics, run_evaluate
from inference.result import CLASSES
from models.split import load_split

MASK_THRESHOLD = 128  # masks are anti-aliased by the 200x150 resize (README of the data)
CAM_GOAL = 0.60
AGE_BANDS = ((0, 30, "<30"), (30, 50, "30-49"), (50, 70, "50-69"), (70, 200, ">=70"))
MIN_SUBGROUP = 30     # smaller subgroups are listed with n only: their metrics are noise
SUBGROUP_BOOTSTRAP = 500


def age_band(age: str) -> str:
    try:
        a = float(age)
    except ValueError:
        return "unknown"
    return next(name for lo, hi, name in AGE_BANDS if lo <= a < hi)


def write_labels(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def read_predictions(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def subgroups(preds: list[dict[str, str]], meta: dict[str, dict[str, str]], threshold: float) -> dict:
    """Metrics by sex, age band and body site on the test split, lesion-level bootstrap CIs."""
    out: dict[str, dict] = {}
    keys = {"sex": lambda m: m["sex"] or "unknown", "age_band": lambda m: age_band(m["age"]),
            "body_site": lambda m: m["localization"] or "unknown"}
    for name, key in keys.items():
        groups: dict[str, list[dict[str, str]]] = defaultdict(list)
        for p in preds:
            groups[key(meta[p["path"].removesuffix(".jpg")])].append(p)
        out[name] = {}
        for g, rows in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            if len(rows) < MIN_SUBGROUP:
                out[name][g] = {"n": len(rows), "note": f"fewer than {MIN_SUBGROUP} images: no metrics"}
                continue
            probs = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
            m = classification_metrics([r["dx"] for r in rows], probs, threshold,
                                       groups=[meta[r["path"].removesuffix(".jpg")]["lesion_id"] for r in rows],
                                       bootstrap=SUBGROUP_BOOTSTRAP)
            out[name][g] = {k: m[k] for k in ("n", "n_malignant", "malignancy_auc", "melanoma_auc",
                                              "balanced_accuracy", "sensitivity", "specificity", "ci95")}
    return out


def hard_cases(preds: list[dict[str, str]], meta: dict[str, dict[str, str]], threshold: float,
               bootstrap: int) -> dict:
    """Melanoma against naevi confirmed by histopathology (HAM ``dx_type``), lesion bootstrap CI:
    the excised, atypical naevi that other clinics' collections are full of."""
    rows = [p for p in preds if p["dx"] == "mel"
            or (p["dx"] == "nv" and meta[p["path"].removesuffix(".jpg")]["dx_type"] == "histo")]
    probs = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    m = classification_metrics([r["dx"] for r in rows], probs, threshold,
                               groups=[meta[r["path"].removesuffix(".jpg")]["lesion_id"] for r in rows],
                               bootstrap=bootstrap)
    ci = m.get("ci95", {}).get("melanoma_auc")
    return {"n": m["n"], "n_melanoma": m["n_melanoma"], "n_histo_naevi": m["n"] - m["n_melanoma"],
            "melanoma_auc": m["melanoma_auc"], "ci95": {"melanoma_auc": ci}}


def cam_in_mask(engine: Engine, ham: Path, image_ids: list[str]) -> dict:
    """Share of positive Grad-CAM mass inside the lesion mask, per image, vs the mask's area share
    (what a uniform map would score)."""
    shares, areas = [], []
    for i in tqdm(range(0, len(image_ids), 32), desc="grad-cam", unit="batch"):
        ids = image_ids[i:i + 32]
        preds = engine.predict([load_image(ham / "images" / f"{x}.jpg") for x in ids], cam=True)
        for x, p in zip(ids, preds):
            mask = cv2.imread(str(ham / "masks" / f"{x}.png"), cv2.IMREAD_GRAYSCALE) >= MASK_THRESHOLD
            if p.cam is None or not mask.any():
                continue
            shares.append(mass_inside(p.cam, mask))
            areas.append(float(mask.mean()))
    s, a = np.array(shares), np.array(areas)
    s_ok = ~np.isnan(s)
    return {"n": int(s_ok.sum()), "mean_share_inside": float(s[s_ok].mean()),
            "median_share_inside": float(np.median(s[s_ok])),
            "fraction_of_images_at_least_0.60": float((s[s_ok] >= CAM_GOAL).mean()),
            "mean_mask_area_fraction": float(a[s_ok].mean()),
            "mean_share_minus_area": float((s[s_ok] - a[s_ok]).mean()),
            "goal": f"mean share inside >= {CAM_GOAL}",
            "mask_threshold": MASK_THRESHOLD}


def _summary(m: dict) -> dict:
    keys = ("n", "n_malignant", "n_melanoma", "malignancy_auc", "melanoma_auc", "balanced_accuracy",
            "sensitivity", "specificity", "sensitivity_at_specificity_0.80", "ece", "ece_malignancy",
            "n_not_assessable", "n_low_confidence", "risk_counts", "ci95", "tta")
    return {k: m[k] for k in keys if k in m}


def _f(v: object, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def _ci(m: dict, key: str) -> str:
    ci = m.get("ci95", {}).get(key)
    return f"{_f(m.get(key))} ({_f(ci[0])}-{_f(ci[1])})" if ci and ci[0] is not None else _f(m.get(key))


def render_tables(report: dict) -> str:
    """Markdown tables of the report, pasted between the markers in MODEL_CARD.md."""
    shipped = report["shipped_mode"]
    views = report.get("tta_views", [])
    out = [f"Shipped inference mode: **{f'TTA over {len(views)} views' if shipped == 'tta' else 'single view'}**. "
           "95% CIs: percentile bootstrap (1000 resamples; lesions on HAM10000, images on ISIC 2017). "
           "ISIC 2017: its 600-image test split only (595 labelled); its train and val splits are training "
           "and selection data.", "",
           "| data set | n | malignancy AUC | melanoma AUC | balanced accuracy | sensitivity @ referral | "
           "specificity @ referral | sensitivity @ spec 0.80 | ECE (top class) | ECE (P malignant) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for name, key in (("HAM10000 test split (lesion-level)", "test"), ("ISIC 2017 test split (external)", "isic2017")):
        m = report[key][shipped]
        out.append(f"| {name} | {m['n']} | {_ci(m, 'malignancy_auc')} | {_ci(m, 'melanoma_auc')} | "
                   f"{_ci(m, 'balanced_accuracy')} | {_ci(m, 'sensitivity')} | {_ci(m, 'specificity')} | "
                   f"{_ci(m, 'sensitivity_at_specificity_0.80')} | {_ci(m, 'ece')} | {_ci(m, 'ece_malignancy')} |")
    hc = report.get("hard_cases", {})
    if hc:
        out += ["", "Hard cases: melanoma against naevi confirmed by histopathology (HAM10000 `dx_type`), "
                "and ISIC 2017 validation (selection data, shown for reference):", "",
                "| data set | n | melanomas | other | melanoma AUC (95% CI) |", "|---|---|---|---|---|"]
        for key, title in (("test", "HAM test: melanoma vs histopathology naevi"),
                           ("val", "HAM validation: melanoma vs histopathology naevi (selection data)"),
                           ("isic_val", "ISIC 2017 validation (selection data)")):
            if key in hc:
                m = hc[key]
                out.append(f"| {title} | {m['n']} | {m['n_melanoma']} | {m['n'] - m['n_melanoma']} | "
                           f"{_ci(m, 'melanoma_auc')} |")
    out += ["", "TTA on and off (same model, same calibration procedure; the choice was made on validation):", "",
            "| data set | mode | malignancy AUC | melanoma AUC | balanced accuracy | sensitivity | specificity | ECE |",
            "|---|---|---|---|---|---|---|---|"]
    for key in ("test", "isic2017"):
        for mode in ("plain", "tta"):
            m = report[key][mode]
            out.append(f"| {key} | {mode} | {_f(m['malignancy_auc'])} | {_f(m['melanoma_auc'])} | "
                       f"{_f(m['balanced_accuracy'])} | {_f(m['sensitivity'])} | {_f(m['specificity'])} | {_f(m['ece'])} |")
    for key, title in (("test", "HAM test split"), ("isic2017", "ISIC 2017")):
        m = report[key][shipped]
        out += ["", f"Risk levels on the {title}: " + ", ".join(f"{k} {v}" for k, v in m["risk_counts"].items())
                + f"; low-confidence flags {m['n_low_confidence']}; not assessable {m['n_not_assessable']}."]
    out += ["", "Subgroups on the HAM test split (lesion bootstrap CIs; groups under "
            f"{MIN_SUBGROUP} images listed without metrics):", "",
            "| attribute | group | n | malignant | malignancy AUC | sensitivity | specificity | balanced accuracy |",
            "|---|---|---|---|---|---|---|---|"]
    for attr, groups in report["subgroups_test"].items():
        for g, m in groups.items():
            if "note" in m:
                out.append(f"| {attr} | {g} | {m['n']} | | | | | |")
            else:
                out.append(f"| {attr} | {g} | {m['n']} | {m['n_malignant']} | {_ci(m, 'malignancy_auc')} | "
                           f"{_ci(m, 'sensitivity')} | {_ci(m, 'specificity')} | {_ci(m, 'balanced_accuracy')} |")
    c = report["grad_cam_test"]
    out += ["", f"Grad-CAM on the HAM test split ({c['n']} images, lesion masks thresholded at {c['mask_threshold']}): "
            f"mean share of positive CAM mass inside the lesion **{c['mean_share_inside']:.1%}** "
            f"(median {c['median_share_inside']:.1%}; {c['fraction_of_images_at_least_0.60']:.0%} of images at or "
            f"above 60%). A flat map would score the mask's mean area share, {c['mean_mask_area_fraction']:.1%}."]
    return "\n".join(out) + "\n"


CARD_BEGIN, CARD_END = "<!-- results:begin -->", "<!-- results:end -->"


def update_card(card: Path, tables: str) -> None:
    text = card.read_text()
    if CARD_BEGIN in text and CARD_END in text:
        head, rest = text.split(CARD_BEGIN, 1)
        _, tail = rest.split(CARD_END, 1)
        card.write_text(f"{head}{CARD_BEGIN}\n{tables}{CARD_END}{tail}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ham", type=Path, default=Path("../shared/data/ham10000"))
    ap.add_argument("--isic", type=Path, default=Path("../shared/data/isic2017"))
    ap.add_argument("--split", type=Path, default=Path("models/split.csv"))
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("models/card"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--no-card", action="store_true",
                    help="measure only (e.g. an earlier model for comparison): do not touch the card or manifest")
    args = ap.parse_args(argv)
    model_dir = args.model_dir or default_model_dir()
    engines = {mode: Engine(model_dir, intra_op_threads=args.threads, tta=(mode == "tta"))
               for mode in ("plain", "tta")}
    shipped = "tta" if engines["plain"].manifest.tta else "plain"
    meta = {r["image_id"]: r for r in csv.DictReader((args.ham / "metadata.csv").open())}
    test = [r for r in load_split(args.split) if r["split"] == "test"]
    isic_all = list(csv.DictReader((args.isic / "labels.csv").open()))
    isic = [r for r in isic_all if r["split"] == "test"]          # the external test split only
    isic_val = [r for r in isic_all if r["split"] == "val" and r["dx"]]
    val = [r for r in load_split(args.split) if r["split"] == "val"]
    report: dict = {"shipped_mode": shipped, "test": {}, "isic2017": {}}
    with tempfile.TemporaryDirectory() as tmp:
        ham_csv = write_labels(Path(tmp) / "ham_test.csv", [
            {"path": f"{r['image_id']}.jpg", "dx": r["dx"], "lesion_id": r["lesion_id"]} for r in test])
        isic_csv = write_labels(Path(tmp) / "isic2017.csv", [
            {"path": f"{r['image_id']}.jpg", "dx": r["dx"]} for r in isic])
        for mode, engine in engines.items():
            report["test"][mode] = _summary(run_evaluate(args.ham / "images", ham_csv, args.out / f"ham_test_{mode}",
                                                         engine, bootstrap=args.bootstrap))
            report["isic2017"][mode] = _summary(run_evaluate(args.isic / "images", isic_csv,
                                                             args.out / f"isic2017_{mode}", engine,
                                                             bootstrap=args.bootstrap))
        engine = engines[shipped]
        ham_val_csv = write_labels(Path(tmp) / "ham_val.csv", [
            {"path": f"{r['image_id']}.jpg", "dx": r["dx"], "lesion_id": r["lesion_id"]} for r in val])
        run_evaluate(args.ham / "images", ham_val_csv, args.out / f"ham_val_{shipped}", engine, bootstrap=0)
        isic_val_csv = write_labels(Path(tmp) / "isic_val.csv", [
            {"path": f"{r['image_id']}.jpg", "dx": r["dx"]} for r in isic_val])
        iv = run_evaluate(args.isic / "images", isic_val_csv, args.out / f"isic2017_val_{shipped}", engine,
                          bootstrap=args.bootstrap)
    preds = read_predictions(args.out / f"ham_test_{shipped}" / "predictions.csv")
    threshold = engine.calibration.referral_threshold
    report["tta_views"] = list(engine.manifest.tta_views)
    report["hard_cases"] = {
        "test": hard_cases(preds, meta, threshold, args.bootstrap),
        "val": hard_cases(read_predictions(args.out / f"ham_val_{shipped}" / "predictions.csv"), meta, threshold,
                          args.bootstrap),
        "isic_val": {"n": iv["n"], "n_melanoma": iv["n_melanoma"], "melanoma_auc": iv["melanoma_auc"],
                     "ci95": {"melanoma_auc": iv.get("ci95", {}).get("melanoma_auc")}}}
    report["subgroups_test"] = subgroups(preds, meta, threshold)
    report["grad_cam_test"] = cam_in_mask(engine, args.ham, [r["image_id"] for r in test])
    report["model"] = dict(engine.model_info.__dict__)
    (args.out / "report.json").write_text(json.dumps(_jsonable(report), indent=1) + "\n")
    tables = render_tables(report)
    (args.out / "results.md").write_text(tables)
    for key, m in report["hard_cases"].items():
        print(f"hard cases {key}: melanoma AUC {_ci(m, 'melanoma_auc')} (n {m['n']}, melanomas {m['n_melanoma']})")
    if args.no_card:
        return
    update_card(model_dir / "MODEL_CARD.md", tables)

    manifest_path = model_dir / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["metrics"]["test"] = _jsonable(report["test"][shipped])
    manifest["metrics"]["isic2017_external"] = _jsonable(report["isic2017"][shipped])
    manifest["metrics"]["grad_cam_test"] = report["grad_cam_test"]
    manifest["metrics"]["hard_cases"] = _jsonable(report["hard_cases"])
    manifest["metrics"]["details"] = "models/card/report.json (subgroups, TTA on/off), models/MODEL_CARD.md"
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    for split in ("test", "isic2017"):
        for mode in ("plain", "tta"):
            m = report[split][mode]
            print(f"{split:9s} {mode:5s} malAUC {m['malignancy_auc']:.4f} melAUC {m['melanoma_auc']:.4f} "
                  f"balacc {m['balanced_accuracy']:.4f} sens {m['sensitivity']:.3f} spec {m['specificity']:.3f} "
                  f"ece {m['ece']:.4f}")
    print("grad-cam", json.dumps(report["grad_cam_test"]))


if __name__ == "__main__":
    main()
