"""The path of one image, in one place.

    modality --C-STORE--> SCP handler ............ integration/dicom_scp/handlers.py
        receive:  decode + check, answer a DICOM status
        store:    object, instance row + job and audit record made durable by a group
                  commit shared with concurrent C-STOREs ...................... dermgate/groupcommit.py
    Worker (this file), a batch of jobs at once (one model run, one transaction and one
    audit write per stage, one round of fsyncs), each stage committed under the jobs' leases:
        1. load:      read the stored object                      RECEIVED
        2. classify:  decode to RGB, ONNX model, Grad-CAM         -> CLASSIFIED
        3. render:    Grad-CAM Secondary Capture, AI-result SR    -> RENDERED
        4. plan:      one outbox row per channel (PACS, EHR), in the same transaction
    Dispatcher (this file), per outbox row:
        5. deliver:   channel.deliver(payload) -> sent | retry with back-off | dead letter
                      when every row of a job is sent             -> DELIVERED
    audit:  every step above records an AuditEvent ................. audit/

The core speaks in ImageRef / Prediction / Outputs; pydicom and HTTP stay in
the channels, the decoder and the renderer it is given (integration/dicom_scp/stages.py
for DICOM), injected like the classifier.

Errors: a stage that fails is retried with back-off, up to ``max_attempts``; a failure
that retrying cannot change is dead-lettered at once, with its reason for a person::

    PipelineError           a stage failed (transient: I/O, the classifier, the database)
     +-- PermanentError     the stored object cannot be read, decoded, rendered or planned:
                            the same bytes fail the same way on every attempt

Loading, decoding, rendering and planning are pure functions of the stored object and the
result: any error they raise other than an OSError or MemoryError is permanent.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import structlog
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from audit.api import AuditEvent, AuditSink, EventType, Outcome, record_all
from dermgate import metrics
from dermgate.db import Instance, Job, JobState, OutboxItem, OutboxState, utcnow
from dermgate.durable import Deferred, sync_all
from dermgate.memory import release_free_memory
from dermgate.queue import backoff, claim, fenced_update, owner_id, release, release_dead_owners
from dermgate.records import Channel, DeliveryOutcome, ImageRef, Outputs
from dermgate.store import ObjectStore
from inference.result import Prediction

if TYPE_CHECKING:
    from dermgate.settings import WorkerSettings

log = structlog.get_logger("dermgate.pipeline")

ACTIVE_JOB_STATES = (JobState.RECEIVED, JobState.CLASSIFIED)
LEASE_MARGIN_S = 5.0   # database round trips around one delivery, on top of the channel's own bound


class PipelineError(Exception):
    """A stage failed; ``permanent`` errors dead-letter at once instead of retrying. Decoders
    and renderers raise it (or a subclass) when they know another try cannot succeed."""


    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class PermanentError(PipelineError):
    """Retrying cannot help: the job is dead-lettered at once with this reason."""

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=True)


_TRANSIENT = (OSError, MemoryError)


@contextmanager
def permanent_unless_transient(what: str) -> Iterator[None]:
    """Turn the errors of a deterministic stage into :class:`PermanentError` (``what``: the stage)."""
    try:
        yield
    except (PipelineError, *_TRANSIENT):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a pure stage raises, it raises again
        raise PermanentError(f"{what}: {type(exc).__name__}: {exc}") from exc


class Classifier(Protocol):
    def predict(self, images: list[np.ndarray]) -> list[Prediction]: ...


class Decoder(Protocol):
    """Reads a stored object and decodes its pixels (DICOM: integration/dicom_scp/stages.py).
    The parsed object is opaque to the core: it only travels on to ``rgb`` and the renderer."""

    def read(self, data: bytes) -> Any: ...

    def image_ref(self, ref: ImageRef, source: Any) -> ImageRef:
        """``ref`` completed from the object's header (order context, time zone, body site)."""
        ...

    def rgb(self, source: Any) -> np.ndarray: ...


class Renderer(Protocol):
    """Writes one image's outputs (Grad-CAM SC, AI-result SR, heatmap PNG) into ``folder`` and
    checks them; returns their paths relative to the store root, and the writes still to be
    fsynced (:class:`~dermgate.durable.Deferred`): the worker syncs a whole batch's at once."""

    def render(self, source: Any, prediction: Prediction, folder: Path,
               image_rgb: np.ndarray | None) -> tuple[Outputs, tuple[Deferred, ...]]: ...


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
    dataset: Any                     # the parsed object, as the decoder read it (opaque to the core)
    rgb: np.ndarray | None = None


# ---- stages: small typed functions -------------------------------------------------------------

def load(store: ObjectStore, inst: Instance, job: Job, decoder: Decoder) -> Loaded:
    """Stage 1: read the stored object back (it was fsynced before Success was answered).

    A missing or unreadable file is transient (a volume not mounted yet); bytes that do not
    parse are permanent. Its sha256 is checked against the row: the intake's group commit
    fsyncs the object alongside the row's commit, so a crash before Success may leave a row
    whose object is torn (dermgate/groupcommit.py); the SCU's resend repairs it, until then
    the job retries."""
    data = store.read(inst.path)
    if hashlib.sha256(data).hexdigest() != inst.sha256:
        raise PipelineError("stored object incomplete (sha256 differs from the received object's)")
    with permanent_unless_transient("stored object cannot be parsed"):
        source = decoder.read(data)
        image = decoder.image_ref(ImageRef.from_object(inst), source)
    return Loaded(job.id, job.correlation_id, image, source)


def decode(item: Loaded, decoder: Decoder) -> np.ndarray:
    """Stage 2a: the first frame as RGB; an image that does not decode fails permanently."""
    with permanent_unless_transient("pixel data cannot be decoded"):
        item.rgb = decoder.rgb(item.dataset)
    return item.rgb


def classify(loaded: list[Loaded], classifier: Classifier, decoder: Decoder) -> list[Prediction]:
    """Stage 2: decode pixels to RGB (unless already decoded) and run the model on the batch."""
    return classifier.predict([item.rgb if item.rgb is not None else decode(item, decoder) for item in loaded])


def derived_dir(image: ImageRef, *, opaque: bool = False) -> str:
    """This image's output folder; ``opaque`` (an encrypted store) names it by hashes of the UIDs, so a
    directory listing does not show Study and SOP Instance UIDs. Either way a re-run finds the same folder."""
    if opaque:
        import hashlib
        study = hashlib.sha256(image.study_instance_uid.encode()).hexdigest()[:32]
        sop = hashlib.sha256(image.sop_instance_uid.encode()).hexdigest()[:32]
        return f"derived/{study}/{sop}"
    return f"derived/{image.study_instance_uid}/{image.sop_instance_uid}"


def render(store: ObjectStore, item: Loaded, prediction: Prediction,
           renderer: Renderer) -> tuple[Outputs, tuple[Deferred, ...]]:
    """Stage 3: Grad-CAM Secondary Capture + AI-result SR + the heatmap PNG, encoded once and written.

    Their UIDs derive from the source and the model, so a re-run rewrites the same objects.
    The files are in place but not yet fsynced: the worker fsyncs those of the whole batch
    at once (the second element) before it commits any of them.
    """
    with permanent_unless_transient("outputs cannot be built"):
        return renderer.render(item.dataset, prediction,
                               store.path(derived_dir(item.image, opaque=store.encrypted)), item.rgb)


def plan(planners: list[Planner], store: ObjectStore, item: Loaded, prediction: Prediction,
         outputs: Outputs) -> list[tuple[str, dict[str, Any] | None]]:
    """Stage 4: each channel's payload (a report that cannot be built fails permanently)."""
    with permanent_unless_transient("delivery payload cannot be built"):
        return [(p.channel, p.plan(item.image, prediction, outputs, store)) for p in planners]


# ---- the worker: composes the stages under a lease ---------------------------------------------

class DeadOwnerReaper:
    """Releases the leases of this host's dead processes at the first run and then once per lease
    period, so a restarted worker resumes their jobs at once (``queue.release_dead_owners``)."""

    def __init__(self, model: Any, period_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.model, self.period_s, self.clock = model, period_s, clock
        self.next_at: float | None = None

    def maybe_run(self, sessions: sessionmaker) -> None:
        now = self.clock()
        if self.next_at is not None and now < self.next_at:
            return
        self.next_at = now + self.period_s
        with sessions.begin() as s:
            dead = release_dead_owners(s, self.model)
        if dead:
            log.warning("dead_owner_leases_released", table=self.model.__tablename__, owners=dead)


@dataclass
class _Rendered:
    job: Job
    inst: Instance
    item: Loaded
    outputs: Outputs
    plans: list[tuple[str, dict[str, Any]]]
    pending: tuple[Any, ...]


class Worker:
    """Claims a batch of jobs and runs stages 1-4 on all of them together: one model batch, one
    transaction and one audit write per stage, one round of fsyncs for every file written;
    each write is fenced on the job's lease."""

    def __init__(self, sessions: sessionmaker, store: ObjectStore, classifier: Classifier, audit: AuditSink,
                 planners: list[Planner], cfg: WorkerSettings, *, decoder: Decoder, renderer: Renderer,
                 owner: str | None = None, clock: Callable[[], float] = time.monotonic,
                 on_planned: Callable[[], None] | None = None) -> None:
        self.sessions, self.store, self.classifier, self.audit = sessions, store, classifier, audit
        self.planners, self.cfg, self.clock = planners, cfg, clock
        self.decoder, self.renderer = decoder, renderer
        self.owner = owner or owner_id("worker")
        self.on_planned = on_planned            # outbox rows committed: wake the dispatchers
        self._reaper = DeadOwnerReaper(Job, cfg.lease_seconds, clock)
        self._recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-record")

    def run_once(self) -> int:
        """Claim a batch and take each job as far as it goes; returns how many jobs were claimed."""
        self._reaper.maybe_run(self.sessions)
        with self.sessions.begin() as s:
            jobs = claim(s, Job, ACTIVE_JOB_STATES, self.owner, self.cfg.lease_seconds, self.cfg.batch_size)
            rows = [(j, s.get(Instance, j.instance_id)) for j in jobs]
        if not rows:
            return 0
        t0 = self.clock()
        to_classify: list[Loaded] = []
        for job, inst in rows:
            try:
                loaded = load(self.store, inst, job, self.decoder)
                decode(loaded, self.decoder)
            except PermanentError as exc:
                self._fail(job, inst, str(exc), permanent=True)
                continue
            except Exception as exc:  # noqa: BLE001 - any read failure is a job failure, recorded
                self._fail(job, inst, f"cannot read stored object: {exc}", permanent=_permanent(exc))
                continue
            # A job resumed after CLASSIFIED is classified again rather than reloaded: the
            # model is deterministic and the Grad-CAM map is derivable, so nothing but the
            # result row is kept between the stages.
            to_classify.append(loaded)
        metrics.STAGE_SECONDS.labels("load").observe(self.clock() - t0)
        if not to_classify:
            return len(rows)
        jobs_by_id = {j.id: (j, i) for j, i in rows}
        ready = self._classify(to_classify, jobs_by_id)
        if not ready:
            return len(rows)
        # The results are committed and audited (two waits for the disk) while the outputs render.
        recording = self._recorder.submit(self._record_classified, ready, jobs_by_id)
        rendered: list[_Rendered] = []
        try:
            rendered = [r for r in (self._render_and_plan(*jobs_by_id[item.job_id], item, pred)
                                    for item, pred in ready) if r is not None]
            kept = recording.result()
        except BaseException:
            for r in rendered:
                for d in r.pending:
                    d.close()
            raise
        lost = [r for r in rendered if r.job.id not in kept]
        for r in lost:                      # another worker owns the job now: its outputs are its own
            for d in r.pending:
                d.close()
        rendered = [r for r in rendered if r.job.id in kept]
        if rendered:
            self._commit_rendered(rendered)
        return len(rows)

    def _classify(self, batch: list[Loaded],
                  jobs: Mapping[int, tuple[Job, Instance]]) -> list[tuple[Loaded, Prediction]]:
        t0 = self.clock()
        try:
            predictions = classify(batch, self.classifier, self.decoder)
        except Exception as exc:  # noqa: BLE001 - retry each job individually with back-off
            for item in batch:
                self._fail(*jobs[item.job_id], f"classification failed: {exc}")
            return []
        metrics.STAGE_SECONDS.labels("classify").observe(self.clock() - t0)
        return list(zip(batch, predictions))

    def _record_classified(self, batch: list[tuple[Loaded, Prediction]],
                           jobs: Mapping[int, tuple[Job, Instance]]) -> set[int]:
        """CLASSIFIED with its result for the batch in one transaction, then one audit write for those
        classified for the first time; returns the ids of the jobs whose lease held."""
        done: list[tuple[Loaded, Prediction]] = []
        with self.sessions.begin() as s:           # one transaction for the batch's results
            for item, pred in batch:
                if fenced_update(s, Job, item.job_id, self.owner, state=JobState.CLASSIFIED, result=pred.to_json(),
                                risk=pred.risk.value, low_confidence=pred.low_confidence):
                    done.append((item, pred))
                else:
                    log.warning("lease_lost", stage="classify", correlation_id=item.correlation_id)
        fresh = [(item, pred) for item, pred in done if jobs[item.job_id][0].state is JobState.RECEIVED]
        if fresh:                                  # resumed jobs were audited when first classified
            record_all(self.audit, [AuditEvent(
                event=EventType.CLASSIFIED, outcome=Outcome.SUCCESS, actor="dermgate", action="C",
                patient_id=item.image.patient_id, study_uid=item.image.study_instance_uid,
                sop_instance_uids=(item.image.sop_instance_uid,),
                detail={"top_class": pred.top_class, "risk": pred.risk.value, "model": pred.model.version,
                        "malignancy_probability": round(pred.malignancy_probability, 4),
                        "correlation_id": item.correlation_id}) for item, pred in fresh])
        for item, pred in done:
            log.info("classified", correlation_id=item.correlation_id, top_class=pred.top_class,
                     risk=pred.risk.value)
        return {item.job_id for item, _ in done}

    def _render_and_plan(self, job: Job, inst: Instance, item: Loaded, prediction: Prediction) -> _Rendered | None:
        t0 = self.clock()
        pending: tuple[Any, ...] = ()
        try:
            outputs, pending = render(self.store, item, prediction, self.renderer)
            t1 = self.clock()
            plans = plan(self.planners, self.store, item, prediction, outputs)
        except Exception as exc:  # noqa: BLE001 - a job failure, recorded
            for d in pending:
                d.close()
            if isinstance(exc, PermanentError):
                self._fail(job, inst, str(exc), permanent=True)
            else:
                self._fail(job, inst, f"rendering failed: {exc}", permanent=_permanent(exc))
            return None
        metrics.STAGE_SECONDS.labels("render").observe(t1 - t0)
        metrics.STAGE_SECONDS.labels("plan").observe(self.clock() - t1)
        return _Rendered(job, inst, item, outputs, [(c, p) for c, p in plans if p is not None], pending)

    def _commit_rendered(self, batch: list[_Rendered]) -> None:
        """Every output file of the batch durable (one round of fsyncs), then result, outputs and
        outbox rows of every job in one transaction (transactional outbox)."""
        t0 = self.clock()
        try:
            sync_all(d for r in batch for d in r.pending)
        except OSError as exc:
            for r in batch:
                self._fail(r.job, r.inst, f"rendering failed: outputs not durable: {exc}")
            return
        now = utcnow()
        committed: list[_Rendered] = []
        with self.sessions.begin() as s:
            for r in batch:
                state = JobState.RENDERED if r.plans else JobState.DELIVERED
                if not fenced_update(s, Job, r.job.id, self.owner, state=state, outputs=r.outputs.__dict__,
                                     lease_owner=None, lease_expires_at=None, last_error=None,
                                     completed_at=now if state == JobState.DELIVERED else None):
                    log.warning("lease_lost", stage="render", correlation_id=r.item.correlation_id)
                    continue
                for channel, payload in r.plans:
                    s.add(OutboxItem(job_id=r.job.id, channel=channel, kind="report",
                                     business_key=f"{r.item.image.sop_instance_uid}:report", payload=payload))
                committed.append(r)
        metrics.STAGE_SECONDS.labels("commit").observe(self.clock() - t0)
        if committed and self.on_planned is not None:
            self.on_planned()
        for r in committed:
            metrics.JOB_LATENCY.observe((now - r.inst.received_at).total_seconds())
            log.info("rendered", correlation_id=r.item.correlation_id, deliveries=len(r.plans))

    def _fail(self, job: Job, inst: Instance, reason: str, permanent: bool = False) -> None:
        """Record a failed attempt: retry later, or dead-letter (permanent, or attempts used up).
        A dead letter's ``last_error`` says which, and why, for the person who reads ``jobs list``."""
        attempts = job.attempts + 1
        dead = permanent or attempts >= self.cfg.max_attempts
        if permanent:
            reason = f"permanent, not retried: {reason}"
        elif dead:
            reason = f"gave up after {attempts} attempts: {reason}"
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
                sop_instance_uids=(inst.sop_instance_uid,),
                detail={"reason": reason[:500], "dead_letter": True, "permanent": permanent,
                        "attempts": attempts, "correlation_id": job.correlation_id}))

    def release_all(self) -> int:
        with self.sessions.begin() as s:
            return release(s, Job, self.owner)


# ---- the dispatcher: stage 5, the outbox ------------------------------------------------------

class Dispatcher:
    """Delivers outbox rows through their channels: at least once, made exactly once by the
    channels' idempotency (same SOP Instance UIDs for DICOM, conditional create for FHIR).

    The service runs one Dispatcher per channel, each on its own thread, so a hung EHR
    cannot hold up PACS forwarding. A claim's lease is derived from the channel's own
    bound on one delivery (``max_delivery_s``, from its timeouts): the dispatcher claims
    only as many rows as it can deliver before the lease runs out, and no fewer than one.
    """

    def __init__(self, sessions: sessionmaker, channels: Mapping[str, Channel], cfg: WorkerSettings,
                 audit: AuditSink, owner: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sessions, self.channels, self.cfg, self.audit = sessions, channels, cfg, audit
        self.owner = owner or owner_id("dispatch")
        self.clock = clock
        self._reaper = DeadOwnerReaper(OutboxItem, cfg.lease_seconds, clock)

    def delivery_bound_s(self) -> float:
        """The longest one delivery may take on any of this dispatcher's channels."""
        bounds = [float(getattr(ch, "max_delivery_s", 0.0) or 0.0) for ch in self.channels.values()]
        return max([*bounds, 0.0])

    def lease_plan(self) -> tuple[int, float]:
        """(rows per claim, lease seconds): as many rows as fit ``lease_seconds`` at the channel's
        worst case, at least one; the lease then covers that many worst-case deliveries."""
        bound = self.delivery_bound_s()
        if bound <= 0:
            return self.cfg.batch_size, self.cfg.lease_seconds
        fits = int(self.cfg.lease_seconds // (bound + LEASE_MARGIN_S))
        batch = max(1, min(self.cfg.batch_size, fits))
        return batch, max(self.cfg.lease_seconds, batch * (bound + LEASE_MARGIN_S))

    def run_once(self) -> int:
        self._reaper.maybe_run(self.sessions)
        batch, lease_s = self.lease_plan()
        with self.sessions.begin() as s:
            # Only rows for channels this process can deliver: another process's rows stay unleased.
            items = claim(s, OutboxItem, (OutboxState.PENDING,), self.owner, lease_s,
                          batch, OutboxItem.channel.in_(list(self.channels)))
            job_ids = {i.job_id for i in items if i.job_id is not None}
            cids = dict(s.execute(select(Job.id, Job.correlation_id).where(Job.id.in_(job_ids))).all()) \
                if job_ids else {}
        claimed_at = self.clock()
        for n, item in enumerate(items):
            bound = float(getattr(self.channels[item.channel], "max_delivery_s", 0.0) or 0.0)
            if n and self.clock() - claimed_at + bound + LEASE_MARGIN_S > lease_s:
                # Not enough lease left for a worst-case delivery: hand the rest back.
                with self.sessions.begin() as s:
                    for rest in items[n:]:
                        fenced_update(s, OutboxItem, rest.id, self.owner, lease_owner=None, lease_expires_at=None)
                break
            self._deliver(item, cids.get(item.job_id))
        return len(items)

    def _deliver(self, item: OutboxItem, cid: str | None) -> None:
        channel = self.channels[item.channel]
        try:
            outcome = channel.deliver(item.payload)
        except Exception as exc:  # noqa: BLE001 - a channel bug must not kill the dispatcher
            outcome = DeliveryOutcome(ok=False, retryable=True, reason=f"{type(exc).__name__}: {exc}")
        metrics.DELIVERIES.labels(item.channel.split(":")[0], "ok" if outcome.ok else "error").inc()
        now = utcnow()
        attempts = item.attempts + 1
        with self.sessions.begin() as s:
            if outcome.ok:
                if item.job_id is not None:
                    # The job's rows are delivered side by side (one dispatcher per channel, many
                    # processes): lock the job first, so whichever commits last sees every row sent.
                    s.execute(select(Job.id).where(Job.id == item.job_id).with_for_update())
                fenced = fenced_update(s, OutboxItem, item.id, self.owner, state=OutboxState.SENT, sent_at=now,
                                       remote_ref=outcome.remote_ref, attempts=attempts, last_error=None,
                                       lease_owner=None, lease_expires_at=None)
                if fenced and item.job_id is not None:
                    pending = s.scalar(select(func.count()).select_from(OutboxItem).where(
                        OutboxItem.job_id == item.job_id, OutboxItem.state != OutboxState.SENT))
                    if pending == 0:
                        s.query(Job).filter(Job.id == item.job_id, Job.state == JobState.RENDERED).update(
                            {"state": JobState.DELIVERED, "completed_at": now})
            else:
                dead = not outcome.retryable or attempts >= self.cfg.delivery_max_attempts
                delay = max(outcome.retry_after_s or 0.0,
                            backoff(attempts, self.cfg.backoff_base_s, self.cfg.backoff_max_s))
                fenced = fenced_update(s, OutboxItem, item.id, self.owner, attempts=attempts,
                                       last_error=(outcome.reason or "")[:2000],
                                       state=OutboxState.DEAD if dead else OutboxState.PENDING,
                                       next_attempt_at=now + timedelta(seconds=delay), lease_owner=None,
                                       lease_expires_at=None)
                if fenced and dead and item.job_id is not None:
                    s.query(Job).filter(Job.id == item.job_id).update(
                        {"state": JobState.FAILED, "last_error": f"{item.channel}: {outcome.reason}"[:2000]})
        if not fenced:
            # Another dispatcher holds the row now (our lease ran out): its record stands, not ours.
            log.warning("delivery_lease_lost", channel=item.channel, outbox_id=item.id, correlation_id=cid,
                        delivered=outcome.ok)
            return
        if outcome.ok:
            log.info("delivered", channel=item.channel, outbox_id=item.id, correlation_id=cid)
            return
        log.warning("delivery_dead_letter" if dead else "delivery_retry", channel=item.channel,
                    outbox_id=item.id, correlation_id=cid, attempts=attempts, retry_in_s=None if dead else round(delay, 2),
                    reason=(outcome.log_reason if outcome.log_reason is not None else outcome.reason or "")[:200])

    def release_all(self) -> int:
        with self.sessions.begin() as s:
            return release(s, OutboxItem, self.owner)


def _permanent(exc: BaseException) -> bool:
    """Whether a stage's error says that another try cannot succeed."""
    return isinstance(exc, PipelineError) and exc.permanent


def run_loop(step: Callable[[], int], stop: threading.Event, idle_s: float,
             wake: threading.Event | None = None) -> None:
    """Call ``step`` until ``stop`` is set; when it found no work, wait ``idle_s`` or until ``wake`` is set."""
    while not stop.is_set():
        if wake is not None:
            wake.clear()                 # before the step: a notification during it is not lost
        try:
            busy = step()
        except Exception:  # noqa: BLE001 - the loop must survive a database blip
            log.exception("loop_error")
            busy = 0
        if busy:
            release_free_memory()        # a batch's freed memory back to the OS (dermgate/memory.py)
        else:
            (wake or stop).wait(idle_s)


def queue_depth(sessions: sessionmaker) -> dict[str, int]:
    with sessions() as s:
        rows = s.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    counts = {JobState(st): n for st, n in rows}
    return {state.value: counts.get(state, 0) for state in JobState}

