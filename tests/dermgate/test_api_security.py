"""Issue 12, HTTP API: every attack against the real uvicorn server (`Service(roles={"api"})`), over
loopback sockets. Each test speaks from its own 127.0.0.x address, so one test's lockout does not
touch another's; the audit assertions read the real encrypted trail.
"""

from __future__ import annotations

import json
import re
import select
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from audit.api import EventType
from dermgate.api.deps import hash_token
from dermgate.app import Runtime
from dermgate.db import Instance, Job, JobState
from dermgate.service import Service
from dermgate.settings import ApiSettings, Settings
from tests.peers.orthanc import free_port, make_test_pki

CLIN, OPS, LEGACY = "clin-token-1234", "ops-token-5678", "legacy-token-0"
EXPIRED, EXPIRED2 = "expired-token-9", "expired-token-8"
PROXY = "127.0.0.9"
REVIEWED_SOP = "1.2.826.0.1.3680043.99.12.1"


@dataclass
class Api:
    rt: Runtime
    service: Service
    port: int
    scheme: str = "http"

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def client(self, source: str, **kwargs: Any) -> httpx.Client:
        """An HTTP client whose requests come from ``source`` (a 127.0.0.x address)."""
        return httpx.Client(base_url=self.base, transport=httpx.HTTPTransport(local_address=source, **kwargs),
                            timeout=20)

    def flush(self) -> None:
        self.service.api_app.state.security.coalescer.flush(everything=True)

    def auth_failures(self, source: str) -> list[Any]:
        self.flush()
        return [r.event for r in self.rt.audit.events()
                if r.event.event is EventType.AUTH_FAILURE and r.event.source == source]


def _tokens(path: Path) -> Path:
    now = datetime.now(timezone.utc)
    path.write_text(json.dumps({
        hash_token(CLIN): {"user": "dr.derm", "role": "clinician", "created": now.isoformat(),
                           "expires": (now + timedelta(days=90)).isoformat()},
        hash_token(OPS): {"user": "it.ops", "role": "operator", "created": now.isoformat()},
        hash_token(EXPIRED): {"user": "dr.gone", "role": "clinician", "created": (now - timedelta(days=91)).isoformat(),
                              "expires": (now - timedelta(days=1)).isoformat()},
        hash_token(EXPIRED2): {"user": "dr.gone", "role": "clinician", "expires": (now - timedelta(days=1)).isoformat()},
        hash_token(LEGACY): {"user": "dr.legacy", "role": "clinician"},
    }))
    return path


def _start(rt: Runtime, port: int, scheme: str = "http", ca: Path | None = None) -> Service:
    service = Service(rt, roles={"api"})
    service.start()
    deadline = time.monotonic() + 20
    verify: Any = ssl.create_default_context(cafile=str(ca)) if ca else True
    while True:
        try:
            httpx.get(f"{scheme}://{'localhost' if ca else '127.0.0.1'}:{port}/healthz", verify=verify, timeout=2)
            return service
        except httpx.ConnectError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _add_reviewable_image(rt: Runtime) -> None:
    with rt.sessions.begin() as s:
        inst = Instance(sop_instance_uid=REVIEWED_SOP, sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.4",
                        study_instance_uid="1.2.3.4", series_instance_uid="1.2.3.4.5", patient_id="SEC-PAT-1",
                        issuer_of_patient_id=None, accession_number=None, study_date=None, study_time=None,
                        modality="XC", body_site=None, calling_ae="SCOPE", transfer_syntax_uid="1.2.840.10008.1.2.1",
                        sha256="0" * 64, size=1, path="objects/00/none.dcm")
        s.add(inst)
        s.flush()
        s.add(Job(instance_id=inst.id, state=JobState.DELIVERED, correlation_id="c0ffee",
                  result=RESULT))



# A result as the worker stores it (Prediction.to_json): the API's typed response needs every field.
RESULT = {"probabilities": {"akiec": 0.01, "bcc": 0.01, "bkl": 0.05, "df": 0.01, "mel": 0.02, "nv": 0.89,
                            "vasc": 0.01},
          "malignancy_probability": 0.04, "risk": "Low", "uncertainty": 0.2, "low_confidence": False,
          "assessable": True, "reason": None, "top_class": "nv",
          "model": {"manufacturer": "dermgate project", "name": "dermgate-lite0", "version": "2.0.0",
                    "sha256": "0" * 64, "device_uid": "2.25.1"}}

@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("api-security")
    port = free_port()
    rt = Runtime(Settings(workdir=root / "work", api=ApiSettings(
        port=port, tokens_file=_tokens(root / "tokens.json"), trusted_proxies=[PROXY],
        auth_failures_before_lockout=5, auth_failure_window_s=60, lockout_s=30, audit_coalesce_s=60)))
    _add_reviewable_image(rt)
    service = _start(rt, port)
    try:
        yield Api(rt, service, port)
    finally:
        service.stop()
        rt.close()


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _raw(api: Api, source: str, head: str, body_chunks: Any = (), timeout: float = 5.0) -> tuple[str, int]:
    """Send ``head`` (request line + headers), then body chunks while the server has not answered;
    returns (the status line, body bytes the server let us send before answering or closing)."""
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", api.port))
    s.settimeout(timeout)
    sent = 0
    try:
        s.sendall(head.encode())
        for chunk in body_chunks:
            readable, _, _ = select.select([s], [], [], 0)
            if readable:
                break
            try:
                s.sendall(chunk)
            except OSError:
                break
            sent += len(chunk)
        try:
            answer = s.recv(4096).decode("latin-1")
        except (socket.timeout, OSError):
            answer = ""
        return answer.split("\r\n", 1)[0], sent
    finally:
        s.close()


# ---- request size --------------------------------------------------------------------------------

def test_an_unauthenticated_huge_post_is_refused_before_its_body_is_read(api: Api) -> None:
    """Attack: a 300 MB POST without a token was read (and parsed) before authentication: the server
    grew by ~600 MB. Now it is answered 401 from its headers alone and memory stays flat."""
    head = ("POST /api/v1/results/1.2.3/review HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {300 * 2**20}\r\n\r\n")
    status, _ = _raw(api, "127.0.0.11", head)                       # the answer comes before any body byte
    assert status.startswith("HTTP/1.1 401"), status
    before = _rss_bytes()
    chunk = b"x" * 2**20
    status, sent = _raw(api, "127.0.0.11", head, (chunk for _ in range(300)))
    assert status.startswith("HTTP/1.1 401") or status == "", status
    assert sent < 64 * 2**20                                        # the server stopped taking it
    assert _rss_bytes() - before < 40 * 2**20


def test_an_authenticated_oversized_body_is_refused_with_413_by_length_and_by_stream(api: Api) -> None:
    auth = f"Authorization: Bearer {CLIN}\r\n"
    by_length = ("POST /api/v1/results/1.2.3/review HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"{auth}Content-Length: {300 * 2**20}\r\n\r\n")
    status, _ = _raw(api, "127.0.0.12", by_length)
    assert status.startswith("HTTP/1.1 413"), status
    chunked = ("POST /api/v1/results/1.2.3/review HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"{auth}Transfer-Encoding: chunked\r\n\r\n")
    piece = b"x" * 16384
    status, sent = _raw(api, "127.0.0.12", chunked, (b"4000\r\n" + piece + b"\r\n" for _ in range(4096)))
    assert status.startswith("HTTP/1.1 413"), status
    assert sent < 16 * 2**20


def test_a_50_mb_review_comment_is_refused_and_a_long_one_too(api: Api) -> None:
    """Attack: a 50 MB comment was stored with the review. Now 413 (body cap) or 422 (field cap)."""
    with api.client("127.0.0.13") as c:
        headers = {"Authorization": f"Bearer {CLIN}"}
        huge = c.post(f"/api/v1/results/{REVIEWED_SOP}/review", headers=headers,
                      json={"decision": "confirm", "comment": "x" * (50 * 2**20)})
        assert huge.status_code == 413
        long = c.post(f"/api/v1/results/{REVIEWED_SOP}/review", headers=headers,
                      json={"decision": "confirm", "comment": "x" * 5000})
        assert long.status_code == 422
        ok = c.post(f"/api/v1/results/{REVIEWED_SOP}/review", headers=headers,
                    json={"decision": "confirm", "comment": "looks benign"})
        assert ok.status_code == 201, ok.text
    from dermgate.db import Review
    with api.rt.sessions() as s:
        assert [len(r.comment or "") for r in s.query(Review)] == [len("looks benign")]


# ---- brute force and the audit flood ------------------------------------------------------------

def test_failed_authentication_locks_the_source_out_with_429_and_retry_after(api: Api) -> None:
    """Attack: 2,000 bad-token requests in 5 s, all answered 401. Now the 6th is 429 with Retry-After,
    even with a valid token from that source; other sources are still served."""
    with api.client("127.0.0.14") as c:
        codes = [c.get("/api/v1/results/1.2.3", headers={"Authorization": f"Bearer guess{i}"}).status_code
                 for i in range(5)]
        assert codes == [401] * 5
        locked = c.get("/api/v1/results/1.2.3", headers={"Authorization": "Bearer guess5"})
        assert locked.status_code == 429 and 0 < int(locked.headers["Retry-After"]) <= 30
        assert c.get("/api/v1/results/1.2.3", headers={"Authorization": f"Bearer {CLIN}"}).status_code == 429
    with api.client("127.0.0.15") as other:
        assert other.get("/api/v1/results/1.2.3", headers={"Authorization": f"Bearer {CLIN}"}).status_code == 404


def test_one_token_failing_from_many_sources_is_locked_per_token(api: Api) -> None:
    codes = []
    for i in range(6):
        with api.client(f"127.0.1.{i + 1}") as c:
            codes.append(c.get("/api/v1/results/1.2.3", headers={"Authorization": f"Bearer {EXPIRED}"}).status_code)
    assert codes == [401] * 5 + [429]


def test_repeated_failures_become_one_audit_record_per_window_with_their_count(api: Api) -> None:
    """Attack: each failed request was its own fsynced audit record. Now the first of a kind is recorded
    at once and the rest counted into one summary: 200 failures, at most 4 records, none lost."""
    with api.client("127.0.0.16") as c:
        for i in range(200):
            c.get("/api/v1/results/1.2.3", headers={"Authorization": f"Bearer flood{i}"})
    records = api.auth_failures("127.0.0.16")
    assert len(records) <= 4
    # a first record stands for itself, a summary for the repeats it counts
    assert sum(r.detail.get("coalesced", 1) for r in records) == 200
    assert {r.detail["reason"] for r in records} == {"unknown bearer token",
                                                     "locked out after repeated failed authentication"}


# ---- headers, docs, scheme ------------------------------------------------------------------------

def test_phi_responses_are_not_cached_nor_sniffed(api: Api) -> None:
    with api.client("127.0.0.17") as c:
        r = c.get(f"/api/v1/results/{REVIEWED_SOP}", headers={"Authorization": f"Bearer {CLIN}"})
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store" and r.headers["x-content-type-options"] == "nosniff"
    assert "strict-transport-security" not in r.headers                # plain HTTP: HSTS would be ignored


def test_hsts_is_sent_under_tls_and_behind_a_trusted_tls_proxy(api: Api, tmp_path: Path) -> None:
    with api.client(PROXY) as c:
        r = c.get("/healthz", headers={"X-Forwarded-Proto": "https"})
        assert r.headers["strict-transport-security"].startswith("max-age=31536000")
    with api.client("127.0.0.18") as c:                              # not a proxy: its header is ignored
        assert "strict-transport-security" not in c.get("/healthz", headers={"X-Forwarded-Proto": "https"}).headers
    pki = make_test_pki(tmp_path / "pki", hostname="localhost")
    port = free_port()
    rt = Runtime(Settings(workdir=tmp_path / "work", api=ApiSettings(
        port=port, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)))
    service = _start(rt, port, "https", pki.ca_cert)
    try:
        r = httpx.get(f"https://localhost:{port}/api/v1/results/1.2.3",
                      verify=ssl.create_default_context(cafile=str(pki.ca_cert)), timeout=5)
        assert r.status_code == 401
        assert r.headers["strict-transport-security"] == "max-age=31536000; includeSubDomains"
        assert r.headers["cache-control"] == "no-store"
    finally:
        service.stop()
        rt.close()


def test_docs_load_nothing_from_outside(api: Api) -> None:
    """Attack surface: /docs pulled swagger-ui from a public CDN (no docs offline, a third party's
    script in a PHI application). Now every asset is served here and the CSP forbids others."""
    with api.client("127.0.0.19") as c:
        for page in ("/docs", "/redoc"):
            r = c.get(page)
            assert r.status_code == 200
            urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*'([^']+)'""", r.text)
            urls = [u for pair in urls for u in pair if u]
            assert urls and not [u for u in urls if "//" in u], urls
            assert "default-src 'self'" in r.headers["content-security-policy"]
            for u in urls:
                asset = c.get(u)
                assert asset.status_code == 200 and len(asset.content) > 100, u
        assert c.get("/openapi.json").json()["info"]["title"] == "dermgate"


@pytest.mark.parametrize("header, status", [(f"bearer {CLIN}", 404), (f"BEARER {CLIN}", 404),
                                            (f"Bearer   {CLIN}", 404), (CLIN, 401), (f"Basic {CLIN}", 401),
                                            (f"Bearer{CLIN}", 401), ("Bearer", 401)])
def test_bearer_scheme_is_matched_without_case_and_the_prefix_is_required(api: Api, header: str,
                                                                          status: int) -> None:
    with api.client("127.0.0.20") as c:
        assert c.get("/api/v1/results/1.2.3", headers={"Authorization": header}).status_code == status


# ---- forwarded addresses, purposes, lifetimes ----------------------------------------------------

def _accesses(api: Api) -> list[Any]:
    return [r.event for r in api.rt.audit.events() if r.event.event is EventType.API_ACCESS]


def test_x_forwarded_for_counts_only_from_a_trusted_proxy(api: Api) -> None:
    headers = {"Authorization": f"Bearer {CLIN}", "X-Forwarded-For": "203.0.113.7"}
    before = len(_accesses(api))
    for source in (PROXY, "127.0.0.21", "127.0.0.1"):     # 127.0.0.1: what uvicorn itself trusted by default
        with api.client(source) as c:
            assert c.get(f"/api/v1/results/{REVIEWED_SOP}", headers=headers).status_code == 200
    assert [e.source for e in _accesses(api)[before:]] == ["203.0.113.7", "127.0.0.21", "127.0.0.1"]


def test_a_lockout_behind_the_proxy_is_per_forwarded_client(api: Api) -> None:
    with api.client(PROXY) as c:
        for _ in range(6):
            c.get("/api/v1/results/1.2.3", headers={"Authorization": "Bearer nope", "X-Forwarded-For": "203.0.113.66"})
        locked = c.get("/api/v1/results/1.2.3", headers={"Authorization": f"Bearer {CLIN}",
                                                         "X-Forwarded-For": "203.0.113.66"})
        other = c.get("/api/v1/results/1.2.3", headers={"Authorization": f"Bearer {CLIN}",
                                                        "X-Forwarded-For": "203.0.113.67"})
    assert (locked.status_code, other.status_code) == (429, 404)


def test_purpose_of_use_only_from_the_configured_set(api: Api) -> None:
    sop = REVIEWED_SOP
    before = len(_accesses(api))
    with api.client("127.0.0.22") as c:
        auth = {"Authorization": f"Bearer {CLIN}"}
        bad = c.get(f"/api/v1/results/{sop}", headers={**auth, "X-Purpose-Of-Use": "MARKETING"})
        assert bad.status_code == 400 and "TREAT" in bad.json()["detail"]
        assert c.get(f"/api/v1/results/{sop}", headers={**auth, "X-Purpose-Of-Use": "etreat"}).status_code == 200
        assert c.get(f"/api/v1/results/{sop}", headers=auth).status_code == 200
    assert [e.purpose for e in _accesses(api)[before:]] == ["ETREAT", "TREAT"]
    refused = api.auth_failures("127.0.0.22")
    assert refused and refused[-1].detail["reason"] == "purpose of use not allowed" and refused[-1].actor == "dr.derm"


def test_expired_and_lifetime_less_tokens_are_refused_and_audited(api: Api) -> None:
    with api.client("127.0.0.23") as c:
        for token in (EXPIRED2, LEGACY):
            r = c.get("/api/v1/results/1.2.3", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 401 and "invalid_token" in r.headers["www-authenticate"]
        assert c.get("/api/v1/results/1.2.3", headers={"Authorization": f"Bearer {OPS}"}).status_code == 403
    reasons = {(r.actor, r.detail["reason"]) for r in api.auth_failures("127.0.0.23")}
    assert ("dr.gone", "bearer token expired") in reasons
    assert ("dr.legacy", "bearer token has no lifetime; reissue it") in reasons
    assert ("it.ops", "role operator not allowed") in reasons


def test_issued_tokens_have_a_lifetime_that_api_token_list_shows(tmp_path: Path) -> None:
    work = tmp_path / "work"
    run = [sys.executable, "-m", "dermgate.cli", "api-token"]
    subprocess.run([sys.executable, "-m", "dermgate.cli", "migrate", "--workdir", str(work)], check=True,
                   capture_output=True)          # tokens need an existing work dir (a typo must not make one)
    default = subprocess.run([*run, "add", "--name", "dr.a", "--workdir", str(work)], capture_output=True,
                             text=True, check=True)
    short = subprocess.run([*run, "add", "--name", "dr.b", "--days", "0.00002", "--workdir", str(work)],
                           capture_output=True, text=True, check=True)
    entries = {v["user"]: v for v in json.loads((work / "keys" / "api-tokens.json").read_text()).values()}
    lifetime = datetime.fromisoformat(entries["dr.a"]["expires"]) - datetime.fromisoformat(entries["dr.a"]["created"])
    assert lifetime == timedelta(days=90)
    time.sleep(2)
    listing = subprocess.run([*run, "list", "--workdir", str(work)], capture_output=True, text=True, check=True).stdout
    assert "expires" in listing.splitlines()[0]
    rows = {line.split()[0]: line for line in listing.splitlines()[2:]}
    assert " valid " in rows["dr.a"] and entries["dr.a"]["expires"][:10] in rows["dr.a"]
    assert " expired " in rows["dr.b"]
    rt = Runtime(Settings(workdir=work))
    from fastapi.testclient import TestClient

    from dermgate.api.main import create_app
    app = create_app(rt, check_model=False)
    client = TestClient(app)
    assert client.get("/api/v1/results/1.2.3",
                      headers={"Authorization": f"Bearer {default.stdout.strip()}"}).status_code == 404
    assert client.get("/api/v1/results/1.2.3",
                      headers={"Authorization": f"Bearer {short.stdout.strip()}"}).status_code == 401
    app.state.security.close()
    expired = [r.event for r in rt.audit.events() if r.event.event is EventType.AUTH_FAILURE]
    assert [(e.actor, e.detail["reason"]) for e in expired] == [("dr.b", "bearer token expired")]
    rt.close()
