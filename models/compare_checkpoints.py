"""Score checkpoints, and every mean ensemble of 2 or more of them, on validation.

    python -m models.compare_checkpoints --config models/configs/lite0-ft.toml \
        models/checkpoints/run/best.pt models/checkpoints/ft/best.pt models/checkpoints/ft/last.pt

How the shipped ensemble (``[export] checkpoints``) was chosen: plain softmax
(no TTA, no calibration), validation data only, the training selection score
(``models.train.score``: with ``[data] hard_case_selection`` it adds HAM melanoma
against histopathology naevi and ISIC 2017 validation). The test splits are not read.

A checkpoint may also be ``onnx:PATH#MEMBERS:INDEX``: member INDEX of a shipped
ensemble recovered from its ONNX file (``models/from_onnx.py``).
"""

from __future__ import annotations

import argparse
import itertools
import tomllib
from pathlib import Path

import numpy as np
import torch

from inference.engine import load_image
from inference.result import CLASSES
from models.export import load_model
from models.split import load_split
from models.selection import (
    ham_dx_type,
    isic_rows,
    load_images,
    predict_logits,
    score,
    to_tensor,
    validation_metrics,
)


def _net(cfg: dict, ref: str) -> torch.nn.Module:
    if ref.startswith("onnx:"):
        from models.from_onnx import members_from_onnx
        path, _, spec = ref.removeprefix("onnx:").partition("#")
        n, _, i = spec.partition(":")
        return members_from_onnx(path, cfg["model"]["arch"], int(n or 1), cfg["model"]["dropout"],
                                 int(cfg["model"].get("init_input_size", cfg["model"]["input_size"])))[int(i or 0)]
    return load_model(cfg, [Path(ref)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("checkpoints", nargs="+")
    args = ap.parse_args(argv)
    cfg = tomllib.loads(args.config.read_text())
    torch.set_num_threads(cfg["train"].get("threads", 2))
    d, size, pp = cfg["data"], cfg["model"]["input_size"], cfg["preprocess"]
    rows = [r for r in load_split(Path(d["split_file"])) if r["split"] == "val"]
    images = load_images(Path(d["ham_dir"]), [r["image_id"] for r in rows])
    x = np.stack([to_tensor(im, size, pp) for im in images])
    y = np.array([CLASSES.index(r["dx"]) for r in rows])
    types = None
    x_isic = y_isic = None
    if d.get("hard_case_selection"):
        dx_type = ham_dx_type(Path(d["ham_dir"]))
        types = [dx_type.get(r["image_id"], "") for r in rows]
        if d.get("isic_dir"):
            iv = isic_rows(Path(d["isic_dir"]), "val")
            x_isic = np.stack([to_tensor(load_image(Path(d["isic_dir"]) / "images" / f"{r['image_id']}.jpg"), size, pp)
                               for r in iv])
            y_isic = np.array([CLASSES.index(r["dx"]) for r in iv])
    logits = {}
    for c in args.checkpoints:
        net = _net(cfg, c)
        logits[c] = (predict_logits(net, x), None if x_isic is None else predict_logits(net, x_isic))
    for k in range(1, len(logits) + 1):
        for combo in itertools.combinations(logits, k):
            m = validation_metrics(np.mean([logits[c][0] for c in combo], 0), y, types,
                                   None if x_isic is None else np.mean([logits[c][1] for c in combo], 0), y_isic)
            print(f"score {score(m):.4f}  " + "  ".join(f"{key} {v:.4f}" for key, v in m.items()) + "  "
                  + " + ".join(str(c) for c in combo), flush=True)


if __name__ == "__main__":
    main()
