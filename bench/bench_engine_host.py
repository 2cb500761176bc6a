"""The engine's host-side cost per image: ``Engine.predict`` time minus the graph's time, same run.

    python -m bench.bench_engine_host [--baseline m15] [--batches 8 64] [--seconds 3] [--rounds 2]
                                      [--images DIR] [--host-threads N] [--cv2-threads N]

On a GPU the model takes a fraction of a millisecond per image and the host work around it
(preprocessing, TTA views, quality gate, image statistics, calibration, Grad-CAM) sets the
engine's throughput; this measures that work on any machine so the GPU path can be projected
on a CPU-only box. For each batch size, with and without Grad-CAM, it times ``predict`` and,
inside it, every call of ``Engine.run`` (the bare graph, through IO binding where the engine
uses it); host ms/image = (predict - run) / images.

With ``--baseline REF`` the ``inference`` package of that git commit (``git archive``) is
measured too, each version in its own child process, alternating for ``--rounds`` rounds,
and the table gives the medians and the ratio baseline / current. The probabilities the two
versions give for the same images are compared (max absolute difference).

The engine keeps its input buffer between batches, as it does on the GPU path. The session
runs with one intra-op thread so that ONNX Runtime's spinning worker threads do not compete
with the host work for the cores (on a GPU they are idle as well).
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BATCH_SIZES = (8, 64)
SESSION_THREADS = 1


def load_images(images_dir: Path | None, n: int) -> list[np.ndarray]:
    """``n`` images from ``images_dir`` (cycled), or the bundled samples (what gpu_check uses)."""
    from inference.engine import load_image
    paths = sorted(images_dir.glob("*.jpg"))[:n] if images_dir else []
    paths = paths or sorted((REPO / "dermgate" / "samples").glob("*.jpg"))
    base = [load_image(p) for p in paths]
    return [base[i % len(base)] for i in range(n)]


def measure(src: Path, batches: list[int], seconds: float, images_dir: Path | None,
            host_threads: int | None, cv2_threads: int | None = None) -> dict[str, Any]:
    """Time one version of the ``inference`` package (imported from ``src``): host ms/image."""
    sys.path.insert(0, str(src))
    if cv2_threads is not None:
        import cv2
        cv2.setNumThreads(cv2_threads)
    from inference.engine import Engine
    kwargs: dict[str, Any] = {"intra_op_threads": SESSION_THREADS, "batch_size": max(batches),
                              "cpu_memory_arena": False}
    params = inspect.signature(Engine).parameters
    if host_threads is not None and "host_threads" in params:
        kwargs["host_threads"] = host_threads
    if "reuse_input_buffer" in params:
        kwargs["reuse_input_buffer"] = True     # as on the GPU path (IO binding), which this projects
    engine = Engine(**kwargs)
    assert Path(sys.modules["inference.engine"].__file__ or "").is_relative_to(src), "wrong inference package"
    run_s, run_cpu = [0.0], [0.0]
    graph = engine.run

    def timed_run(x: np.ndarray) -> Any:
        t0, c0 = time.perf_counter(), time.thread_time()   # one intra-op thread: the graph runs on this one
        try:
            return graph(x)
        finally:
            run_s[0] += time.perf_counter() - t0
            run_cpu[0] += time.thread_time() - c0
    engine.run = timed_run  # type: ignore[method-assign]
    images = load_images(images_dir, max(batches))
    cells: dict[str, float] = {}
    for bs in batches:
        for cam in (False, True):
            batch = images[:bs]
            engine.predict(batch, cam=cam)                       # warm-up
            run_s[0] = run_cpu[0] = 0.0
            n, start, cpu = 0, time.perf_counter(), time.process_time()
            while n == 0 or time.perf_counter() - start < seconds:
                engine.predict(batch, cam=cam)
                n += bs
            total, total_cpu = time.perf_counter() - start, time.process_time() - cpu
            key = f"{bs}/{'cam' if cam else 'nocam'}"
            cells[f"{key}/host"] = 1e3 * (total - run_s[0]) / n
            cells[f"{key}/host_cpu"] = 1e3 * (total_cpu - run_cpu[0]) / n
            cells[f"{key}/run"] = 1e3 * run_s[0] / n
    preds = engine.predict(images, cam=False)
    probs = [[p for p in pr.probabilities.values()] for pr in preds]
    return {"cells": cells, "probabilities": probs}


def child(src: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.bench_engine_host", "--child", str(src), "--seconds", str(args.seconds),
           "--batches", *map(str, args.batches)]
    if args.images:
        cmd += ["--images", str(args.images)]
    if args.host_threads is not None:
        cmd += ["--host-threads", str(args.host_threads)]
    if args.cv2_threads is not None:
        cmd += ["--cv2-threads", str(args.cv2_threads)]
    out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default=None, help="git commit whose inference package is the baseline")
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCH_SIZES))
    ap.add_argument("--seconds", type=float, default=3.0, help="timing budget per cell")
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of each version")
    ap.add_argument("--images", type=Path, default=None, help="folder of .jpg (default: dermgate/samples)")
    ap.add_argument("--host-threads", type=int, default=None, help="Engine host_threads (default: its own)")
    ap.add_argument("--cv2-threads", type=int, default=None,
                    help="cv2.setNumThreads in both versions (default: OpenCV's, one per core)")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.batches, args.seconds, args.images, args.host_threads,
                                 args.cv2_threads)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"current": REPO}
        if args.baseline:
            base = Path(tmp) / "baseline"
            base.mkdir()
            archive = subprocess.run(["git", "archive", args.baseline, "inference"], cwd=REPO, check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
            versions = {"baseline": base, **versions}
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in versions}
        for _ in range(args.rounds):
            for name, src in versions.items():
                runs[name].append(child(src, args))
    keys = list(runs["current"][0]["cells"])
    med = {name: {k: float(np.median([r["cells"][k] for r in rs])) for k in keys} for name, rs in runs.items()}
    print(f"engine host ms/image (predict minus Engine.run; wall, and CPU summed over threads), session threads "
          f"{SESSION_THREADS}, images {args.images or 'dermgate/samples'}, median of {args.rounds} rounds")
    cols = [(n, m) for m in ("host", "host_cpu", "run") for n in med]
    header = f"{'batch':>5} {'cam':<5} " + " ".join(f"{n[:4] + ' ' + m:>13}" for n, m in cols)
    if "baseline" in med:
        header += f" {'ratio wall':>10} {'ratio cpu':>10}"
    print(header)
    print("-" * len(header))
    for bs in args.batches:
        for cam in ("nocam", "cam"):
            k = f"{bs}/{cam}"
            line = f"{bs:>5} {cam:<5} " + " ".join(f"{med[n][f'{k}/{m}']:>13.3f}" for n, m in cols)
            if "baseline" in med:
                line += "".join(f" {med['baseline'][f'{k}/{m}'] / med['current'][f'{k}/{m}']:>9.2f}x"
                                for m in ("host", "host_cpu"))
            print(line)
    if "baseline" in runs:
        diff = np.abs(np.asarray(runs["baseline"][0]["probabilities"]) - np.asarray(runs["current"][0]["probabilities"]))
        print(f"probabilities baseline vs current: max |diff| {diff.max():.2e} over {diff.shape[0]} images")


if __name__ == "__main__":
    main()
