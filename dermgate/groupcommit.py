"""Group commit for the C-STORE intake: one fsync of each log for every image that arrived meanwhile.

Success to a C-STORE promises that the object, its instance row and job, and
the audit record of its reception are durable (docs/dicom-conformance.md 3.4).
Made durable one image at a time that is four fsyncs in a row (object, folder,
database, audit). Here every C-STORE handler thread stages its part and waits
for the commit that covers it:

    handler thread                       the committing handler (leader)
    --------------                       -------------------------------
    GroupIntake.accept(bytes)
      write the object, rename it
      into place, no fsync  ----------> the first handler that finds no commit under way takes
      wait                               every staged image queued so far (its own included)
                                         in parallel: fsync each object and its folder(s)
                                                      | one database transaction: every row + job
      <-------------------------------- every image learns its result
    build the audit record
    GroupAudit.record(event) ---------> the last of this commit's handlers to arrive (or
      wait                               the first after ``gather_s``) writes every queued
      <--------------------------------  record with one write and one fsync (AuditTrail.record_many)
    answer Success

With one association (the SCU waits for each answer) a group is one image:
its object, folder and database fsyncs overlap (one wait), then its audit
record (a second wait), instead of four waits in a row. With several
associations, a group holds what arrived during the previous commit.

Order, and what a crash (kill -9, power loss) leaves before Success was sent:

* the audit record is written only after the object and its row are durable,
  so the trail never records a reception, or a job id, that did not survive;
* the object's fsync and the row's commit overlap, so a crash between them can
  leave a row whose object file is missing or torn (never acknowledged: the
  SCU did not get Success). The SCU's resend is answered as a duplicate and
  :meth:`ObjectStore.stage_object` rewrites the object; the worker checks the
  sha256 of every object it loads, so an object never resent fails its job
  (retried, then a dead letter) instead of being classified.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from audit.api import AuditEvent, AuditSink, record_all
from dermgate import metrics
from dermgate.db import Instance, Job, JobState
from dermgate.durable import Deferred, fsync_dir, fsync_pool
from dermgate.intake import Intake, IntakeResult, IntakeStatus
from dermgate.records import ImageRef
from dermgate.store import ObjectStore, StoreError

log = structlog.get_logger(__name__)

MAX_GROUP = 256              # images per commit (one transaction, one audit write)
GATHER_S = 0.005             # how long an audit commit waits for a straggler of its group


_INSERT_INSTANCE = insert(Instance)
_INSERT_JOB = insert(Job)


class GroupCommitClosed(StoreError):
    """The committer was stopped (shutdown); the SCU gets Out of Resources and may retry."""


@dataclass(eq=False)
class _Staged:
    image: ImageRef
    transfer_syntax_uid: str
    size: int
    rel: str
    digest: str
    deferred: Deferred
    thread: int = field(default_factory=threading.get_ident)
    correlation_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    result: IntakeResult | None = None
    error: BaseException | None = None
    existing: bool = False
    done: bool = False
    wakes_workers: bool = False


class GroupCommit:
    """The committer of one SCP process: :attr:`intake` and :attr:`audit` are what the SCP uses."""

    def __init__(self, store: ObjectStore, sessions: sessionmaker, audit: AuditSink, *,
                 max_group: int = MAX_GROUP, gather_s: float = GATHER_S,
                 on_commit: Callable[[], None] | None = None) -> None:
        self.store, self.sessions = store, sessions
        self.max_group = max_group
        self.on_commit = on_commit              # new jobs committed: wake this process's workers
        self.intake = GroupIntake(self)
        self.audit = GroupAudit(audit, self, gather_s)
        self._cond = threading.Condition()
        self._queue: list[_Staged] = []
        self._leader = False
        self._closed = False

    def submit(self, staged: _Staged) -> None:
        """Queue ``staged`` and return once a commit covers it. No committer thread: the first
        handler to find no commit under way commits everything queued (its own image included),
        the others wait for it; so one association costs no hand-over between threads."""
        with self._cond:
            if self._closed:
                staged.deferred.close()
                raise GroupCommitClosed("intake is shut down")
            self._queue.append(staged)
            while not staged.done:
                if self._leader:
                    self._cond.wait()
                    continue
                self._leader = True
                group, self._queue = self._queue[: self.max_group], self._queue[self.max_group:]
                self._cond.release()
                try:
                    self._commit_group(group)
                finally:
                    self._cond.acquire()
                    for item in group:
                        item.done = True
                    self._leader = False
                    self._cond.notify_all()
        if staged.wakes_workers and self.on_commit is not None:
            self.on_commit()

    def _commit_group(self, group: list[_Staged]) -> None:
        try:
            self._commit(group)
        except BaseException as exc:             # never leave a handler waiting
            log.exception("intake_group_commit_failed")
            for item in group:
                if item.result is None and item.error is None:
                    item.error = exc
        finally:
            for item in group:
                item.deferred.close()
            # Every handler of the group owes its audit record before any of them goes on, so
            # the first to record waits for the others and one fsync covers them all.
            self.audit.owe([item.thread for item in group])
            accepted = [i for i in group if i.error is None and i.result is not None
                        and i.result.status is IntakeStatus.ACCEPTED]
            if accepted:                         # one wake-up of the workers per commit
                accepted[0].wakes_workers = True

    def _commit(self, group: list[_Staged]) -> None:
        t0 = time.perf_counter()
        files = {item: fsync_pool().submit(item.deferred.sync_file) for item in group}
        dirs: dict[Path, Future[None]] = {}
        for item in group:
            for d in item.deferred.dirs:
                if d not in dirs:
                    dirs[d] = fsync_pool().submit(fsync_dir, d)
        try:
            self._insert(group)
        except Exception as exc:                 # database locked / unavailable / full: the whole group
            for item in group:
                item.result, item.error = None, exc
        else:
            for item in group:
                if item.existing:
                    try:
                        item.result = self.intake.resolve_existing(item.image.sop_instance_uid, item.digest)
                    except Exception as exc:
                        item.error = exc
        for item in group:
            try:
                files[item].result()
                for d in item.deferred.dirs:
                    dirs[d].result()
            except OSError as exc:
                # The row may be committed; the SCU's retry is a duplicate, which rewrites the object.
                item.result, item.error = None, StoreError(f"cannot write {item.rel}: {exc.strerror}")
        metrics.INTAKE_GROUP_SIZE.observe(len(group))
        metrics.INTAKE_COMMIT_SECONDS.observe(time.perf_counter() - t0)

    def _insert(self, group: list[_Staged]) -> None:
        """Every row and job of the group in one transaction. A SOP Instance UID already known (a
        resend: rare) makes the transaction start over with one savepoint per image, so that only
        its own insert is undone; it is looked up after the commit (duplicate or conflict)."""
        engine = self.sessions.kw["bind"]        # Core connection: the ORM session adds nothing here
        try:
            with engine.begin() as conn:
                for item in group:
                    self._insert_one(conn, item)
        except IntegrityError:
            for item in group:
                item.result, item.existing = None, False
            with engine.begin() as conn:
                for item in group:
                    try:
                        with conn.begin_nested():
                            self._insert_one(conn, item)
                    except IntegrityError:
                        item.result, item.existing = None, True

    @staticmethod
    def _insert_one(conn: Any, item: _Staged) -> None:
        # Core statements built once and given parameters: no ORM unit of work, no per-image
        # statement construction (both were most of the intake's CPU).
        inst_id = conn.execute(_INSERT_INSTANCE, {
            **item.image.to_json(), "transfer_syntax_uid": item.transfer_syntax_uid, "sha256": item.digest,
            "size": item.size, "path": item.rel}).inserted_primary_key[0]
        job_id = conn.execute(_INSERT_JOB, {"instance_id": inst_id, "state": JobState.RECEIVED,
                                            "correlation_id": item.correlation_id}).inserted_primary_key[0]
        item.result = IntakeResult(IntakeStatus.ACCEPTED, int(job_id), item.correlation_id, item.digest)

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new images and wait (up to ``timeout``) for the commit under way (the SCP has
        stopped taking associations)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closed = True
            while (self._leader or self._queue) and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))


class GroupIntake(Intake):
    """:class:`~dermgate.intake.Intake` whose ``accept`` returns when the commit covering it is durable."""

    def __init__(self, group: GroupCommit) -> None:
        super().__init__(group.store, group.sessions)
        self.group = group

    def accept(self, encoded: bytes | Path, image: ImageRef, transfer_syntax_uid: str) -> IntakeResult:
        rel, digest, size, deferred = self.store.stage_object(encoded)
        staged = _Staged(image, transfer_syntax_uid, size, rel, digest, deferred)
        self.group.submit(staged)
        if staged.error is not None:
            raise staged.error
        assert staged.result is not None
        return staged.result

    def resolve_existing(self, sop_uid: str, digest: str) -> IntakeResult:
        existing = self._existing(sop_uid)
        if existing is None:                     # the row that clashed is gone: nothing sane to answer
            raise StoreError("instance row vanished during intake")
        return existing if existing.sha256 == digest else IntakeResult(IntakeStatus.CONFLICT, None, None, digest)


class _Record:
    __slots__ = ("event", "seq", "error", "done")

    def __init__(self, event: AuditEvent) -> None:
        self.event = event
        self.seq: int | None = None
        self.error: BaseException | None = None
        self.done = False


class GroupAudit:
    """The SCP's audit sink: records of handlers whose images were committed together are written
    together, with one fsync (``record_many``), before any of them answers."""

    def __init__(self, sink: AuditSink, group: GroupCommit, gather_s: float) -> None:
        self.sink, self.group, self.gather_s = sink, group, gather_s
        self._cond = threading.Condition()
        self._queue: list[_Record] = []
        self._owed: dict[int, float] = {}       # thread -> when its image was committed
        self._leader = False

    def owe(self, threads: Sequence[int]) -> None:
        """These handler threads will each record one event for the group just committed."""
        now = time.monotonic()
        with self._cond:
            for tid in threads:
                self._owed[tid] = now

    def record(self, event: AuditEvent) -> int:
        item = _Record(event)
        with self._cond:
            self._owed.pop(threading.get_ident(), None)
            self._queue.append(item)
            self._cond.notify_all()
            while not item.done:
                wait = self._straggler_wait()
                if self._leader or wait > 0:
                    self._cond.wait(None if self._leader else wait)
                    continue
                self._leader = True
                batch, self._queue = self._queue, []
                self._cond.release()
                try:
                    seqs = record_all(self.sink, [r.event for r in batch])
                    for r, seq in zip(batch, seqs):
                        r.seq = seq
                except BaseException as exc:
                    for r in batch:
                        r.error = exc
                finally:
                    self._cond.acquire()
                    for r in batch:
                        r.done = True
                    self._leader = False
                    self._cond.notify_all()
        if item.error is not None:
            raise item.error
        assert item.seq is not None
        return item.seq

    def _straggler_wait(self) -> float:
        """Seconds to wait for handlers of the same commit that have not recorded yet (0: go)."""
        if not self._owed:
            return 0.0
        now = time.monotonic()
        for tid, since in list(self._owed.items()):
            if now - since >= self.gather_s:
                del self._owed[tid]              # it will not come (or comes late): do not hold the others
        if not self._owed:
            return 0.0
        return max(0.0, self.gather_s - (now - min(self._owed.values())))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sink, name)
