"""C-STORE to report accepted: the whole service against its own model, in the same run.

    python -m bench.bench_pipeline [--n 60]

One dermgate process with every role (SCP, worker, dispatcher; embedded SQLite,
the real model, the real encrypted audit trail), the loopback Medplum FHIR server
with SMART backend auth (ES384) as the EHR, and Orthanc as the PACS. dcmtk
``storescu`` is the modality. Printed, each against a baseline of the same run:

* ``engine``: the model alone (``Engine.predict`` with Grad-CAM, the worker's
  batch size and thread count) on the same decoded images: images/s.
* ``pipeline``: N images in one association; images / (first C-STORE -> last job
  delivered: FHIR report accepted by the server and SC + SR accepted by Orthanc).
  ``pipeline / engine: X`` is their ratio.
* ``idle``: one image at a time, each waiting for its report: C-STORE committed ->
  FHIR report accepted (the outbox row's ``sent_at``), p50 and p95 (``idle p95 X ms``).
* ``steady``: images sent at a steady rate (default 10/s, one association paced by a
  pynetdicom SCU): the same latency, p50 and p95.
* where the worker's time goes (the ``dermgate_stage_seconds`` histogram), per image.

The service runs with its default settings (poll interval, batch size, threads)
unless ``--poll-interval`` is given. These machines are shared: compare the ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.bench_scale import make_files
from bench.harness import (count_pacs_instances, count_reports, peers, process_peak_rss, send_paced, serve,
                           service_settings,
                           storescu_send, wait_until)
from dermgate.settings import Settings, WorkerSettings


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def engine_rate(settings: Settings, files: list[Path], seconds: float = 8.0) -> tuple[float, list[str]]:
    """Images/s of the model alone as the worker runs it: same threads, batch size, Grad-CAM."""
    import pydicom

    from inference.engine import Engine
    from integration.dicom_scp.decode import decode_rgb
    threads = settings.model.threads or max(1, os.cpu_count() or 2)
    engine = Engine(settings.model.path, intra_op_threads=threads)
    images = [decode_rgb(pydicom.dcmread(f)) for f in files]
    bs = settings.worker.batch_size
    batches = [images[i:i + bs] for i in range(0, len(images) - bs + 1, bs)] or [images]
    engine.predict(batches[0])
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or done < 4 * bs:
        batch = batches[(done // bs) % len(batches)]
        engine.predict(batch)
        done += len(batch)
    return done / (time.perf_counter() - t0), engine.providers


def stage_split(metrics: dict) -> dict[str, tuple[float, float]]:
    """stage -> (total seconds, count) from the dermgate_stage_seconds histogram."""
    out: dict[str, list[float]] = {}
    for (name, labels), value in metrics.items():
        stage = dict(labels).get("stage")
        if name == "dermgate_stage_seconds_sum":
            out.setdefault(stage, [0.0, 0.0])[0] = value
        elif name == "dermgate_stage_seconds_count":
            out.setdefault(stage, [0.0, 0.0])[1] = value
    return {k: (v[0], v[1]) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", "--images", dest="n", type=int, default=60, help="images for the throughput run")
    ap.add_argument("--single", type=int, default=20, help="images sent one at a time (idle latency)")
    ap.add_argument("--steady-rate", type=float, default=10.0, help="images/s of the steady run (0: skip)")
    ap.add_argument("--steady-seconds", type=float, default=10.0)
    ap.add_argument("--worker-threads", type=int, default=None,
                    help="dermgate serve --workers (default: the service's default)")
    ap.add_argument("--poll-interval", type=float, default=None,
                    help="worker.poll_interval_s (default: the service's default)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dermgate-pipeline-"))
    root.chmod(0o755)
    files = make_files(root / "src", args.n)
    singles = make_files(root / "single", args.single + 1)
    steady = make_files(root / "steady", int(args.steady_rate * args.steady_seconds)) if args.steady_rate else []
    worker = WorkerSettings() if args.poll_interval is None else WorkerSettings(poll_interval_s=args.poll_interval)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (shared machine: compare the ratios)")
    with peers(root) as p:
        settings = service_settings(root / "work", p, worker=worker)
        engine_ips, providers = engine_rate(settings, files)
        with serve(settings, "scp,worker,dispatcher,api", workers=args.worker_threads) as svc:
            storescu_send(svc.port, singles[:1])             # warm-up: SMART token, associations
            wait_until(lambda: svc.finished() >= 1, 120, "the warm-up image")
            before, split0 = svc.finished(), stage_split(svc.metrics())
            cpu0 = svc.cpu_seconds()
            t0 = time.monotonic()
            storescu_send(svc.port, files)
            wait_until(lambda: svc.finished() >= before + len(files), 1800, "the throughput run")
            total = time.monotonic() - t0
            cpu = svc.cpu_seconds() - cpu0
            split1 = stage_split(svc.metrics())
            idle: list[float] = []
            for f in singles[1:]:     # one image at a time, each waiting for its report: no queueing
                since = svc.last_job_id()
                storescu_send(svc.port, [f])
                wait_until(lambda since=since: svc.report_latencies(since), 120, "an idle image's report")
                idle.extend(svc.report_latencies(since).values())
                wait_until(lambda: svc.finished() >= svc.last_job_id(), 120, "the PACS delivery")
                time.sleep(0.3)           # let every loop go idle again
            steady_lat: list[float] = []
            if steady:
                since = svc.last_job_id()
                send_paced(svc.port, steady, args.steady_rate)
                wait_until(lambda: len(svc.report_latencies(since)) >= len(steady), 1800, "the steady run")
                steady_lat = sorted(svc.report_latencies(since).values())
            wait_until(lambda: svc.finished() >= svc.last_job_id(), 600, "the last PACS deliveries")
            failed = svc.failed()
            peak_rss = process_peak_rss(svc.proc.pid)
        reports = count_reports(p.fhir)
        in_pacs = count_pacs_instances(p.orthanc)
    shutil.rmtree(root, ignore_errors=True)      # the PACS and the store hold ~1 MB per image
    pipeline_ips = len(files) / total
    idle.sort()
    n_total = 1 + len(files) + len(idle) + len(steady_lat)
    print(f"\n{len(files)} images (200x150 JPEG, dermoscopic); `dermgate serve` with SCP + worker + dispatcher "
          f"+ API in one process, SQLite; FHIR generic-r4 with SMART ES384; PACS Orthanc; providers {providers}")
    print(f"  engine alone (batch {settings.worker.batch_size}, Grad-CAM): {engine_ips:.2f} images/s")
    print(f"  pipeline: {pipeline_ips:.2f} images/s ({total:.1f} s first C-STORE -> last job delivered)")
    print(f"pipeline / engine: {pipeline_ips / engine_ips:.2f}")
    print(f"  CPU of the dermgate process in the throughput run: {cpu / len(files) * 1000:.0f} ms per image "
          f"({len(files) / cpu:.2f} images/s per core, all roles); peak RSS {peak_rss / 2**20:.0f} MiB")
    print(f"  idle, one at a time ({len(idle)}): C-STORE -> FHIR report accepted p50 {pct(idle, 50) * 1000:.0f} ms")
    print(f"idle p95 {pct(idle, 95) * 1000:.0f} ms")
    if steady_lat:
        print(f"steady {args.steady_rate:g}/s ({len(steady_lat)} images): C-STORE -> FHIR report accepted "
              f"p50 {pct(steady_lat, 50) * 1000:.0f} ms, p95 {pct(steady_lat, 95) * 1000:.0f} ms")
    print("  worker time per image in the throughput run (dermgate_stage_seconds):")
    for stage, (secs, count) in sorted(split1.items()):
        secs0, count0 = split0.get(stage, (0.0, 0.0))
        if count > count0:
            print(f"    {stage:<10} {(secs - secs0) / max(len(files), 1) * 1000:7.1f} ms/image "
                  f"({int(count - count0)} observations)")
    print(f"  reports on the FHIR server: {reports}, instances in Orthanc: {in_pacs}, failed jobs: {failed} "
          f"(expected {n_total}, {2 * n_total}, 0)")


if __name__ == "__main__":
    main()
