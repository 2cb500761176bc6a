"""SMART Backend Services authorisation as a pluggable ``httpx.Auth``.

``client_credentials`` grant with a ``private_key_jwt`` client assertion
(RS384 or ES384), a fresh ``jti`` and at most five minutes of life per
assertion. The access token is cached until shortly before it expires and
fetched again when the FHIR server answers 401 (one retry per request).
The token request is yielded from the auth flow, so it travels over the same
injected ``httpx.Client`` (same transport, timeouts and TLS settings).

Key material never appears in ``repr``, logs or exceptions; tokens neither.
``jwks()`` gives the public JWK Set the service publishes (Epic asks backend
apps for a JWK Set URL).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from integration.fhir.errors import FhirAuthError, FhirConfigError, TokenEndpointError
from integration.fhir.settings import FhirSettings, SigningAlg

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
GRANT_TYPE = "client_credentials"
EXPIRY_SKEW_S = 30.0            # renew this long before the token expires (at most half its life)
DEFAULT_TOKEN_LIFETIME_S = 300  # when the server omits expires_in
MIN_RSA_BITS = 2048

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


# ---- keys ---------------------------------------------------------------------------------------

def load_private_key(path: Path, alg: SigningAlg) -> PrivateKey:
    """Reads a PEM private key and checks that it fits the algorithm (RSA >= 2048 / EC P-384)."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise FhirConfigError(f"cannot read the SMART private key at {path}: {type(exc).__name__}") from None
    check_key(key, alg)
    return key  # type: ignore[return-value]


def check_key(key: object, alg: SigningAlg) -> None:
    if alg is SigningAlg.RS384:
        if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < MIN_RSA_BITS:
            raise FhirConfigError(f"RS384 needs an RSA key of at least {MIN_RSA_BITS} bits")
    elif not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise FhirConfigError("ES384 needs an EC key on curve P-384")


def generate_private_key_pem(alg: SigningAlg) -> bytes:
    """A new private key in PEM (PKCS#8) for the algorithm: for set-up scripts and tests."""
    key: PrivateKey
    if alg is SigningAlg.RS384:
        key = rsa.generate_private_key(public_exponent=65537, key_size=MIN_RSA_BITS)
    else:
        key = ec.generate_private_key(ec.SECP384R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _public_jwk(public_key: PublicKey) -> dict[str, Any]:
    if isinstance(public_key, rsa.RSAPublicKey):
        return RSAAlgorithm.to_jwk(public_key, as_dict=True)
    return ECAlgorithm.to_jwk(public_key, as_dict=True)


def key_id(public_key: PublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): a kid that changes whenever the key does."""
    jwk = _public_jwk(public_key)
    members = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({k: jwk[k] for k in members}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def jwks(public_keys: Iterable[PublicKey | PrivateKey]) -> dict[str, Any]:
    """The JWK Set to publish at ``/.well-known/jwks.json`` (public parts only, even if given private keys).
    Publish the old and the new key together while rotating."""
    keys = []
    for key in public_keys:
        pub: PublicKey = key.public_key() if isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)) else key
        jwk = _public_jwk(pub)
        jwk.update({"kid": key_id(pub), "use": "sig", "key_ops": ["verify"],
                    "alg": SigningAlg.RS384.value if jwk["kty"] == "RSA" else SigningAlg.ES384.value})
        keys.append(jwk)
    return {"keys": keys}


# ---- the auth flow -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Token:
    value: str
    expires_at: float   # monotonic clock


class SmartBackendAuth(httpx.Auth):
    """Bearer token from a SMART Backend Services token endpoint, cached and refreshed on 401."""

    requires_response_body = True   # the token response is read inside the flow

    def __init__(self, token_url: str, client_id: str, private_key: PrivateKey, alg: SigningAlg, scopes: str, *,
                 kid: str | None = None, jku: str | None = None, assertion_lifetime_s: int = 300,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        check_key(private_key, alg)
        self.token_url = token_url
        self.client_id = client_id
        self.alg = alg
        self.scopes = scopes
        self.kid = kid or key_id(private_key.public_key())
        self.jku = jku
        self.assertion_lifetime_s = assertion_lifetime_s
        self._key = private_key
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._token: _Token | None = None
        self.tokens_fetched = 0          # for metrics and tests

    @classmethod
    def from_settings(cls, settings: FhirSettings) -> SmartBackendAuth:
        if not settings.auth_enabled or settings.private_key_file is None or settings.client_id is None:
            raise FhirConfigError("SMART backend auth is not configured")
        key = load_private_key(settings.private_key_file, settings.alg)
        return cls(str(settings.token_url), settings.client_id, key, settings.alg, settings.scopes,
                   kid=settings.key_id, jku=str(settings.jku) if settings.jku else None,
                   assertion_lifetime_s=settings.assertion_lifetime_s)

    def __repr__(self) -> str:
        return f"SmartBackendAuth(client_id={self.client_id!r}, alg={self.alg.value}, kid={self.kid!r})"

    # -- httpx.Auth

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self._cached()
        if token is None:
            token = yield from self._fetch()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == httpx.codes.UNAUTHORIZED:
            self.invalidate()
            token = yield from self._fetch()
            request.headers["Authorization"] = f"Bearer {token}"
            yield request

    def fetch_token(self, http: httpx.Client) -> str:
        """Get a fresh token now through ``http`` (a client without this auth), e.g. for a
        readiness check; it is cached like any other. Raises the same errors as a request would."""
        flow = self._fetch()
        request = next(flow)
        try:
            while True:
                request = flow.send(http.send(request))
        except StopIteration as done:
            return str(done.value)

    def has_token(self) -> bool:
        """Whether a cached token is still usable (no request is made)."""
        return self._cached() is not None

    def invalidate(self) -> None:
        with self._lock:
            self._token = None

    # -- internals

    def _cached(self) -> str | None:
        with self._lock:
            if self._token and self._token.expires_at > self._monotonic():
                return self._token.value
            return None

    def client_assertion(self) -> str:
        """A signed, single-use JWT proving possession of the private key (SMART Backend Services)."""
        now = int(self._clock())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": self.token_url,
                  "iat": now, "exp": now + self.assertion_lifetime_s, "jti": uuid.uuid4().hex}
        headers: dict[str, Any] = {"kid": self.kid, "typ": "JWT"}
        if self.jku:
            headers["jku"] = self.jku
        return jwt.encode(claims, self._key, algorithm=self.alg.value, headers=headers)

    def _fetch(self) -> Generator[httpx.Request, httpx.Response, str]:
        form = {"grant_type": GRANT_TYPE, "client_assertion_type": CLIENT_ASSERTION_TYPE,
                "client_assertion": self.client_assertion(), "scope": self.scopes}
        request = httpx.Request("POST", self.token_url, data=form, headers={"Accept": "application/json"})
        response = yield request
        if response.status_code >= 500 or response.status_code == httpx.codes.TOO_MANY_REQUESTS:
            raise TokenEndpointError(f"token endpoint answered {response.status_code}",
                                     status=response.status_code,
                                     retry_after_s=_retry_after(response.headers.get("Retry-After")))
        if response.status_code != httpx.codes.OK:
            raise FhirAuthError(f"token request refused ({response.status_code} {_oauth_error(response)})",
                                status=response.status_code)
        try:
            body = response.json()
            value = str(body["access_token"])
            lifetime = float(body.get("expires_in", DEFAULT_TOKEN_LIFETIME_S))
        except (ValueError, KeyError, TypeError):
            raise FhirAuthError("token endpoint sent no usable access_token", status=response.status_code) from None
        # Renew a little early (at most EXPIRY_SKEW_S, at most half the lifetime) so that a token
        # never expires between our check and the server's.
        usable_s = lifetime - min(EXPIRY_SKEW_S, lifetime / 2)
        with self._lock:
            self._token = _Token(value, self._monotonic() + usable_s)
            self.tokens_fetched += 1
        return value


def _oauth_error(response: httpx.Response) -> str:
    """The OAuth ``error`` code only: descriptions may echo request data."""
    try:
        return str(response.json().get("error", "unknown"))
    except ValueError:
        return "unknown"


def _retry_after(value: str | None) -> float | None:
    from integration.fhir.errors import parse_retry_after
    return parse_retry_after(value)
