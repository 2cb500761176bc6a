"""GPU check: ONNX Runtime on CUDA (and TensorRT where available), IO binding, batching, throughput.

    bash bench/gpu_check.sh [options]          # installs the project (pip install -e .), then runs this
    python -m bench.gpu_check [options]        # in an environment that already has it

On a machine with an NVIDIA GPU it proves, and prints:

1. the environment: GPU (nvidia-smi), driver, ONNX Runtime version and its providers;
2. that the committed model runs on ``CUDAExecutionProvider`` (the session's first provider
   after creation: ONNX Runtime falls back to the CPU silently when CUDA cannot load), in a
   bare session and in dermgate's ``Engine``, and that the engine uses IO binding;
3. images/s at batch 1, 8, 64 and 256 (``--batches``) for: a bare ORT CUDA session on a
   ready tensor (the floor), the same with IO binding and the input already on the GPU (the
   ceiling), and the engine (decode-free: RGB in, calibrated result out; then with Grad-CAM as
   the pipeline runs it). TTA views count as in bench_inference: the bare session runs the
   same number of views, so the ratios compare like with like;
4. TensorRT, when ONNX Runtime offers it and its libraries load (``--no-tensorrt`` to skip):
   the bare session on ``TensorrtExecutionProvider``, in a child process with a time limit
   (engine builds take minutes);
5. end to end with several workers (``--workers``, default 4; ``--images``, default 2000):
   one ``dermgate serve --roles scp`` process and N ``--roles worker,dispatcher`` processes,
   one work dir, SQLite (or PostgreSQL when ``initdb`` is on the PATH), the FHIR bundle-folder
   channel standing in for the EHR; C-STOREs from 4 pynetdicom associations; images/s from
   the first C-STORE to the last job delivered, and exactly-once checked.

Without CUDA it stops with exit status 2 and says why, unless ``--allow-cpu`` is given: then
every step runs on the CPU and every figure is labelled CPU (a dry run of the script, not a
GPU figure). ``--json FILE`` writes the figures for the closing note. Exit status: 0 done,
2 no usable GPU provider, 3 a step failed (the message says which).

Targets (issue 15, H100/H200 class): >= 5,000 images/s batched inference, >= 500 images/s
end to end with 16 host cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CUDA, TENSORRT, CPU = "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"
DEFAULT_BATCHES = (1, 8, 64, 256)
TARGET_BATCHED, TARGET_E2E = 5000.0, 500.0


class NoGpu(SystemExit):
    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=list(DEFAULT_BATCHES), help="batch sizes to time")
    ap.add_argument("--seconds", type=float, default=4.0, help="timing budget per cell")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="run on the CPU when CUDA is unusable (a dry run; figures labelled CPU)")
    ap.add_argument("--no-tensorrt", action="store_true", help="skip the TensorRT step")
    ap.add_argument("--tensorrt-timeout", type=float, default=300.0, help="seconds for the TensorRT step")
    ap.add_argument("--workers", type=int, default=4, help="worker processes end to end (0: skip that step)")
    ap.add_argument("--images", type=int, default=2000, help="images end to end")
    ap.add_argument("--scps", type=int, default=1, help="SCP processes end to end (one port each)")
    ap.add_argument("--associations", type=int, default=4, help="concurrent C-STORE associations per SCP")
    ap.add_argument("--worker-batch", type=int, default=64, help="worker.batch_size end to end")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args(argv)
    if any(b < 1 for b in args.batches):
        ap.error("--batches: sizes must be >= 1")
    if args.workers < 0 or args.images < 1 or args.worker_batch < 1:
        ap.error("--workers >= 0, --images >= 1, --worker-batch >= 1")
    return args


# ---- 1. environment ---------------------------------------------------------------------------

def environment() -> dict[str, Any]:
    import onnxruntime as ort
    env: dict[str, Any] = {"onnxruntime": ort.__version__, "available_providers": ort.get_available_providers(),
                           "cpus": os.cpu_count(), "gpus": []}
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        env["gpus"] = [line.strip() for line in q.stdout.splitlines() if line.strip()]
        env["nvidia_smi_error"] = q.stderr.strip()[-300:] or None
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:        # CUDA / cuDNN from nvidia-* wheels or the system, loaded before any session
        try:
            preload()
            env["preload_dlls"] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, the session step decides
            env["preload_dlls"] = f"failed: {exc}"
    return env


# ---- 2. provider proof ------------------------------------------------------------------------

def gpu_session(onnx_path: Path, providers: list[Any]) -> Any:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), sess_options=so, providers=providers)


def check_provider(session: Any, allow_cpu: bool, what: str) -> str:
    first = session.get_providers()[0]
    if first in (CUDA, TENSORRT):
        return first
    reason = (f"{what}: ONNX Runtime runs the model on {first}, not on {CUDA}. Causes: no NVIDIA driver, "
              "or CUDA/cuDNN libraries that this onnxruntime-gpu build links against are missing "
              "(1.27+: CUDA 13 + cuDNN 9, driver >= 580; see deploy/README.md)")
    if not allow_cpu:
        raise NoGpu(reason)
    print(f"WARNING: {reason}. Continuing on the CPU because of --allow-cpu: these are NOT GPU figures.")
    return first


# ---- 3. throughput ----------------------------------------------------------------------------

def rate(fn: Callable[[], object], images: int, seconds: float, min_iters: int = 3) -> float:
    """Images/s of ``fn`` (which handles ``images`` images per call), after one warm-up call."""
    fn()
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return images * n / (time.perf_counter() - t0)


def sample_images(n: int) -> list[np.ndarray]:
    from inference.engine import load_image
    paths = sorted((REPO / "dermgate" / "samples").glob("*.jpg")) + sorted((REPO / "tests" / "data" / "samples")
                                                                           .glob("*.jpg"))
    base = [load_image(p) for p in paths] or [np.full((150, 200, 3), 128, np.uint8)]
    return [base[i % len(base)] for i in range(n)]


def throughput(engine: Any, bare: Any, batches: list[int], seconds: float) -> list[dict[str, Any]]:
    import onnxruntime as ort

    from inference.engine import INPUT_NAME, OUTPUT_FEATURES, OUTPUT_LOGITS, tta_batch
    on_gpu = bare.get_providers()[0] in (CUDA, TENSORRT)
    images = sample_images(max(batches))
    rows = []
    for bs in batches:
        batch = images[:bs]
        x = np.stack([engine.preprocess(im) for im in batch])
        xin = np.ascontiguousarray(tta_batch(x) if engine.tta else x)
        row: dict[str, Any] = {"batch": bs, "views": int(len(xin))}
        row["bare"] = rate(lambda xin=xin: bare.run([OUTPUT_LOGITS, OUTPUT_FEATURES], {INPUT_NAME: xin}), bs,
                           seconds)
        binding = bare.io_binding()
        if on_gpu:          # input resident on the GPU, outputs left there: the device's own speed
            binding.bind_ortvalue_input(INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(xin, "cuda", 0))
            binding.bind_output(OUTPUT_LOGITS, "cuda")
            binding.bind_output(OUTPUT_FEATURES, "cuda")
        else:
            binding.bind_cpu_input(INPUT_NAME, xin)
            binding.bind_output(OUTPUT_LOGITS)
            binding.bind_output(OUTPUT_FEATURES)
        row["bare_iobinding"] = rate(lambda binding=binding: bare.run_with_iobinding(binding), bs, seconds)
        row["engine"] = rate(lambda batch=batch: engine.predict(batch, cam=False), bs, seconds)
        row["engine_cam"] = rate(lambda batch=batch: engine.predict(batch, cam=True), bs, seconds)
        row["engine_vs_bare"] = row["engine"] / row["bare"]
        rows.append(row)
        print(f"{bs:>6} {row['views']:>6} {row['bare']:>10.1f} {row['bare_iobinding']:>12.1f} {row['engine']:>10.1f} "
              f"{row['engine_cam']:>11.1f} {row['engine_vs_bare']:>8.2f}", flush=True)
    return rows


# ---- 4. TensorRT -----------------------------------------------------------------------------

def tensorrt_child(onnx_path: str, batches: list[int], seconds: float, tta: bool) -> None:
    """Runs in a child process: a bare TensorRT session with one shape profile, timed per batch."""
    from inference.engine import INPUT_NAME
    max_views = max(batches) * (4 if tta else 1)
    opts = {"trt_fp16_enable": False, "trt_engine_cache_enable": True,
            "trt_engine_cache_path": tempfile.mkdtemp(prefix="trt-cache-"),
            "trt_profile_min_shapes": f"{INPUT_NAME}:1x3x160x160",
            "trt_profile_opt_shapes": f"{INPUT_NAME}:{max(1, max_views // 4)}x3x160x160",
            "trt_profile_max_shapes": f"{INPUT_NAME}:{max_views}x3x160x160"}
    session = gpu_session(Path(onnx_path), [(TENSORRT, opts), CUDA, CPU])
    out: dict[str, Any] = {"providers": session.get_providers()}
    if session.get_providers()[0] != TENSORRT:
        out["error"] = "TensorRT did not take the model (its libraries are probably missing)"
    else:
        rng = np.random.default_rng(0)
        out["rates"] = {}
        for bs in batches:
            x = rng.normal(size=(bs * (4 if tta else 1), 3, 160, 160)).astype(np.float32)
            out["rates"][str(bs)] = rate(lambda x=x: session.run(None, {INPUT_NAME: x}), bs, seconds)
    print("TRT-RESULT " + json.dumps(out), flush=True)


def tensorrt(onnx_path: Path, batches: list[int], seconds: float, tta: bool, timeout: float) -> dict[str, Any]:
    code = (f"from bench.gpu_check import tensorrt_child; "
            f"tensorrt_child({str(onnx_path)!r}, {batches!r}, {seconds!r}, {tta!r})")
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:.0f} s (engine build too slow)"}
    for line in run.stdout.splitlines():
        if line.startswith("TRT-RESULT "):
            return json.loads(line[len("TRT-RESULT "):])
    return {"error": f"exit {run.returncode}: {(run.stderr or run.stdout).strip()[-400:]}"}


# ---- 5. end to end ---------------------------------------------------------------------------

def end_to_end(workers: int, n_images: int, worker_batch: int, allow_cpu: bool, scps: int = 1,
               associations: int = 4) -> dict[str, Any]:
    """``scps`` SCP processes + ``workers`` worker/dispatcher processes on one work dir; exactly once checked.
    The C-STOREs come from ``associations`` per SCP, each in its own process (one Python SCU is GIL-bound)."""
    from pydicom.uid import generate_uid
    from sqlalchemy import create_engine, func, select

    from dermgate.db import Job, JobState, OutboxItem, OutboxState
    from dermgate.demo import jpeg_to_dicom
    root = Path(tempfile.mkdtemp(prefix="dermgate-gpu-e2e-"))
    root.chmod(0o755)
    pg = None
    db_url = f"sqlite:///{root / 'work' / 'dermgate.db'}"
    if shutil.which("initdb") and shutil.which("pg_ctl"):
        try:                                   # the test helpers need pytest (the project's test extra)
            from tests.peers.postgres import create_database, start_server
        except ImportError:
            pass
        else:
            pg = start_server(root / "pg")
            db_url = create_database(pg.url, prefix="gpu_check")
    sources = sorted((REPO / "dermgate" / "samples").glob("*.jpg"))
    import cv2
    datasets = []
    for i in range(n_images):
        src = sources[i % len(sources)]
        img = cv2.imread(str(src))
        datasets.append(jpeg_to_dicom(src.read_bytes(), img.shape[0], img.shape[1], f"GPU-{i % 50:04d}",
                                      generate_uid(), i))
    work = root / "work"
    work.mkdir()
    ports = [_free_port() for _ in range(scps)]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DERMGATE_")},
           "DERMGATE_WORKDIR": str(work), "DERMGATE_DATABASE_URL": db_url,
           "DERMGATE_FHIR_BUNDLE_DIR": str(work / "reports"), "DERMGATE_MODEL__THREADS": "2",
           "DERMGATE_WORKER__BATCH_SIZE": str(worker_batch), "DERMGATE_WORKER__POLL_INTERVAL_S": "0.05",
           "DERMGATE_DICOM__ALLOWED_CALLERS": '[{"ae_title": "GPUCHECK", "hosts": ["127.0.0.1"]}]',
           "DERMGATE_DICOM__MIN_FREE_BYTES": str(64 * 2 ** 20),
           # 4 associations plus the readiness probe: above the default of 4 connections per host
           "DERMGATE_DICOM__MAX_CONNECTIONS_PER_HOST": "16"}
    subprocess.run([sys.executable, "-m", "dermgate.cli", "migrate"], env=env, check=True, capture_output=True,
                   cwd=REPO)
    cmd = [sys.executable, "-m", "dermgate.cli", "serve"]
    logs = [open(root / f"serve-{i}.log", "wb") for i in range(workers + 1)]
    procs = [subprocess.Popen([*cmd, "--roles", "worker,dispatcher"], env=env, cwd=REPO, stdout=logs[i + 1],
                              stderr=subprocess.STDOUT) for i in range(workers)]
    scp_logs = [open(root / f"serve-scp-{i}.log", "wb") for i in range(scps)]
    logs += scp_logs
    scp_procs = [subprocess.Popen([*cmd, "--roles", "scp"], env={**env, "DERMGATE_DICOM__PORT": str(p)}, cwd=REPO,
                                  stdout=scp_logs[i], stderr=subprocess.STDOUT) for i, p in enumerate(ports)]
    procs = scp_procs + procs
    db = create_engine(db_url)
    try:
        for p, proc in zip(ports, scp_procs):
            _wait_port(p, [proc])
        _wait_workers_ready(root, workers, procs)
        t0 = time.monotonic()
        _send(ports, datasets, associations=associations)
        sent_s = time.monotonic() - t0
        while True:
            with db.connect() as c:
                done = c.scalar(select(func.count()).select_from(Job).where(
                    Job.state.in_([JobState.DELIVERED, JobState.FAILED])))
            if done >= n_images:
                break
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a dermgate process exited; logs in {root}")
            if time.monotonic() - t0 > max(1800, n_images):
                raise RuntimeError("end to end timed out")
            time.sleep(0.2)
        total = time.monotonic() - t0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()
    with db.connect() as c:
        jobs = c.scalar(select(func.count()).select_from(Job))
        delivered = c.scalar(select(func.count()).select_from(Job).where(Job.state == JobState.DELIVERED))
        sent_once = c.scalar(select(func.count()).select_from(OutboxItem).where(
            OutboxItem.state == OutboxState.SENT, OutboxItem.attempts == 1))
    db.dispose()
    if pg is not None:
        pg.stop()
    providers = sorted({",".join(json.loads(line).get("providers", []))
                        for line in (work / "logs" / "dermgate.log").read_text(errors="replace").splitlines()
                        if line.startswith("{") and '"inference.engine_loaded"' in line})
    reports = len(list((work / "reports").glob("*.json")))
    exactly_once = jobs == delivered == sent_once == reports == n_images
    return {"workers": workers, "scps": scps, "associations": associations * scps, "images": n_images, "worker_batch": worker_batch, "database": db_url.split(":")[0],
            "send_s": sent_s, "total_s": total, "images_per_s": n_images / total, "exactly_once": exactly_once,
            "jobs": jobs, "delivered": delivered, "reports": reports, "worker_providers": providers,
            "logs": str(root)}


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, procs: list[subprocess.Popen[bytes]], timeout: float = 300) -> None:
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if procs[0].poll() is not None:
            raise RuntimeError("the SCP process exited at start")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError("the SCP did not start listening")


def _wait_workers_ready(root: Path, workers: int, procs: list[subprocess.Popen[bytes]],
                        timeout: float = 600) -> None:
    """Every worker process logged that its service started (model loaded and verified)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = sum("serving (" in (root / f"serve-{i + 1}.log").read_text(errors="replace")
                      for i in range(workers))
        if started == workers:
            return
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a worker process exited at start; logs in {root}")
        time.sleep(0.5)
    raise RuntimeError("the workers did not start")


def _send(ports: list[int], datasets: list[Any], associations: int) -> None:
    """C-STORE ``datasets`` over ``associations`` concurrent associations to each port, each association
    in its own process (forked: the datasets are inherited, and no SCU waits on another's GIL)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    n = associations * len(ports)
    chunks = [(ports[i % len(ports)], datasets[i::n]) for i in range(n) if datasets[i::n]]
    procs = [ctx.Process(target=_send_one, args=(port, chunk, errors)) for port, chunk in chunks]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    found = []
    while not errors.empty():
        found.append(errors.get())
    if found or any(p.exitcode for p in procs):
        raise RuntimeError(f"sending failed: {found[:3] or [p.exitcode for p in procs]}")


def _send_one(port: int, chunk: list[Any], errors: Any) -> None:
    from pynetdicom import AE
    ae = AE(ae_title="GPUCHECK")
    ae.add_requested_context(chunk[0].SOPClassUID, [chunk[0].file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="DERMGATE")
    if not assoc.is_established:
        errors.put("association refused")
        return
    try:
        for ds in chunk:
            rsp = assoc.send_c_store(ds)
            if not rsp or rsp.Status != 0:
                errors.put(f"C-STORE status {getattr(rsp, 'Status', None)}")
                return
    finally:
        assoc.release()


# ---- main -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    from inference.engine import Engine
    figures: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    try:
        env = environment()
        figures["environment"] = env
        print(f"GPUs: {env['gpus'] or 'none found by nvidia-smi'}; onnxruntime {env['onnxruntime']}, providers "
              f"{env['available_providers']}; {env['cpus']} CPUs; preload_dlls: {env.get('preload_dlls', 'n/a')}")
        if CUDA not in env["available_providers"] and not args.allow_cpu:
            raise NoGpu(f"this onnxruntime build offers no {CUDA} (is onnxruntime-gpu installed, not onnxruntime?)")
        engine = Engine(providers=(CUDA, CPU), batch_size=max(args.batches), intra_op_threads=2)
        bare = gpu_session(engine.onnx_path, [CUDA, CPU])
        figures["bare_provider"] = check_provider(bare, args.allow_cpu, "bare session")
        figures["engine_provider"] = check_provider(engine._session, args.allow_cpu, "dermgate Engine")
        figures["engine_io_binding"] = engine.io_binding
        label = "GPU" if figures["engine_provider"] in (CUDA, TENSORRT) else "CPU (dry run, not a GPU figure)"
        print(f"provider: bare {figures['bare_provider']}, engine {figures['engine_provider']} "
              f"(IO binding {'on' if engine.io_binding else 'off'}); TTA {engine.tta}: {label}")
        print(f"{'batch':>6} {'views':>6} {'bare img/s':>10} {'+iobind img/s':>12} {'engine':>10} "
              f"{'engine+cam':>11} {'eng/bare':>8}")
        figures["throughput"] = throughput(engine, bare, args.batches, args.seconds)
        best = max(r["engine"] for r in figures["throughput"])
        print(f"best batched engine throughput: {best:.0f} images/s ({label}; target {TARGET_BATCHED:.0f} on H100/H200)")
        if not args.no_tensorrt and TENSORRT in env["available_providers"] and label == "GPU":
            trt = tensorrt(engine.onnx_path, args.batches, args.seconds, engine.tta, args.tensorrt_timeout)
            figures["tensorrt"] = trt
            print(f"TensorRT: {trt}")
        else:
            figures["tensorrt"] = {"skipped": "not offered, not a GPU run, or --no-tensorrt"}
        if args.workers:
            e2e = end_to_end(args.workers, args.images, args.worker_batch, args.allow_cpu, args.scps,
                             args.associations)
            figures["end_to_end"] = e2e
            print(f"end to end: {e2e['images_per_s']:.1f} images/s with {args.workers} worker processes "
                  f"and {args.scps} SCP processes (batch {args.worker_batch}, {e2e['database']}, {e2e['images']} images, exactly once: "
                  f"{e2e['exactly_once']}; worker providers {e2e['worker_providers']}; {label}; "
                  f"target {TARGET_E2E:.0f} with 16 host cores)")
            if not e2e["exactly_once"]:
                raise RuntimeError(f"end to end not exactly once: {e2e}")
    except NoGpu as exc:
        print(f"NO GPU: {exc.message}\n(run with --allow-cpu for a CPU dry run of this script)", file=sys.stderr)
        figures["error"] = exc.message
        _write(args.json, figures)
        return 2
    except Exception as exc:  # noqa: BLE001 - say which step failed, keep what was measured
        print(f"FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        figures["error"] = f"{type(exc).__name__}: {exc}"
        _write(args.json, figures)
        return 3
    _write(args.json, figures)
    return 0


def _write(path: Path | None, figures: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
