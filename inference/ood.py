"""Out-of-distribution score from the model's own features, and the image statistics drift is watched on.

The score is a Mahalanobis distance (Lee et al. 2018) of an image's pooled
feature vector (the mean over the ONNX ``features`` map, the vector the
classifier head reads) to the training images of its nearest class, with one
shared covariance:

    z      = P^T (f - mu)                       PCA projection to ``d`` dimensions (train split)
    score  = min_c  sqrt((z - m_c)^T S^-1 (z - m_c)) + w * ||(I - P P^T)(f - mu)|| / r
                                                 S: Ledoit-Wolf shrunk within-class covariance,
                                                 the second term: the feature's part outside the
                                                 training subspace (residual), scaled by its
                                                 training median r

The statistics live in a sidecar file beside the manifest (``ood_stats.npz``),
made by ``python -m models.ood_stats`` from the HAM10000 training split, so a new
model gets its own with one command; it records the sha256 of the ONNX file it
belongs to, and the engine ignores (with a warning) a file made for another
model. The threshold is chosen on the validation split (see models/ood_stats.py
and docs/monitoring.md); a score above it flags the result "outside the
training distribution".

The same file carries the training reference distributions that population
drift is measured against (``dermgate.drift``): OOD score, brightness,
colourfulness, sharpness and size deciles, and the predicted class mix.
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from threadpoolctl import ThreadpoolController

STATS_FILE = "ood_stats.npz"
STATS_FORMAT = 1
IMAGE_STATS = ("megapixels", "brightness", "colourfulness", "sharpness")
DRIFT_FEATURES = ("ood_score", *IMAGE_STATS)
_STATS_SIDE = 256
# Scoring is a few small matrix products. Threaded OpenBLAS spreads them over every core, and its
# threads then spin for a while after each call, taking the cores from ONNX Runtime and from the host
# work of the next batch (2-core box: 8x1280 @ 1280x128 took 15 ms threaded, 0.1 ms on one thread).
_SCORE_BLAS_THREADS = 1
_blas_lock = threading.Lock()   # the limit is process-wide: nested limits from two threads would not restore it


@functools.cache
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


def image_stats(rgb: npt.NDArray[np.uint8]) -> dict[str, float]:
    """Size, brightness (mean grey), colourfulness (Hasler & Suesstrunk 2003) and sharpness
    (variance of the Laplacian) of an RGB uint8 image; the last three on a 256 px copy, so
    they do not depend on the resolution."""
    h, w = rgb.shape[:2]
    scale = _STATS_SIDE / max(h, w)
    small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA) \
        if scale < 1 else rgb
    f = small.astype(np.float32)
    rg = f[..., 0] - f[..., 1]
    yb = 0.5 * (f[..., 0] + f[..., 1]) - f[..., 2]
    colourfulness = float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    return {"megapixels": h * w / 1e6, "brightness": float(grey.mean()), "colourfulness": colourfulness,
            "sharpness": float(cv2.Laplacian(grey, cv2.CV_32F).var())}


@dataclass
class OodStats:
    """Mahalanobis statistics and drift references of one model (one ONNX file)."""
    onnx_sha256: str
    mean: npt.NDArray[np.float64]              # (K,)
    components: npt.NDArray[np.float64]        # (K, d) orthonormal PCA basis
    class_means: npt.NDArray[np.float64]       # (C, d)
    precision: npt.NDArray[np.float64]         # (d, d)
    residual_scale: float                      # median training residual norm
    residual_weight: float
    threshold: float                           # score above: outside the training distribution
    reference: dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]] = field(default_factory=dict)
    class_mix: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))   # predicted, validation
    meta: dict[str, Any] = field(default_factory=dict)

    def score(self, pooled: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        """OOD scores of pooled feature vectors (N, K): higher is further from training."""
        with _blas_lock, _blas().limit(limits=_SCORE_BLAS_THREADS, user_api="blas"):
            return self._score(pooled)

    def _score(self, pooled: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        x = np.asarray(pooled, np.float64) - self.mean
        z = x @ self.components
        zp, mp = z @ self.precision, self.class_means @ self.precision
        # (z - m)^T S^-1 (z - m) for every class at once, without an (N, C, d) array
        d2 = (zp * z).sum(1)[:, None] - 2 * zp @ self.class_means.T + (mp * self.class_means).sum(1)[None, :]
        maha = np.sqrt(np.maximum(d2, 0.0)).min(axis=1)
        resid = np.linalg.norm(x - z @ self.components.T, axis=1) / self.residual_scale
        return maha + self.residual_weight * resid

    def save(self, path: Path) -> None:
        arrays: dict[str, Any] = {"mean": self.mean, "components": self.components.astype(np.float32),
                                  "class_means": self.class_means, "precision": self.precision,
                                  "class_mix": self.class_mix}
        for name, (edges, frac) in self.reference.items():
            arrays[f"ref_edges_{name}"], arrays[f"ref_frac_{name}"] = edges, frac
        meta = {**self.meta, "format": STATS_FORMAT, "onnx_sha256": self.onnx_sha256, "threshold": self.threshold,
                "residual_scale": self.residual_scale, "residual_weight": self.residual_weight}
        np.savez_compressed(path, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)

    @classmethod
    def load(cls, path: Path) -> OodStats:
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            ref = {k[len("ref_edges_"):]: (z[k].astype(np.float64), z["ref_frac_" + k[len("ref_edges_"):]].astype(np.float64))
                   for k in z.files if k.startswith("ref_edges_")}
            return cls(meta["onnx_sha256"], z["mean"].astype(np.float64), z["components"].astype(np.float64),
                       z["class_means"].astype(np.float64), z["precision"].astype(np.float64),
                       float(meta["residual_scale"]), float(meta["residual_weight"]), float(meta["threshold"]),
                       ref, z["class_mix"].astype(np.float64), meta)


def fit(train_pooled: npt.NDArray[np.floating], train_labels: npt.NDArray[np.integer], n_classes: int, *,
        dims: int = 128, residual_weight: float = 1.0, onnx_sha256: str = "") -> OodStats:
    """Fit the statistics on training features (threshold left at +inf: chosen on validation)."""
    from sklearn.covariance import LedoitWolf
    from sklearn.utils.extmath import randomized_svd
    x = np.asarray(train_pooled, np.float64)
    mu = x.mean(axis=0)
    xc = x - mu
    _, _, vt = randomized_svd(xc, dims, n_iter=5, random_state=0)   # the top components, deterministic
    comps = vt.T                                                                   # (K, d)
    z = xc @ comps
    means = np.stack([z[train_labels == c].mean(axis=0) if (train_labels == c).any() else np.zeros(dims)
                      for c in range(n_classes)])
    within = z - means[train_labels]
    precision = LedoitWolf().fit(within).precision_
    resid = np.linalg.norm(xc - z @ comps.T, axis=1)
    return OodStats(onnx_sha256, mu, comps, means, precision, float(np.median(resid)) or 1.0, residual_weight,
                    float("inf"))


def reference_bins(values: npt.NDArray[np.floating], n_bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Decile edges of a reference sample (inner edges only) and the reference share per bin."""
    v = np.asarray(values, np.float64)
    edges = np.unique(np.quantile(v, np.linspace(0, 1, n_bins + 1)[1:-1]))
    frac = np.bincount(np.searchsorted(edges, v, side="right"), minlength=len(edges) + 1) / len(v)
    return edges, frac


def psi(reference_frac: npt.NDArray[np.floating], edges: npt.NDArray[np.floating],
        values: npt.NDArray[np.floating], eps: float = 1e-4) -> float:
    """Population stability index of ``values`` against a reference binned at ``edges``."""
    v = np.asarray(values, np.float64)
    if len(v) == 0:
        return float("nan")
    cur = np.bincount(np.searchsorted(edges, v, side="right"), minlength=len(edges) + 1) / len(v)
    return psi_fractions(reference_frac, cur, eps)


def psi_fractions(ref: npt.NDArray[np.floating], cur: npt.NDArray[np.floating], eps: float = 1e-4) -> float:
    r, c = np.maximum(np.asarray(ref, float), eps), np.maximum(np.asarray(cur, float), eps)
    return float(((c - r) * np.log(c / r)).sum())


def load_for(model_dir: Path, onnx_sha256: str) -> tuple[OodStats | None, str | None]:
    """The sidecar of this model, or (None, why not)."""
    path = Path(model_dir) / STATS_FILE
    if not path.is_file():
        return None, f"no {STATS_FILE} beside the model: run python -m models.ood_stats"
    try:
        stats = OodStats.load(path)
    except (OSError, ValueError, KeyError) as exc:
        return None, f"cannot read {path}: {exc}"
    if stats.onnx_sha256 != onnx_sha256:
        return None, f"{path.name} was made for another model (sha256 {stats.onnx_sha256[:12]}): re-run models.ood_stats"
    return stats, None
