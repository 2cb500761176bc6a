"""Sign-in through a real OpenID provider on loopback (oidc-provider): authorization code with
PKCE, roles from the ``roles`` claim, the Practitioner from a claim or the table; refused: a user
without a mapped role, an ID token for another client (audience), an expired ID token, a forged
state. Each refusal is audited."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient

from audit.api import EventType
from dermgate.api.main import create_app
from dermgate.app import Runtime
from dermgate.console.oidc import OidcClient, OidcError
from dermgate.settings import ConsoleSettings, OidcSettings, Settings
from tests.peers.oidc import ROLE_MAP, OidcTestProvider, sign_in_at_provider

CALLBACK = "http://testserver/auth/oidc/callback"


def oidc_runtime(tmp_path: Path, provider: OidcTestProvider, **extra: Any) -> Runtime:
    client_id, secret = provider.register(CALLBACK)
    tmp_path.mkdir(parents=True, exist_ok=True)
    secret_file = tmp_path / "oidc-secret"
    secret_file.write_text(secret)
    secret_file.chmod(0o600)
    oidc = OidcSettings(issuer=provider.issuer, client_id=client_id, client_secret_file=secret_file,
                        scopes=["openid", "profile", "email"], role_claim="roles", role_map=ROLE_MAP,
                        practitioner_claim="fhir_practitioner",
                        practitioner_table={"privacy.oidc": "Practitioner/table-2"}, **extra)
    return Runtime(Settings(workdir=tmp_path / "work", console=ConsoleSettings(oidc=oidc)))


def app_with_clock(rt: Runtime, skew_s: float = 0.0) -> TestClient:
    app = create_app(rt, check_model=False)
    if skew_s:
        app.state.console.oidc.now = lambda: time.time() + skew_s
    return TestClient(app)


def flow(client: TestClient, login: str) -> Any:
    """The browser's trip: console -> provider (sign in) -> console callback."""
    start = client.get("/auth/oidc/login", follow_redirects=False)
    assert start.status_code == 303
    location = start.headers["location"]
    q = parse_qs(urlsplit(location).query)
    assert q["code_challenge_method"] == ["S256"] and q["code_challenge"][0] and q["nonce"][0]
    back = sign_in_at_provider(location, login)
    assert back.startswith(CALLBACK)
    parts = urlsplit(back)
    return client.get(f"{parts.path}?{parts.query}", follow_redirects=False)


def failures(rt: Runtime) -> list[str]:
    return [r.event.detail["reason"] for r in rt.audit.events() if r.event.event is EventType.AUTH_FAILURE]


def test_clinician_signs_in_with_pkce_and_gets_role_and_practitioner(tmp_path: Path, oidc_provider: Any) -> None:
    rt = oidc_runtime(tmp_path, oidc_provider)
    client = app_with_clock(rt)
    login_page = client.get("/login")
    assert 'href="/auth/oidc/login"' in login_page.text
    r = flow(client, "dr.oidc")
    assert r.status_code == 303 and r.headers["location"] == "/worklist"
    page = client.get("/worklist")
    assert page.status_code == 200 and "Dr. Olivia Idp" in page.text and "(clinician)" in page.text
    from sqlalchemy import select

    from dermgate.db import ConsoleSession
    with rt.sessions() as s:
        row = s.scalar(select(ConsoleSession))
    assert (row.username, row.role, row.auth_method, row.practitioner_reference) == (
        "dr.oidc", "clinician", "oidc", "Practitioner/prac-oidc-1")
    (login,) = [r.event for r in rt.audit.events() if r.event.event is EventType.LOGIN]
    assert login.detail["auth"] == "oidc" and login.actor == "dr.oidc"
    # a second user: the role from another group, the Practitioner from the table
    other = app_with_clock(rt)
    assert flow(other, "privacy.oidc").headers["location"] == "/audit"
    with rt.sessions() as s:
        refs = {r.username: r.practitioner_reference for r in s.scalars(select(ConsoleSession))}
    assert refs["privacy.oidc"] == "Practitioner/table-2"
    rt.close()


def test_user_without_a_mapped_role_is_refused_and_audited(tmp_path: Path, oidc_provider: Any) -> None:
    rt = oidc_runtime(tmp_path, oidc_provider)
    client = app_with_clock(rt)
    r = flow(client, "visitor.oidc")
    assert r.status_code == 403 and "no dermgate role" in r.text
    assert client.get("/worklist", follow_redirects=False).headers["location"] == "/login"
    assert failures(rt) == ["no dermgate role for this user"]
    rt.close()


def test_expired_id_token_is_refused(tmp_path: Path, oidc_provider: Any) -> None:
    rt = oidc_runtime(tmp_path, oidc_provider, leeway_s=0)
    client = app_with_clock(rt, skew_s=2 * 3600)          # our clock two hours past the token's exp
    r = flow(client, "dr.oidc")
    assert r.status_code == 401 and "failed" in r.text
    (reason,) = failures(rt)
    assert "exp" in reason and "expired" in reason.lower()
    rt.close()


def test_id_token_for_another_client_is_refused_for_its_audience(tmp_path: Path, oidc_provider: Any) -> None:
    # A real ID token, issued to another registered client ...
    other_rt = oidc_runtime(tmp_path / "other", oidc_provider)
    other = other_rt.settings.console.oidc
    captured: dict[str, Any] = {}
    real_validate = OidcClient.validate_id_token

    def keep(self: OidcClient, id_token: str | None, **kw: Any) -> dict[str, Any]:
        captured.update(token=id_token, **kw)
        return real_validate(self, id_token, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(OidcClient, "validate_id_token", keep)
        assert flow(app_with_clock(other_rt), "dr.oidc").status_code == 303
    # ... presented to dermgate's client: wrong audience.
    rt = oidc_runtime(tmp_path, oidc_provider)
    ours = OidcClient(rt.settings.console.oidc, b"k" * 32)
    assert ours.settings.client_id != other.client_id
    with pytest.raises(OidcError, match="aud"):
        ours.validate_id_token(captured["token"], nonce=captured["nonce"], access_token=captured["access_token"])
    # and with the right client but another nonce (a replayed token), refused too
    theirs = OidcClient(other, b"k" * 32)
    with pytest.raises(OidcError, match="nonce"):
        theirs.validate_id_token(captured["token"], nonce="another", access_token=captured["access_token"])
    rt.close()
    other_rt.close()


def test_forged_state_and_missing_flow_cookie_are_refused(tmp_path: Path, oidc_provider: Any) -> None:
    rt = oidc_runtime(tmp_path, oidc_provider)
    client = app_with_clock(rt)
    start = client.get("/auth/oidc/login", follow_redirects=False)
    back = urlsplit(sign_in_at_provider(start.headers["location"], "dr.oidc"))
    q = parse_qs(back.query)
    r = client.get(f"/auth/oidc/callback?code={q['code'][0]}&state=forged", follow_redirects=False)
    assert r.status_code == 401
    fresh = app_with_clock(rt)
    assert fresh.get(f"{back.path}?{back.query}", follow_redirects=False).status_code == 401
    assert failures(rt) == ["state mismatch", "no sign-in in progress (cookie missing or expired)"]
    rt.close()
