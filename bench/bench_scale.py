"""Scale-out on PostgreSQL: 2 SCP processes, 1 / 2 / 4 worker processes, one database, one store.

    python -m bench.bench_scale [--n 1000] [--workers 1 2 4] [--pg-url URL]

For each worker count: a fresh database and store; 2 ``dermgate serve --roles scp``
processes; N ``dermgate serve --roles worker,dispatcher`` processes; 4
concurrent dcmtk ``storescu`` associations (2 per SCP) send the images. It
waits until every job is delivered, then checks exactly-once: one job per
image, one outbox row per job, every row sent once, one report file per image
(the FHIR bundle-folder channel stands in for the EHR here), no lease left.
Throughput = images / (first send -> last report). The 1-worker run is the
baseline for the ratios, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from typing import Any

from sqlalchemy import create_engine, func, select, text

from bench.harness import process_cpu_seconds, process_peak_rss

from dermgate.db import Job, JobState, OutboxItem, OutboxState
from dermgate.demo import jpeg_to_dicom
from tests.peers.dcmtk import STORESCU, dcmtk_env
from tests.peers.orthanc import free_port
from tests.peers.postgres import create_database, drop_database, start_server

REPO = Path(__file__).resolve().parents[1]
HAM = REPO.parent / "shared" / "data" / "ham10000" / "images"
# Without the shared data set beside the checkout: the HAM10000 samples committed to the repository.
SAMPLES = (REPO / "dermgate" / "samples", REPO / "tests" / "data" / "samples")
BENCH_AE = "BENCHSCOPE"


def make_files(folder: Path, n: int) -> list[Path]:
    import cv2
    from pydicom.uid import generate_uid
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(HAM.glob("*.jpg"))[: max(n, 1)] or sorted(p for d in SAMPLES for p in d.glob("*.jpg"))
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        img = cv2.imread(str(src))
        ds = jpeg_to_dicom(src.read_bytes(), img.shape[0], img.shape[1], f"BENCH-{i % 50:04d}", generate_uid(), i)
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def wait_listening(ports: list[int], timeout: float = 120.0) -> None:
    import socket
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SCP on port {port} did not start") from None
                time.sleep(0.2)


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` (with its reaped children) and of its live children: the PostgreSQL server."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid:
            total += sum(int(f) for f in fields[11:15]) / tick      # utime stime cutime cstime
        elif int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def run_once(pg_server_url: str, files: list[Path], workers: int, root: Path,
             pg_pid: int | None = None) -> dict[str, Any]:
    db_url = create_database(pg_server_url, prefix="bench_scale")
    work = root / f"work-{workers}"
    env = {**os.environ, "DERMGATE_WORKDIR": str(work), "DERMGATE_DATABASE_URL": db_url,
           "DERMGATE_FHIR_BUNDLE_DIR": str(work / "reports"), "DERMGATE_MODEL__THREADS": "1",
           "DERMGATE_DICOM__ALLOWED_CALLERS": f'[{{"ae_title": "{BENCH_AE}", "hosts": ["127.0.0.1"]}}]',
           "DERMGATE_DICOM__MIN_FREE_BYTES": str(64 * 1024 * 1024), "DERMGATE_WORKER__POLL_INTERVAL_S": "0.05"}
    work.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "dermgate.cli", "migrate"], env=env, check=True, capture_output=True)
    cmd = [sys.executable, "-m", "dermgate.cli", "serve"]
    ports = [free_port(), free_port()]
    procs = [subprocess.Popen([*cmd, "--roles", "scp"], env={**env, "DERMGATE_DICOM__PORT": str(p)})
             for p in ports]
    procs += [subprocess.Popen([*cmd, "--roles", "worker,dispatcher"], env=env) for _ in range(workers)]
    engine = create_engine(db_url)
    try:
        wait_listening(ports)
        time.sleep(3.0)  # workers' models loaded and verified
        cpu0 = [process_cpu_seconds(p.pid) for p in procs]
        pg0 = tree_cpu_seconds(pg_pid) if pg_pid else 0.0
        t0 = time.monotonic()
        chunks = [files[i::4] for i in range(4)]
        senders = [subprocess.Popen([STORESCU, "-aet", BENCH_AE, "-aec", "DERMGATE", "-xy", "-R",
                                     "127.0.0.1", str(ports[i % 2]), *map(str, chunk)],
                                    env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                   for i, chunk in enumerate(chunks)]
        for s in senders:
            _, err = s.communicate(timeout=600)
            if s.returncode != 0:
                raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
        t_sent = time.monotonic() - t0
        while True:
            with engine.connect() as c:
                done = c.scalar(select(func.count()).select_from(Job).where(
                    Job.state.in_([JobState.DELIVERED, JobState.FAILED])))
            if done >= len(files):
                break
            if time.monotonic() - t0 > 1800:
                raise RuntimeError("timed out")
            time.sleep(0.2)
        elapsed = time.monotonic() - t0
        cpu = [process_cpu_seconds(p.pid) - c for p, c in zip(procs, cpu0)]
        pg_cpu = tree_cpu_seconds(pg_pid) - pg0 if pg_pid else None
        rss = [process_peak_rss(p.pid) for p in procs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)
    with engine.connect() as c:
        jobs = c.scalar(select(func.count()).select_from(Job))
        delivered = c.scalar(select(func.count()).select_from(Job).where(Job.state == JobState.DELIVERED))
        outbox = c.scalar(select(func.count()).select_from(OutboxItem))
        sent_once = c.scalar(select(func.count()).select_from(OutboxItem).where(
            OutboxItem.state == OutboxState.SENT, OutboxItem.attempts == 1))
        leases = c.scalar(select(func.count()).select_from(Job).where(Job.lease_owner.is_not(None)))
        per_job = c.execute(text("SELECT max(n) FROM (SELECT count(*) n FROM outbox GROUP BY job_id) t")).scalar()
    engine.dispose()
    drop_database(db_url)
    reports = len(list((work / "reports").glob("*.json")))
    ok = jobs == delivered == outbox == sent_once == reports == len(files) and per_job == 1 and leases == 0
    return {"scp_cpu_s": sum(cpu[:2]), "worker_cpu_s": sum(cpu[2:]), "pg_cpu_s": pg_cpu,
            "scp_rss": max(rss[:2]), "worker_rss": max(rss[2:]),
            "workers": workers, "images": len(files), "send_s": t_sent, "total_s": elapsed,
            "images_per_s": len(files) / elapsed, "jobs": jobs, "delivered": delivered, "reports": reports,
            "outbox_rows": outbox, "sent_first_try": sent_once, "leases_left": leases, "exactly_once": ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", "--images", dest="images", type=int, default=1000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--pg-url", help="an existing PostgreSQL server (default: start one with initdb)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dermgate-scale-"))
    root.chmod(0o755)  # the PostgreSQL cluster runs as an unprivileged user
    server = None
    pg = args.pg_url
    if pg is None:
        server = start_server(root / "pg")
        pg = server.url
    try:
        files = make_files(root / "src", args.images)
        pg_pid = None
        if server is not None and (server.data_dir / "postmaster.pid").exists():
            pg_pid = int((server.data_dir / "postmaster.pid").read_text().split()[0])
        rows = [run_once(pg, files, n, root, pg_pid) for n in args.workers]
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    base = rows[0]["images_per_s"]
    print(f"\n{args.images} images, 2 SCP processes, 4 concurrent storescu associations, PostgreSQL, "
          f"{os.cpu_count()} CPU cores")
    print(f"{'workers':>7} {'send s':>7} {'total s':>8} {'img/s':>7} {'vs 1':>5}  exactly-once (jobs/delivered/reports/outbox)")
    for r in rows:
        print(f"{r['workers']:>7} {r['send_s']:>7.1f} {r['total_s']:>8.1f} {r['images_per_s']:>7.1f} "
              f"{r['images_per_s'] / base:>5.2f}  {r['exactly_once']} "
              f"({r['jobs']}/{r['delivered']}/{r['reports']}/{r['outbox_rows']}, leases left {r['leases_left']})")
    print("\nCPU per image (ms) and peak RSS per process (MiB), from /proc (utime+stime, VmHWM):")
    print(f"{'workers':>7} {'SCPs':>6} {'workers':>8} {'PostgreSQL':>11} {'all':>6} {'busy':>6}  "
          f"{'SCP RSS':>8} {'worker RSS':>10}")
    cores = os.cpu_count() or 1
    for r in rows:
        n = r["images"]
        pg = r["pg_cpu_s"] or 0.0
        busy = (r["scp_cpu_s"] + r["worker_cpu_s"] + pg) / (r["total_s"] * cores)
        print(f"{r['workers']:>7} {r['scp_cpu_s'] / n * 1000:>6.1f} {r['worker_cpu_s'] / n * 1000:>8.1f} "
              f"{pg / n * 1000 if r['pg_cpu_s'] is not None else float('nan'):>11.1f} "
              f"{(r['scp_cpu_s'] + r['worker_cpu_s'] + pg) / n * 1000:>6.1f} {busy:>5.0%}  "
              f"{r['scp_rss'] / 2**20:>8.0f} {r['worker_rss'] / 2**20:>10.0f}")
    print(f"'busy': CPU time of dermgate and PostgreSQL over (elapsed x {cores} cores); near 100% means the "
          f"cores are the limit (the machine is shared: other work takes the rest).")
    if not all(r["exactly_once"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
