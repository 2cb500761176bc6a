"""How the committed sample images were chosen (rerun after retraining the model).

    python tests/data/samples/choose_samples.py [--ham ../shared/data/ham10000]

From the HAM10000 TEST split only (never seen in training or calibration), one
image per lesion, it keeps images the shipped model classifies correctly with a
clear margin (top probability >= MIN_TOP and >= MARGIN above the runner-up),
whose risk is consistent with the truth (malignant: Medium or High; naevus: Low),
and takes the most confident PER_CLASS of each class. They are "clear cases" by
construction: they test that the engine runs the model as trained, not how good
it is (that is models/MODEL_CARD.md's job).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from inference.engine import Engine, load_image  # noqa: E402
from inference.result import MALIGNANT, Risk  # noqa: E402
from models.split import load_split  # noqa: E402

PER_CLASS = {"akiec": 3, "bcc": 3, "bkl": 3, "df": 2, "mel": 4, "nv": 3, "vasc": 2}
MIN_TOP = 0.6
MARGIN = 0.3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ham", type=Path, default=Path("../shared/data/ham10000"))
    ap.add_argument("--split", type=Path, default=Path("models/split.csv"))
    args = ap.parse_args()
    engine = Engine()
    test = [r for r in load_split(args.split) if r["split"] == "test"]
    chosen: list[dict[str, str]] = []
    for dx, k in PER_CLASS.items():
        rows = [r for r in test if r["dx"] == dx]
        preds = engine.predict([load_image(args.ham / "images" / f"{r['image_id']}.jpg") for r in rows], cam=False)
        ok = []
        for r, p in zip(rows, preds):
            (c1, p1), (_, p2) = p.ranked()[:2]
            risk_ok = p.risk in (Risk.MEDIUM, Risk.HIGH) if dx in MALIGNANT else (
                p.risk is Risk.LOW if dx == "nv" else True)
            if c1 == dx and p1 >= MIN_TOP and p1 - p2 >= MARGIN and p.assessable and risk_ok:
                ok.append((p1, r))
        seen: set[str] = set()
        for _, r in sorted(ok, key=lambda t: -t[0]):
            if r["lesion_id"] not in seen and len(seen) < k:
                seen.add(r["lesion_id"])
                chosen.append(r)
        print(f"{dx}: {len(ok)} clear of {len(rows)}; took {len(seen)}")
    (HERE / "masks").mkdir(exist_ok=True)
    for old in list(HERE.glob("ISIC_*.jpg")) + list((HERE / "masks").glob("ISIC_*.png")):
        old.unlink()
    with (HERE / "samples.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "dx", "lesion_id", "mask"])
        for r in chosen:
            shutil.copy(args.ham / "images" / f"{r['image_id']}.jpg", HERE / f"{r['image_id']}.jpg")
            shutil.copy(args.ham / "masks" / f"{r['image_id']}.png", HERE / "masks" / f"{r['image_id']}.png")
            w.writerow([f"{r['image_id']}.jpg", r["dx"], r["lesion_id"], f"masks/{r['image_id']}.png"])


if __name__ == "__main__":
    main()
