"""Per-stage host cost of the engine's image work, the m15 code against the current code, same run.

    python -m bench.bench_host_stages [--images N]

The m15 versions are the verbatim copies the equivalence tests hold
(``tests/inference/test_inference_preprocess_fast.py``). Thread CPU time, best of 3 passes,
so a busy machine skews it less than wall time; bundled samples, cycled.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from bench.bench_engine_host import load_images
from inference.cam import grad_cam
from inference.engine import TTA_VIEWS, fill_views
from inference.postprocess import gate_stats
from inference.preprocess import normalise, prepare, resize_square, shades_of_gray
from tests.inference import test_inference_preprocess_fast as m15

INPUT_SIZE = 160
CAM_HW = (450, 600)        # a HAM10000-sized original
FEATURES = (1280, 5, 5)    # the model's last feature map
PASSES = 3


def per_image_ms(fn: Callable[[], object], n: int) -> float:
    best = float("inf")
    for _ in range(PASSES):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return 1e3 * best / n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    n = ap.parse_args(argv).images
    imgs = load_images(None, n)
    squares = [resize_square(im, INPUT_SIZE) for im in imgs]
    rng = np.random.default_rng(0)
    fc = rng.normal(size=(7, FEATURES[0])).astype(np.float32)
    feats = rng.random(FEATURES).astype(np.float32)

    def batch_now() -> None:
        x = np.empty((len(TTA_VIEWS) * n, 3, INPUT_SIZE, INPUT_SIZE), np.float32)
        for i, im in enumerate(imgs):
            prepare(im, INPUT_SIZE, out=x[i])
            fill_views(x, i, n, TTA_VIEWS)

    stages: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "shades_of_gray (160 px)": (lambda: [m15.reference_shades_of_gray(s) for s in squares],
                                    lambda: [shades_of_gray(s) for s in squares]),
        "normalise": (lambda: [m15.reference_normalise(s) for s in squares], lambda: [normalise(s) for s in squares]),
        "prepare + TTA batch": (lambda: m15.reference_tta_batch(np.stack([m15.reference_prepare(im, INPUT_SIZE)
                                                                          for im in imgs])), batch_now),
        "gate_stats": (lambda: [m15.reference_gate_stats(im) for im in imgs], lambda: [gate_stats(im) for im in imgs]),
        "grad_cam (600x450)": (lambda: [m15.reference_grad_cam(feats, fc, 1, CAM_HW) for _ in imgs],
                               lambda: [grad_cam(feats, fc, 1, CAM_HW) for _ in imgs]),
    }
    print(f"{'stage (CPU ms/image, best of 3)':<32} {'m15':>7} {'now':>7} {'ratio':>7}")
    for name, (old, new) in stages.items():
        o, c = per_image_ms(old, n), per_image_ms(new, n)
        print(f"{name:<32} {o:>7.3f} {c:>7.3f} {o / c:>6.1f}x")


if __name__ == "__main__":
    main()
