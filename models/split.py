"""Lesion-level, class-stratified train/val/test split of HAM10000.

Images of one lesion never straddle splits (HAM10000 has 7,470 lesions for
10,015 images), or test figures would leak from training.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from inference.result import CLASSES



def make_split(metadata_csv: Path, out_csv: Path, seed: int,
               val_fraction: float, test_fraction: float) -> None:
    rows = list(csv.DictReader(metadata_csv.open()))
    lesion_dx: dict[str, str] = {}
    for r in rows:
        lesion_dx.setdefault(r["lesion_id"], r["dx"])
    rng = np.random.default_rng(seed)
    assign: dict[str, str] = {}
    for dx in CLASSES:
        lesions = sorted(l for l, d in lesion_dx.items() if d == dx)
        rng.shuffle(lesions)
        n_test = round(len(lesions) * test_fraction)
        n_val = round(len(lesions) * val_fraction)
        for i, lesion in enumerate(lesions):
            assign[lesion] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with out_csv.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "lesion_id", "dx", "split"])
        for r in sorted(rows, key=lambda r: r["image_id"]):
            w.writerow([r["image_id"], r["lesion_id"], r["dx"], assign[r["lesion_id"]]])


def load_split(split_csv: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(split_csv.open()))
