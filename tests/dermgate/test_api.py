"""HTTP API: health, readiness (really failing when a dependency is gone), metrics, auth, review."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from audit.api import EventType
from dermgate.api.deps import hash_token
from dermgate.api.main import create_app
from dermgate.app import Runtime
from dermgate.settings import ApiSettings, ModelSettings, Settings
from inference.engine import default_model_dir
from tests.dermgate.test_service_e2e import model_dir
from tests.peers.postgres import create_database, drop_database

TOKENS = {"clin-token": ("dr.derm", "clinician"), "ops-token": ("it.ops", "operator")}


def make_runtime(tmp_path: Path, database_url: str | None = None) -> Runtime:
    src = model_dir() or default_model_dir()
    models = tmp_path / "model"
    shutil.copytree(src, models, ignore=shutil.ignore_patterns("*.py", "__pycache__", "checkpoints", "configs"))
    tokens = tmp_path / "tokens.json"
    created = datetime.now(timezone.utc).isoformat()            # tokens live api.token_lifetime_days from here
    tokens.write_text(json.dumps({hash_token(t): {"user": u, "role": r, "created": created}
                                  for t, (u, r) in TOKENS.items()}))
    return Runtime(Settings(workdir=tmp_path / "work", database_url=database_url,
                            model=ModelSettings(path=models, threads=1), api=ApiSettings(tokens_file=tokens)))


def test_readyz_is_ok_with_every_dependency_and_turns_false_when_the_model_file_goes(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path)
    client = TestClient(create_app(rt))
    assert client.get("/healthz").status_code == 200
    ok = client.get("/readyz")
    assert ok.status_code == 200, ok.json()
    assert ok.json()["checks"]["model"]["providers"][-1] == "CPUExecutionProvider"
    onnx = next((tmp_path / "model").glob("*.onnx"))
    onnx.write_bytes(onnx.read_bytes()[:-10] + b"tampered!!")
    bad = client.get("/readyz")
    assert bad.status_code == 503 and bad.json()["checks"]["model"]["ok"] is False
    onnx.unlink()
    assert client.get("/readyz").status_code == 503
    rt.close()


def test_readyz_turns_false_when_the_database_is_gone(tmp_path: Path, postgres_url: str) -> None:
    url = create_database(postgres_url)
    rt = make_runtime(tmp_path, url)
    client = TestClient(create_app(rt, check_model=False))
    assert client.get("/readyz").status_code == 200
    rt.db.dispose()
    drop_database(url)
    gone = client.get("/readyz")
    assert gone.status_code == 503 and gone.json()["checks"]["database"]["ok"] is False
    rt.close()


def test_metrics_expose_queue_depth_and_provider(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path)
    _ = rt.classifier
    body = TestClient(create_app(rt)).get("/metrics").text
    assert 'dermgate_jobs{state="received"}' in body
    assert 'dermgate_execution_provider{provider="CPUExecutionProvider"} 1.0' in body
    rt.close()


def test_results_need_a_clinician_token_and_every_failure_is_audited(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path)
    client = TestClient(create_app(rt, check_model=False))
    assert client.get("/api/v1/results/1.2.3").status_code == 401
    assert client.get("/api/v1/results/1.2.3", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/v1/results/1.2.3", headers={"Authorization": "Bearer ops-token"}).status_code == 403
    missing = client.get("/api/v1/results/1.2.3", headers={"Authorization": "Bearer clin-token"})
    assert missing.status_code == 404 and "SOP Instance UID" in missing.json()["detail"]
    kinds = [r.event.event for r in rt.audit.events()]
    assert kinds.count(EventType.AUTH_FAILURE) == 3 and EventType.API_ACCESS in kinds
    rt.close()


@pytest.mark.parametrize("body, status", [({"decision": "override"}, 422), ({"decision": "maybe"}, 422),
                                          ({"decision": "confirm"}, 404)])
def test_review_refuses_bad_requests_with_a_reason(tmp_path: Path, body: dict, status: int) -> None:
    rt = make_runtime(tmp_path)
    client = TestClient(create_app(rt, check_model=False))
    r = client.post("/api/v1/results/1.2.3/review", json=body, headers={"Authorization": "Bearer clin-token"})
    assert r.status_code == status and r.json()["detail"]
    rt.close()


def test_an_issued_token_opens_the_api_and_a_revoked_one_no_longer_does(tmp_path: Path) -> None:
    """Tokens from `dermgate api-token` work at once, are stored hashed (0600), and revocation is immediate."""
    import subprocess
    import sys
    work = tmp_path / "work"
    rt = Runtime(Settings(workdir=work))     # a work dir with dermgate state (api-token creates none)
    run = [sys.executable, "-m", "dermgate.cli", "api-token"]
    issued = subprocess.run([*run, "add", "--name", "dr.a", "--role", "clinician", "--workdir", str(work)],
                            capture_output=True, text=True, check=True)
    token = issued.stdout.strip()
    stored = (work / "keys" / "api-tokens.json")
    assert token and token not in stored.read_text() and stored.stat().st_mode & 0o077 == 0
    client = TestClient(create_app(rt, check_model=False))
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/results/1.2.3", headers=headers).status_code == 404   # authenticated, not found
    subprocess.run([*run, "revoke", "--name", "dr.a", "--workdir", str(work)], check=True, capture_output=True)
    assert client.get("/api/v1/results/1.2.3", headers=headers).status_code == 401
    assert any(r.event.event is EventType.KEY_CHANGE for r in rt.audit.events())
    rt.close()


def test_api_serves_https_with_tls12_or_later_only(tmp_path: Path) -> None:
    import ssl
    import time

    import httpx

    from dermgate.service import Service
    from tests.peers.orthanc import free_port, make_test_pki
    pki = make_test_pki(tmp_path / "pki", hostname="localhost")
    port = free_port()
    rt = Runtime(Settings(workdir=tmp_path / "work", api=ApiSettings(
        port=port, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)))
    service = Service(rt, roles={"api"})
    service.start()
    try:
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.get(f"https://localhost:{port}/healthz", verify=ctx, timeout=2)
                break
            except httpx.ConnectError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert r.status_code == 200
        old = ssl.create_default_context(cafile=str(pki.ca_cert))
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("ALL:@SECLEVEL=0")
        # The server refusing the ClientHello (a protocol_version alert, or uvicorn hanging up),
        # not a client that could not offer TLS 1.1 at all (NO_PROTOCOLS_AVAILABLE).
        with pytest.raises((httpx.ConnectError, ssl.SSLError), match="ALERT_PROTOCOL_VERSION|UNEXPECTED_EOF"):
            httpx.get(f"https://localhost:{port}/healthz", verify=old, timeout=2)
    finally:
        service.stop()
        rt.close()


def test_readyz_of_a_dispatcher_checks_the_fhir_token_it_holds_without_asking_on_every_probe(
        tmp_path: Path, fhir: Any, smart_key: Any) -> None:
    """Where the dispatcher runs, readiness needs an EHR token: the cached one counts (a token
    endpoint outage does not flap the probe); with none cached and the endpoint down, 503."""
    import time

    from integration.fhir.auth import SmartBackendAuth
    from integration.fhir.settings import FhirSettings
    from tests.integration.fhir.peer import TEST_CLIENT_ID
    fhir.configure(require_auth=True, token_lifetime_s=2)
    rt = make_runtime(tmp_path)
    rt.settings.fhir = FhirSettings.model_validate({"base_url": fhir.base_url, "token_url": fhir.token_url,
                                                    "client_id": TEST_CLIENT_ID,
                                                    "private_key_file": str(smart_key())})
    client = TestClient(create_app(rt, check_model=False, check_ehr=True))
    ok = client.get("/readyz")
    assert ok.status_code == 200 and ok.json()["checks"]["fhir_token"]["ok"] is True
    auth = rt.channels["fhir"].client.http.auth  # type: ignore[attr-defined]
    assert isinstance(auth, SmartBackendAuth) and auth.tokens_fetched == 1
    fhir.fault(target="token", status=503, times=100)
    cached = client.get("/readyz")
    assert cached.status_code == 200 and auth.tokens_fetched == 1     # no request while the token is good
    deadline = time.monotonic() + 10
    while auth.has_token() and time.monotonic() < deadline:           # the 2 s token runs out
        time.sleep(0.05)
    down = client.get("/readyz")
    assert down.status_code == 503 and down.json()["checks"]["fhir_token"]["ok"] is False
    # An SCP/API process (no dispatcher) does not ask the EHR at all.
    assert TestClient(create_app(rt, check_model=False)).get("/readyz").status_code == 200
    rt.close()
