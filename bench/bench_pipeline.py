"""C-STORE to report accepted: delivery throughput and latency through the whole service.

    python -m bench.bench_pipeline [--images 60]

One dermgate process (SCP + worker + dispatcher, embedded SQLite, real model)
and the loopback Medplum FHIR server with SMART backend auth. dcmtk
``storescu`` sends the images in one association; for every image the latency
is (FHIR report accepted by the server) - (C-STORE committed), taken from the
database; throughput is images / (first C-STORE -> last report accepted).
The stage split (classify, render + FHIR prepare) comes from the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import select

from dermgate.app import Runtime
from dermgate.db import Instance, Job, OutboxItem, OutboxState
from dermgate.service import Service
from dermgate.settings import AllowedCaller, DicomSettings, Settings, WorkerSettings
from integration.fhir.settings import FhirSettings
from bench.bench_scale import make_files
from tests.integration.fhir.data import PATIENT_SYSTEM, patient_resource
from tests.integration.fhir.peer import TEST_CLIENT_ID, start_fhir_server
from tests.peers.dcmtk import storescu
from tests.peers.orthanc import free_port


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def sent_reports(rt: Runtime) -> list:
    """(received_at, sent_at) of every report accepted so far, in delivery order."""
    with rt.sessions() as s:
        return list(s.execute(select(Instance.received_at, OutboxItem.sent_at)
                              .join(Job, Job.instance_id == Instance.id)
                              .join(OutboxItem, OutboxItem.job_id == Job.id)
                              .where(OutboxItem.state == OutboxState.SENT)
                              .order_by(OutboxItem.id)).all())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--single", type=int, default=10, help="then send this many one at a time (unqueued latency)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dermgate-pipeline-"))
    files = make_files(root / "src", args.images)
    singles = make_files(root / "single", args.single)
    with start_fhir_server() as fhir:
        from cryptography.hazmat.primitives import serialization
        from integration.fhir.auth import generate_private_key_pem, jwks
        from integration.fhir.settings import SigningAlg
        pem = generate_private_key_pem(SigningAlg.ES384)
        key = root / "client.pem"
        key.write_bytes(pem)
        key.chmod(0o600)
        fhir.register_client(TEST_CLIENT_ID, jwks([serialization.load_pem_private_key(pem, None)]))
        fhir.configure(require_auth=True)
        for i in range(50):
            fhir.create(patient_resource(f"BENCH-{i:04d}"))
        port = free_port()
        settings = Settings(
            workdir=root / "work",
            dicom=DicomSettings(port=port, allowed_callers=[AllowedCaller(ae_title="BENCHSCOPE")],
                                min_free_bytes=64 * 1024 * 1024),
            worker=WorkerSettings(poll_interval_s=0.02),
            fhir=FhirSettings.model_validate({"base_url": fhir.base_url, "token_url": fhir.token_url,
                                              "client_id": TEST_CLIENT_ID, "private_key_file": str(key),
                                              "alg": "ES384", "default_patient_identifier_system": PATIENT_SYSTEM}))
        rt = Runtime(settings)
        service = Service(rt, roles={"scp", "worker", "dispatcher"})
        service.start()
        try:
            t0 = time.monotonic()
            run = storescu("127.0.0.1", port, files, calling="BENCHSCOPE", called="DERMGATE", options=["-xy", "-R"],
                           timeout=600)
            assert run.returncode == 0, run.stderr
            while True:
                rows = sent_reports(rt)
                if len(rows) >= len(files):
                    break
                time.sleep(0.1)
            total = time.monotonic() - t0
            single_lat = []
            for f in singles:    # one image at a time, each waiting for its report: no queueing
                n_before = len(rows)
                storescu("127.0.0.1", port, [f], calling="BENCHSCOPE", called="DERMGATE", options=["-xy", "-R"])
                while True:
                    new = sent_reports(rt)
                    if len(new) > n_before:
                        recv, sent = new[-1]
                        single_lat.append((sent - recv).total_seconds())
                        rows = new
                        break
                    time.sleep(0.02)
        finally:
            service.stop()
            rt.close()
        reports = fhir.search("DiagnosticReport", _count="1000")
    lat = sorted((sent - recv).total_seconds() for recv, sent in rows[: len(files)])
    single_lat.sort()
    print(f"\n{len(files)} images (200x150 JPEG, dermoscopic), SCP + worker + dispatcher in one process, "
          f"SQLite, FHIR generic-r4 with SMART ES384")
    print(f"  throughput: {len(files) / total:.2f} reports/s ({total:.1f} s first C-STORE -> last report)")
    print(f"  C-STORE -> report accepted: p50 {pct(lat, 50):.2f} s, p95 {pct(lat, 95):.2f} s, max {lat[-1]:.2f} s")
    if single_lat:
        print(f"  one image at a time ({len(single_lat)}): C-STORE -> report accepted p50 {pct(single_lat, 50):.2f} s, "
              f"p95 {pct(single_lat, 95):.2f} s")
    print(f"  reports on the FHIR server: {len(reports)} (expected {len(files) + len(single_lat)})")


if __name__ == "__main__":
    main()
