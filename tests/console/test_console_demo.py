"""The demo contract, as an independent check uses it: ``dermgate demo --ui --ui-port PORT``
processes the samples, prints ``console: URL`` and ``login: NAME PASSWORD`` lines, serves the
console on 127.0.0.1 until SIGTERM; the sign-in form's inputs are ``username`` and ``password``;
``/worklist`` links every result to its case page; ``/audit?patient=ID`` lists that patient's events."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

import pytest

from tests.integration.fhir.peer import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(1800)      # the demo classifies 9 images first; shared CI machines can be slow
def test_demo_ui_serves_the_console_with_the_printed_accounts_until_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dermgate.cli", "demo", "--ui", "--ui-port", str(port),
                             "--workdir", str(tmp_path / "demo")], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    out: list[str] = []
    assert proc.stdout is not None
    # Lines are read by a thread: select() on a buffered pipe misses lines already in the buffer.
    def pump() -> None:
        for line in iter(proc.stdout.readline, ""):  # type: ignore[union-attr]
            out.append(line)
    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + 1200
        while sum(line.startswith("login: ") for line in list(out)) < 3 and time.monotonic() < deadline:
            assert proc.poll() is None, "".join(out)[-3000:]
            time.sleep(0.5)
        text = "".join(out)
        assert f"console: http://127.0.0.1:{port}/\n" in text, text[-2000:]
        logins = dict(re.findall(r"^login: (\S+) (\S+)$", text, re.M))
        assert set(logins) == {"clinician", "compliance", "operator"}
        base = f"http://127.0.0.1:{port}"

        def sign_in(name: str) -> httpx.Client:
            c = httpx.Client(base_url=base, timeout=120)
            form = c.get("/login").text
            assert 'name="username"' in form and 'name="password"' in form
            token = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)   # type: ignore[union-attr]
            r = c.post("/login", data={"username": name, "password": logins[name], "csrf_token": token})
            assert r.status_code == 303, r.text[:500]
            return c

        clinician = sign_in("clinician")
        worklist = clinician.get("/worklist").text
        cases = re.findall(r'href="/case/(\d+)"', worklist)
        assert len(cases) == 9
        assert clinician.get(f"/case/{cases[0]}").status_code == 200
        patients = re.findall(r'class="case-link" href="/case/\d+">([^<]+)<', worklist)
        compliance = sign_in("compliance")
        audit = compliance.get("/audit", params={"patient": patients[0]}).text
        rows = re.findall(r'<tr class="outcome-', audit)
        assert len(rows) >= 3 and "dicom.store" in audit and "api.access" in audit
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0
