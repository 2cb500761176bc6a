"""FHIR report delivery throughput against the loopback test FHIR server.

    python -m bench.bench_fhir [--reports 100] [--threads 1,4]
                               [--profiles generic-r4,epic,oracle-health] [--auth] [--prepare 10]

Needs ``npm ci --prefix tests/integration/fhir/server`` (the Medplum-based server the tests use).
For each profile it times:
  prepare     ``FhirChannel.prepare``: transaction Bundle + the one-page PDF (matplotlib), per report
  deliver     ``FhirChannel.deliver`` of prepared payloads: Patient search, ImagingStudy search, then
              the transaction (generic-r4) or search-before-create sequence (epic, oracle-health);
              1 and N threads sharing one channel (one httpx.Client, one token cache)
  redeliver   the same payloads again: every create is found existing (the path a retry after a
              lost response takes)
and prints reports/s and p50/p95 ms per delivery, with ``--auth``: SMART Backend Services on the
server and the channel (RS384 assertion, token cached).

The server is one Node process with an in-memory repository (identifier searches answered by a
direct comparison, as an EHR's index would): figures for the service side and the protocol on
loopback, not for a production EHR.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from integration.fhir.auth import generate_private_key_pem, jwks, load_private_key
from integration.fhir.channel import FhirChannel
from integration.fhir.settings import FhirSettings, ProfileName, SigningAlg
from tests.integration.fhir.data import ISSUER, PATIENT_SYSTEM, cam_png, image_ref, synthetic_prediction
from tests.integration.fhir.peer import FhirTestServer, ListAuditSink, start_fhir_server

CLIENT_ID = "dermgate-bench"
BENCH_PDF = b"%PDF-1.4 bench stand-in"      # the PDF is timed in 'prepare'; deliveries carry a small one
CAM_SIZE = 224


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def make_channel(server: FhirTestServer, profile: ProfileName, key: Path | None) -> FhirChannel:
    auth: dict[str, Any] = {}
    if key is not None:
        auth = {"token_url": server.token_url, "client_id": CLIENT_ID, "private_key_file": key}
    settings = FhirSettings(base_url=server.base_url, profile=profile,
                            patient_identifier_systems={ISSUER: PATIENT_SYSTEM}, **auth)
    return FhirChannel.from_settings(settings, ListAuditSink(), clock=lambda: datetime.now(timezone.utc))


def add_patient(server: FhirTestServer) -> None:
    server.create({"resourceType": "Patient", "identifier": [{"system": PATIENT_SYSTEM, "value": "MRN-0001"}]})


def deliver_all(channel: FhirChannel, payloads: list[dict[str, Any]], threads: int) -> tuple[float, list[float]]:
    """Wall seconds for the deliveries and each one's latency (ms); every delivery must succeed."""
    def one(payload: dict[str, Any]) -> float:
        t0 = time.perf_counter()
        outcome = channel.deliver(payload)
        if not outcome.ok:
            raise RuntimeError(f"delivery failed: {outcome.reason}")
        return 1000 * (time.perf_counter() - t0)

    t0 = time.perf_counter()
    if threads == 1:
        latencies = [one(p) for p in payloads]
    else:
        with ThreadPoolExecutor(threads) as pool:
            latencies = list(pool.map(one, payloads))
    return time.perf_counter() - t0, latencies


def line(label: str, wall_s: float, latencies: list[float]) -> str:
    n = len(latencies)
    return (f"  {label:<24} {n / wall_s:7.1f} reports/s   p50 {statistics.median(latencies):7.1f} ms"
            f"   p95 {percentile(latencies, 0.95):7.1f} ms   max {max(latencies):7.1f} ms   (n={n})")


def bench_profile(profile: ProfileName, args: argparse.Namespace, key_dir: Path) -> None:
    print(f"\n{profile.value}{' + SMART auth' if args.auth else ''}")
    prediction = synthetic_prediction(CAM_SIZE, CAM_SIZE)
    png = cam_png(CAM_SIZE)
    with start_fhir_server() as server:
        key = None
        if args.auth:
            key = key_dir / "bench.pem"
            key.write_bytes(generate_private_key_pem(SigningAlg.RS384))
            server.register_client(CLIENT_ID, jwks([load_private_key(key, SigningAlg.RS384)]))
            server.configure(require_auth=True)
        channel = make_channel(server, profile, key)
        try:
            channel.prepare(image_ref(0), prediction, png)                          # warm-up (fonts, imports)
            t0 = time.perf_counter()
            for n in range(args.prepare):
                channel.prepare(image_ref(100_000 + n), prediction, png)
            per_ms = 1000 * (time.perf_counter() - t0) / max(1, args.prepare)
            print(f"  {'prepare (bundle + PDF)':<24} {1000 / per_ms:7.1f} reports/s   {per_ms:7.1f} ms each")
            for threads in args.threads:
                server.reset(repository_only=True)
                add_patient(server)
                payloads = [channel.prepare(image_ref(n), prediction, png, pdf=BENCH_PDF)
                            for n in range(1, args.reports + 1)]
                wall, lat = deliver_all(channel, payloads, threads)
                rewall, relat = deliver_all(channel, payloads, threads)
                print(line(f"deliver, {threads} thread(s)", wall, lat))
                print(line(f"redeliver, {threads} thread(s)", rewall, relat))
            if args.auth:
                print(f"  tokens issued over the run: {server.stats()['tokensIssued']}")
        finally:
            channel.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reports", type=int, default=100)
    p.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    p.add_argument("--profiles", type=lambda s: [ProfileName(x) for x in s.split(",")], default=list(ProfileName))
    p.add_argument("--auth", action="store_true", help="SMART Backend Services on")
    p.add_argument("--prepare", type=int, default=10, help="reports prepared (with PDF) for the prepare timing")
    args = p.parse_args()
    print(f"FHIR delivery to the loopback test server: {args.reports} reports per run, "
          f"heatmap {CAM_SIZE}x{CAM_SIZE} PNG")
    with tempfile.TemporaryDirectory() as key_dir:
        for profile in args.profiles:
            bench_profile(profile, args, Path(key_dir))


if __name__ == "__main__":
    main()
