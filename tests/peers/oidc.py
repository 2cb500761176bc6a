"""A real OpenID Connect provider on loopback: ``tests/peers/oidc_provider/provider.mjs``
(the npm package ``oidc-provider``, a certified OpenID Provider implementation).

It needs ``npm ci --prefix tests/peers/oidc_provider`` once (``scripts/test.sh`` does it);
without it the tests skip, except under CI (``CI=true``), where that is a failure.

- ``oidc_provider`` (session fixture): the running provider (``OidcTestProvider``).
- ``OidcTestProvider.register(redirect_uri)``: a new confidential client (RFC 7591 registration).
- ``sign_in_at_provider(...)``: what a browser does at the provider (for tests without one).
Accounts (password ``PASSWORD``): ``dr.oidc`` (groups derm-clinicians, staff; Practitioner/prac-oidc-1),
``privacy.oidc`` (privacy-office), ``it.oidc`` (it-ops), ``visitor.oidc`` (visitors: no dermgate role).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.peers.process import stop

PROVIDER_DIR = Path(__file__).resolve().parent / "oidc_provider"
NODE_MODULES = PROVIDER_DIR / "node_modules"
AXE_JS = NODE_MODULES / "axe-core" / "axe.min.js"
PASSWORD = "oidc-test-password"
ROLE_MAP = {"derm-clinicians": "clinician", "privacy-office": "compliance", "it-ops": "operator"}
NPM_HINT = "npm ci --prefix tests/peers/oidc_provider"


def require_node_packages() -> None:
    problem = None
    if shutil.which("node") is None:
        problem = "node is not installed"
    elif not (NODE_MODULES / "oidc-provider").is_dir():
        problem = f"the OpenID provider's packages are missing: run `{NPM_HINT}`"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)


@dataclass
class OidcTestProvider:
    issuer: str
    process: subprocess.Popen[bytes]

    def register(self, redirect_uri: str) -> tuple[str, str]:
        """(client_id, client_secret) of a new web client for ``redirect_uri``."""
        r = httpx.post(f"{self.issuer}/reg", json={
            "redirect_uris": [redirect_uri], "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": ["authorization_code"], "response_types": ["code"]}, timeout=10.0)
        r.raise_for_status()
        body = r.json()
        return body["client_id"], body["client_secret"]


@contextlib.contextmanager
def start_oidc_provider(env: dict[str, str] | None = None) -> Iterator[OidcTestProvider]:
    require_node_packages()
    proc = subprocess.Popen(["node", str(PROVIDER_DIR / "provider.mjs")], cwd=PROVIDER_DIR,
                            env={**os.environ, "PORT": "0", **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 60
        issuer = None
        while issuer is None and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"OpenID provider exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
            if sel.select(timeout=0.2):
                line = proc.stdout.readline()
                if line:
                    issuer = json.loads(line)["issuer"]
        if issuer is None:
            raise RuntimeError("OpenID provider did not start")
        yield OidcTestProvider(issuer, proc)
    finally:
        stop(proc, timeout=10)


@pytest.fixture(scope="session")
def oidc_provider() -> Iterator[OidcTestProvider]:
    with start_oidc_provider() as provider:
        yield provider


def sign_in_at_provider(authorization_url: str, login: str, password: str = PASSWORD) -> str:
    """Play the browser at the provider: open the authorization URL, post the sign-in form,
    follow the provider's redirects; returns the URL it finally sends the browser to (the callback)."""
    with httpx.Client(follow_redirects=False, timeout=10.0) as browser:
        url = authorization_url
        for _ in range(10):
            r = browser.get(url)
            if r.status_code in (302, 303) and "/interaction/" in r.headers["location"]:
                url = str(r.url.join(r.headers["location"]))
                continue
            if r.status_code == 200 and "/interaction/" in str(r.url):
                r = browser.post(f"{r.url}/login", data={"login": login, "password": password})
                while r.status_code in (302, 303):
                    target = str(r.url.join(r.headers["location"]))
                    if not target.startswith(str(r.url.copy_with(path="/", query=None, fragment=None))):
                        return target
                    r = browser.get(target)
                raise AssertionError(f"provider answered {r.status_code}: {r.text[:300]}")
            if r.status_code in (302, 303):
                return str(r.url.join(r.headers["location"]))
            raise AssertionError(f"provider answered {r.status_code}: {r.text[:300]}")
    raise AssertionError("too many redirects at the provider")
