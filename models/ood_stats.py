"""Make the out-of-distribution statistics of the shipped model (``models/ood_stats.npz``), and measure them.

    python -m models.ood_stats                       # fit on the train split, threshold on validation
    python -m models.ood_stats --measure             # also: AUROC HAM test vs ISIC 2017 / non-dermoscopy

Re-run it whenever the ONNX model changes: the file records the model's sha256
and the engine ignores a file made for another model. Steps:

1. Pooled features (mean of the ONNX ``features`` map, identity view) and image
   statistics of the HAM10000 train / validation / test images (models/split.csv);
   cached under models/checkpoints/ood_cache/ by model sha256.
2. Fit (inference/ood.py): PCA to 128 dimensions, class means of the 7 training
   classes, Ledoit-Wolf shared covariance, residual scale.
3. Threshold: the 95th percentile of the VALIDATION split's scores, so about 5%
   of images like the training data are flagged (a documented, deliberate
   false-positive rate; the flag says "interpret with care", it blocks nothing).
4. Drift references: deciles of the validation scores and the training images'
   statistics, and the class mix the model predicts on validation.
5. ``--measure``: AUROC of the score for HAM10000 test vs ISIC 2017 (all 2,750
   images), and vs generated non-dermoscopy images (blank, text, synthetic
   photographs); written to models/card/ood.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from inference.engine import Engine, load_image
from inference.ood import STATS_FILE, fit, image_stats, reference_bins
from inference.result import CLASSES

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD_PERCENTILE = 95.0
DIMS = 128


def data_dir(name: str, given: Path | None) -> Path:
    if given:
        return given
    for cand in (os.environ.get(f"DERMGATE_{name.upper()}_DIR"), ROOT.parent / "shared" / "data" / name,
                 Path("/work/shared/data") / name):
        if cand and Path(cand).is_dir():
            return Path(cand)
    raise SystemExit(f"{name} images not found: pass --{name.replace('ham10000', 'ham').replace('isic2017', 'isic')}")


def features(engine: Engine, images: list[np.ndarray], batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features (identity view) and plain-view logits' argmax for RGB images."""
    pooled, top = [], []
    for i in range(0, len(images), batch):
        x = np.stack([engine.preprocess(im) for im in images[i:i + batch]])
        logits, feats = engine.run(x)
        pooled.append(feats.mean(axis=(2, 3)))
        top.append(logits.argmax(1))
    return np.concatenate(pooled), np.concatenate(top)


def extract(engine: Engine, paths: list[Path], cache: Path, desc: str) -> dict[str, np.ndarray]:
    if cache.exists():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    pooled, top, stats = [], [], []
    for i in tqdm(range(0, len(paths), 64), desc=desc, unit="batch"):
        ims = [load_image(p) for p in paths[i:i + 64]]
        f, t = features(engine, ims)
        pooled.append(f)
        top.append(t)
        stats.extend([list(image_stats(im).values()) for im in ims])
    out = {"pooled": np.concatenate(pooled).astype(np.float32), "top": np.concatenate(top),
           "stats": np.asarray(stats, np.float64)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)  # type: ignore[arg-type]
    return out


def synthetic_images(n: int = 150, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Non-dermoscopy images: blank frames, text documents and synthetic 'photographs'
    (gradients, shapes, textures, crops of sklearn's sample photos)."""
    from sklearn.datasets import load_sample_images
    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    out, kinds = [], []
    for i in range(n):
        kind = ("blank", "text", "photo", "shapes")[i % 4]
        h, w = int(rng.integers(300, 700)), int(rng.integers(400, 900))
        if kind == "blank":
            im = np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8)
            im = np.clip(im + rng.normal(0, 2, im.shape), 0, 255).astype(np.uint8)
        elif kind == "text":
            im = np.full((h, w, 3), 245, np.uint8)
            for y in range(30, h - 10, 28):
                words = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz  "), int(rng.integers(20, 50))))
                cv2.putText(im, words, (10, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (20, 20, 20), 1, cv2.LINE_AA)
        elif kind == "photo":
            src = photos[i % len(photos)]
            y0, x0 = int(rng.integers(0, src.shape[0] - 200)), int(rng.integers(0, src.shape[1] - 200))
            crop = src[y0:y0 + int(rng.integers(150, src.shape[0] - y0)), x0:x0 + int(rng.integers(150, src.shape[1] - x0))]
            im = np.ascontiguousarray(crop, np.uint8)
        else:
            yy, xx = np.mgrid[0:h, 0:w]
            c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            t = (xx / w)[..., None]
            im = (c0 * (1 - t) + c1 * t).astype(np.uint8)
            for _ in range(int(rng.integers(3, 12))):
                colour = tuple(int(v) for v in rng.integers(0, 256, 3))
                cv2.circle(im, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(10, 120)),
                           colour, -1)
        out.append(np.ascontiguousarray(im, np.uint8))
        kinds.append(kind)
    return out, kinds


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score
    y = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return float(roc_auc_score(y, np.r_[inside, outside]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=ROOT / "models")
    ap.add_argument("--ham", type=Path, default=None, help="HAM10000 folder (images/, metadata.csv)")
    ap.add_argument("--isic", type=Path, default=None, help="ISIC 2017 folder (images/, labels.csv)")
    ap.add_argument("--split", type=Path, default=ROOT / "models" / "split.csv")
    ap.add_argument("--cache", type=Path, default=ROOT / "models" / "checkpoints" / "ood_cache")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--measure", action="store_true", help="AUROC vs ISIC 2017 and non-dermoscopy images")
    args = ap.parse_args(argv)

    import csv
    engine = Engine(args.model_dir, intra_op_threads=args.threads, tta=False)
    sha = engine.model_info.sha256
    ham = data_dir("ham10000", args.ham)
    with args.split.open() as fh:
        rows = list(csv.DictReader(fh))
    data = {}
    for split in ("train", "val", "test"):
        part = [r for r in rows if r["split"] == split]
        d = extract(engine, [ham / "images" / f"{r['image_id']}.jpg" for r in part],
                    args.cache / f"{sha[:16]}-ham-{split}.npz", f"HAM {split}")
        d["y"] = np.array([CLASSES.index(r["dx"]) for r in part])
        data[split] = d

    stats = fit(data["train"]["pooled"], data["train"]["y"], len(CLASSES), dims=DIMS, onnx_sha256=sha)
    val_scores = stats.score(data["val"]["pooled"])
    stats.threshold = float(np.percentile(val_scores, THRESHOLD_PERCENTILE))
    stats.reference["ood_score"] = reference_bins(val_scores)
    for j, name in enumerate(("megapixels", "brightness", "colourfulness", "sharpness")):
        stats.reference[name] = reference_bins(data["train"]["stats"][:, j])
    stats.class_mix = np.bincount(data["val"]["top"], minlength=len(CLASSES)) / len(data["val"]["top"])
    test_scores = stats.score(data["test"]["pooled"])
    stats.meta = {"model": engine.model_info.name, "version": engine.model_info.version, "dims": DIMS,
                  "threshold_rule": f"{THRESHOLD_PERCENTILE:g}th percentile of the validation split's scores",
                  "fitted_on": f"HAM10000 train split ({len(data['train']['y'])} images, models/split.csv)",
                  "flagged_validation": float((val_scores > stats.threshold).mean()),
                  "flagged_test": float((test_scores > stats.threshold).mean())}
    out = args.model_dir / STATS_FILE
    stats.save(out)
    print(f"wrote {out}: threshold {stats.threshold:.3f}; flags {stats.meta['flagged_validation']:.3f} of "
          f"validation, {stats.meta['flagged_test']:.3f} of test")

    if args.measure:
        isic = data_dir("isic2017", args.isic)
        with (isic / "labels.csv").open() as fh:
            isic_rows = list(csv.DictReader(fh))
        di = extract(engine, [isic / "images" / f"{r['image_id']}.jpg" for r in isic_rows],
                     args.cache / f"{sha[:16]}-isic2017.npz", "ISIC 2017")
        isic_scores = stats.score(di["pooled"])
        synth, kinds = synthetic_images()
        sf, _ = features(engine, synth)
        synth_scores = stats.score(sf)
        result = {
            "model_sha256": sha, "threshold": stats.threshold, "meta": stats.meta,
            "n": {"ham_test": len(test_scores), "isic2017": len(isic_scores), "synthetic": len(synth_scores)},
            "auroc_ham_test_vs_isic2017": auroc(test_scores, isic_scores),
            "auroc_ham_test_vs_synthetic": auroc(test_scores, synth_scores),
            "auroc_ham_test_vs_synthetic_by_kind": {k: auroc(test_scores, synth_scores[np.array(kinds) == k])
                                                    for k in sorted(set(kinds))},
            "flagged": {"ham_val": stats.meta["flagged_validation"], "ham_test": stats.meta["flagged_test"],
                        "isic2017": float((isic_scores > stats.threshold).mean()),
                        "synthetic": float((synth_scores > stats.threshold).mean())},
            "score_median": {"ham_test": float(np.median(test_scores)), "isic2017": float(np.median(isic_scores)),
                             "synthetic": float(np.median(synth_scores))},
        }
        (ROOT / "models" / "card").mkdir(exist_ok=True)
        (ROOT / "models" / "card" / "ood.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "meta"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
