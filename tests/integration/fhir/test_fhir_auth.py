"""SMART Backend Services against the test server's token endpoint, which verifies each client
assertion's signature against the registered JWK Set, its audience, expiry and jti."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import structlog

from audit.api import Outcome
from integration.fhir.auth import (
    SmartBackendAuth,
    generate_private_key_pem,
    jwks,
    key_id,
    load_private_key,
)
from integration.fhir.channel import FhirChannel
from integration.fhir.client import FhirClient, build_http_client
from integration.fhir.errors import FhirConfigError
from integration.fhir.settings import FhirSettings, SigningAlg
from tests.integration.fhir.data import ISSUER, PATIENT_SYSTEM, cam_png, image_ref, synthetic_prediction
from tests.integration.fhir.peer import TEST_CLIENT_ID, FhirTestServer, ListAuditSink, RecordingTransport

PDF = b"%PDF-1.4 stand-in"
KeyMaker = Callable[..., Path]


class FakeMonotonic:
    """A monotonic clock the test moves forward (token expiry without sleeping)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def secured(fhir: FhirTestServer, patient: dict[str, Any]) -> FhirTestServer:
    """The test server with bearer tokens required on the FHIR API."""
    fhir.configure(require_auth=True)
    return fhir


@pytest.fixture
def auth_channel(secured: FhirTestServer, audit_sink: ListAuditSink) -> Iterator[Callable[..., FhirChannel]]:
    """Builds a channel whose SmartBackendAuth uses the given key (and clocks, for expiry tests)."""
    made: list[FhirChannel] = []

    def make(key_path: Path, alg: SigningAlg = SigningAlg.RS384, *, clock: Callable[[], float] = time.time,
             monotonic: Callable[[], float] = time.monotonic, client_id: str = TEST_CLIENT_ID,
             kid: str | None = None) -> FhirChannel:
        settings = FhirSettings(base_url=secured.base_url, token_url=secured.token_url, client_id=client_id,
                                private_key_file=key_path, alg=alg, patient_identifier_systems={ISSUER: PATIENT_SYSTEM})
        auth = SmartBackendAuth(secured.token_url, client_id, load_private_key(key_path, alg), alg, settings.scopes,
                                kid=kid, clock=clock, monotonic=monotonic)
        http = build_http_client(settings, auth=auth, transport=RecordingTransport())
        channel = FhirChannel(settings, FhirClient(http, token_url=secured.token_url), audit_sink)
        made.append(channel)
        return channel

    yield make
    for channel in made:
        channel.close()


def deliver(channel: FhirChannel, n: int = 1) -> Any:
    return channel.deliver(channel.prepare(image_ref(n), synthetic_prediction(64, 64), cam_png(), pdf=PDF))


def auth_of(channel: FhirChannel) -> SmartBackendAuth:
    auth = channel.client.http.auth
    assert isinstance(auth, SmartBackendAuth)
    return auth


@pytest.mark.parametrize("alg", list(SigningAlg))
def test_client_with_registered_key_gets_a_token_and_delivers(
        alg: SigningAlg, secured: FhirTestServer, smart_key: KeyMaker, auth_channel: Callable[..., FhirChannel]) -> None:
    outcome = deliver(auth_channel(smart_key(alg), alg))
    assert outcome.ok, outcome.reason
    assert len(secured.search("DiagnosticReport")) == 1
    assert secured.stats()["tokensIssued"] == 1


def test_settings_wire_the_same_auth_as_the_service_uses(
        secured: FhirTestServer, smart_key: KeyMaker, audit_sink: ListAuditSink) -> None:
    settings = FhirSettings(base_url=secured.base_url, token_url=secured.token_url, client_id=TEST_CLIENT_ID,
                            private_key_file=smart_key(), patient_identifier_systems={ISSUER: PATIENT_SYSTEM})
    channel = FhirChannel.from_settings(settings, audit_sink)
    try:
        assert deliver(channel).ok
    finally:
        channel.close()


def test_without_a_token_the_server_refuses_and_that_is_not_the_messages_fault(
        secured: FhirTestServer, audit_sink: ListAuditSink) -> None:
    settings = FhirSettings(base_url=secured.base_url, patient_identifier_systems={ISSUER: PATIENT_SYSTEM})
    channel = FhirChannel.from_settings(settings, audit_sink)
    try:
        outcome = deliver(channel)
    finally:
        channel.close()
    assert not outcome.ok and outcome.retryable and "HTTP 401" in (outcome.reason or "")


def test_token_is_reused_until_it_nears_expiry_then_renewed(
        secured: FhirTestServer, smart_key: KeyMaker, auth_channel: Callable[..., FhirChannel]) -> None:
    secured.configure(token_lifetime_s=120)
    clock = FakeMonotonic()
    channel = auth_channel(smart_key(), monotonic=clock)
    assert all(deliver(channel, n).ok for n in (1, 2, 3))
    assert secured.stats()["tokensIssued"] == 1
    clock.now += 120 - 30 + 1                           # inside the renewal margin
    assert deliver(channel, 4).ok
    assert secured.stats()["tokensIssued"] == 2
    assert not [r for r in secured.requests() if r["status"] == 401]


def test_token_revoked_by_the_server_is_renewed_on_401_and_the_request_retried_once(
        secured: FhirTestServer, smart_key: KeyMaker, auth_channel: Callable[..., FhirChannel]) -> None:
    channel = auth_channel(smart_key())
    assert deliver(channel, 1).ok
    secured.revoke_tokens()
    assert deliver(channel, 2).ok
    assert secured.stats()["tokensIssued"] == 2
    assert [r["status"] for r in secured.requests()].count(401) == 1
    assert len(secured.search("DiagnosticReport")) == 2


@pytest.mark.parametrize(("claim_registered_kid", "denial"), [
    (False, "assertion rejected: ERR_JWKS_NO_MATCHING_KEY"),             # unknown kid
    (True, "assertion rejected: ERR_JWS_SIGNATURE_VERIFICATION_FAILED"),  # registered kid, wrong signature
])
def test_assertion_signed_with_an_unregistered_key_is_refused_and_nothing_is_written(
        claim_registered_kid: bool, denial: str, secured: FhirTestServer, smart_key: KeyMaker,
        auth_channel: Callable[..., FhirChannel], audit_sink: ListAuditSink) -> None:
    registered = smart_key()                             # the key registered for the client
    wrong = smart_key(register=False)                    # same client id, another key
    kid = key_id(load_private_key(registered, SigningAlg.RS384).public_key()) if claim_registered_kid else None
    outcome = deliver(auth_channel(wrong, kid=kid))
    assert not outcome.ok and outcome.retryable
    assert "FhirAuthError" in (outcome.reason or "") and "401 invalid_client" in (outcome.reason or "")
    stats = secured.stats()
    assert stats["tokensIssued"] == 0 and stats["tokenDenied"] == [denial]
    assert stats["fhir"] == 1                            # the patient fixture's create only
    assert audit_sink.events[-1].outcome is Outcome.MINOR_FAILURE


def test_expired_assertion_is_refused(
        secured: FhirTestServer, smart_key: KeyMaker, auth_channel: Callable[..., FhirChannel]) -> None:
    channel = auth_channel(smart_key(), clock=lambda: time.time() - 3600)   # exp an hour ago
    outcome = deliver(channel)
    assert not outcome.ok and "401 invalid_client" in (outcome.reason or "")
    stats = secured.stats()
    assert stats["tokensIssued"] == 0 and stats["tokenDenied"] == ["assertion rejected: ERR_JWT_EXPIRED"]


@pytest.mark.parametrize("fault", [{"action": "status", "status": 503}, {"action": "cut-before"}])
def test_token_endpoint_down_is_retryable_and_delivery_recovers(
        fault: dict[str, Any], secured: FhirTestServer, smart_key: KeyMaker,
        auth_channel: Callable[..., FhirChannel]) -> None:
    secured.fault(target="token", **fault)
    channel = auth_channel(smart_key())
    first = deliver(channel)
    assert not first.ok and first.retryable and "TokenEndpointError" in (first.reason or "")
    assert deliver(channel).ok
    assert len(secured.search("DiagnosticReport")) == 1


def test_client_assertion_is_short_lived_single_use_and_identifies_the_key(smart_key: KeyMaker) -> None:
    path = smart_key(SigningAlg.ES384)
    key = load_private_key(path, SigningAlg.ES384)
    auth = SmartBackendAuth("https://ehr.invalid/token", "app-1", key, SigningAlg.ES384, "system/*.read",
                            jku="https://dermgate.invalid/.well-known/jwks.json")
    first, second = auth.client_assertion(), auth.client_assertion()
    header = jwt.get_unverified_header(first)
    assert header["alg"] == "ES384" and header["kid"] == key_id(key.public_key())
    assert header["jku"] == "https://dermgate.invalid/.well-known/jwks.json"
    claims = jwt.decode(first, key.public_key(), algorithms=["ES384"], audience="https://ehr.invalid/token")
    assert claims["iss"] == claims["sub"] == "app-1"
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert claims["jti"] != jwt.decode(second, options={"verify_signature": False})["jti"]


def test_jwks_publishes_only_public_parts_with_kid_and_alg() -> None:
    rsa_key = load_pem(SigningAlg.RS384)
    ec_key = load_pem(SigningAlg.ES384)
    keys = jwks([rsa_key, ec_key.public_key()])["keys"]
    assert [(k["kty"], k["alg"]) for k in keys] == [("RSA", "RS384"), ("EC", "ES384")]
    assert keys[0]["kid"] == key_id(rsa_key.public_key()) and keys[1]["kid"] == key_id(ec_key.public_key())
    for k in keys:
        assert not {"d", "p", "q", "dp", "dq", "qi"} & set(k)
        assert k["use"] == "sig"


def load_pem(alg: SigningAlg) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    return load_pem_private_key(generate_private_key_pem(alg), password=None)


def test_key_that_does_not_fit_the_algorithm_is_a_configuration_error(smart_key: KeyMaker) -> None:
    ec_path = smart_key(SigningAlg.ES384, register=False)
    with pytest.raises(FhirConfigError, match="RS384 needs an RSA key"):
        load_private_key(ec_path, SigningAlg.RS384)
    with pytest.raises(FhirConfigError, match="cannot read"):
        load_private_key(ec_path.with_name("missing.pem"), SigningAlg.RS384)


def test_keys_and_tokens_never_reach_reprs_logs_or_the_audit_trail(
        secured: FhirTestServer, smart_key: KeyMaker, auth_channel: Callable[..., FhirChannel],
        audit_sink: ListAuditSink) -> None:
    path = smart_key()
    channel = auth_channel(path)
    with structlog.testing.capture_logs() as logs:
        assert deliver(channel).ok
    auth = auth_of(channel)
    token = auth._token.value if auth._token else ""
    assert token
    pem_body = path.read_text().splitlines()[1]
    texts = [repr(auth), repr(channel.settings), str(channel.settings.model_dump()), repr(logs),
             repr([e.detail for e in audit_sink.events])]
    for text in texts:
        assert token not in text and pem_body not in text and "PRIVATE KEY" not in text
