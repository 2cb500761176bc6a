"""Console sign-in and sessions: local accounts (Argon2id, lockout, TOTP), cookies, CSRF,
idle and absolute timeouts, every sign-in event audited; the CLI that manages the accounts."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyotp
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from audit.api import EventType, Outcome
from dermgate.api.main import create_app
from dermgate.cli import main as cli
from dermgate.db import Account, ConsoleSession, utcnow
from tests.console.conftest import PASSWORD, accounts, csrf_of, make_runtime, sign_in


def events(rt: Any, kind: EventType) -> list[Any]:
    return [r.event for r in rt.audit.events() if r.event.event is kind]


def test_password_is_stored_as_argon2id_and_sign_in_is_audited(console_rt: Any, client_for: Any) -> None:
    with console_rt.sessions() as s:
        stored = s.scalar(select(Account.password_hash).where(Account.username == "dr.derm"))
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    client = client_for()
    r = sign_in(client, "dr.derm")
    assert r.status_code == 303 and r.headers["location"] == "/worklist"
    cookie = r.headers["set-cookie"]
    assert "dermgate_session=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert "Secure" not in cookie                      # plain HTTP on loopback (the demo)
    (login,) = events(console_rt, EventType.LOGIN)
    assert login.actor == "dr.derm" and login.actor_role == "clinician" and login.detail["auth"] == "local"
    assert client.get("/worklist").status_code == 200
    r = client.post("/logout", data={"csrf_token": csrf_of(client, "/worklist")}, follow_redirects=False)
    assert r.status_code == 303
    assert client.get("/worklist", follow_redirects=False).headers["location"] == "/login"
    (logout,) = events(console_rt, EventType.LOGOUT)
    assert logout.detail["reason"] == "sign-out"


def test_under_tls_the_cookie_is_secure_host_prefixed_and_hsts_is_sent(client_for: Any) -> None:
    client = client_for(base_url="https://testserver")
    r = sign_in(client, "dr.derm")
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("__Host-dermgate_session=") and "Secure" in cookie and "Path=/" in cookie
    page = client.get("/worklist")
    assert page.status_code == 200 and "max-age=" in page.headers["strict-transport-security"]


def test_wrong_passwords_lock_the_account_and_each_failure_is_audited(console_rt: Any, client_for: Any) -> None:
    client = client_for()
    threshold = console_rt.settings.console.lockout_threshold
    for _ in range(threshold):
        assert sign_in(client, "dr.derm", "wrong password!").status_code == 401
    # locked now: even the right password fails, with the same message
    r = sign_in(client, "dr.derm")
    assert r.status_code == 401 and "Sign-in failed" in r.text
    failures = events(console_rt, EventType.AUTH_FAILURE)
    reasons = [e.detail["reason"] for e in failures]
    assert reasons.count("wrong password") == threshold - 1
    assert any("locked after" in x for x in reasons) and reasons[-1] == "account locked"
    assert any(e.outcome is Outcome.SERIOUS_FAILURE for e in failures)
    # unknown users and disabled accounts fail the same way
    assert sign_in(client, "nobody").status_code == 401
    accounts(console_rt).set_disabled("it.ops", True)
    assert sign_in(client, "it.ops").status_code == 401
    assert {"unknown user", "account disabled"} <= {e.detail["reason"] for e in events(console_rt, EventType.AUTH_FAILURE)}


def test_lock_expires_and_reset_unlocks(console_rt: Any) -> None:
    acc = accounts(console_rt)
    for _ in range(console_rt.settings.console.lockout_threshold):
        acc.authenticate("dr.derm", "nope nope nope")
    assert acc.authenticate("dr.derm", PASSWORD)[1] == "locked"
    later = utcnow() + timedelta(seconds=console_rt.settings.console.lockout_s + 1)
    assert acc.authenticate("dr.derm", PASSWORD, now=later)[1] == "ok"


def test_totp_is_required_once_enrolled(console_rt: Any, client_for: Any) -> None:
    secret = accounts(console_rt).reset("dr.derm", PASSWORD, totp=True)
    assert secret
    with console_rt.sessions() as s:
        sealed = s.scalar(select(Account.totp_secret).where(Account.username == "dr.derm"))
    assert secret not in sealed                          # kept encrypted
    client = client_for()
    assert sign_in(client, "dr.derm").status_code == 401
    assert sign_in(client, "dr.derm", otp="000000").status_code == 401
    assert sign_in(client, "dr.derm", otp=pyotp.TOTP(secret).now()).status_code == 303


def test_every_form_needs_the_session_csrf_token(console_rt: Any, client_for: Any) -> None:
    client = client_for()
    page = client.get("/login")
    assert page.status_code == 200
    r = client.post("/login", data={"username": "dr.derm", "password": PASSWORD, "csrf_token": "forged"})
    assert r.status_code == 400
    client = client_for("dr.derm")
    assert client.post("/worklist", data={"csrf_token": "forged", "state": "reviewed"}).status_code == 403
    assert client.post("/logout", data={"csrf_token": ""}).status_code == 403
    (job,) = __import__("tests.console.conftest", fromlist=["seed"]).seed(console_rt)
    assert client.post(f"/case/{job}/review", data={"decision": "confirm"}).status_code == 403


def test_idle_timeout_signs_out_and_is_audited(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path / "w", idle_timeout_s=1)
    accounts(rt).add("dr.derm", "clinician", PASSWORD)
    client = TestClient(create_app(rt, check_model=False))
    assert sign_in(client, "dr.derm").status_code == 303
    page = client.get("/worklist")
    assert 'data-idle-timeout="1"' in page.text and 'src="/static/console.js"' in page.text
    time.sleep(1.2)
    r = client.get("/worklist", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?reason=idle"
    assert "without activity" in client.get("/login?reason=idle").text
    (logout,) = [r.event for r in rt.audit.events() if r.event.event is EventType.LOGOUT]
    assert logout.detail["reason"] == "idle timeout" and logout.actor == "dr.derm"
    with rt.sessions() as s:
        assert s.scalar(select(ConsoleSession.end_reason)) == "idle"
    rt.close()


def test_absolute_lifetime_ends_a_busy_session(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path / "w", absolute_lifetime_s=1)
    accounts(rt).add("dr.derm", "clinician", PASSWORD)
    client = TestClient(create_app(rt, check_model=False))
    assert sign_in(client, "dr.derm").status_code == 303
    for _ in range(2):                                  # busy: never idle for long
        assert client.get("/worklist").status_code == 200
        time.sleep(0.35)
    time.sleep(0.4)
    assert client.get("/worklist", follow_redirects=False).headers["location"] == "/login?reason=idle"
    assert [r.event.detail["reason"] for r in rt.audit.events()
            if r.event.event is EventType.LOGOUT] == ["session lifetime reached"]
    rt.close()


def test_roles_open_only_their_pages_and_refusals_are_audited(console_rt: Any, client_for: Any) -> None:
    expect = {"dr.derm": {"/worklist": 200, "/audit": 403, "/ops": 403},
              "pat.privacy": {"/worklist": 403, "/audit": 200, "/ops": 403},
              "it.ops": {"/worklist": 403, "/audit": 403, "/ops": 200},
              "ad.min": {"/worklist": 200, "/audit": 200, "/ops": 200}}
    for user, pages in expect.items():
        client = client_for(user)
        for path, code in pages.items():
            assert client.get(path).status_code == code, (user, path)
    refused = [e for e in events(console_rt, EventType.AUTH_FAILURE) if "not allowed" in e.detail["reason"]]
    assert len(refused) == 6
    assert client_for().get("/worklist", follow_redirects=False).headers["location"] == "/login"


def test_pages_carry_a_strict_csp_and_no_store(console_rt: Any, client_for: Any) -> None:
    client = client_for("dr.derm")
    for path in ("/login", "/worklist", "/model-card"):
        h = client.get(path).headers
        assert "'unsafe-inline'" not in h["content-security-policy"]
        assert "frame-ancestors 'none'" in h["content-security-policy"]
        assert "script-src 'self'" in h["content-security-policy"]
        assert h["cache-control"] == "no-store" and h["x-frame-options"] == "DENY"
    # the JSON API gets the API's own CSP (dermgate/api/security.py: nothing may load), not the console's
    assert client.get("/healthz").headers["content-security-policy"].startswith("default-src 'none'")
    static = client.get("/static/console.js")
    assert static.status_code == 200 and "no-store" not in static.headers["cache-control"]


def test_user_command_adds_lists_disables_and_resets(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    wd = str(tmp_path / "w")
    monkeypatch.setenv("DERMGATE_WORKDIR", wd)   # the CLI sets it in-process: restored after this test
    assert cli(["migrate", "--workdir", wd]) == 0  # accounts go into an existing work dir (only migrate/serve/demo make one)
    assert cli(["user", "add", "dr.new", "--role", "clinician", "--workdir", wd, "--practitioner",
                "Practitioner/9"]) == 0
    out = capsys.readouterr().out
    password = out.split("password for dr.new: ")[1].split()[0]
    assert cli(["user", "list", "--workdir", wd]) == 0
    listed = capsys.readouterr().out
    assert "dr.new" in listed and "clinician" in listed and "Practitioner/9" in listed and password not in listed
    assert cli(["user", "add", "dr.new", "--workdir", wd]) == 1
    assert cli(["user", "disable", "dr.new", "--workdir", wd]) == 0
    assert "disabled" in (capsys.readouterr(), cli(["user", "list", "--workdir", wd]), capsys.readouterr().out)[2]
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("a brand new passphrase\n"))
    assert cli(["user", "reset", "dr.new", "--password-stdin", "--totp", "--workdir", wd]) == 0
    assert "TOTP secret for dr.new" in capsys.readouterr().out
    assert cli(["user", "enable", "dr.new", "--workdir", wd]) == 0
    from dermgate.app import Runtime
    from dermgate.settings import Settings
    rt = Runtime(Settings(workdir=Path(wd)))
    acc = accounts(rt)
    assert acc.authenticate("dr.new", "a brand new passphrase")[1] == "otp-required"
    kinds = [r.event.detail["user_admin"] for r in rt.audit.events() if r.event.event is EventType.USER_ADMIN]
    assert kinds == ["add", "disable", "reset", "enable"]
    rt.close()
