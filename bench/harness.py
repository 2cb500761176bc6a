"""What the end-to-end benches share: the peers (FHIR server, Orthanc) and one `dermgate serve` process.

The service runs as its own process, started the way an operator starts it
(``python -m dermgate.cli serve``), configured through ``DERMGATE_*``
environment variables; the bench process only sends, watches the database and
reads ``/metrics``, so its own work is not charged to the service.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from dermgate.db import Instance, Job, JobState, OutboxItem, OutboxState, make_engine, make_sessionmaker
from dermgate.settings import AllowedCaller, Destination, DicomSettings, Settings, WorkerSettings
from integration.fhir.settings import FhirSettings
from tests.peers.orthanc import OrthancPeer, free_port

BENCH_AE = "BENCHSCOPE"
PATIENTS = 50                     # bench images belong to BENCH-0000 .. BENCH-0049 (bench_scale.make_files)


@dataclass
class Peers:
    fhir: Any                      # tests.integration.fhir.peer.FhirTestServer
    orthanc: OrthancPeer
    fhir_settings: FhirSettings


@contextmanager
def peers(root: Path, *, pacs: bool = True) -> Iterator[Peers | Any]:
    """The loopback Medplum FHIR server (SMART ES384 required, the bench patients registered) and Orthanc."""
    from cryptography.hazmat.primitives import serialization

    from integration.fhir.auth import generate_private_key_pem, jwks
    from integration.fhir.settings import SigningAlg
    from tests.integration.fhir.data import PATIENT_SYSTEM, patient_resource
    from tests.integration.fhir.peer import TEST_CLIENT_ID, start_fhir_server
    from tests.peers.orthanc import run_orthanc
    with ExitStack() as stack:
        fhir = stack.enter_context(start_fhir_server())
        orthanc = stack.enter_context(run_orthanc(root / "orthanc")) if pacs else None
        pem = generate_private_key_pem(SigningAlg.ES384)
        key = root / "client.pem"
        key.write_bytes(pem)
        key.chmod(0o600)
        fhir.register_client(TEST_CLIENT_ID, jwks([serialization.load_pem_private_key(pem, None)]))
        fhir.configure(require_auth=True)
        for i in range(PATIENTS):
            fhir.create(patient_resource(f"BENCH-{i:04d}"))
        settings = FhirSettings.model_validate({
            "base_url": fhir.base_url, "token_url": fhir.token_url, "client_id": TEST_CLIENT_ID,
            "private_key_file": str(key), "alg": "ES384", "default_patient_identifier_system": PATIENT_SYSTEM})
        yield Peers(fhir, orthanc, settings)  # type: ignore[arg-type]


def service_settings(workdir: Path, p: Peers | None, *, worker: WorkerSettings | None = None) -> Settings:
    dests = [Destination(name="orthanc", ae_title=p.orthanc.aet, host=p.orthanc.host, port=p.orthanc.dicom_port)] \
        if p is not None and p.orthanc is not None else []
    return Settings(workdir=workdir,
                    dicom=DicomSettings(port=free_port(), allowed_callers=[AllowedCaller(ae_title=BENCH_AE)],
                                        min_free_bytes=64 * 1024 * 1024, destinations=dests),
                    worker=worker or WorkerSettings(),
                    fhir=p.fhir_settings if p is not None else None)


def service_env(settings: Settings, api_port: int) -> dict[str, str]:
    """``settings`` as the DERMGATE_* environment of a `dermgate serve` process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DERMGATE_")}
    env.update({"DERMGATE_WORKDIR": str(settings.workdir),
                "DERMGATE_DICOM": json.dumps(settings.dicom.model_dump(mode="json")),
                "DERMGATE_WORKER": json.dumps(settings.worker.model_dump(mode="json")),
                "DERMGATE_MODEL": json.dumps(settings.model.model_dump(mode="json", exclude_none=True)),
                "DERMGATE_API__PORT": str(api_port)})
    if settings.fhir is not None:
        env["DERMGATE_FHIR"] = json.dumps(settings.fhir.model_dump(mode="json", exclude_none=True))
    if settings.fhir_bundle_dir is not None:
        env["DERMGATE_FHIR_BUNDLE_DIR"] = str(settings.fhir_bundle_dir)
    return env


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    settings: Settings
    api_port: int
    sessions: sessionmaker

    @property
    def port(self) -> int:
        return self.settings.dicom.port

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The process's /metrics, parsed: (name, sorted labels) -> value."""
        from prometheus_client.parser import text_string_to_metric_families
        text = httpx.get(f"http://127.0.0.1:{self.api_port}/metrics", timeout=30).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def cpu_seconds(self) -> float:
        """User + system CPU time of the service process so far."""
        return process_cpu_seconds(self.proc.pid)

    def rss_bytes(self) -> int:
        """Resident set size of the service process (VmRSS in /proc/<pid>/status)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def finished(self) -> int:
        with self.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(Job).where(
                Job.state.in_([JobState.DELIVERED, JobState.FAILED]))) or 0)

    def failed(self) -> int:
        with self.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(Job).where(Job.state == JobState.FAILED)) or 0)

    def last_job_id(self) -> int:
        with self.sessions() as s:
            return int(s.scalar(select(func.max(Job.id))) or 0)

    def report_latencies(self, since_id: int = 0, channel: str = "fhir") -> dict[int, float]:
        """Job id -> seconds from C-STORE committed to the report accepted on ``channel``."""
        with self.sessions() as s:
            rows = s.execute(select(Job.id, Instance.received_at, OutboxItem.sent_at)
                             .join(Instance, Job.instance_id == Instance.id)
                             .join(OutboxItem, OutboxItem.job_id == Job.id)
                             .where(OutboxItem.channel == channel, OutboxItem.state == OutboxState.SENT,
                                    Job.id > since_id)).all()
        return {jid: (sent - recv).total_seconds() for jid, recv, sent in rows}


@contextmanager
def serve(settings: Settings, roles: str = "scp,worker,dispatcher,api", *,
          log: Path | None = None, workers: int | None = None) -> Iterator[Served]:
    """`dermgate serve --roles ROLES` in its own process; SIGTERM (graceful) on exit."""
    api_port = free_port()
    settings.workdir.mkdir(parents=True, exist_ok=True)
    env = service_env(settings, api_port)
    out = open(log or settings.workdir / "serve.out", "wb")
    extra = ["--workers", str(workers)] if workers else []
    proc = subprocess.Popen([sys.executable, "-m", "dermgate.cli", "serve", "--roles", roles, *extra], env=env,
                            stdout=out, stderr=subprocess.STDOUT)
    engine = None
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"dermgate serve exited with {proc.returncode}; see {out.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{api_port}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("dermgate serve did not become ready")
            time.sleep(0.2)
        engine = make_engine(settings.db_url)
        yield Served(proc, settings, api_port, make_sessionmaker(engine))
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        out.close()
        if engine is not None:
            engine.dispose()


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (/proc/<pid>/stat), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_peak_rss(pid: int) -> int:
    """The kernel's high-water mark of the process's resident set (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def count_reports(fhir: Any, resource_type: str = "DiagnosticReport") -> int | None:
    """How many ``resource_type`` the FHIR server holds (Bundle.total, no bodies transferred)."""
    try:
        resp = fhir.get(resource_type, params={"_count": "0", "_total": "accurate"})
        total = resp.json().get("total")
        return int(total) if total is not None else None
    except Exception:  # noqa: BLE001 - a count for the closing line only
        return None


def count_pacs_instances(orthanc: Any) -> int | None:
    try:
        return int(orthanc.get("/statistics")["CountInstances"])
    except Exception:  # noqa: BLE001
        return None


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(interval)


def send_paced(port: int, files: list[Path], rate: float) -> None:
    """One association from this process, one C-STORE every 1/rate s (a modality taking pictures)."""
    import pydicom
    from pynetdicom import AE
    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=BENCH_AE)
    ae.add_requested_context(datasets[0].SOPClassUID, [datasets[0].file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="DERMGATE")
    assert assoc.is_established, "association refused"
    try:
        t0 = time.monotonic()
        for i, ds in enumerate(datasets):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            rsp = assoc.send_c_store(ds)
            assert rsp and rsp.Status == 0, rsp
    finally:
        assoc.release()


def storescu_send(port: int, files: list[Path], timeout: float = 900) -> None:
    from tests.peers.dcmtk import storescu
    run = storescu("127.0.0.1", port, files, calling=BENCH_AE, called="DERMGATE", options=["-xy", "-R"], timeout=timeout)
    if run.returncode != 0:
        raise SystemExit(f"storescu failed: {run.stderr[-1000:]}")
