"""``dermgate demo``: the whole path on loopback with the bundled sample images.

Starts the SCP, a worker and the dispatcher with the embedded defaults in a
fresh work dir, plays a dermatoscope (a pynetdicom SCU sending the samples as
Dermoscopic Photography images, JPEG Baseline, in one association), waits for
the results and prints them. Exit status 1 if any image failed.

With ``--ui`` it then keeps the service running and serves the web console on
127.0.0.1 (``--ui-port``, default 8080) until Ctrl-C or SIGTERM, with local accounts
``clinician``, ``compliance`` and ``operator`` whose demo passwords it prints.
"""

from __future__ import annotations

import argparse
import csv
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid

SAMPLES = Path(__file__).parent / "samples"
DEMO_SCOPE_AE = "DEMO-SCOPE"
DERMOSCOPIC_PHOTOGRAPHY_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.7"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=Path, default=SAMPLES, help="folder of JPEG images to send")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for all results")
    p.add_argument("--fhir-url", help="deliver the reports to this FHIR R4 server "
                                      "(default: write the bundles under the work dir)")
    p.add_argument("--fhir-profile", default="generic-r4", choices=["generic-r4", "epic", "oracle-health"])
    p.add_argument("--fhir-token-url", help="SMART backend services token endpoint")
    p.add_argument("--fhir-client-id", help="SMART client id")
    p.add_argument("--fhir-key", type=Path, help="private key (PEM) for the SMART client assertion")
    p.add_argument("--pacs", help="also forward SC + SR to a PACS: AET@HOST:PORT")
    p.add_argument("--ui", action="store_true", help="then keep serving the web console until Ctrl-C / SIGTERM, "
                                                     "with demo accounts clinician, compliance and operator")
    p.add_argument("--ui-port", type=int, default=8080, help="console port on 127.0.0.1 (default 8080)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def jpeg_to_dicom(jpeg: bytes, rows: int, cols: int, patient_id: str, study_uid: str, index: int,
                  body_site: str | None = None) -> Dataset:
    """A Dermoscopic Photography image as a dermatoscope would send it (JPEG Baseline, as is)."""
    now = datetime.now(timezone.utc)
    ds = Dataset()
    ds.SOPClassUID = DERMOSCOPIC_PHOTOGRAPHY_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID, ds.IssuerOfPatientID = patient_id, "DEMO-HOSPITAL"
    ds.PatientName, ds.PatientBirthDate, ds.PatientSex = f"Demo^Patient{index}", "", ""
    ds.StudyDate, ds.StudyTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.ContentDate, ds.ContentTime = ds.StudyDate, ds.StudyTime
    ds.AccessionNumber, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = f"DEMO{index:04d}", "1", 1, 1
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.Manufacturer = "DMS", "dermgate demo"
    ds.BodyPartExamined = (body_site or "").upper().replace(" ", "")[:16]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression = "01"
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def load_samples(folder: Path) -> list[tuple[str, Dataset, str | None]]:
    import cv2
    import numpy as np
    truth = {}
    if (folder / "samples.csv").exists():
        truth = {r["file"]: r for r in csv.DictReader((folder / "samples.csv").open())}
    out = []
    for i, path in enumerate(sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")), 1):
        data = path.read_bytes()
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            print(f"  skipping {path.name}: not a readable JPEG", file=sys.stderr)
            continue
        row = truth.get(path.name, {})
        ds = jpeg_to_dicom(data, img.shape[0], img.shape[1], f"DEMO-{i:04d}", generate_uid(), i,
                           row.get("localization"))
        out.append((path.name, ds, row.get("dx")))
    return out


def send(datasets: list[Dataset], port: int, ae_title: str) -> list[int]:
    from pynetdicom import AE
    ae = AE(ae_title=DEMO_SCOPE_AE)
    ae.add_requested_context(DERMOSCOPIC_PHOTOGRAPHY_STORAGE, [JPEGBaseline8Bit])
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        raise RuntimeError("the SCP refused the demo association")
    statuses = []
    try:
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            statuses.append(int(rsp.Status) if rsp else -1)
    finally:
        assoc.release()
    return statuses


def cmd_demo(args: argparse.Namespace) -> int:
    import os

    from sqlalchemy import select

    from dermgate import logs
    from dermgate.app import Runtime
    from dermgate.db import Instance, Job, JobState
    from dermgate.service import Service
    from dermgate.settings import AllowedCaller, DicomSettings, Settings

    workdir = Path(args.workdir or f"dermgate-demo-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["DERMGATE_WORKDIR"] = str(workdir)
    port = free_port()
    dicom = DicomSettings(port=port, allowed_callers=[AllowedCaller(ae_title=DEMO_SCOPE_AE, hosts=["127.0.0.1"])],
                          min_free_bytes=64 * 1024 * 1024)
    if args.pacs:
        from dermgate.settings import Destination
        aet, _, hostport = args.pacs.partition("@")
        host, _, pport = hostport.rpartition(":")
        dicom.destinations = [Destination(name="pacs", ae_title=aet, host=host, port=int(pport))]
    fhir = None
    if args.fhir_url:
        from integration.fhir.settings import FhirSettings
        fhir = FhirSettings(base_url=args.fhir_url, profile=args.fhir_profile, token_url=args.fhir_token_url,
                            client_id=args.fhir_client_id, private_key_file=args.fhir_key)
    from dermgate.settings import ApiSettings
    if args.ui and not _port_free(args.ui_port):
        print(f"port {args.ui_port} on 127.0.0.1 is in use: choose another with --ui-port", file=sys.stderr)
        return 2
    settings = Settings(workdir=workdir, dicom=dicom, fhir=fhir, api=ApiSettings(host="127.0.0.1", port=args.ui_port),
                        fhir_bundle_dir=None if fhir else workdir / "fhir-bundles")
    logs.configure(settings.log_level, settings.log_dir / "dermgate.log")
    rt = Runtime(settings)
    samples = load_samples(args.images)
    if not samples:
        print(f"no JPEG images in {args.images}", file=sys.stderr)
        return 2
    service = Service(rt, roles={"scp", "worker", "dispatcher"} | ({"api"} if args.ui else set()))
    print(f"dermgate demo: work dir {workdir}")
    print(f"  loading the model and starting the SCP on 127.0.0.1:{port} ...")
    service.start()
    try:
        t0 = time.monotonic()
        statuses = send([ds for _, ds, _ in samples], port, settings.dicom.ae_title)
        sent_s = time.monotonic() - t0
        print(f"  sent {len(samples)} images over one association in {sent_s:.2f}s; "
              f"statuses {sorted(set(f'0x{s:04X}' for s in statuses))}")
        uids = {ds.SOPInstanceUID: name for name, ds, _ in samples}
        deadline = time.monotonic() + args.timeout
        terminal = {JobState.DELIVERED, JobState.FAILED}
        while True:
            with rt.sessions() as s:
                rows = s.execute(select(Instance, Job).join(Job, Job.instance_id == Instance.id)
                                 .where(Instance.sop_instance_uid.in_(list(uids)))).all()
            if len(rows) == len(uids) and all(j.state in terminal for _, j in rows):
                break
            if time.monotonic() > deadline:
                print("  timed out waiting for results", file=sys.stderr)
                break
            time.sleep(0.2)
    except BaseException:
        service.stop()
        raise
    if not args.ui:
        service.stop()
    truth = {ds.SOPInstanceUID: dx for _, ds, dx in samples}
    table = []
    failed = len(uids) - len(rows)
    for inst, job in sorted(rows, key=lambda r: uids[r[0].sop_instance_uid]):
        res = job.result or {}
        took = ((job.completed_at or job.updated_at) - inst.received_at).total_seconds()
        if job.state != JobState.DELIVERED:
            failed += 1
        table.append((uids[inst.sop_instance_uid], truth.get(inst.sop_instance_uid) or "?",
                      res.get("top_class", "-"), f"{100 * res.get('malignancy_probability', 0):.1f}%",
                      res.get("risk", "-"), "yes" if res.get("low_confidence") else "no",
                      job.state.value, f"{took:.2f}s"))
    from dermgate.cli import _table
    print()
    print(_table(table, ["image", "truth", "AI top class", "p(malignant)", "risk", "low conf.", "state", "time"]))
    print("\nAI results are decision support for clinicians, not a diagnosis.")
    print(f"\n  received objects : {settings.store_dir / 'objects'}")
    print(f"  SC + SR + heatmap: {settings.store_dir / 'derived'}")
    print(f"  FHIR reports     : {args.fhir_url or settings.workdir / 'fhir-bundles'}")
    print(f"  database         : {settings.db_url}")
    print(f"  audit trail      : {settings.audit_dir}  (dermgate audit verify --workdir {workdir})")
    print(f"  logs             : {settings.log_dir / 'dermgate.log'}")
    if args.ui:
        try:
            serve_console(rt, args.ui_port)
        finally:
            service.stop()
    rt.close()
    if failed:
        print(f"\n{failed} image(s) failed: dermgate jobs list --workdir {workdir}", file=sys.stderr)
        return 1
    return 0


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


DEMO_ACCOUNTS = (("clinician", "clinician", "Dr. Demo Clinician"), ("compliance", "compliance", "Demo Compliance Officer"),
                 ("operator", "operator", "Demo IT Operator"))


def demo_accounts(rt: object) -> list[tuple[str, str]]:
    """(name, password) of the demo's console accounts, made (or given new passwords) in this work dir."""
    import secrets

    from audit.api import AuditEvent, EventType, Outcome
    from dermgate.console.accounts import Accounts, console_key
    accounts = Accounts(rt.sessions, rt.settings.console, console_key(rt.settings.workdir))  # type: ignore[attr-defined]
    out = []
    for name, role, display in DEMO_ACCOUNTS:
        password = f"demo-{secrets.token_urlsafe(9)}"
        if accounts.get(name) is None:
            accounts.add(name, role, password, display_name=display)
        else:
            accounts.reset(name, password)
        rt.audit.record(AuditEvent(event=EventType.USER_ADMIN, outcome=Outcome.SUCCESS, actor="dermgate demo",  # type: ignore[attr-defined]
                                   action="C", detail={"user_admin": "demo account", "for_user": name, "role": role}))
        out.append((name, password))
    return out


def serve_console(rt: object, port: int) -> None:
    """Print the console's address and the demo accounts, then wait for Ctrl-C or SIGTERM
    (the service, API role included, is already running)."""
    import signal
    import threading
    import urllib.request

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    logins = demo_accounts(rt)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:      # the API thread may still be binding
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).close()
            break
        except OSError:
            time.sleep(0.1)
    print()
    print("Web console (Ctrl-C to stop):")
    print(f"console: http://127.0.0.1:{port}/")
    for name, password in logins:
        print(f"login: {name} {password}")
    sys.stdout.flush()
    stop.wait()
    print("\nstopping the console ...")

