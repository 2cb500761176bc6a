"""Issue 12: the CLI records an authenticated identity (the OS user, or an API token's holder), never a typed name.

``dermgate review --reviewer dr.smith`` and ``dermgate audit search --as ann.comp --role compliance`` used
to record whoever the caller typed. Run as an operator would: the real command in a subprocess, on a
real work dir (SQLite, audit trail, tokens file).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from audit.api import EventType
from dermgate.app import Runtime, open_audit
from dermgate.db import Instance, Job, JobState, Review
from audit.identity import os_user
from dermgate.settings import Settings

SOP_UID = "1.2.826.0.1.3680043.8.498.120001"


def dermgate(*args: str, work: Path, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DERMGATE_")}
    if token:
        env["DERMGATE_API_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "dermgate.cli", *args, "--workdir", str(work)], text=True,
                          capture_output=True, timeout=120, env=env, cwd=work)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A work dir with one classified image, ready for review."""
    work = tmp_path / "work"
    rt = Runtime(Settings(workdir=work))
    with rt.sessions.begin() as s:
        inst = Instance(sop_instance_uid=SOP_UID, sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.7",
                        study_instance_uid=SOP_UID + ".1", series_instance_uid=SOP_UID + ".2", patient_id="PAT-ID-1",
                        calling_ae="SCOPE", transfer_syntax_uid="1.2.840.10008.1.2.4.50", sha256="0" * 64,
                        size=1, path="objects/00/x.dcm")
        s.add(inst)
        s.flush()
        s.add(Job(instance_id=inst.id, state=JobState.RENDERED, correlation_id="c1",
                  result={"top_class": "nv", "risk": "low"}))
    rt.close()
    return work


def token_for(work: Path, name: str, role: str) -> str:
    run = dermgate("api-token", "add", "--name", name, "--role", role, work=work)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def events(work: Path, kind: EventType) -> list:
    audit = open_audit(Settings(workdir=work))
    try:
        return [r.event for r in audit.events() if r.event.event is kind]
    finally:
        audit.close()


def reviewers(work: Path) -> list[str]:
    rt = Runtime(Settings(workdir=work), create=False)
    with rt.sessions() as s:
        names = list(s.scalars(select(Review.reviewer).order_by(Review.id)))
    rt.close()
    return names


def test_review_records_the_os_user_and_refuses_a_typed_reviewer_without_their_token(work: Path) -> None:
    typed = dermgate("review", SOP_UID, "--reviewer", "dr.smith", "--confirm", work=work)
    assert typed.returncode == 2 and "DERMGATE_API_TOKEN" in typed.stderr
    assert reviewers(work) == []                                   # nothing recorded under the typed name
    plain = dermgate("review", SOP_UID, "--confirm", work=work)
    assert plain.returncode == 0, plain.stderr
    assert reviewers(work) == [f"os:{os_user()}"]
    [review] = events(work, EventType.REVIEW)
    assert review.actor == f"os:{os_user()}" and review.actor_role is None


def test_review_with_a_clinicians_token_records_that_clinician_and_no_one_else(work: Path) -> None:
    smith = token_for(work, "dr.smith", "clinician")
    assert dermgate("review", SOP_UID, "--reviewer", "dr.jones", "--confirm", work=work, token=smith).returncode == 2
    ok = dermgate("review", SOP_UID, "--reviewer", "dr.smith", "--override", "mel", work=work, token=smith)
    assert ok.returncode == 0, ok.stderr
    assert reviewers(work) == ["dr.smith"]
    [review] = events(work, EventType.REVIEW)
    assert review.actor == "dr.smith" and review.actor_role == "clinician"
    operator = token_for(work, "op.kim", "operator")
    refused = dermgate("review", SOP_UID, "--confirm", work=work, token=operator)
    assert refused.returncode == 2 and "only a clinician" in refused.stderr
    assert dermgate("review", SOP_UID, "--confirm", work=work, token="not-a-token").returncode == 2


def test_audit_search_cannot_claim_another_person_or_role(work: Path) -> None:
    typed = dermgate("audit", "search", "--as", "ann.comp", "--role", "compliance", work=work)
    assert typed.returncode == 2 and "ann.comp" in typed.stderr
    role_only = dermgate("audit", "search", "--role", "compliance", work=work)
    assert role_only.returncode == 2
    mine = dermgate("audit", "search", work=work)
    assert mine.returncode == 0, mine.stderr
    ann = token_for(work, "ann.comp", "compliance")
    assert dermgate("audit", "search", "--as", "bob", work=work, token=ann).returncode == 2
    proved = dermgate("audit", "search", "--as", "ann.comp", "--role", "compliance", work=work, token=ann)
    assert proved.returncode == 0, proved.stderr
    queries = events(work, EventType.AUDIT_QUERY)
    assert [(q.actor, q.actor_role) for q in queries] == [(f"os:{os_user()}", None), ("ann.comp", "compliance")]


def test_operator_commands_record_the_os_user_not_a_typed_user(work: Path) -> None:
    assert dermgate("jobs", "retry", "--user", "someone.else", work=work).returncode == 2
    assert dermgate("jobs", "retry", work=work).returncode == 0
    [admin] = events(work, EventType.JOB_ADMIN)
    assert admin.actor == f"os:{os_user()}"
