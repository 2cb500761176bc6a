"""Throughput and latency of the engine against a bare ONNX Runtime session, same model, same run.

    python -m bench.bench_inference [--threads 2] [--seconds 3] [--images DIR] [--providers cuda]

For batch sizes 1, 8 and 32 it times:
  bare        ``session.run`` on an already preprocessed tensor (the floor)
  engine      ``Engine.predict(images, cam=False)`` on decoded RGB images: preprocessing
              (squash resize + Shades of Gray), quality gate, calibration, risk
  engine+cam  the same with Grad-CAM for every image (what the pipeline runs)
and prints images/s, p50 and p95 latency per call, and the overhead ratio
engine p50 / bare p50. TTA follows the manifest (``--tta/--no-tta`` to force);
the bare session runs the same number of views so the ratio compares like with like.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from inference.engine import (CPU, CUDA, INPUT_NAME, Engine, load_image, select_providers, tta_batch)

BATCH_SIZES = (1, 8, 32)


def timeit(fn: Callable[[], object], seconds: float, min_iters: int = 5) -> np.ndarray:
    """Per-call latencies (s) of ``fn`` over about ``seconds`` after two warm-up calls."""
    fn(); fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


def sample_images(images_dir: Path | None, n: int) -> list[np.ndarray]:
    if images_dir is not None:
        paths = sorted(images_dir.glob("*.jpg"))[:n]
        if paths:
            return [load_image(p) for p in paths]
    # Synthetic dermoscopy-sized frames (HAM10000 is 200x150) when no folder is given.
    rng = np.random.default_rng(0)
    base = np.zeros((150, 200, 3), np.uint8)
    base[...] = (190, 140, 120)
    return [np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8) for _ in range(n)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for both sessions")
    ap.add_argument("--seconds", type=float, default=3.0, help="timing budget per cell")
    ap.add_argument("--images", type=Path, default=Path("../shared/data/ham10000/images"))
    ap.add_argument("--providers", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--model-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    requested = (CUDA, CPU) if args.providers == "cuda" else (CPU,)
    engine = Engine(args.model_dir, intra_op_threads=args.threads, providers=requested, tta=args.tta,
                    batch_size=max(BATCH_SIZES))
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    bare = ort.InferenceSession(str(engine.onnx_path), sess_options=so, providers=select_providers(requested))
    images = sample_images(args.images, max(BATCH_SIZES))
    print(f"model {engine.model_info.name} {engine.model_info.sha256[:12]}; engine providers {engine.providers}; "
          f"bare providers {bare.get_providers()}; threads {args.threads}; TTA {engine.tta}; "
          f"image {images[0].shape[1]}x{images[0].shape[0]}")
    header = f"{'batch':>5} {'path':<11} {'img/s':>9} {'p50 ms':>9} {'p95 ms':>9} {'ms/img':>8} {'overhead':>9}"
    print(header)
    print("-" * len(header))
    for bs in BATCH_SIZES:
        batch = images[:bs]
        x = np.stack([engine.preprocess(im) for im in batch])
        xin = tta_batch(x, engine.manifest.tta_views) if engine.tta else x
        rows = {
            "bare": timeit(lambda xin=xin: bare.run(None, {INPUT_NAME: xin}), args.seconds),
            "engine": timeit(lambda batch=batch: engine.predict(batch, cam=False), args.seconds),
            "engine+cam": timeit(lambda batch=batch: engine.predict(batch, cam=True), args.seconds),
        }
        base = float(np.median(rows["bare"]))
        for name, t in rows.items():
            p50, p95 = float(np.median(t)), float(np.percentile(t, 95))
            print(f"{bs:>5} {name:<11} {bs / t.mean():>9.1f} {p50 * 1e3:>9.2f} {p95 * 1e3:>9.2f} "
                  f"{p50 * 1e3 / bs:>8.2f} {p50 / base:>8.2f}x")


if __name__ == "__main__":
    main()
