"""Intake durability and leased queues, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import threading
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from dermgate.db import Instance, Job, JobState, utcnow
from dermgate.intake import Intake, IntakeStatus
from dermgate.queue import backoff, claim, fenced_update, owner_id, release_dead_owners
from dermgate.records import ImageRef
from dermgate.store import ObjectStore


def image(sop: str) -> ImageRef:
    return ImageRef(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.7",
                    study_instance_uid="1.2.3", series_instance_uid="1.2.3.4", patient_id="P1",
                    issuer_of_patient_id=None, accession_number=None, study_date="20260101", study_time=None,
                    modality="DMS", body_site=None, calling_ae="SCOPE")


def test_accepted_object_is_on_disk_with_its_row_and_job(sessions: sessionmaker, store: ObjectStore) -> None:
    res = Intake(store, sessions).accept(b"object-bytes", image("1.1"), "1.2.840.10008.1.2.4.50")
    assert res.status is IntakeStatus.ACCEPTED
    with sessions() as s:
        inst = s.scalar(select(Instance))
        job = s.scalar(select(Job))
    assert store.read(inst.path) == b"object-bytes"
    assert inst.sha256 == hashlib.sha256(b"object-bytes").hexdigest() == res.sha256
    assert job.instance_id == inst.id and job.state is JobState.RECEIVED


def test_resent_identical_object_is_a_duplicate_not_a_second_job(sessions: sessionmaker, store: ObjectStore) -> None:
    intake = Intake(store, sessions)
    first = intake.accept(b"same", image("1.2"), "1.2.840.10008.1.2.1")
    again = intake.accept(b"same", image("1.2"), "1.2.840.10008.1.2.1")
    assert again.status is IntakeStatus.DUPLICATE and again.job_id == first.job_id
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 1


def test_different_content_under_a_used_uid_is_refused_and_first_kept(sessions: sessionmaker,
                                                                       store: ObjectStore) -> None:
    intake = Intake(store, sessions)
    intake.accept(b"first", image("1.3"), "1.2.840.10008.1.2.1")
    res = intake.accept(b"second", image("1.3"), "1.2.840.10008.1.2.1")
    assert res.status is IntakeStatus.CONFLICT
    with sessions() as s:
        inst = s.scalar(select(Instance))
    assert store.read(inst.path) == b"first"


def test_concurrent_workers_claim_each_job_exactly_once(sessions: sessionmaker, store: ObjectStore) -> None:
    intake = Intake(store, sessions)
    for i in range(60):
        intake.accept(f"obj{i}".encode(), image(f"2.{i}"), "1.2.840.10008.1.2.1")
    done: list[int] = []
    lock = threading.Lock()

    def work(owner: str) -> None:
        while True:
            with sessions.begin() as s:
                jobs = claim(s, Job, (JobState.RECEIVED,), owner, 60, limit=3)
                ids = [j.id for j in jobs]
            if not ids:
                return
            for jid in ids:
                with sessions.begin() as s:
                    assert fenced_update(s, Job, jid, owner, state=JobState.DELIVERED, lease_owner=None)
                with lock:
                    done.append(jid)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(done) == sorted(set(done)) and len(done) == 60


def test_expired_lease_is_taken_over_and_the_old_owner_cannot_complete(sessions: sessionmaker,
                                                                        store: ObjectStore) -> None:
    Intake(store, sessions).accept(b"x", image("3.1"), "1.2.840.10008.1.2.1")
    with sessions.begin() as s:
        (job,) = claim(s, Job, (JobState.RECEIVED,), "dead-worker", 30)
    with sessions.begin() as s:   # lease still valid: nobody else gets it
        assert claim(s, Job, (JobState.RECEIVED,), "other", 30) == []
    later = utcnow() + timedelta(seconds=31)
    with sessions.begin() as s:
        (again,) = claim(s, Job, (JobState.RECEIVED,), "other", 30, now=later)
    assert again.id == job.id
    with sessions.begin() as s:
        assert not fenced_update(s, Job, job.id, "dead-worker", state=JobState.DELIVERED)
        assert fenced_update(s, Job, job.id, "other", state=JobState.DELIVERED)


def test_leases_of_dead_processes_of_this_host_are_released_and_no_others(sessions: sessionmaker,
                                                                            store: ObjectStore) -> None:
    """A restarted worker takes over at once what a process of its host that is gone held; a live
    process's leases, another host's and unparseable owners wait for their leases to expire."""
    import os
    import subprocess
    import sys

    import dermgate.queue as queue
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = queue.host_tag()
    owners = {
        "gone": f"worker@{host}:{gone.pid}:abcdef01:00000001",
        "same pid, earlier process": f"worker@{host}:{os.getpid()}:0badf00d:00000002",
        "alive": f"worker@{host}:{alive.pid}:abcdef01:00000003",
        "this process": owner_id("worker"),
        "other host": f"worker@elsewhere-9:{gone.pid}:abcdef01:00000004",
        "old format": "worker-0123456789ab",
    }
    try:
        intake = Intake(store, sessions)
        for i, owner in enumerate(owners.values()):
            intake.accept(f"obj-{i}".encode(), image(f"4.{i}"), "1.2.840.10008.1.2.1")
            with sessions.begin() as s:
                (job,) = claim(s, Job, (JobState.RECEIVED,), owner, 120)
        with sessions.begin() as s:
            released = release_dead_owners(s, Job)
        assert sorted(released) == sorted([owners["gone"], owners["same pid, earlier process"]])
        with sessions() as s:
            held = set(s.scalars(select(Job.lease_owner).where(Job.lease_owner.is_not(None))))
        assert held == {owners[k] for k in ("alive", "this process", "other host", "old format")}
        with sessions.begin() as s:       # the released jobs are claimable now, not in 120 s
            assert len(claim(s, Job, (JobState.RECEIVED,), owner_id("worker"), 120, 10)) == 2
    finally:
        alive.kill()
        alive.wait()


def test_backoff_grows_exponentially_and_is_capped() -> None:
    import random
    rng = random.Random(1)
    caps = [max(backoff(n, 2.0, 60.0, rng) for _ in range(200)) for n in (1, 3, 8)]
    assert caps[0] <= 2.0 and 4.0 < caps[1] <= 8.0 and caps[2] <= 60.0


def test_production_refuses_a_plain_http_api_on_the_network(tmp_path) -> None:  # noqa: ANN001
    import pytest

    from dermgate.settings import ApiSettings, Settings
    with pytest.raises(ValueError, match="tls_cert_file"):
        Settings(workdir=tmp_path, environment="production", api=ApiSettings(host="0.0.0.0"))
    Settings(workdir=tmp_path, environment="production")   # loopback API: allowed
