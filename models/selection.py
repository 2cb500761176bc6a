"""What picks a model: the data it is selected on and the selection score.

Shared by training (``models/train.py``), export (``models/export.py``) and
``models/compare_checkpoints.py``, so that none of them imports another.
ISIC 2017's test split is external validation: nothing here will read it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from torch import nn

from inference.engine import load_image
from inference.preprocess import prepare
from inference.result import CLASSES, MALIGNANT


def load_images(ham_dir: Path, ids: list[str]) -> list[np.ndarray]:
    return [load_image(ham_dir / "images" / f"{image_id}.jpg") for image_id in ids]


def ham_dx_type(ham_dir: Path) -> dict[str, str]:
    """image_id -> how HAM10000 confirmed the label (histo, follow_up, consensus, confocal)."""
    with (ham_dir / "metadata.csv").open(newline="") as fh:
        return {r["image_id"]: r["dx_type"] for r in csv.DictReader(fh)}


def isic_rows(isic_dir: Path, split: str) -> list[dict[str, str]]:
    """Labelled ISIC 2017 rows of one split. Only ``train`` (training) and ``val``
    (selection) may be asked for: ``test`` is external and never read here."""
    if split == "test":
        raise ValueError("ISIC 2017 test is external validation: never train or select on it")
    with (isic_dir / "labels.csv").open(newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["split"] == split and r["dx"]]


def hard_case_metrics(p: np.ndarray, ys: np.ndarray, dx_types: list[str]) -> dict:
    """Melanoma against naevi confirmed by histopathology: the excised, atypical naevi
    that other clinics' collections are full of (issue 10)."""
    mel, nv = CLASSES.index("mel"), CLASSES.index("nv")
    keep = np.array([(y == mel) or (y == nv and t == "histo") for y, t in zip(ys, dx_types)])
    return {"mel_vs_histo_nv_auc": auc((ys[keep] == mel).astype(int), p[keep, mel])}


def to_tensor(img: np.ndarray, size: int, pp: dict) -> np.ndarray:
    """The service's own preprocessing (``inference.preprocess.prepare``), with the config's flags."""
    return prepare(img, size, colour_constancy=pp.get("colour_constancy", True),
                   hair_removal=pp.get("hair_removal", False))


def auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")


def predict_logits(model: nn.Module, xs: np.ndarray, bs: int = 64) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(xs[i:i + bs])).numpy() for i in range(0, len(xs), bs)])


def logit_metrics(lg: np.ndarray, ys: np.ndarray) -> dict:
    """Validation metrics of raw logits (plain softmax, no calibration)."""
    from sklearn.metrics import balanced_accuracy_score
    p = torch.softmax(torch.from_numpy(lg), 1).numpy()
    mal = p[:, [CLASSES.index(c) for c in MALIGNANT]].sum(1)
    ymal = np.isin(ys, [CLASSES.index(c) for c in MALIGNANT]).astype(int)
    return {
        "bal_acc": float(balanced_accuracy_score(ys, p.argmax(1))),
        "mal_auc": auc(ymal, mal),
        "mel_auc": auc((ys == CLASSES.index("mel")).astype(int), p[:, CLASSES.index("mel")]),
    }


def score(m: dict) -> float:
    """The model-selection score.

    1.x: (balanced accuracy + malignancy AUC) / 2 on HAM10000 validation. Where the
    hard cases were measured (2.x), their AUCs weigh as much as the overall ones:
    mean of HAM balanced accuracy, HAM malignancy AUC, HAM melanoma against
    histopathology naevi, and ISIC 2017 validation melanoma AUC.
    """
    if "mel_vs_histo_nv_auc" in m and "isic_mel_auc" in m:
        return (m["bal_acc"] + m["mal_auc"] + m["mel_vs_histo_nv_auc"] + m["isic_mel_auc"]) / 4
    return (m["bal_acc"] + m["mal_auc"]) / 2


def validation_metrics(lg_ham: np.ndarray, y_ham: np.ndarray, dx_types: list[str] | None,
                       lg_isic: np.ndarray | None, y_isic: np.ndarray | None) -> dict:
    """All selection metrics from raw logits: HAM validation, its hard cases, ISIC 2017 validation."""
    m = logit_metrics(lg_ham, y_ham)
    if dx_types is not None:
        m.update(hard_case_metrics(torch.softmax(torch.from_numpy(lg_ham), 1).numpy(), y_ham, dx_types))
    if lg_isic is not None and y_isic is not None:
        p = torch.softmax(torch.from_numpy(lg_isic), 1).numpy()
        m["isic_mel_auc"] = auc((y_isic == CLASSES.index("mel")).astype(int), p[:, CLASSES.index("mel")])
    return m
