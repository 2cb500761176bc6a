"""Images per second received by dermgate's SCP from dcmtk's storescu, against dcmtk's storescp.

Both receivers get the same N 600x450 JPEG Baseline files (HAM10000 samples upscaled and
wrapped by img2dcm) from one ``storescu -xy`` association (TCP_NODELAY=1), in the same run.
Ours runs with durability: the real Intake (fsynced object + SQLite WAL commit of the row and
its job) and the real encrypted audit trail when it opens (``--audit none`` for a no-op sink);
the line printed says which. A bare pynetdicom SCP that only writes files is measured too, as
the ceiling of the toolkit. The same dermgate SCP is measured a second time with the store
encrypted at rest (AES-256-GCM per object, the production default) to show what encryption costs.

    PYTHONPATH=. .venv/bin/python bench/bench_scp.py --n 300
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dermgate.db import create_schema, make_engine, make_sessionmaker  # noqa: E402
from dermgate.intake import Intake  # noqa: E402
from dermgate.settings import AllowedCaller, DicomSettings, Settings  # noqa: E402
from dermgate.store import ObjectStore  # noqa: E402
from integration.dicom_scp.scp import DicomService  # noqa: E402
from tests.peers.dcmtk import IMG2DCM, STORESCP, STORESCU  # noqa: E402  (dcmtk's, not pynetdicom's)

SIZE = (600, 450)                       # width x height, as the target
CALLING, CALLED = "BENCHSCU", "DERMGATE"
SAMPLE_DIRS = (REPO / "dermgate" / "samples", REPO.parent / "shared" / "data" / "ham10000" / "images")
ENV = {**os.environ, "TCP_NODELAY": "1"}


class PrototypeIntake(Intake):
    """A proposal for dermgate/intake.py, measured here and used by nothing else.

    The object's write + fsync runs in a thread while the row and its job are inserted
    with Core statements (no ORM unit of work, no SELECT before the INSERT) and
    committed: the two fsyncs overlap. Both are done before ``accept`` returns, so
    Success still follows durability; a crash between the two leaves either an
    unreferenced object or a row whose object the SCU's resend writes again.
    """

    def __init__(self, store: ObjectStore, sessions: Any) -> None:
        from concurrent.futures import ThreadPoolExecutor
        super().__init__(store, sessions)
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="intake-io")

    def accept(self, encoded: bytes, image: Any, transfer_syntax_uid: str) -> Any:
        import hashlib
        import uuid

        from sqlalchemy import insert
        from sqlalchemy.exc import IntegrityError

        from dermgate.db import Instance, Job, JobState
        from dermgate.intake import IntakeResult, IntakeStatus
        if isinstance(encoded, Path):           # the SCP receives into a file (integration/dicom_scp/incoming.py)
            encoded = encoded.read_bytes()
        written = self.pool.submit(self.store.put_object, encoded)
        digest = hashlib.sha256(encoded).hexdigest()
        rel = f"objects/{digest[:2]}/{digest}.dcm"
        correlation_id = uuid.uuid4().hex[:16]
        try:
            with self.sessions.begin() as s:
                iid = s.execute(insert(Instance).values(**image.to_json(), transfer_syntax_uid=transfer_syntax_uid,
                                                        sha256=digest, size=len(encoded), path=rel)
                                .returning(Instance.id)).scalar_one()
                job_id = s.execute(insert(Job).values(instance_id=iid, state=JobState.RECEIVED,
                                                      correlation_id=correlation_id)
                                   .returning(Job.id)).scalar_one()
        except IntegrityError:
            written.result()
            existing = self._existing(image.sop_instance_uid)
            if existing is None:
                raise
            return existing if existing.sha256 == digest else IntakeResult(IntakeStatus.CONFLICT, None, None, digest)
        written.result()
        return IntakeResult(IntakeStatus.ACCEPTED, job_id, correlation_id, digest)


class NullAudit:
    def record(self, event: Any) -> int:
        return 0


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


def send(port: int, files: list[Path]) -> float:
    """Seconds for one storescu -xy association carrying ``files``."""
    t0 = time.perf_counter()
    res = subprocess.run([STORESCU, "-xy", "-aet", CALLING, "-aec", CALLED, "127.0.0.1", str(port),
                          *map(str, files)], capture_output=True, text=True, env=ENV)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"storescu failed ({res.returncode}): {res.stderr[-2000:]}")
    return elapsed


def open_audit(workdir: Path, kind: str) -> tuple[Any, str]:
    if kind == "none":
        return NullAudit(), "no-op audit sink"
    try:
        from dermgate.app import open_audit as open_real
        return open_real(Settings(workdir=workdir)), "real encrypted audit trail (fsync per record)"
    except Exception as exc:                    # the trail may be unavailable in a partial checkout
        if kind == "real":
            raise
        return NullAudit(), f"no-op audit sink (real trail unavailable: {type(exc).__name__})"


@contextmanager
def dermgate_scp(workdir: Path, audit_kind: str, max_pdu: int, intake_cls: type[Intake] = Intake,
                 encrypted: bool = False) -> Iterator[tuple[int, str, ObjectStore, Any]]:
    workdir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(f"sqlite:///{workdir / 'dermgate.db'}")
    create_schema(engine)
    cipher = None
    if encrypted:
        from audit.keys import Keyring
        from dermgate.store import StoreCipher
        cipher = StoreCipher(Keyring.generate())             # a keyring is a KeyProvider
    store = ObjectStore(workdir / "store", cipher)
    audit, audit_desc = open_audit(workdir, audit_kind)
    cfg = DicomSettings(ae_title=CALLED, port=0, max_pdu=max_pdu,
                        allowed_callers=[AllowedCaller(ae_title=CALLING, hosts=["127.0.0.1"])])
    service = DicomService(cfg, intake_cls(store, make_sessionmaker(engine)), audit, store)
    service.start()
    try:
        assert service.port is not None
        yield service.port, audit_desc, store, engine
    finally:
        service.stop(timeout=10)
        getattr(audit, "close", lambda: None)()
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
    ap.add_argument("--no-bare", action="store_true", help="skip the bare pynetdicom reference")
    ap.add_argument("--no-encrypted", action="store_true", help="skip the encrypted-store run")
    ap.add_argument("--intake", choices=["service", "prototype"], default="service",
                    help="prototype: the overlapped-fsync Intake proposed above (not the service's)")
    args = ap.parse_args(argv)

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_scp_"))
    files = make_files(root / "input", args.n)
    warmup = make_files(root / "warmup", 5)
    size_mb = sum(f.stat().st_size for f in files) / 2**20
    print(f"{len(files)} files, 600x450 JPEG Baseline, {size_mb:.1f} MiB; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.2f}")

    rates: dict[str, float] = {}
    run = root / f"run_{int(time.time())}"
    intake_cls = PrototypeIntake if args.intake == "prototype" else Intake
    with dermgate_scp(run / "dermgate", args.audit, args.max_pdu, intake_cls) as (port, audit_desc, store, engine):
        send(port, warmup)
        rates["dermgate"] = len(files) / send(port, files)
        from sqlalchemy import text
        with engine.connect() as c:
            rows = c.execute(text("select count(*) from instances")).scalar_one()
    if rows != len(files) + len(warmup):
        raise SystemExit(f"expected {len(files) + len(warmup)} instance rows, found {rows}")
    if not args.no_encrypted:
        with dermgate_scp(run / "dermgate-encrypted", args.audit, args.max_pdu, intake_cls,
                          encrypted=True) as (port, _, store, _engine):
            send(port, warmup)
            rates["encrypted"] = len(files) / send(port, files)
            sample = next((store.root / "objects").rglob("*.dcm"))
            if not sample.read_bytes().startswith(b"DGS1"):
                raise SystemExit("the encrypted run wrote a plaintext object")
    with dcmtk_storescp(run / "storescp") as port:
        send(port, warmup)
        rates["storescp"] = len(files) / send(port, files)
    if not args.no_bare:
        with bare_pynetdicom(run / "bare") as port:
            send(port, warmup)
            rates["bare"] = len(files) / send(port, files)

    print(f"dermgate SCP (checks + decode, fsynced object, SQLite row + job, {audit_desc}; "
          f"{args.intake} intake; max PDU {args.max_pdu}): {rates['dermgate']:7.1f} images/s")
    if "bare" in rates:
        print(f"bare pynetdicom SCP (write file only, no fsync):          {rates['bare']:7.1f} images/s")
    print(f"dcmtk storescp (write file only, no fsync):               {rates['storescp']:7.1f} images/s")
    print(f"ratio dermgate / storescp: {rates['dermgate'] / rates['storescp']:.3f}"
          + (f"; dermgate / bare pynetdicom: {rates['dermgate'] / rates['bare']:.2f}" if "bare" in rates else ""))
    if "encrypted" in rates:
        print(f"dermgate SCP, store encrypted at rest (AES-256-GCM per object): {rates['encrypted']:7.1f} images/s; "
              f"encrypted / plain store: {rates['encrypted'] / rates['dermgate']:.3f}")
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
