"""Images per second received by dermgate's SCP from dcmtk's storescu, against bare receivers.

Every receiver gets the same N 600x450 JPEG Baseline files (HAM10000 samples upscaled and
wrapped by img2dcm), in the same run, first over one ``storescu -xy`` association
(TCP_NODELAY=1), then split over 4 concurrent associations. Ours runs with durability, as
``dermgate serve`` does: the group-commit intake (dermgate/groupcommit.py: object + folder
fsyncs alongside one SQLite WAL commit per group, then one audit fsync per group), the real
encrypted audit trail (``--audit none`` for a no-op sink), JSON logs to a file. The intake
before group commit (object, folder, database and audit fsynced one after the other for each
image) is measured in the same run as ``per-image``, and the service's intake again with the
store encrypted at rest (AES-256-GCM per object, the production default) as ``encrypted``. References: a bare pynetdicom SCP that
only writes files (the ceiling of the toolkit, no fsync) and dcmtk's storescp (no fsync).

    python -m bench.bench_scp [--n 300]

The line ``dermgate / bare pynetdicom: X`` is the one-association ratio; the 4-association
ratio has its own line. "durability wait" is the time a C-STORE handler spends in the
intake and the audit record (the latency durability adds to each answer), per image.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dermgate import logs  # noqa: E402
from dermgate.db import create_schema, make_engine, make_sessionmaker  # noqa: E402
from dermgate.groupcommit import GroupCommit  # noqa: E402
from dermgate.intake import Intake  # noqa: E402
from dermgate.settings import AllowedCaller, DicomSettings, Settings  # noqa: E402
from dermgate.store import ObjectStore  # noqa: E402
from integration.dicom_scp.scp import DicomService  # noqa: E402
from tests.peers.dcmtk import IMG2DCM, STORESCP, STORESCU  # noqa: E402  (dcmtk's, not pynetdicom's)

SIZE = (600, 450)                       # width x height, as the target
CALLING, CALLED = "BENCHSCU", "DERMGATE"
SAMPLE_DIRS = (REPO / "dermgate" / "samples", REPO.parent / "shared" / "data" / "ham10000" / "images")
ENV = {**os.environ, "TCP_NODELAY": "1"}


class NullAudit:
    def record(self, event: Any) -> int:
        return 0


class Stopwatch:
    """Seconds the SCP's handlers spend making objects durable (intake + audit record)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seconds = 0.0
        self.stores = 0

    def add(self, seconds: float, store: bool) -> None:
        with self.lock:
            self.seconds += seconds
            self.stores += store

    def reset(self) -> None:
        with self.lock:
            self.seconds, self.stores = 0.0, 0

    def per_store_ms(self) -> float:
        return self.seconds / max(self.stores, 1) * 1000


class TimedIntake:
    def __init__(self, intake: Any, watch: Stopwatch) -> None:
        self.intake, self.watch = intake, watch

    def accept(self, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.intake.accept(*args)
        finally:
            self.watch.add(time.perf_counter() - t0, True)


class TimedSink:
    def __init__(self, sink: Any, watch: Stopwatch) -> None:
        self.sink, self.watch = sink, watch

    def record(self, event: Any) -> int:
        t0 = time.perf_counter()
        try:
            return int(self.sink.record(event))
        finally:
            if event.event.value == "dicom.store":
                self.watch.add(time.perf_counter() - t0, False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_files(folder: Path, n: int) -> list[Path]:
    """N distinct JPEG Baseline VL Photographic files (cached in ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("img_*.dcm"))
    if len(existing) >= n:
        return existing[:n]
    sources = [p for d in SAMPLE_DIRS if d.exists() for p in sorted(d.glob("*.jpg"))][:200]
    if not sources:
        raise SystemExit("no sample JPEGs found")
    files = []
    for i in range(n):
        out = folder / f"img_{i:05d}.dcm"
        files.append(out)
        if out.exists():
            continue
        source = cv2.imread(str(sources[i % len(sources)]))
        assert source is not None
        img = cv2.resize(source, SIZE, interpolation=cv2.INTER_CUBIC)
        jpg = folder / "tmp.jpg"
        cv2.imwrite(str(jpg), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        subprocess.run([IMG2DCM, "-vlp", "-k", f"PatientID=BENCH{i:05d}", "-k", "StudyID=1",
                        str(jpg), str(out)], check=True, capture_output=True)
    return files


def send(port: int, files: list[Path], associations: int = 1) -> float:
    """Seconds for ``associations`` concurrent storescu -xy associations carrying ``files`` between them."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen([STORESCU, "-xy", "-aet", CALLING, "-aec", CALLED, "127.0.0.1", str(port),
                               *map(str, files[i::associations])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for i in range(associations)]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"storescu failed ({proc.returncode}): {err[-2000:]}")
    return time.perf_counter() - t0


def open_audit(workdir: Path, kind: str) -> tuple[Any, str]:
    if kind == "none":
        return NullAudit(), "no-op audit sink"
    try:
        from dermgate.app import open_audit as open_real
        return open_real(Settings(workdir=workdir)), "real encrypted audit trail"
    except Exception as exc:                    # the trail may be unavailable in a partial checkout
        if kind == "real":
            raise
        return NullAudit(), f"no-op audit sink (real trail unavailable: {type(exc).__name__})"


@contextmanager
def dermgate_scp(workdir: Path, audit_kind: str, max_pdu: int, intake_kind: str,
                 watch: Stopwatch) -> Iterator[tuple[int, str, Any]]:
    """The SCP as ``dermgate serve`` wires it (``group``; ``encrypted``: with the store encrypted
    at rest), or with the intake before group commit (``per-image``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(f"sqlite:///{workdir / 'dermgate.db'}")
    create_schema(engine)
    cipher = None
    if intake_kind == "encrypted":
        from audit.keys import Keyring
        from dermgate.store import StoreCipher
        cipher = StoreCipher(Keyring.generate())             # a keyring is a KeyProvider
    store = ObjectStore(workdir / "store", cipher)
    sessions = make_sessionmaker(engine)
    trail, audit_desc = open_audit(workdir, audit_kind)
    group = GroupCommit(store, sessions, trail) if intake_kind in ("group", "encrypted") else None
    intake = group.intake if group else Intake(store, sessions)
    audit = group.audit if group else trail
    cfg = DicomSettings(ae_title=CALLED, port=0, max_pdu=max_pdu,
                        allowed_callers=[AllowedCaller(ae_title=CALLING, hosts=["127.0.0.1"])])
    service = DicomService(cfg, TimedIntake(intake, watch), TimedSink(audit, watch), store)  # type: ignore[arg-type]
    service.start()
    try:
        assert service.port is not None
        yield service.port, audit_desc, engine
        if cipher is not None:
            sample = next((store.root / "objects").rglob("*.dcm"))
            if not sample.read_bytes().startswith(b"DGS1"):
                raise SystemExit("the encrypted run wrote a plaintext object")
    finally:
        service.stop(timeout=10)
        if group is not None:
            group.close()
        getattr(trail, "close", lambda: None)()
        engine.dispose()


@contextmanager
def dcmtk_storescp(outdir: Path) -> Iterator[int]:
    outdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen([STORESCP, "+xa", "-aet", CALLED, "-od", str(outdir), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        _wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def bare_pynetdicom(outdir: Path) -> Iterator[int]:
    """pynetdicom writing each received stream to a file: no checks, no fsync, no database."""
    from pynetdicom import AE, evt
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

    from integration.dicom_scp.uids import VL_PHOTOGRAPHIC_IMAGE_STORAGE

    outdir.mkdir(parents=True, exist_ok=True)

    def on_store(event: Any) -> int:
        (outdir / f"{event.request.AffectedSOPInstanceUID}.dcm").write_bytes(event.encoded_dataset())
        return 0x0000

    ae = AE(ae_title=CALLED)
    ae.add_supported_context(VL_PHOTOGRAPHIC_IMAGE_STORAGE,
                             [JPEGBaseline8Bit, ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def _wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a fresh temporary folder")
    ap.add_argument("--audit", choices=["auto", "real", "none"], default="auto")
    ap.add_argument("--max-pdu", type=int, default=DicomSettings().max_pdu)
    ap.add_argument("--associations", type=int, default=4, help="concurrent associations of the second round")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare pynetdicom reference")
    ap.add_argument("--no-per-image", action="store_true", help="skip the intake before group commit")
    ap.add_argument("--no-encrypted", action="store_true", help="skip the encrypted-store run")
    args = ap.parse_args(argv)

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_scp_"))
    files = make_files(root / "input", args.n)
    warmup = make_files(root / "warmup", 5)
    size_mb = sum(f.stat().st_size for f in files) / 2**20
    run = root / f"run_{int(time.time())}"
    logs.configure("INFO", run / "dermgate.log")        # as `dermgate serve`: JSON lines to a file
    print(f"{len(files)} files, 600x450 JPEG Baseline, {size_mb:.1f} MiB; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.2f} (shared machine: compare ratios, not absolute figures)")

    rounds = (1, args.associations)
    rates: dict[tuple[str, int], float] = {}
    waits: dict[tuple[str, int], float] = {}
    cpu: dict[tuple[str, int], float] = {}     # CPU seconds of this process (the SCP) per image
    kinds = ["group"] + ([] if args.no_encrypted else ["encrypted"]) + ([] if args.no_per_image else ["per-image"])
    for kind in kinds:
        for assocs in rounds:
            watch = Stopwatch()
            with dermgate_scp(run / f"dermgate-{kind}-{assocs}", args.audit, args.max_pdu, kind,
                              watch) as (port, audit_desc, engine):
                send(port, warmup)
                watch.reset()
                cpu0 = time.process_time()
                rates[(kind, assocs)] = len(files) / send(port, files, assocs)
                cpu[(kind, assocs)] = (time.process_time() - cpu0) / len(files)
                waits[(kind, assocs)] = watch.per_store_ms()
                from sqlalchemy import text
                with engine.connect() as c:
                    rows = c.execute(text("select count(*) from instances")).scalar_one()
            if rows != len(files) + len(warmup):
                raise SystemExit(f"expected {len(files) + len(warmup)} instance rows, found {rows}")
    for assocs in rounds:
        with dcmtk_storescp(run / f"storescp-{assocs}") as port:
            send(port, warmup)
            rates[("storescp", assocs)] = len(files) / send(port, files, assocs)
        if not args.no_bare:
            with bare_pynetdicom(run / f"bare-{assocs}") as port:
                send(port, warmup)
                rates[("bare", assocs)] = len(files) / send(port, files, assocs)

    print(f"dermgate SCP: checks + decode, object + row + job + audit record durable before Success "
          f"({audit_desc}, SQLite, max PDU {args.max_pdu})")
    print(f"{'receiver':<48} {'1 assoc img/s':>13} {f'{args.associations} assoc img/s':>13}")
    labels = {"group": "dermgate, group commit (the service)",
              "encrypted": "dermgate, group commit, store encrypted",
              "per-image": "dermgate, per-image fsyncs (before group commit)",
              "bare": "bare pynetdicom (write file, no fsync)",
              "storescp": "dcmtk storescp (write file, no fsync)"}
    for key in ("group", "encrypted", "per-image", "bare", "storescp"):
        if (key, 1) in rates:
            print(f"{labels[key]:<48} {rates[(key, 1)]:>13.1f} {rates[(key, args.associations)]:>13.1f}")
    for kind in kinds:
        print(f"durability wait per C-STORE ({kind}): {waits[(kind, 1)]:.2f} ms with 1 association, "
              f"{waits[(kind, args.associations)]:.2f} ms with {args.associations}; SCP CPU "
              f"{cpu[(kind, 1)] * 1000:.1f} / {cpu[(kind, args.associations)] * 1000:.1f} ms per image "
              f"({1 / cpu[(kind, args.associations)]:.0f} images/s per core)")
    g1, ga = rates[("group", 1)], rates[("group", args.associations)]
    if ("encrypted", 1) in rates:
        print(f"encrypted / plain store: {rates[('encrypted', 1)] / g1:.2f} with 1 association, "
              f"{rates[('encrypted', args.associations)] / ga:.2f} with {args.associations}")
    if ("per-image", 1) in rates:
        print(f"group commit / per-image: {g1 / rates[('per-image', 1)]:.2f} with 1 association, "
              f"{ga / rates[('per-image', args.associations)]:.2f} with {args.associations}")
    print(f"ratio dermgate / storescp: {g1 / rates[('storescp', 1)]:.3f}"
          + (f"; dermgate / bare pynetdicom: {g1 / rates[('bare', 1)]:.2f}" if ("bare", 1) in rates else ""))
    if ("bare", args.associations) in rates:
        print(f"{args.associations} concurrent associations, dermgate / bare pynetdicom "
              f"({args.associations} associations each): {ga / rates[('bare', args.associations)]:.2f}")
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
