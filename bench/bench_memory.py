"""Resident memory of a running ``dermgate serve`` while it receives large and fuzzed objects.

The service runs as its own process, as in production (real SQLite database, folder store and
encrypted audit trail under a fresh work dir; ``--roles``, default ``scp``); this script is the
modality. It reads the server's VmRSS (now) and VmHWM (peak) from /proc and prints, per phase,
the figure before, after and the peak, in MiB:

1. ``large``: one native RGB object of ``--large-mb`` MB whose Rows x Columns exceed
   ``max_pixels`` (the SCP must refuse it with 0xC003);
2. ``large x3``: three of them on three associations at once;
3. ``accepted``: one native object just inside ``max_pixels`` (it must be stored);
4. ``fuzz``, on a fresh server: ``--fuzz`` mutants of the deterministic corpus
   (tests/integration/dicom_scp/fuzz.py), over associations of 100 objects each, with the RSS
   after every 500 and, when the server runs a worker, once the queue has drained.

    PYTHONPATH=. .venv/bin/python bench/bench_memory.py --large-mb 300 --fuzz 2000
    PYTHONPATH=. .venv/bin/python bench/bench_memory.py --fuzz 2000 --skip-large --roles scp,worker,dispatcher

To measure another checkout's server with this script, put that checkout first on PYTHONPATH
for the server only: ``--server-path /path/to/checkout``.
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pydicom import Dataset  # noqa: E402
from pydicom.dataset import FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402
from pynetdicom import AE, _config  # noqa: E402

CALLING, CALLED = "BENCHMEM", "DERMGATE"
VL_PHOTO = "1.2.840.10008.5.1.4.1.1.77.1.4"
MAX_PIXELS = 40_000_000                  # the default of dicom.max_pixels


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mem(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def reset_peak(pid: int) -> bool:
    """Reset VmHWM (Linux >= 4.0: write 5 to clear_refs); False when not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def start_server(workdir: Path, port: int, server_path: str | None, roles: str) -> subprocess.Popen[bytes]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "dermgate.toml").write_text(
        f'log_level = "WARNING"\n[dicom]\nport = {port}\nmin_free_bytes = 1048576\nmax_associations = 8\n'
        f'[[dicom.allowed_callers]]\nae_title = "{CALLING}"\nhosts = ["127.0.0.1"]\n')
    env = {**os.environ, "DERMGATE_WORKDIR": str(workdir)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (server_path, str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-m", "dermgate.cli", "serve", "--roles", roles], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.2)
    raise SystemExit("server did not listen")


def native_object(path: Path, rows: int, columns: int) -> Path:
    """A native RGB VL Photographic object of rows x columns, written without holding two copies."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = VL_PHOTO
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = VL_PHOTO, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "BENCH-MEM", "Bench^Memory", "XC"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 3, "RGB"
    ds.PlanarConfiguration, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 0, 8, 8, 7, 0
    pixels = np.random.default_rng(1).integers(0, 256, rows * columns * 3, dtype=np.uint8).tobytes()
    ds.PixelData = pixels
    ds.save_as(path, enforce_file_format=True)
    return path


def send_files(port: int, paths: list[Path]) -> list[str]:
    """C-STORE each file on its own association, all at once; the statuses as hex (or 'none')."""
    out: list[str] = [""] * len(paths)

    def one(i: int, path: Path) -> None:
        ae = AE(ae_title=CALLING)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 600
        ae.add_requested_context(VL_PHOTO, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", port, ae_title=CALLED)
        if not assoc.is_established:
            out[i] = "not-associated"
            return
        rsp = assoc.send_c_store(path)
        out[i] = f"0x{int(rsp.Status):04X}" if "Status" in rsp else "none"
        if assoc.is_established:
            assoc.release()

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(paths)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def phase(name: str, pid: int, action) -> None:  # noqa: ANN001
    reset_peak(pid)
    before, _ = mem(pid)
    started = time.perf_counter()
    result = action()
    after, peak = mem(pid)
    print(f"{name:<10} rss before {before:8.1f} MiB  after {after:8.1f} MiB  peak {peak:8.1f} MiB  "
          f"(+{peak - before:.1f} at peak)  {time.perf_counter() - started:6.1f} s  {result}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--large-mb", type=int, default=300)
    p.add_argument("--fuzz", type=int, default=2000)
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--server-path", default=None, help="checkout whose dermgate the server runs")
    p.add_argument("--roles", default="scp", help="roles of the server process (default scp; e.g. scp,worker)")
    p.add_argument("--skip-large", action="store_true", help="only the fuzz phase")
    args = p.parse_args()
    _config.STORE_SEND_CHUNKED_DATASET = True           # the SCU streams from the file: only the server is measured
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        root = Path(tmp)
        if not args.skip_large:
            large_phases(root, args)
        if args.fuzz:
            port = free_port()
            proc = start_server(root / "fuzz-work", port, args.server_path, args.roles)
            try:
                fuzz(proc.pid, port, root, args.fuzz, args.seed, root / "fuzz-work" if "worker" in args.roles else None)
            finally:
                proc.terminate()
                proc.wait(60)


def large_phases(root: Path, args: argparse.Namespace) -> None:
    port = free_port()
    proc = start_server(root / "work", port, args.server_path, args.roles)
    try:
        side = int((args.large_mb * 1e6 / 3) ** 0.5)
        large = native_object(root / "large.dcm", side, side)
        print(f"server pid {proc.pid}; large object {large.stat().st_size / 1e6:.0f} MB "
              f"({side}x{side} RGB, > max_pixels {MAX_PIXELS})", flush=True)
        phase("idle", proc.pid, lambda: time.sleep(1) or "")
        phase("large", proc.pid, lambda: send_files(port, [large]))
        phase("large x3", proc.pid, lambda: send_files(port, [large] * 3))
        inside = int((MAX_PIXELS * 0.9) ** 0.5)
        accepted = native_object(root / "accepted.dcm", inside, inside)
        large.unlink()
        phase("accepted", proc.pid, lambda: send_files(port, [accepted]))
        accepted.unlink()
    finally:
        proc.terminate()
        proc.wait(60)


def unfinished_jobs(workdir: Path) -> int:
    import sqlite3
    with sqlite3.connect(workdir / "dermgate.db") as db:
        return int(db.execute("SELECT count(*) FROM jobs WHERE state NOT IN ('delivered', 'failed')").fetchone()[0])


def fuzz(pid: int, port: int, root: Path, n: int, seed: int, worker_dir: Path | None) -> None:
    from tests.integration.dicom_scp.fuzz import base_objects, corpus, send_all
    from tests.peers.dcmtk import sample_jpeg
    bases = base_objects(root / "bases", sample_jpeg())
    statuses: collections.Counter[str] = collections.Counter()
    reset_peak(pid)
    start, _ = mem(pid)
    started = time.perf_counter()
    for i, (_, answer) in enumerate(send_all("127.0.0.1", port, corpus(bases, n, seed), calling=CALLING,
                                             called=CALLED), start=1):
        statuses["none" if answer.status is None else f"0x{answer.status:04X}"] += 1
        if i % 500 == 0 or i == n:
            rss, peak = mem(pid)
            print(f"fuzz {i:>5}  rss {rss:8.1f} MiB  (+{rss - start:.1f} since the first)  peak {peak:8.1f} MiB  "
                  f"{time.perf_counter() - started:6.1f} s", flush=True)
    print("fuzz statuses:", dict(sorted(statuses.items())), flush=True)
    if worker_dir is not None:
        deadline = time.monotonic() + 3600
        while unfinished_jobs(worker_dir) and time.monotonic() < deadline:
            time.sleep(2)
        rss, peak = mem(pid)
        print(f"fuzz drained  rss {rss:8.1f} MiB  (+{rss - start:.1f} since the first)  peak {peak:8.1f} MiB  "
              f"{time.perf_counter() - started:6.1f} s  ({unfinished_jobs(worker_dir)} jobs unfinished)", flush=True)


if __name__ == "__main__":
    main()
