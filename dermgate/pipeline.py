"""The path of one image, in one place.

    modality --C-STORE--> SCP handler ............ integration/dicom_scp/handlers.py
        receive:  decode + check, answer a DICOM status
        store:    Intake.accept -> bytes fsynced, instance row + job committed ... dermgate/intake.py
    Worker (this file), per job, each stage committed under the job's lease:
        1. load:      read the stored object                      RECEIVED
        2. classify:  decode to RGB, ONNX model, Grad-CAM         -> CLASSIFIED
        3. render:    Grad-CAM Secondary Capture, AI-result SR    -> RENDERED
        4. plan:      one outbox row per channel (PACS, EHR), in the same transaction
    Dispatcher (this file), per outbox row:
        5. deliver:   channel.deliver(payload) -> sent | retry with back-off | dead letter
                      when every row of a job is sent             -> DELIVERED
    audit:  every step above records an AuditEvent ................. audit/

The core speaks in ImageRef / Prediction / Outputs; pydicom and HTTP stay in
the channels and the output writers it calls.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from io import BytesIO
from typing import Any, Protocol

import numpy as np
import pydicom
import structlog
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from audit.api import AuditEvent, AuditSink, EventType, Outcome
from dermgate import metrics
from dermgate.db import Instance, Job, JobState, OutboxItem, OutboxState, utcnow
from dermgate.queue import backoff, claim, fenced_update, release
from dermgate.records import Channel, ImageRef, Outputs
from dermgate.settings import WorkerSettings
from dermgate.store import ObjectStore
from inference.result import Prediction

log = structlog.get_logger("dermgate.pipeline")

ACTIVE_JOB_STATES = (JobState.RECEIVED, JobState.CLASSIFIED)


class PipelineError(Exception):
    """A stage failed; ``permanent`` errors dead-letter at once instead of retrying."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class Classifier(Protocol):
    def predict(self, images: list[np.ndarray]) -> list[Prediction]: ...


class Planner(Protocol):
    """Turns a finished result into an outbox payload for one channel (``None``: nothing to send).
    A planner may also offer ``plan_review(image, review)`` (see dermgate/review.py)."""
    channel: str

    def plan(self, image: ImageRef, prediction: Prediction, outputs: Outputs, store: ObjectStore) -> dict[str, Any] | None: ...


class _LeaseLost(Exception):
    """Another worker took this job over; roll back and leave it to them."""


@dataclass
class Loaded:
    job_id: int
    correlation_id: str
    image: ImageRef
    dataset: pydicom.Dataset
    rgb: np.ndarray | None = None


# ---- stages: small typed functions -------------------------------------------------------------

def load(store: ObjectStore, inst: Instance, job: Job) -> Loaded:
    """Stage 1: read the stored object back (it was fsynced before Success was answered).

    Its sha256 is checked against the row: the intake's group commit fsyncs the object
    alongside the row's commit, so a crash before Success may leave a row whose object
    is torn (dermgate/groupcommit.py); the SCU's resend repairs it, until then the job
    retries."""
    data = store.read(inst.path)
    if hashlib.sha256(data).hexdigest() != inst.sha256:
        raise PipelineError("stored object incomplete (sha256 differs from the received object's)")
    ds = pydicom.dcmread(BytesIO(data))
    return Loaded(job.id, job.correlation_id, ImageRef.from_object(inst), ds)


def classify(loaded: list[Loaded], classifier: Classifier) -> list[Prediction]:
    """Stage 2: decode pixels to RGB and run the model on the batch."""
    from integration.dicom_scp.decode import decode_rgb
    images = [decode_rgb(item.dataset) for item in loaded]
    for item, rgb in zip(loaded, images):
        item.rgb = rgb
    return classifier.predict(images)


def derived_dir(image: ImageRef) -> str:
    return f"derived/{image.study_instance_uid}/{image.sop_instance_uid}"


def render(store: ObjectStore, item: Loaded, prediction: Prediction) -> Outputs:
    """Stage 3: Grad-CAM Secondary Capture + AI-result SR + the heatmap PNG, written and read back.

    Their UIDs derive from the source and the model, so a re-run rewrites the same objects.
    """
    from integration.dicom_scp.outputs import write_outputs
    written = write_outputs(item.dataset, prediction, store.path(derived_dir(item.image)), image_rgb=item.rgb)
    return written.to_record(store.root)


# ---- the worker: composes the stages under a lease ---------------------------------------------

class Worker:
    """Claims jobs, runs stages 1-4, and commits each stage's result fenced on its lease."""

    def __init__(self, sessions: sessionmaker, store: ObjectStore, classifier: Classifier, audit: AuditSink,
                 planners: list[Planner], cfg: WorkerSettings, owner: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sessions, self.store, self.classifier, self.audit = sessions, store, classifier, audit
        self.planners, self.cfg, self.clock = planners, cfg, clock
        self.owner = owner or f"worker-{uuid.uuid4().hex[:12]}"

    def run_once(self) -> int:
        """Claim a batch and take each job as far as it goes; returns how many jobs were claimed."""
        with self.sessions.begin() as s:
            jobs = claim(s, Job, ACTIVE_JOB_STATES, self.owner, self.cfg.lease_seconds, self.cfg.batch_size)
            rows = [(j, s.get(Instance, j.instance_id)) for j in jobs]
        if not rows:
            return 0
        to_classify: list[Loaded] = []
        ready: list[tuple[Loaded, Prediction]] = []
        for job, inst in rows:
            try:
                loaded = load(self.store, inst, job)
            except Exception as exc:  # noqa: BLE001 - any read failure is a job failure, recorded
                self._fail(job, inst, f"cannot read stored object: {exc}", permanent=False)
                continue
            # A job resumed after CLASSIFIED is classified again rather than reloaded: the
            # model is deterministic and the Grad-CAM map is derivable, so nothing but the
            # result row is kept between the stages.
            to_classify.append(loaded)
        if to_classify:
            ready.extend(self._classify(to_classify, {j.id: j for j, _ in rows}, {j.id: i for j, i in rows}))
        jobs_by_id = {j.id: (j, i) for j, i in rows}
        for loaded, prediction in ready:
            job, inst = jobs_by_id[loaded.job_id]
            self._render_and_plan(job, inst, loaded, prediction)
        return len(rows)

    def _classify(self, batch: list[Loaded], jobs: Mapping[int, Job], insts: Mapping[int, Instance]) -> list[tuple[Loaded, Prediction]]:
        t0 = self.clock()
        try:
            predictions = classify(batch, self.classifier)
        except Exception as exc:  # noqa: BLE001 - retry each job individually with back-off
            for item in batch:
                self._fail(jobs[item.job_id], insts[item.job_id], f"classification failed: {exc}")
            return []
        metrics.STAGE_SECONDS.labels("classify").observe(self.clock() - t0)
        done = []
        for item, pred in zip(batch, predictions):
            with self.sessions.begin() as s:
                ok = fenced_update(s, Job, item.job_id, self.owner, state=JobState.CLASSIFIED, result=pred.to_json())
            if not ok:
                log.warning("lease_lost", stage="classify", correlation_id=item.correlation_id)
                continue
            if jobs[item.job_id].state is not JobState.RECEIVED:   # resumed: already audited
                done.append((item, pred))
                continue
            self.audit.record(AuditEvent(
                event=EventType.CLASSIFIED, outcome=Outcome.SUCCESS, actor="dermgate", action="C",
                patient_id=item.image.patient_id, study_uid=item.image.study_instance_uid,
                sop_instance_uids=(item.image.sop_instance_uid,),
                detail={"top_class": pred.top_class, "risk": pred.risk.value, "model": pred.model.version,
                        "malignancy_probability": round(pred.malignancy_probability, 4),
                        "correlation_id": item.correlation_id}))
            log.info("classified", correlation_id=item.correlation_id, top_class=pred.top_class,
                     risk=pred.risk.value)
            done.append((item, pred))
        return done

    def _render_and_plan(self, job: Job, inst: Instance, item: Loaded, prediction: Prediction) -> None:
        t0 = self.clock()
        try:
            outputs = render(self.store, item, prediction)
            plans = [(p.channel, p.plan(item.image, prediction, outputs, self.store)) for p in self.planners]
        except Exception as exc:  # noqa: BLE001
            self._fail(job, inst, f"rendering failed: {exc}")
            return
        metrics.STAGE_SECONDS.labels("render").observe(self.clock() - t0)
        plans = [(c, p) for c, p in plans if p is not None]
        now = utcnow()
        try:
            with self.sessions.begin() as s:
                state = JobState.RENDERED if plans else JobState.DELIVERED
                # Result, outputs and the outbox rows commit together (transactional outbox).
                if not fenced_update(s, Job, job.id, self.owner, state=state, outputs=outputs.__dict__,
                                     lease_owner=None, lease_expires_at=None, last_error=None,
                                     completed_at=now if state == JobState.DELIVERED else None):
                    raise _LeaseLost
                for channel, payload in plans:
                    s.add(OutboxItem(job_id=job.id, channel=channel, kind="report",
                                     business_key=f"{item.image.sop_instance_uid}:report", payload=payload))
        except _LeaseLost:
            log.warning("lease_lost", stage="render", correlation_id=item.correlation_id)
            return
        metrics.JOB_LATENCY.observe((now - inst.received_at).total_seconds())
        log.info("rendered", correlation_id=item.correlation_id, deliveries=len(plans))

    def _fail(self, job: Job, inst: Instance, reason: str, permanent: bool = False) -> None:
        attempts = job.attempts + 1
        dead = permanent or attempts >= self.cfg.max_attempts
        delay = backoff(attempts, self.cfg.backoff_base_s, self.cfg.backoff_max_s)
        with self.sessions.begin() as s:
            fenced_update(s, Job, job.id, self.owner, attempts=attempts, last_error=reason[:2000],
                          state=JobState.FAILED if dead else job.state, lease_owner=None, lease_expires_at=None,
                          next_attempt_at=utcnow() + timedelta(seconds=delay))
        log.error("job_failed" if dead else "job_retry", correlation_id=job.correlation_id, attempts=attempts,
                  reason=reason[:200])
        if dead:
            self.audit.record(AuditEvent(
                event=EventType.CLASSIFIED, outcome=Outcome.SERIOUS_FAILURE, actor="dermgate",
                patient_id=inst.patient_id, study_uid=inst.study_instance_uid,
                sop_instance_uids=(inst.sop_instance_uid,), detail={"reason": reason[:500], "dead_letter": True}))

    def release_all(self) -> int:
        with self.sessions.begin() as s:
            return release(s, Job, self.owner)


# ---- the dispatcher: stage 5, the outbox ------------------------------------------------------

class Dispatcher:
    """Delivers outbox rows through their channels: at least once, made exactly once by the
    channels' idempotency (same SOP Instance UIDs for DICOM, conditional create for FHIR)."""

    def __init__(self, sessions: sessionmaker, channels: Mapping[str, Channel], cfg: WorkerSettings,
                 audit: AuditSink, owner: str | None = None) -> None:
        self.sessions, self.channels, self.cfg, self.audit = sessions, channels, cfg, audit
        self.owner = owner or f"dispatch-{uuid.uuid4().hex[:12]}"

    def run_once(self) -> int:
        with self.sessions.begin() as s:
            # Only rows for channels this process can deliver: another process's rows stay unleased.
            items = claim(s, OutboxItem, (OutboxState.PENDING,), self.owner, self.cfg.lease_seconds,
                          self.cfg.batch_size, OutboxItem.channel.in_(list(self.channels)))
            job_ids = {i.job_id for i in items if i.job_id is not None}
            cids = dict(s.execute(select(Job.id, Job.correlation_id).where(Job.id.in_(job_ids))).all()) \
                if job_ids else {}
        for item in items:
            self._deliver(item, cids.get(item.job_id))
        return len(items)

    def _deliver(self, item: OutboxItem, cid: str | None) -> None:
        channel = self.channels[item.channel]
        try:
            outcome = channel.deliver(item.payload)
        except Exception as exc:  # noqa: BLE001 - a channel bug must not kill the dispatcher
            from dermgate.records import DeliveryOutcome
            outcome = DeliveryOutcome(ok=False, retryable=True, reason=f"{type(exc).__name__}: {exc}")
        metrics.DELIVERIES.labels(item.channel.split(":")[0], "ok" if outcome.ok else "error").inc()
        now = utcnow()
        with self.sessions.begin() as s:
            if outcome.ok:
                fenced_update(s, OutboxItem, item.id, self.owner, state=OutboxState.SENT, sent_at=now,
                              remote_ref=outcome.remote_ref, attempts=item.attempts + 1, last_error=None,
                              lease_owner=None, lease_expires_at=None)
                if item.job_id is not None:
                    pending = s.scalar(select(func.count()).select_from(OutboxItem).where(
                        OutboxItem.job_id == item.job_id, OutboxItem.state != OutboxState.SENT))
                    if pending == 0:
                        s.query(Job).filter(Job.id == item.job_id, Job.state == JobState.RENDERED).update(
                            {"state": JobState.DELIVERED, "completed_at": now})
                log.info("delivered", channel=item.channel, outbox_id=item.id, correlation_id=cid)
                return
            attempts = item.attempts + 1
            dead = not outcome.retryable or attempts >= self.cfg.max_attempts * 4
            delay = max(outcome.retry_after_s or 0.0,
                        backoff(attempts, self.cfg.backoff_base_s, self.cfg.backoff_max_s))
            fenced_update(s, OutboxItem, item.id, self.owner, attempts=attempts,
                          last_error=(outcome.reason or "")[:2000],
                          state=OutboxState.DEAD if dead else OutboxState.PENDING,
                          next_attempt_at=now + timedelta(seconds=delay), lease_owner=None, lease_expires_at=None)
            if dead and item.job_id is not None:
                s.query(Job).filter(Job.id == item.job_id).update(
                    {"state": JobState.FAILED, "last_error": f"{item.channel}: {outcome.reason}"[:2000]})
        log.warning("delivery_dead_letter" if dead else "delivery_retry", channel=item.channel,
                    outbox_id=item.id, correlation_id=cid, attempts=attempts, retry_in_s=None if dead else round(delay, 2),
                    reason=(outcome.reason or "")[:200])

    def release_all(self) -> int:
        with self.sessions.begin() as s:
            return release(s, OutboxItem, self.owner)


def run_loop(step: Callable[[], int], stop: threading.Event, idle_s: float) -> None:
    """Call ``step`` until ``stop`` is set, sleeping ``idle_s`` when it found no work."""
    while not stop.is_set():
        try:
            busy = step()
        except Exception:  # noqa: BLE001 - the loop must survive a database blip
            log.exception("loop_error")
            busy = 0
        if not busy:
            stop.wait(idle_s)


def queue_depth(sessions: sessionmaker) -> dict[str, int]:
    with sessions() as s:
        rows = s.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    counts = {JobState(st): n for st, n in rows}
    return {state.value: counts.get(state, 0) for state in JobState}

