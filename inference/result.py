"""What the engine says about one image: the contract between inference and the rest."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import numpy.typing as npt

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
MALIGNANT = ("akiec", "bcc", "mel")
CLASS_NAMES = {
    "akiec": "Actinic keratosis / intraepithelial carcinoma",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis-like lesion",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesion",
}
DISCLAIMER = "AI result for clinical decision support, not a diagnosis."


class Risk(str, Enum):
    LOW = "Low"
    MEDIUM = "Medium"
    HIGH = "High"
    NOT_ASSESSABLE = "Not assessable"


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the algorithm, for DICOM Contributing Equipment and FHIR Device."""
    manufacturer: str
    name: str
    version: str
    sha256: str
    device_uid: str  # changes whenever the model (sha256) changes; IHE AIR


@dataclass(frozen=True)
class Prediction:
    probabilities: dict[str, float]        # calibrated, the 7 classes, sums to 1
    malignancy_probability: float          # mel + bcc + akiec
    risk: Risk
    uncertainty: float                     # normalised entropy in [0, 1]
    low_confidence: bool
    assessable: bool
    reason: str | None                     # why not assessable, when it is not
    model: ModelInfo
    cam: npt.NDArray[np.float32] | None = field(default=None, repr=False, compare=False)
    # cam: Grad-CAM of the top class, HxW float32 in [0, 1] at the input image's size
    ood_score: float | None = None         # Mahalanobis distance to the training features (None: no statistics)
    out_of_distribution: bool = False      # ood_score above the threshold chosen on validation
    image_stats: dict[str, float] | None = field(default=None, compare=False)   # size, brightness, ... (drift)

    @property
    def top_class(self) -> str:
        return max(self.probabilities, key=self.probabilities.__getitem__)

    def ranked(self) -> list[tuple[str, float]]:
        return sorted(self.probabilities.items(), key=lambda kv: kv[1], reverse=True)

    def to_json(self) -> dict:
        return {
            "probabilities": self.probabilities,
            "malignancy_probability": self.malignancy_probability,
            "risk": self.risk.value,
            "uncertainty": self.uncertainty,
            "low_confidence": self.low_confidence,
            "assessable": self.assessable,
            "reason": self.reason,
            "top_class": self.top_class,
            "model": self.model.__dict__,
            "ood_score": self.ood_score,
            "out_of_distribution": self.out_of_distribution,
            "image_stats": self.image_stats,
        }
