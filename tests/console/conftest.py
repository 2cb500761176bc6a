"""Console fixtures: a runtime on a fresh work dir (SQLite or PostgreSQL), results seeded
straight into the database (no model needed), a signed-in TestClient."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from dermgate.api.main import create_app
from dermgate.app import Runtime
from dermgate.console.accounts import Accounts, console_key
from dermgate.db import Instance, Job, JobState, utcnow
from dermgate.settings import ConsoleSettings, Settings

PASSWORD = "correct horse battery"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def make_runtime(workdir: Path, database_url: str | None = None, **console: Any) -> Runtime:
    settings = Settings(workdir=workdir, database_url=database_url, console=ConsoleSettings(**console),
                        fhir_bundle_dir=workdir / "fhir-bundles")
    return Runtime(settings)


def accounts(rt: Runtime) -> Accounts:
    return Accounts(rt.sessions, rt.settings.console, console_key(rt.settings.workdir))


def result(risk: str = "Medium", *, top: str = "nv", p_mal: float = 0.2, low_confidence: bool = False,
           assessable: bool = True) -> dict[str, Any]:
    probs = {c: 0.01 for c in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")}
    probs[top] = 1 - 0.06
    return {"probabilities": probs, "malignancy_probability": p_mal, "risk": risk, "uncertainty": 0.3,
            "low_confidence": low_confidence, "assessable": assessable,
            "reason": None if assessable else "image too dark", "top_class": top,
            "model": {"manufacturer": "dermgate project", "name": "dermgate-lite0", "version": "1.1.0",
                      "sha256": "0" * 64, "device_uid": "2.25.1"}}


def seed(rt: Runtime, n: int = 1, *, patient: str = "PAT-1", accession: str | None = None, ae: str = "SCOPE-1",
         state: JobState = JobState.DELIVERED, res: dict[str, Any] | None = None, minutes_ago: int = 0
         ) -> list[int]:
    """Insert ``n`` received images with their jobs; returns the job ids."""
    ids = []
    with rt.sessions.begin() as s:
        for _ in range(n):
            uid = f"2.25.{uuid.uuid4().int}"
            inst = Instance(sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.7",
                            study_instance_uid=uid + ".1", series_instance_uid=uid + ".2",
                            patient_id=patient, issuer_of_patient_id="TESTHOSP", accession_number=accession,
                            study_date="20260101", calling_ae=ae, transfer_syntax_uid="1.2.840.10008.1.2.4.50",
                            sha256="0" * 64, size=1, path="objects/none.dcm",
                            received_at=utcnow() - timedelta(minutes=minutes_ago))
            when = inst.received_at
            s.add(inst)
            s.flush()
            job = Job(instance_id=inst.id, state=state, correlation_id="c" * 32,
                      result=None if state in (JobState.RECEIVED,) else (res or result()),
                      outputs=None, attempts=0, created_at=when)
            s.add(job)
            s.flush()
            ids.append(job.id)
    return ids


def sign_in(client: TestClient, username: str, password: str = PASSWORD, otp: str = "") -> Any:
    page = client.get("/login")
    token = CSRF.search(page.text).group(1)
    return client.post("/login", data={"username": username, "password": password, "otp": otp,
                                       "csrf_token": token}, follow_redirects=False)


def csrf_of(client: TestClient, path: str) -> str:
    return CSRF.search(client.get(path).text).group(1)


@pytest.fixture
def console_rt(tmp_path: Path) -> Iterator[Runtime]:
    rt = make_runtime(tmp_path / "work")
    acc = accounts(rt)
    for name, role in (("dr.derm", "clinician"), ("pat.privacy", "compliance"), ("it.ops", "operator"),
                       ("ad.min", "admin")):
        acc.add(name, role, PASSWORD, display_name=name.title(),
                practitioner_reference="Practitioner/p-1" if role == "clinician" else None)
    yield rt
    rt.close()


@pytest.fixture
def client_for(console_rt: Runtime) -> Callable[..., TestClient]:
    """``client_for(username)``: a TestClient signed in as that account."""
    def make(username: str | None = None, base_url: str = "http://testserver") -> TestClient:
        client = TestClient(create_app(console_rt, check_model=False), base_url=base_url)
        if username:
            r = sign_in(client, username)
            assert r.status_code == 303, r.text
        return client
    return make
