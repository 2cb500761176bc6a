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

from inference.result import CLASSES
from models.export import load_model
from models.split import load_split
from models.train import load_images, logit_metrics, predict_logits, score, to_tensor


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
    logits = {c: predict_logits(load_model(cfg, [c]), x) for c in args.checkpoints}
    for k in range(1, len(logits) + 1):
        for combo in itertools.combinations(logits, k):
            m = logit_metrics(np.mean([logits[c] for c in combo], 0), y)
            print(f"score {score(m):.4f}  balanced accuracy {m['bal_acc']:.4f}  malignancy AUC {m['mal_auc']:.4f}  "
                  + " + ".join(str(c) for c in combo), flush=True)


if __name__ == "__main__":
    main()
