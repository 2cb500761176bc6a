"""Group commit of the C-STORE intake (dermgate/groupcommit.py), on SQLite and PostgreSQL,
and a kill -9 of a running SCP: every image answered Success is durable, audited and intact."""

from __future__ import annotations

import copy
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from audit.api import AuditEvent, EventType, Outcome
from dermgate.db import Instance, Job
from dermgate.groupcommit import GroupCommit, GroupCommitClosed
from dermgate.intake import IntakeStatus
from dermgate.store import ObjectStore, StoreError
from tests.dermgate.test_intake_queue import image
from tests.peers.audit import ListAudit

TS = "1.2.840.10008.1.2.1"


class CountingAudit(ListAudit):
    """Counts the durable writes: one per ``record_many`` call, as the real trail fsyncs."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def record_many(self, events: list[AuditEvent]) -> list[int]:
        self.writes += 1
        time.sleep(0.005)                      # an fsync's worth: handlers of the next group pile up
        return [self.record(e) for e in events]


def store_event(job_id: int | None) -> AuditEvent:
    return AuditEvent(event=EventType.STORE_RECEIVED, outcome=Outcome.SUCCESS, actor="SCOPE",
                      detail={"job_id": job_id})


def test_concurrent_stores_share_commits_and_audit_writes(sessions: sessionmaker, store: ObjectStore) -> None:
    audit = CountingAudit()
    group = GroupCommit(store, sessions, audit)
    results: dict[str, IntakeStatus] = {}
    barrier = threading.Barrier(8)

    def handler(t: int) -> None:
        barrier.wait()
        for i in range(10):
            sop = f"5.{t}.{i}"
            res = group.intake.accept(f"object {sop}".encode(), image(sop), TS)
            group.audit.record(store_event(res.job_id))   # as the SCP handler does, after the intake
            results[sop] = res.status

    threads = [threading.Thread(target=handler, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    group.close()
    assert len(results) == 80 and set(results.values()) == {IntakeStatus.ACCEPTED}
    with sessions() as s:
        insts = list(s.scalars(select(Instance)))
        assert s.scalar(select(func.count()).select_from(Job)) == 80
    for inst in insts:
        assert hashlib.sha256(store.read(inst.path)).hexdigest() == inst.sha256
    assert len(audit.events) == 80
    assert audit.writes < 80, "audit records of one group were not written together"


def test_one_group_holds_a_new_object_its_resend_and_a_conflict(sessions: sessionmaker,
                                                                 store: ObjectStore) -> None:
    group = GroupCommit(store, sessions, ListAudit())
    answers: list[IntakeStatus] = []
    payloads = [b"first", b"first", b"other bytes"]             # same SOP Instance UID each time
    barrier = threading.Barrier(len(payloads))

    def handler(data: bytes) -> None:
        barrier.wait()
        answers.append(group.intake.accept(data, image("6.1"), TS).status)

    threads = [threading.Thread(target=handler, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    group.close()
    # Whichever came first was accepted; an identical one is a duplicate; different bytes conflict
    # unless they came first (then both "first" conflict).
    assert answers.count(IntakeStatus.ACCEPTED) == 1
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 1
        inst = s.scalar(select(Instance))
    assert store.read(inst.path) in (b"first", b"other bytes")


def test_a_torn_object_left_by_a_crash_is_rewritten_by_the_resend(sessions: sessionmaker,
                                                                   store: ObjectStore) -> None:
    data = b"the whole object" * 100
    digest = hashlib.sha256(data).hexdigest()
    torn = store.root / f"objects/{digest[:2]}/{digest}.dcm"
    torn.parent.mkdir(parents=True)
    torn.write_bytes(data[:10])                # renamed into place, never fsynced, then a power cut
    group = GroupCommit(store, sessions, ListAudit())
    res = group.intake.accept(data, image("7.1"), TS)
    group.close()
    assert res.status is IntakeStatus.ACCEPTED
    assert torn.read_bytes() == data


def test_a_database_failure_fails_every_image_of_the_group(tmp_path: Path, store: ObjectStore) -> None:
    from sqlalchemy.exc import OperationalError

    from dermgate.db import make_engine, make_sessionmaker
    engine = make_engine(f"sqlite:///{tmp_path / 'no-schema.db'}")   # no tables: every insert fails
    group = GroupCommit(store, make_sessionmaker(engine), ListAudit())
    with pytest.raises(OperationalError):
        group.intake.accept(b"x", image("8.1"), TS)
    group.close()
    engine.dispose()


def test_an_object_fsync_failure_is_a_store_error(sessions: sessionmaker, store: ObjectStore,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from dermgate import durable

    def broken(self: durable.Deferred) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(durable.Deferred, "sync_file", broken)
    group = GroupCommit(store, sessions, ListAudit())
    with pytest.raises(StoreError, match="Input/output error"):
        group.intake.accept(b"y", image("9.1"), TS)
    group.close()


def test_after_close_nothing_is_accepted(sessions: sessionmaker, store: ObjectStore) -> None:
    group = GroupCommit(store, sessions, ListAudit())
    group.close()
    with pytest.raises(GroupCommitClosed):
        group.intake.accept(b"z", image("10.1"), TS)


def test_the_worker_retries_a_job_whose_object_is_incomplete(sessions: sessionmaker, store: ObjectStore) -> None:
    """A row committed with an object that never became durable (a crash before Success):
    the worker's sha256 check stops it before the model sees anything."""
    from dermgate.db import JobState
    from dermgate.pipeline import Worker
    from dermgate.settings import WorkerSettings
    from integration.dicom_scp.stages import DicomDecoder, DicomRenderer
    group = GroupCommit(store, sessions, ListAudit())
    res = group.intake.accept(b"complete object", image("11.1"), TS)
    group.close()
    with sessions() as s:
        inst = s.scalar(select(Instance))
    store.path(inst.path).write_bytes(b"comp")          # torn

    class NoModel:
        def predict(self, images: list) -> list:       # noqa: ANN401
            raise AssertionError("a torn object reached the model")

    worker = Worker(sessions, store, NoModel(), ListAudit(), [], WorkerSettings(max_attempts=3),
                    decoder=DicomDecoder(), renderer=DicomRenderer(store))
    assert worker.run_once() == 1
    with sessions() as s:
        job = s.get(Job, res.job_id)
    assert job.state is JobState.RECEIVED and job.attempts == 1 and "incomplete" in (job.last_error or "")


# ---- kill -9 of a running SCP -------------------------------------------------------------------

def test_scp_killed_mid_stream_keeps_every_acknowledged_image(tmp_path: Path) -> None:
    """kill -9 the `dermgate serve --roles scp` process while 4 associations send: every image
    answered Success has its object (sha256 intact), its row, its job and its audit record."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid
    from pynetdicom import AE

    from dermgate.app import Runtime
    from dermgate.settings import Settings
    from tests.peers.dcmtk import img2dcm, sample_jpeg
    from tests.peers.orthanc import free_port

    work, port = tmp_path / "work", free_port()
    env = {**os.environ, "DERMGATE_WORKDIR": str(work), "DERMGATE_DICOM__PORT": str(port),
           "DERMGATE_DICOM__MIN_FREE_BYTES": str(16 * 1024 * 1024),
           "DERMGATE_DICOM__ALLOWED_CALLERS": '[{"ae_title": "KILLTEST", "hosts": ["127.0.0.1"]}]'}
    work.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "dermgate.cli", "serve", "--roles", "scp"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    source = dcmread(img2dcm(sample_jpeg(), tmp_path / "src.dcm"))
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def modality() -> None:
        ae = AE(ae_title="KILLTEST")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(source.SOPClassUID, [source.file_meta.TransferSyntaxUID])
        while not stop.is_set():
            assoc = ae.associate("127.0.0.1", port, ae_title="DERMGATE")
            if not assoc.is_established:
                time.sleep(0.05)
                continue
            try:
                while not stop.is_set() and assoc.is_established:
                    uid = generate_uid()
                    ds = copy.deepcopy(source)         # file meta included: the threads share nothing
                    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
                    rsp = assoc.send_c_store(ds)
                    if rsp and rsp.get("Status") == 0x0000:
                        with lock:
                            acknowledged.append(str(uid))
            finally:
                if assoc.is_established:
                    assoc.abort()

    senders = [threading.Thread(target=modality, daemon=True) for _ in range(4)]
    try:
        for t in senders:
            t.start()
        deadline = time.monotonic() + 120
        while len(acknowledged) < 40 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        stop.set()
        for t in senders:
            t.join(15)
        if proc.poll() is None:
            proc.kill()
    with lock:
        acked = list(acknowledged)
    assert len(acked) >= 40, "the SCP acknowledged too little before the kill: the test tested nothing"
    rt = Runtime(Settings(workdir=work))
    try:
        with rt.sessions() as s:
            rows = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
            jobs = {j.instance_id for j in s.scalars(select(Job))}
        audited = {uid for r in rt.audit.events() if r.event is not None and r.event.event is EventType.STORE_RECEIVED
                   and r.event.outcome is Outcome.SUCCESS for uid in r.event.sop_instance_uids}
        for uid in acked:
            inst = rows.get(uid)
            assert inst is not None, f"acknowledged image has no row ({len(acked)} acked, {len(rows)} rows, missing {sum(u not in rows for u in acked)})"
            assert inst.id in jobs, "acknowledged image has no job"
            assert hashlib.sha256(rt.store.read(inst.path)).hexdigest() == inst.sha256, "object not intact"
            assert uid in audited, (f"acknowledged image not audited: position {acked.index(uid)} of {len(acked)}, "
                                    f"{sum(u not in audited for u in acked)} missing, {len(audited)} audited, "
                                    f"torn {rt.audit.torn_tail()}")
    finally:
        rt.close()
