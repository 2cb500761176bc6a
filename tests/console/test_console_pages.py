"""Console pages on both databases: worklist order, filters, paging and counts; every view
audited with user, role and purpose; a review through the console is the API's review (same
outbox, same FHIR update); the IT page's dead-letter actions are audited."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from audit.api import EventType
from dermgate.api.main import create_app
from dermgate.db import JobState, OutboxItem, OutboxState, Review
from dermgate.results import WorklistFilter, worklist
from tests.console.conftest import PASSWORD, accounts, csrf_of, make_runtime, result, seed, sign_in

CASE_LINK = re.compile(r'href="/case/(\d+)"')


def rt_on(tmp_path: Path, db_url: str) -> Any:
    rt = make_runtime(tmp_path / "work", db_url, page_size=3)
    accounts(rt).add("dr.derm", "clinician", PASSWORD, display_name="Dr. Derm",
                     practitioner_reference="Practitioner/p-7")
    return rt


def test_worklist_puts_awaiting_high_risk_and_low_confidence_first_with_counts_filters_and_pages(
        tmp_path: Path, database_url: str) -> None:
    rt = rt_on(tmp_path, database_url)
    low = seed(rt, 1, patient="P-LOW", res=result("Low"), minutes_ago=1)[0]
    high = seed(rt, 1, patient="P-HIGH", accession="ACC-H", res=result("High", top="mel", p_mal=0.8),
                minutes_ago=30)[0]
    lowconf = seed(rt, 1, patient="P-LC", res=result("Medium", low_confidence=True), minutes_ago=20)[0]
    medium = seed(rt, 1, patient="P-MED", res=result("Medium"), minutes_ago=2)[0]
    na = seed(rt, 1, patient="P-NA", ae="SCOPE-2", res=result("Not assessable", assessable=False))[0]
    busy = seed(rt, 1, patient="P-BUSY", state=JobState.RECEIVED)[0]
    failed = seed(rt, 1, patient="P-FAIL", state=JobState.FAILED)[0]
    reviewed = seed(rt, 1, patient="P-HIGH", res=result("High"), minutes_ago=5)[0]
    with rt.sessions.begin() as s:
        s.add(Review(job_id=reviewed, reviewer="Dr. Derm", decision="confirm"))
    page = worklist(rt.sessions, page_size=50)
    assert [r.job_id for r in page.rows] == [high, na, lowconf, medium, low, busy, failed, reviewed]
    assert page.counts == {"awaiting review": 5, "reviewed": 1, "processing": 1, "failed": 1}
    assert [r.job_id for r in worklist(rt.sessions, WorklistFilter(patient_id="P-HIGH")).rows] == [high, reviewed]
    assert [r.job_id for r in worklist(rt.sessions, WorklistFilter(accession_number="ACC-H")).rows] == [high]
    assert [r.job_id for r in worklist(rt.sessions, WorklistFilter(risk="High", state="awaiting review")).rows] == [high]
    assert [r.job_id for r in worklist(rt.sessions, WorklistFilter(device="SCOPE-2")).rows] == [na]
    assert [r.job_id for r in worklist(rt.sessions, WorklistFilter(not_assessable=True)).rows] == [na]
    assert [r.job_id for r in worklist(rt.sessions, WorklistFilter(low_confidence=True)).rows] == [lowconf]
    assert worklist(rt.sessions, WorklistFilter(state="reviewed")).rows[0].decision == "confirm"

    client = TestClient(create_app(rt, check_model=False))
    assert sign_in(client, "dr.derm").status_code == 303
    first = client.get("/worklist")
    assert [int(x) for x in CASE_LINK.findall(first.text)] == [high, na, lowconf]   # page size 3
    second = client.get("/worklist?page=2")
    assert [int(x) for x in CASE_LINK.findall(second.text)] == [medium, low, busy]
    # search by patient: posted, kept in the session, never in the URL
    r = client.post("/worklist", data={"csrf_token": csrf_of(client, "/worklist"), "patient_id": "P-HIGH"},
                    follow_redirects=False)
    assert r.headers["location"] == "/worklist"
    assert [int(x) for x in CASE_LINK.findall(client.get("/worklist").text)] == [high, reviewed]
    views = [r.event for r in rt.audit.events() if r.event.event is EventType.API_ACCESS]
    assert all(v.actor == "dr.derm" and v.actor_role == "clinician" and v.purpose == "TREAT" for v in views)
    assert views[0].detail["patients"] == sorted(["P-HIGH", "P-NA", "P-LC"])
    assert views[-1].patient_id == "P-HIGH"
    rt.close()


def test_review_from_the_console_goes_through_the_api_core_with_the_practitioner(tmp_path: Path) -> None:
    rt = rt_on(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    (job,) = seed(rt, 1, patient="P-9", res=result("High", top="mel", p_mal=0.9))
    client = TestClient(create_app(rt, check_model=False))
    assert sign_in(client, "dr.derm").status_code == 303
    page = client.get(f"/case/{job}")
    assert page.status_code == 200 and "Melanoma" in page.text and "P-9" in page.text
    assert page.headers["cache-control"] == "no-store"
    token = csrf_of(client, f"/case/{job}")
    r = client.post(f"/case/{job}/review", data={"csrf_token": token, "decision": "override"})
    assert "Review not recorded" in r.text                                    # an override needs a diagnosis
    r = client.post(f"/case/{job}/review", data={"csrf_token": token, "decision": "override", "diagnosis": "bcc",
                                                  "comment": "pearly border"})
    assert r.status_code == 200 and "Overridden" in r.text and "Basal cell carcinoma" in r.text
    assert "pearly border" in r.text
    with rt.sessions() as s:
        (review,) = s.scalars(select(Review))
        (item,) = s.scalars(select(OutboxItem).where(OutboxItem.kind == "review"))
    assert (review.reviewer, review.decision, review.diagnosis, review.reviewer_reference) == (
        "Dr. Derm", "override", "bcc", "Practitioner/p-7")
    assert item.business_key.endswith(f":review:{review.id}") and item.channel == "fhir-file"
    assert "Practitioner/p-7" in str(item.payload)
    (audited,) = [r.event for r in rt.audit.events() if r.event.event is EventType.REVIEW]
    assert audited.detail["via"] == "console" and audited.detail["diagnosis"] == "bcc"
    assert audited.actor == "dr.derm"                       # the account; the report shows "Dr. Derm"
    rt.close()


def test_ops_page_retries_and_purges_dead_letters_audited(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path / "work")
    accounts(rt).add("it.ops", "operator", PASSWORD)
    (job,) = seed(rt, 1)
    with rt.sessions.begin() as s:
        for i in range(3):
            s.add(OutboxItem(job_id=job, channel="fhir", business_key=f"k{i}", kind="report", payload={},
                             state=OutboxState.DEAD, attempts=5, last_error="HTTP 422"))
    client = TestClient(create_app(rt, check_model=False))
    assert sign_in(client, "it.ops").status_code == 303
    page = client.get("/ops")
    assert page.status_code == 200 and "Dead letters (3)" in page.text and "HTTP 422" in page.text
    assert "Readiness" in page.text and "database" in page.text
    with rt.sessions() as s:
        ids = list(s.scalars(select(OutboxItem.id).order_by(OutboxItem.id)))
    token = csrf_of(client, "/ops")
    client.post("/ops/outbox/retry", data={"csrf_token": token, "id": [str(ids[0])]})
    client.post("/ops/outbox/purge", data={"csrf_token": token, "id": [str(ids[1])]})
    with rt.sessions() as s:
        states = dict(s.execute(select(OutboxItem.id, OutboxItem.state)).all())
    assert states == {ids[0]: OutboxState.PENDING, ids[2]: OutboxState.DEAD}
    admin = [r.event for r in rt.audit.events() if r.event.event is EventType.JOB_ADMIN]
    assert [(e.actor, e.detail["outbox"]) for e in admin] == [("it.ops", "retry"), ("it.ops", "purge-dead")]
    rt.close()
