"""Score checkpoints, and every mean ensemble of 2 or more of them, on validation.

    python -m models.compare_checkpoints --config models/configs/lite0-ft.toml \
        models/checkpoints/run/best.pt models/checkpoints/ft/best.pt models/checkpoints/ft/last.pt

How the shipped ensemble (``[export] checkpoints``) was chosen: plain softmax
(no TTA, no calibration), validation split only, score = (balanced accuracy +
malignancy AUC) / 2 as in training. The test split and ISIC 2017 are not read.
"""

from __future__ import annotations

import argparse
import itertools
import tomllib
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from inference.result import CLASSES, MALIGNANT
from models.export import load_model
from models.split import load_split
from models.train import evaluate, load_images, to_tensor


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("checkpoints", type=Path, nargs="+")
    args = ap.parse_args(argv)
    cfg = tomllib.loads(args.config.read_text())
    torch.set_num_threads(cfg["train"].get("threads", 2))
    rows = [r for r in load_split(Path(cfg["data"]["split_file"])) if r["split"] == "val"]
    images = load_images(Path(cfg["data"]["ham_dir"]), [r["image_id"] for r in rows])
    x = np.stack([to_tensor(im, cfg["model"]["input_size"], cfg["preprocess"]) for im in images])
    y = np.array([CLASSES.index(r["dx"]) for r in rows])
    y_mal = np.isin(y, [CLASSES.index(c) for c in MALIGNANT])
    logits = {c: evaluate(load_model(cfg, [c]), x, y)[1] for c in args.checkpoints}
    for k in range(1, len(logits) + 1):
        for combo in itertools.combinations(logits, k):
            p = torch.softmax(torch.from_numpy(np.mean([logits[c] for c in combo], 0)), 1).numpy()
            bal = balanced_accuracy_score(y, p.argmax(1))
            auc = roc_auc_score(y_mal, p[:, [CLASSES.index(c) for c in MALIGNANT]].sum(1))
            print(f"score {(bal + auc) / 2:.4f}  balanced accuracy {bal:.4f}  malignancy AUC {auc:.4f}  "
                  + " + ".join(str(c) for c in combo), flush=True)


if __name__ == "__main__":
    main()
