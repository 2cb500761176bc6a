"""Does each preprocessing step help? A linear-probe ablation that fits 2 CPU cores.

    python -m models.ablate_preprocess [--out models/card/ablation_preprocess.json]

Retraining the network once per variant costs an hour each on 2 cores, so this
measures the steps with the ImageNet-pretrained Lite0 frozen: pooled features
of every training and validation image under each preprocessing variant, a
class-balanced logistic regression fitted on the training split, scored on the
validation split. The **choice is made on validation only**; ISIC 2017 scores
are printed beside it for information (never used to choose). A frozen-feature
probe is a proxy: it says whether a step makes the images more separable for
these features, not exactly what it does after fine-tuning.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from inference.engine import load_image
from inference.evaluate import classification_metrics
from inference.preprocess import prepare
from inference.result import CLASSES
from models.split import load_split

VARIANTS = {
    "none": {"colour_constancy": False, "hair_removal": False},
    "shades_of_gray": {"colour_constancy": True, "hair_removal": False},
    "shades_of_gray+hair_removal": {"colour_constancy": True, "hair_removal": True},
}


def features(net, images: list[np.ndarray], size: int, flags: dict, bs: int = 64) -> np.ndarray:
    import torch
    out = []
    with torch.no_grad():
        for i in range(0, len(images), bs):
            x = torch.from_numpy(np.stack([prepare(im, size, **flags) for im in images[i:i + bs]]))
            out.append(net.extract_features(x).mean((2, 3)).numpy())
    return np.concatenate(out)


def probe(f_tr: np.ndarray, y_tr: np.ndarray, *f_ev: np.ndarray) -> list[np.ndarray]:
    """Fit on the training features; 7-class probabilities for each evaluation set."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced", C=0.1))
    clf.fit(f_tr, y_tr)
    out = []
    for f in f_ev:
        p = np.zeros((len(f), len(CLASSES)))
        p[:, clf.classes_] = clf.predict_proba(f)
        out.append(p)
    return out


def scores(p: np.ndarray, y: np.ndarray) -> dict:
    """The evaluation interface's own definitions (``inference.evaluate``)."""
    m = classification_metrics([CLASSES[i] for i in y], p, referral_threshold=0.5)
    return {k: round(float(m[k]), 4) for k in ("malignancy_auc", "melanoma_auc", "balanced_accuracy")}


def main(argv: list[str] | None = None) -> None:
    import torch

    from models.arch import build_model
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ham", type=Path, default=Path("../shared/data/ham10000"))
    ap.add_argument("--isic", type=Path, default=Path("../shared/data/isic2017"))
    ap.add_argument("--split", type=Path, default=Path("models/split.csv"))
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--limit", type=int, help="every n-th image only (smoke test)")
    ap.add_argument("--out", type=Path, default=Path("models/card/ablation_preprocess.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    net = build_model("efficientnet-lite0", 0.0).eval()
    step = args.limit or 1
    rows = load_split(args.split)
    tr = [r for r in rows if r["split"] == "train"][::step]
    va = [r for r in rows if r["split"] == "val"][::step]
    isic = [r for r in csv.DictReader((args.isic / "labels.csv").open()) if r["dx"] in CLASSES][::step]
    def load(rs: list[dict[str, str]], d: Path) -> list[np.ndarray]:
        return [load_image(d / f"{r['image_id']}.jpg") for r in rs]

    img_tr, img_va, img_is = load(tr, args.ham / "images"), load(va, args.ham / "images"), load(isic, args.isic / "images")
    y = {k: np.array([CLASSES.index(r["dx"]) for r in rs]) for k, rs in (("tr", tr), ("va", va), ("is", isic))}
    report: dict = {"method": __doc__.split("\n\n")[1].strip().replace("\n", " "),
                    "n": {"train": len(tr), "val": len(va), "isic2017": len(isic)}, "variants": {}}
    for name, flags in VARIANTS.items():
        t0 = time.time()
        f_tr, f_va, f_is = (features(net, imgs, args.size, flags) for imgs in (img_tr, img_va, img_is))
        p_va, p_is = probe(f_tr, y["tr"], f_va, f_is)
        report["variants"][name] = {"val": scores(p_va, y["va"]),
                                    "isic2017_info_only": scores(p_is, y["is"]),
                                    "seconds": round(time.time() - t0)}
        print(name, json.dumps(report["variants"][name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
