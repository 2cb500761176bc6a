"""Composition root: builds the service's parts from one Settings object.

Everything is constructed here and injected downwards, so tests build the
same parts with their own settings, peers and clocks.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy.engine import Engine as DbEngine
from sqlalchemy.orm import sessionmaker

from audit.api import AuditSink
from dermgate.db import make_engine, make_sessionmaker
from dermgate.pipeline import Dispatcher, Planner, Worker
from dermgate.records import Channel
from dermgate.settings import Settings
from dermgate.store import ObjectStore

log = structlog.get_logger("dermgate.app")


class Runtime:
    """The parts of a running dermgate, built lazily from settings."""

    def __init__(self, settings: Settings, *, create: bool = True) -> None:
        self.settings = settings
        settings.workdir.mkdir(parents=True, exist_ok=True)
        self.db: DbEngine = make_engine(settings.db_url)
        if create:
            from dermgate.migrate import upgrade
            upgrade(settings.db_url)   # safe from many processes at once (advisory lock / BEGIN IMMEDIATE)
        self.sessions: sessionmaker = make_sessionmaker(self.db)
        self.store = ObjectStore(settings.store_dir)

    @cached_property
    def audit(self) -> AuditSink:
        return open_audit(self.settings)

    @cached_property
    def classifier(self) -> Any:
        from dermgate import metrics
        from inference.engine import Engine
        m = self.settings.model
        threads = m.threads or max(1, (os.cpu_count() or 2))
        # one model run per worker batch (batches across jobs: worker.batch_size; larger on a GPU)
        engine = Engine(m.path, intra_op_threads=threads, batch_size=max(32, self.settings.worker.batch_size))
        for provider in ("CUDAExecutionProvider", "CPUExecutionProvider"):
            metrics.EXECUTION_PROVIDER.labels(provider).set(1 if engine.providers[0] == provider else 0)
        return TimedClassifier(engine)

    @cached_property
    def channels(self) -> dict[str, Channel]:
        from dermgate.channels import build_channels
        return build_channels(self)

    @cached_property
    def planners(self) -> list[Planner]:
        from dermgate.channels import build_planners
        return build_planners(self)

    def worker(self, owner: str | None = None, on_planned: Any = None) -> Worker:
        return Worker(self.sessions, self.store, self.classifier, self.audit, self.planners,
                      self.settings.worker, owner=owner, on_planned=on_planned)

    def dispatcher(self, owner: str | None = None, channels: list[str] | None = None) -> Dispatcher:
        """A dispatcher for ``channels`` (default: every channel)."""
        chosen = self.channels if channels is None else {c: self.channels[c] for c in channels}
        return Dispatcher(self.sessions, chosen, self.settings.worker, self.audit, owner=owner)

    def intake(self) -> Any:
        """The SCP's intake, one image at a time (tools and tests; the SCP uses ``group_commit``)."""
        from dermgate.intake import Intake
        return Intake(self.store, self.sessions)

    def group_commit(self, on_commit: Any = None) -> Any:
        """The SCP's intake and audit sink with group commit (dermgate/groupcommit.py); close it after the SCP."""
        from dermgate.groupcommit import GroupCommit
        return GroupCommit(self.store, self.sessions, self.audit, on_commit=on_commit)

    def close(self) -> None:
        closer = getattr(self.__dict__.get("audit"), "close", None)
        if closer:
            closer()
        self.db.dispose()


class TimedClassifier:
    """The engine, with each batch's run time observed per execution provider.

    Worker threads of one process take turns at the model: one batch runs while the others
    render the previous ones (the model releases the GIL; rendering needs it), and ONNX
    Runtime keeps the memory of one batch, not one per thread.
    """

    def __init__(self, engine: Any) -> None:
        import threading
        self.engine = engine
        self._turn = threading.Lock()

    def predict(self, images: list[Any]) -> list[Any]:
        import time

        from dermgate import metrics
        with self._turn:
            t0 = time.perf_counter()
            out = self.engine.predict(images)
            metrics.INFERENCE_SECONDS.labels(self.engine.providers[0]).observe(time.perf_counter() - t0)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


class TimedAudit:
    """The audit trail, with each durable write's latency observed."""

    def __init__(self, trail: Any) -> None:
        self.trail = trail

    def record(self, event: Any) -> int:
        import time

        from dermgate import metrics
        t0 = time.perf_counter()
        seq = self.trail.record(event)
        metrics.AUDIT_WRITE_SECONDS.observe(time.perf_counter() - t0)
        return int(seq)

    def record_many(self, events: Any) -> list[int]:
        import time

        from dermgate import metrics
        t0 = time.perf_counter()
        seqs = self.trail.record_many(events)
        metrics.AUDIT_WRITE_SECONDS.observe(time.perf_counter() - t0)
        return [int(s) for s in seqs]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.trail, name)


def open_audit(settings: Settings) -> TimedAudit:
    """Open the audit trail from settings.

    Keys come from ``DERMGATE_AUDIT_KEY`` / ``DERMGATE_AUDIT_SIGNING_KEY`` or
    key files (0600). In development only, missing keys are generated under
    ``<workdir>/keys`` so the demo needs no set-up; production refuses to start
    without configured keys rather than invent them.
    """
    from audit.cli import open_configured_trail
    from audit.keys import KEY_ENV, KEYRING_FILE, SIGNING_KEY_ENV, SIGNING_KEY_FILE, init_keys
    a = settings.audit
    key_dir = settings.workdir / "keys"
    key_file = a.key_file or key_dir / KEYRING_FILE
    signing = a.signing_key_file or key_dir / SIGNING_KEY_FILE
    have_keys = (os.environ.get(KEY_ENV) or key_file.exists()) and (os.environ.get(SIGNING_KEY_ENV) or signing.exists())
    if not have_keys and settings.environment == "development" and a.key_file is None:
        from audit.errors import AuditConfigError
        try:
            init_keys(key_dir)
            log.warning("audit_keys_generated", directory=str(key_dir), note="development only")
        except AuditConfigError:
            pass   # another process of this work dir made them first

    trail = open_configured_trail(settings.audit_dir, key_file, signing, checkpoint_every=a.checkpoint_every,
                                  auto_repair=True, syslog_host=a.syslog_host, syslog_port=a.syslog_port,
                                  syslog_ca_file=a.syslog_ca_file)
    return TimedAudit(trail)


def workdir_from(path: str | Path | None) -> Path:
    return Path(path or os.environ.get("DERMGATE_WORKDIR") or Path.cwd()).resolve()
