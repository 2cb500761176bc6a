"""Sign-in through the hospital's OpenID Connect provider: authorization code flow with PKCE (S256).

The provider's metadata comes from discovery; the ID token is verified with ``joserfc`` against the
provider's JWK Set and its claims with ``authlib``'s ``CodeIDToken`` (issuer, audience, expiry,
issued-at, nonce, ``at_hash``, ``azp``). The console role comes from a configurable claim (a list
of groups or roles, or one string) through ``role_map``; a user whose claim maps to no role is
refused. The user's FHIR Practitioner reference comes from a claim or from a table by user name.

State, nonce and the PKCE verifier travel in a short-lived cookie signed and encrypted with the
console key, so the callback needs no server-side state and a forged or replayed callback fails.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
from authlib.common.security import generate_token
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.oidc.core import CodeIDToken
from cryptography.fernet import Fernet, InvalidToken
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from joserfc.jws import JWSRegistry

from dermgate.settings import OidcSettings

FLOW_TTL_S = 600           # the user has 10 minutes at the provider


class OidcError(Exception):
    """Sign-in through the provider failed; ``reason`` is short and safe to audit and show."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class OidcIdentity:
    username: str
    display_name: str | None
    role: str
    practitioner_reference: str | None
    subject: str
    claims: dict[str, Any]


class OidcClient:
    def __init__(self, settings: OidcSettings, key: bytes, *, now: Callable[[], float] = time.time,
                 transport: httpx.BaseTransport | None = None) -> None:
        import base64
        self.settings, self.now = settings, now
        self._fernet = Fernet(base64.urlsafe_b64encode(key[:32]))
        self._metadata: dict[str, Any] | None = None
        self._jwks: dict[str, Any] | None = None
        verify: Any = str(settings.ca_file) if settings.ca_file else True
        self._http = httpx.Client(timeout=10.0, verify=verify, transport=transport)

    # ---- provider metadata

    def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            url = self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
            r = self._http.get(url)
            r.raise_for_status()
            meta = r.json()
            if meta.get("issuer") != self.settings.issuer:
                raise OidcError("the provider's metadata names another issuer")
            self._metadata = meta
        return self._metadata

    def _keys(self, force: bool = False) -> KeySet:
        if self._jwks is None or force:
            r = self._http.get(self.metadata()["jwks_uri"])
            r.raise_for_status()
            self._jwks = r.json()
        return KeySet.import_key_set(self._jwks)  # type: ignore[arg-type]

    def _secret(self) -> str | None:
        f = self.settings.client_secret_file
        return f.read_text().strip() if f else None

    # ---- step 1: send the browser to the provider

    def start(self, redirect_uri: str) -> tuple[str, str]:
        """(the provider's authorization URL, the sealed flow cookie value)."""
        state, nonce, verifier = generate_token(32), generate_token(32), generate_token(64)
        params = {"response_type": "code", "client_id": self.settings.client_id, "redirect_uri": redirect_uri,
                  "scope": " ".join(self.settings.scopes), "state": state, "nonce": nonce,
                  "code_challenge": create_s256_code_challenge(verifier), "code_challenge_method": "S256"}
        url = self.metadata()["authorization_endpoint"] + "?" + urlencode(params)
        flow = {"state": state, "nonce": nonce, "verifier": verifier, "redirect_uri": redirect_uri}
        return url, self._fernet.encrypt(json.dumps(flow).encode()).decode()

    # ---- step 2: the provider sends the browser back with a code

    def finish(self, sealed_flow: str | None, params: dict[str, str]) -> OidcIdentity:
        if not sealed_flow:
            raise OidcError("no sign-in in progress (cookie missing or expired)")
        try:
            flow = json.loads(self._fernet.decrypt(sealed_flow.encode(), ttl=FLOW_TTL_S))
        except (InvalidToken, ValueError) as exc:
            raise OidcError("sign-in state is invalid or expired") from exc
        if params.get("error"):
            raise OidcError(f"the provider answered {params['error'][:60]}")
        if not params.get("state") or params["state"] != flow["state"]:
            raise OidcError("state mismatch")
        if params.get("iss") and params["iss"] != self.metadata()["issuer"]:   # RFC 9207: mix-up defence
            raise OidcError("the authorization response names another issuer")
        if not params.get("code"):
            raise OidcError("no authorization code")
        token = self._exchange(params["code"], flow)
        claims = self.validate_id_token(token.get("id_token"), nonce=flow["nonce"],
                                        access_token=token.get("access_token"))
        return self.identity(claims)

    def _exchange(self, code: str, flow: dict[str, str]) -> dict[str, Any]:
        data = {"grant_type": "authorization_code", "code": code, "redirect_uri": flow["redirect_uri"],
                "code_verifier": flow["verifier"]}
        secret = self._secret()
        auth: Any = (self.settings.client_id, secret) if secret else None
        if auth is None:
            data["client_id"] = self.settings.client_id
        try:
            r = self._http.post(self.metadata()["token_endpoint"], data=data, auth=auth,
                                headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise OidcError(f"token endpoint unreachable ({type(exc).__name__})") from exc
        if r.status_code != 200:
            try:
                err = r.json().get("error", r.status_code)
            except ValueError:
                err = r.status_code
            raise OidcError(f"token request refused: {err}")
        return r.json()

    def validate_id_token(self, id_token: str | None, *, nonce: str, access_token: str | None = None) -> dict[str, Any]:
        """Verify signature and claims; returns the claims. Raises OidcError naming what failed."""
        if not id_token:
            raise OidcError("no ID token in the token response")
        algs = self.metadata().get("id_token_signing_alg_values_supported") or ["RS256"]
        registry = JWSRegistry(algorithms=[a for a in algs if a != "none"])
        try:
            try:
                decoded = jwt.decode(id_token, self._keys(), registry=registry)
            except JoseError:
                decoded = jwt.decode(id_token, self._keys(force=True), registry=registry)   # key rotation
        except (JoseError, ValueError) as exc:
            raise OidcError(f"ID token signature invalid ({type(exc).__name__})") from exc
        params: dict[str, Any] = {"nonce": nonce, "client_id": self.settings.client_id}
        if access_token:
            params["access_token"] = access_token
        claims = CodeIDToken(decoded.claims, decoded.header,
                             {"iss": {"essential": True, "values": [self.metadata()["issuer"]]},
                              "aud": {"essential": True, "values": [self.settings.client_id]},
                              "exp": {"essential": True}}, params)
        try:
            claims.validate(now=int(self.now()), leeway=self.settings.leeway_s)
        except JoseError as exc:
            name = getattr(exc, "claim", None) or getattr(exc, "error", type(exc).__name__)
            raise OidcError(f"ID token rejected: {name} {getattr(exc, 'description', '')}".strip()) from exc
        return dict(claims)

    # ---- who the user is to dermgate

    def identity(self, claims: dict[str, Any]) -> OidcIdentity:
        s = self.settings
        username = str(claims.get(s.username_claim) or claims.get("sub") or "")
        if not username:
            raise OidcError("the ID token names no user")
        values = _claim(claims, s.role_claim)
        listed = values if isinstance(values, list) else [values] if values else []
        roles = [s.role_map[str(v)] for v in listed if str(v) in s.role_map]
        if not roles:
            raise OidcError("no dermgate role for this user")
        order = ("admin", "clinician", "compliance", "operator")   # one role per session: the first held
        role = sorted(set(roles), key=order.index)[0]
        practitioner = None
        if s.practitioner_claim and claims.get(s.practitioner_claim):
            ref = str(claims[s.practitioner_claim])
            practitioner = ref if "/" in ref else f"Practitioner/{ref}"
        practitioner = practitioner or s.practitioner_table.get(username)
        name = claims.get(s.display_name_claim)
        return OidcIdentity(username=username, display_name=str(name) if name else None, role=role,
                            practitioner_reference=practitioner, subject=str(claims.get("sub")), claims=claims)

    def close(self) -> None:
        self._http.close()


def _claim(claims: dict[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value
