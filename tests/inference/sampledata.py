"""The committed sample images (tests/data/samples, see ATTRIBUTION.md there)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.engine import load_image

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "data" / "samples"
SAMPLES_CSV = SAMPLES_DIR / "samples.csv"


@dataclass(frozen=True)
class Sample:
    path: Path
    dx: str
    mask: Path

    def image(self) -> np.ndarray:
        return load_image(self.path)


def load_samples() -> list[Sample]:
    with SAMPLES_CSV.open(newline="") as fh:
        return [Sample(SAMPLES_DIR / r["path"], r["dx"], SAMPLES_DIR / r["mask"]) for r in csv.DictReader(fh)]
