"""Intake: make a received object durable and queue its job, before Success is answered.

The SCP handler calls :meth:`Intake.accept` with the received object (the file
it arrived in, or its bytes); when it returns ``ACCEPTED`` or ``DUPLICATE`` the
bytes are fsynced on disk and the instance row and its job are committed, so the
Success status is a promise the service can keep across a crash.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from dermgate.db import Instance, Job, JobState
from dermgate.records import ImageRef
from dermgate.store import ObjectStore


class IntakeStatus(str, enum.Enum):
    ACCEPTED = "accepted"        # new object, job queued
    DUPLICATE = "duplicate"      # same SOP Instance UID, same bytes: nothing to do
    CONFLICT = "conflict"        # same SOP Instance UID, different bytes: refused, first kept


@dataclass(frozen=True)
class IntakeResult:
    status: IntakeStatus
    job_id: int | None
    correlation_id: str | None
    sha256: str


class Intake:
    def __init__(self, store: ObjectStore, sessions: sessionmaker) -> None:
        self.store = store
        self.sessions = sessions

    def accept(self, encoded: bytes | Path, image: ImageRef, transfer_syntax_uid: str) -> IntakeResult:
        """``encoded``: the Part 10 object, as bytes or as the file it was received into
        (renamed into the store, see :meth:`ObjectStore.put_object_file`)."""
        if isinstance(encoded, Path):
            rel, digest, size = self.store.put_object_file(encoded)
        else:
            (rel, digest), size = self.store.put_object(encoded), len(encoded)
        correlation_id = uuid.uuid4().hex[:16]
        try:
            with self.sessions.begin() as s:
                inst = Instance(**image.to_json(), transfer_syntax_uid=transfer_syntax_uid,
                                sha256=digest, size=size, path=rel)
                s.add(inst)
                s.flush()
                job = Job(instance_id=inst.id, state=JobState.RECEIVED, correlation_id=correlation_id)
                s.add(job)
                s.flush()
                job_id = job.id
        except IntegrityError:
            # The SOP Instance UID is known (a re-send, or another association first): no
            # look-up before the insert, so a new object, the common case, costs one statement.
            existing = self._existing(image.sop_instance_uid)
            if existing is None:
                raise
            return existing if existing.sha256 == digest else IntakeResult(IntakeStatus.CONFLICT, None, None, digest)
        return IntakeResult(IntakeStatus.ACCEPTED, job_id, correlation_id, digest)

    def _existing(self, sop_uid: str) -> IntakeResult | None:
        with self.sessions() as s:
            row = s.execute(select(Instance.sha256, Job.id, Job.correlation_id)
                            .join(Job, Job.instance_id == Instance.id)
                            .where(Instance.sop_instance_uid == sop_uid)).first()
        if row is None:
            return None
        return IntakeResult(IntakeStatus.DUPLICATE, row[1], row[2], row[0])
