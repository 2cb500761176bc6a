"""``dermgate demo``: the whole path on loopback with the bundled sample images.

Starts the SCP, a worker and the dispatcher with the embedded defaults in a
fresh work dir, plays a dermatoscope (a pynetdicom SCU sending the samples as
Dermoscopic Photography images, JPEG Baseline, in one association), waits for
the results and prints them. Exit status 1 if any image failed.

Settings: the work dir's ``dermgate.toml`` and ``DERMGATE_*`` variables apply as
for every command; the demo only adds what it needs to talk to itself (its own
SCP port and calling AE) and, where nothing is configured, the demo hospital's
patient identifier system. Flags given on the command line win. With a FHIR
server (``--fhir-url`` or ``fhir.base_url``) the demo first registers its
patients there, as the hospital's EHR would already have them (and, for
``oracle-health``, the service's Practitioner, since Millennium documents need a
Practitioner author); without one, the bundles of the chosen profile are
written under the work dir. ``--hl7 HOST:PORT`` also sends ORU^R01 messages.
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
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid

SAMPLES = Path(__file__).parent / "samples"
DEMO_SCOPE_AE = "DEMO-SCOPE"
DERMOSCOPIC_PHOTOGRAPHY_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.7"
DEMO_ISSUER = "DEMO-HOSPITAL"
DEMO_PATIENT_SYSTEM = "urn:dermgate:demo-hospital:mrn"     # the demo hospital's MRN namespace
DEMO_STAFF_SYSTEM = "urn:dermgate:demo-hospital:staff"
# HAM10000 localisations as SNOMED CT body structures (DICOM CID 4031 Common Anatomic Regions).
BODY_SITES = {
    "trunk": ("22943007", "Trunk"),
    "abdomen": ("818981001", "Abdomen"),
    "back": ("77568009", "Back"),
    "lower extremity": ("61685007", "Lower limb"),
    "upper extremity": ("53120007", "Upper limb"),
    "face": ("89545001", "Face"),
    "neck": ("45048000", "Neck"),
    "scalp": ("41695006", "Scalp"),
    "foot": ("56459004", "Foot"),
    "hand": ("85562004", "Hand"),
    "ear": ("117590005", "Ear"),
    "chest": ("43799004", "Chest"),
}
LIMBS = {"lower extremity", "upper extremity", "foot", "hand", "ear"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=Path, default=SAMPLES, help="folder of JPEG images to send")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for all results")
    p.add_argument("--fhir-url", help="deliver the reports to this FHIR R4 server "
                                      "(default: write the bundles under the work dir)")
    p.add_argument("--fhir-profile", choices=["generic-r4", "epic", "oracle-health"],
                   help="EHR profile (default: fhir.profile from the settings, else generic-r4); "
                        "without a FHIR server it shapes the bundle files")
    p.add_argument("--fhir-token-url", help="SMART backend services token endpoint")
    p.add_argument("--fhir-client-id", help="SMART client id")
    p.add_argument("--fhir-key", type=Path, help="private key (PEM) for the SMART client assertion")
    p.add_argument("--pacs", help="also forward SC + SR to a PACS: AET@HOST:PORT")
    p.add_argument("--hl7", metavar="HOST:PORT", help="also send HL7 v2 ORU^R01 results over MLLP there")
    p.add_argument("--ui", action="store_true", help="then keep serving the web console until Ctrl-C / SIGTERM, "
                                                     "with demo accounts clinician, compliance and operator")
    p.add_argument("--ui-port", type=int, default=8080, help="console port on 127.0.0.1 (default 8080)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def jpeg_to_dicom(jpeg: bytes, rows: int, cols: int, patient_id: str, study_uid: str, index: int,
                  body_site: str | None = None, sex: str | None = None, age: float | None = None) -> Dataset:
    """A Dermoscopic Photography image as a dermatoscope would send it (JPEG Baseline, as is), with
    the order it answers, the local time and its offset, and the body site as a SNOMED CT code."""
    now = datetime.now(timezone.utc).astimezone()
    ds = Dataset()
    ds.SOPClassUID = DERMOSCOPIC_PHOTOGRAPHY_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID, ds.IssuerOfPatientID = patient_id, DEMO_ISSUER
    ds.PatientName, ds.PatientBirthDate = demo_patient_name(index), demo_birth_date(index, age)
    ds.PatientSex = {"male": "M", "female": "F"}.get(sex or "", "O")
    ds.StudyDate, ds.StudyTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.TimezoneOffsetFromUTC = now.strftime("%z")
    ds.ContentDate, ds.ContentTime = ds.StudyDate, ds.StudyTime
    ds.AccessionNumber, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = f"DEMO{index:04d}", "1", 1, 1
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.Manufacturer = "DMS", "dermgate demo"
    ds.BodyPartExamined = (body_site or "").upper().replace(" ", "")[:16]
    if body_site in BODY_SITES:
        code, meaning = BODY_SITES[body_site]
        region = Dataset()
        region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = code, "SCT", meaning
        if body_site in LIMBS:
            side = Dataset()
            side.CodeValue, side.CodingSchemeDesignator, side.CodeMeaning = (
                ("7771000", "SCT", "Left") if index % 2 else ("24028007", "SCT", "Right"))
            region.AnatomicRegionModifierSequence = [side]
        ds.AnatomicRegionSequence = [region]
    # The order this image answers (a dermoscopy consult ordered in the EHR, scheduled by the RIS).
    ds.RequestedProcedureID = f"RP{index:04d}"
    request = Dataset()
    request.AccessionNumber, request.RequestedProcedureID = f"DEMO{index:04d}", ds.RequestedProcedureID
    request.PlacerOrderNumberImagingServiceRequest = f"PLC{index:04d}"
    request.FillerOrderNumberImagingServiceRequest = f"FIL{index:04d}"
    request.StudyInstanceUID = study_uid
    request.ReferencedStudySequence = []
    request.RequestedProcedureCodeSequence = []
    ds.ReferencedRequestSequence = [request]
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
        age = float(row["age"]) if row.get("age") else None
        ds = jpeg_to_dicom(data, img.shape[0], img.shape[1], f"DEMO-{i:04d}", generate_uid(), i,
                           row.get("localization"), row.get("sex"), age)
        out.append((path.name, ds, row.get("dx")))
    return out


def demo_patient_name(index: int) -> str:
    return f"Demo^Patient{index}"


def demo_birth_date(index: int, age: float | None) -> str:
    """A made-up birth date that matches the sample's age (the samples are anonymous)."""
    year = datetime.now().year - int(age or 50)
    return f"{year:04d}{(index % 12) + 1:02d}{(index % 28) + 1:02d}"


def demo_patient(ds: Dataset) -> dict[str, object]:
    """The demo patient as the hospital's EHR registers it."""
    family, _, given = str(ds.PatientName).partition("^")
    birth = str(ds.PatientBirthDate)
    return {"resourceType": "Patient", "identifier": [{"system": DEMO_PATIENT_SYSTEM, "value": str(ds.PatientID)}],
            "name": [{"family": family, "given": [given]}], "birthDate": f"{birth[:4]}-{birth[4:6]}-{birth[6:]}",
            "gender": {"M": "male", "F": "female"}.get(str(ds.PatientSex), "unknown")}


def register_on_ehr(fhir: object, datasets: list[Dataset]) -> dict[str, str]:
    """Puts the demo patients (and the service's Practitioner and Organization) on the FHIR server,
    as the hospital's EHR would already hold them; each only when its identifier is not there yet.
    Returns the references of the Practitioner and the Organization."""
    from integration.fhir.auth import SmartBackendAuth
    from integration.fhir.client import FhirClient, build_http_client
    auth = SmartBackendAuth.from_settings(fhir) if fhir.auth_enabled else None   # type: ignore[attr-defined,arg-type]
    client = FhirClient(build_http_client(fhir, auth=auth),                   # type: ignore[arg-type]
                        token_url=str(fhir.token_url) if fhir.token_url else None)  # type: ignore[attr-defined]

    def ensure(resource: dict[str, object], system: str, value: str) -> str:
        rtype = str(resource["resourceType"])
        found = client.search_identifier(rtype, system, value)
        return f"{rtype}/{found[0]['id']}" if found else client.create(resource).reference

    try:
        for ds in datasets:
            ensure(demo_patient(ds), DEMO_PATIENT_SYSTEM, str(ds.PatientID))
        practitioner = ensure({"resourceType": "Practitioner", "identifier": [
            {"system": DEMO_STAFF_SYSTEM, "value": "dermgate"}], "name": [{"text": "dermgate AI service"}]},
            DEMO_STAFF_SYSTEM, "dermgate")
        organization = ensure({"resourceType": "Organization", "identifier": [
            {"system": DEMO_STAFF_SYSTEM, "value": "dermatology"}], "name": "Demo Hospital Dermatology"},
            DEMO_STAFF_SYSTEM, "dermatology")
    finally:
        client.close()
    return {"practitioner": practitioner, "organization": organization}


def demo_settings(args: argparse.Namespace, workdir: Path, port: int) -> object:
    """The settings the demo runs with: the configured ones (dermgate.toml, DERMGATE_*), the flags
    given on top, and the demo's own needs only where nothing is configured."""
    from dermgate.settings import AllowedCaller, Destination, Settings
    from integration.fhir.settings import FhirSettings
    base = Settings(workdir=workdir)
    dicom = base.dicom.model_copy(update={
        "port": port, "allowed_callers": [*base.dicom.allowed_callers,
                                          AllowedCaller(ae_title=DEMO_SCOPE_AE, hosts=["127.0.0.1"])],
        "min_free_bytes": min(base.dicom.min_free_bytes, 64 * 1024 * 1024)})
    if args.pacs:
        aet, _, hostport = args.pacs.partition("@")
        host, _, pport = hostport.rpartition(":")
        dicom.destinations = [*dicom.destinations, Destination(name="pacs", ae_title=aet, host=host, port=int(pport))]
    fhir_data = base.fhir.model_dump(mode="json", exclude_unset=True) if base.fhir else {}
    flags = {"base_url": args.fhir_url, "profile": args.fhir_profile, "token_url": args.fhir_token_url,
             "client_id": args.fhir_client_id, "private_key_file": args.fhir_key}
    fhir_data.update({k: v for k, v in flags.items() if v is not None})
    if DEMO_ISSUER not in fhir_data.get("patient_identifier_systems", {}) \
            and not fhir_data.get("default_patient_identifier_system"):
        fhir_data["patient_identifier_systems"] = {**fhir_data.get("patient_identifier_systems", {}),
                                                   DEMO_ISSUER: DEMO_PATIENT_SYSTEM}
    fhir = FhirSettings.model_validate(fhir_data)
    hl7 = base.hl7
    if args.hl7:
        from integration.hl7v2.settings import Hl7Settings
        host, _, hport = args.hl7.rpartition(":")
        hl7 = Hl7Settings.model_validate({**(hl7.model_dump(mode="json", exclude_unset=True) if hl7 else {}),
                                          "host": host or "127.0.0.1", "port": int(hport)})
    bundle_dir = None if fhir.base_url else (base.fhir_bundle_dir or workdir / "fhir-bundles")
    # --ui: the console on the loopback port asked for (the API role serves it)
    api = base.api.model_copy(update={"host": "127.0.0.1", "port": args.ui_port}) if args.ui else base.api
    return base.model_copy(update={"dicom": dicom, "fhir": fhir, "hl7": hl7, "fhir_bundle_dir": bundle_dir,
                                   "api": api})


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
    from dermgate.durable import private_dir
    from dermgate.service import Service

    workdir = Path(args.workdir or f"dermgate-demo-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    private_dir(workdir, tighten=False)
    os.environ["DERMGATE_WORKDIR"] = str(workdir)
    port = free_port()
    if args.ui and not _port_free(args.ui_port):
        print(f"port {args.ui_port} on 127.0.0.1 is in use: choose another with --ui-port", file=sys.stderr)
        return 2
    settings: Any = demo_settings(args, workdir, port)
    samples = load_samples(args.images)
    if not samples:
        print(f"no JPEG images in {args.images}", file=sys.stderr)
        return 2
    fhir = settings.fhir
    if fhir.base_url:
        refs = register_on_ehr(fhir, [ds for _, ds, _ in samples])
        update = {}
        if fhir.author_reference is None:
            update["author_reference"] = refs["practitioner"]
        if fhir.performer_reference is None:
            update["performer_reference"] = refs["organization"]
        settings = settings.model_copy(update={"fhir": fhir.model_copy(update=update)})
        print(f"  registered {len(samples)} demo patients on {fhir.base_url} (as the hospital's EHR holds them)")
    elif fhir.profile.value == "oracle-health" and fhir.author_reference is None:
        # bundle files only: Millennium would need the service's Practitioner id here
        settings = settings.model_copy(update={"fhir": fhir.model_copy(
            update={"author_reference": "Practitioner/dermgate-service"})})
    logs.configure(settings.log_level, settings.log_dir / "dermgate.log")
    rt = Runtime(settings)
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
    from dermgate.tables import table as text_table
    print()
    print(text_table(table, ["image", "truth", "AI top class", "p(malignant)", "risk", "low conf.", "state", "time"]))
    print("\nAI results are decision support for clinicians, not a diagnosis.")
    print(f"\n  received objects : {settings.store_dir / 'objects'}")
    print(f"  SC + SR + heatmap: {settings.store_dir / 'derived'}")
    print(f"  FHIR reports     : {settings.fhir.base_url or settings.fhir_bundle_dir} "
          f"(profile {settings.fhir.profile.value})")
    if settings.hl7 is not None and settings.hl7.host:
        print(f"  HL7 v2 results   : {settings.hl7.host}:{settings.hl7.port} ({settings.hl7.message_type.value})")
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

