"""Audit throughput, and the cost one audit record adds to one C-STORE, same run.

    python -m bench.bench_audit [--events 1000] [--threads 8] [--stores 200] [--rounds 3] [--dir DIR]

Part 1, the trail alone (encrypted, chained, checkpoint every 100):
  fsync      one thread, ``record`` returns after fdatasync (production setting)
  no-fsync   one thread, ``durable=False`` (the CPU cost: JSON, AES-GCM, hashing)
  fsync xN   N threads at once: group commit shares one fsync between queued events
  fsync+anchor  one thread, fsync, the head published to an SQLite ``audit_anchor`` table
             (``audit.anchor.DbAnchor``, a background writer): what the outside anchor costs
Part 2, a pynetdicom C-STORE SCP receiving ``--stores`` images from dcmtk's
``storescu`` over one association, with handler variants run alternately:
  ack         answer 0x0000 at once (the protocol floor)
  store       write the dataset to disk and fsync it, then answer (a durable SCP)
  ... +audit  the same, plus one ``AuditTrail.record`` (fsync) before answering
It prints ms per C-STORE (median of the rounds) and the ratios audited/unaudited.
dcmtk on loopback needs TCP_NODELAY=1 in the environment (set here for storescu).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt

from audit.api import AuditEvent, EventType, Outcome
from audit.keys import Keyring, Signer
from audit.trail import AuditTrail
from tests.peers.dcmtk import STORESCU   # dcmtk's storescu, even where pynetdicom's is first on PATH

VL_PHOTOGRAPHIC = UID("1.2.840.10008.5.1.4.1.1.77.1.4")
STATUS_SUCCESS = 0x0000


def _event(i: int) -> AuditEvent:
    return AuditEvent(event=EventType.STORE_RECEIVED, outcome=Outcome.SUCCESS, actor="BENCHSCU", action="C",
                      actor_role="modality", source="127.0.0.1", patient_id=f"BENCH-{i % 50:04d}",
                      study_uid=f"1.2.826.0.1.3680043.8.498.{i}", sop_instance_uids=(f"1.2.826.0.1.3680043.8.498.{i}.1",),
                      detail={"called_ae": "DERMGATE", "sop_class_uid": VL_PHOTOGRAPHIC})


def _trail(directory: Path, durable: bool = True) -> AuditTrail:
    return AuditTrail(directory, Keyring.generate(), Signer.generate(), durable=durable, checkpoint_every=100)


def bench_trail(root: Path, events: int, threads: int) -> dict[str, float]:
    rates: dict[str, float] = {}
    for name, durable in (("fsync", True), ("no-fsync", False)):
        trail = _trail(root / f"trail-{name}", durable)
        trail.record(_event(0))
        start = time.perf_counter()
        for i in range(events):
            trail.record(_event(i))
        rates[name] = events / (time.perf_counter() - start)
        trail.close()
    from audit.anchor import DbAnchor
    from dermgate.db import AuditAnchor, make_engine
    from dermgate.migrate import upgrade
    url = f"sqlite:///{root / 'anchor.db'}"
    upgrade(url)
    trail = AuditTrail(root / "trail-anchor", Keyring.generate(), Signer.generate(), checkpoint_every=100,
                       anchor=DbAnchor(make_engine(url), AuditAnchor.__table__, owns_engine=True))
    trail.record(_event(0))
    start = time.perf_counter()
    for i in range(events):
        trail.record(_event(i))
    rates["fsync+anchor"] = events / (time.perf_counter() - start)
    trail.close()
    trail = _trail(root / "trail-threads")
    per_thread = max(1, events // threads)

    def work(t: int) -> None:
        for i in range(per_thread):
            trail.record(_event(t * per_thread + i))

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    rates[f"fsync x{threads}"] = per_thread * threads / (time.perf_counter() - start)
    report = trail.verify()
    trail.close()
    assert report.ok, report.summary()
    return rates


# --- C-STORE -------------------------------------------------------------------------------------

def _image(path: Path) -> Path:
    """A 256x256 RGB VL Photographic image, uncompressed (about 200 kB)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = VL_PHOTOGRAPHIC
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = VL_PHOTOGRAPHIC, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName, ds.Modality = "BENCH-0001", "Bench^Patient", "XC"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows = ds.Columns = 256
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


class Scp:
    """A pynetdicom storage SCP whose handler variant can be switched between runs."""

    def __init__(self, store_dir: Path, trail: AuditTrail) -> None:
        self.mode = "ack"
        self.store_dir, self.trail = store_dir, trail
        self.count = 0
        ae = AE(ae_title="DERMGATE")
        ae.add_supported_context(VL_PHOTOGRAPHIC, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self.handle)])
        assert server is not None
        self.server = server

    def handle(self, event: evt.Event) -> int:
        self.count += 1
        if self.mode.startswith("store"):
            path = self.store_dir / f"{self.count}.dcm"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, event.encoded_dataset())
                os.fsync(fd)
            finally:
                os.close(fd)
        if self.mode.endswith("+audit"):
            self.trail.record(_event(self.count))
        return STATUS_SUCCESS

    def close(self) -> None:
        self.server.shutdown()


def _send(port: int, files: list[Path]) -> float:
    env = {**os.environ, "TCP_NODELAY": "1"}
    start = time.perf_counter()
    subprocess.run([STORESCU, "-aet", "BENCHSCU", "-aec", "DERMGATE", "-R", "127.0.0.1", str(port), *map(str, files)],
                   check=True, capture_output=True, env=env, timeout=600)
    return time.perf_counter() - start


def bench_cstore(root: Path, stores: int, rounds: int) -> dict[str, float]:
    image = _image(root / "image.dcm")
    files = [image] * stores
    trail = _trail(root / "trail-cstore")
    store_dir = root / "received"
    store_dir.mkdir()
    scp = Scp(store_dir, trail)
    modes = ("ack", "ack+audit", "store", "store+audit")
    samples: dict[str, list[float]] = {m: [] for m in modes}
    try:
        scp.mode = "ack"
        _send(scp.port, files[:10])                     # warm up
        for _ in range(rounds):
            for mode in modes:
                scp.mode = mode
                samples[mode].append(_send(scp.port, files) / stores * 1000.0)
    finally:
        scp.close()
        trail.close()
    return {m: statistics.median(v) for m, v in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--stores", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir on this disk)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-audit-", dir=args.dir))
    try:
        rates = bench_trail(root, args.events, args.threads)
        print(f"audit trail, {args.events} events (AES-256-GCM, hash chain, checkpoint every 100):")
        for name, rate in rates.items():
            print(f"  {name:<12} {rate:8.0f} events/s")
        print(f"  fsync/no-fsync throughput ratio: {rates['fsync'] / rates['no-fsync']:.3f}")
        if not Path(STORESCU).exists():
            print("storescu not found: skipping the C-STORE part (apt-get install dcmtk)")
            return
        ms = bench_cstore(root, args.stores, args.rounds)
        print(f"C-STORE via storescu -> pynetdicom SCP, {args.stores} images/association, median of {args.rounds}:")
        for name, value in ms.items():
            print(f"  {name:<12} {value:7.2f} ms per C-STORE")
        for base in ("ack", "store"):
            added = ms[f"{base}+audit"] - ms[base]
            print(f"  audit cost vs {base:<5}: +{added:.2f} ms per C-STORE, ratio {ms[f'{base}+audit'] / ms[base]:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
