"""Composition root: builds the service's parts from one Settings object.

Everything is constructed here and injected downwards, so tests build the
same parts with their own settings, peers and clocks.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import structlog
from sqlalchemy.engine import Engine as DbEngine
from sqlalchemy.orm import sessionmaker

from audit.api import AuditSink
from dermgate.db import AuditAnchor, make_engine, make_sessionmaker
from dermgate.durable import private_dir
from dermgate.pipeline import Dispatcher, Planner, Worker
from dermgate.records import Channel
from dermgate.settings import Settings
from dermgate.store import ObjectStore, store_cipher

log = structlog.get_logger("dermgate.app")


# What a work dir holds once dermgate has used it (any one of them is enough).
STATE_MARKERS = ("dermgate.toml", "dermgate.db", "store", "audit-trail", "keys")


class WorkdirError(Exception):
    """The work dir holds no dermgate state, or its database is not at this release's schema."""


def has_state(settings: Settings) -> bool:
    """Whether the work dir already holds dermgate state (a mistyped --workdir holds none)."""
    wd = settings.workdir
    return any((wd / name).exists() for name in STATE_MARKERS)


class Runtime:
    """The parts of a running dermgate, built lazily from settings.

    ``create=True`` (serve, demo, migrate, tests) makes the work dir and migrates the database.
    ``create=False`` (every other command) refuses a work dir without dermgate state and a
    database that is not at this release's schema, and changes neither.
    """

    def __init__(self, settings: Settings, *, create: bool = True) -> None:
        self.settings = settings
        if not create and not has_state(settings):
            raise WorkdirError(f"{settings.workdir} holds no dermgate state (none of {', '.join(STATE_MARKERS)}): "
                               "check --workdir or $DERMGATE_WORKDIR; 'dermgate migrate', 'dermgate serve' "
                               "and 'dermgate demo' create one")
        private_dir(settings.workdir, tighten=False)   # a new work dir is 0700; an existing one is the admin's
        self.db: DbEngine = make_engine(settings.db_url)
        if create:
            from dermgate.migrate import upgrade
            upgrade(settings.db_url)   # safe from many processes at once (advisory lock / BEGIN IMMEDIATE)
        else:
            self._require_schema()
        self.sessions: sessionmaker = make_sessionmaker(self.db)
        # Encrypted at rest when settings.store_encrypted (production default); no key, no start.
        self.store = ObjectStore(settings.store_dir, store_cipher(settings))

    def _require_schema(self) -> None:
        from dermgate.migrate import current, head
        at, want = current(self.settings.db_url), head()
        if at != want:
            self.db.dispose()
            raise WorkdirError(f"the database is at schema {at or 'none'}, this release needs {want}: "
                               "run 'dermgate migrate' first")

    @cached_property
    def audit(self) -> AuditSink:
        return open_audit(self.settings)

    @cached_property
    def classifier(self) -> Any:
        from dermgate import metrics
        from inference.engine import Engine
        m = self.settings.model
        threads = m.threads or max(1, (os.cpu_count() or 2))
        # No CPU arena: it would hold the largest batch's memory for good (issue 16, bench_memory.py).
        # One model run per worker batch (batches across jobs: worker.batch_size; larger on a GPU).
        engine = Engine(m.path, intra_op_threads=threads, cpu_memory_arena=False,
                        batch_size=max(32, self.settings.worker.batch_size))
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
        from integration.dicom_scp.stages import DicomDecoder, DicomRenderer
        return Worker(self.sessions, self.store, self.classifier, self.audit, self.planners,
                      self.settings.worker, decoder=DicomDecoder(), renderer=DicomRenderer(self.store),
                      owner=owner, on_planned=on_planned)

    def dispatcher(self, owner: str | None = None, channels: list[str] | None = None) -> Dispatcher:
        """A dispatcher for ``channels`` (default: every channel; tests, tools); the service runs
        ``dispatchers()``."""
        chosen = self.channels if channels is None else {c: self.channels[c] for c in channels}
        return Dispatcher(self.sessions, chosen, self.settings.worker, self.audit, owner=owner)

    def dispatchers(self) -> list[Dispatcher]:
        """One dispatcher per channel, each for its own thread: a hung EHR cannot stall the PACS."""
        return [Dispatcher(self.sessions, {name: ch}, self.settings.worker, self.audit)
                for name, ch in self.channels.items()]

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


def open_audit(settings: Settings, *, public_key_files: Sequence[Path] = ()) -> TimedAudit:
    """Open the audit trail from settings, anchored in the database.

    Keys come from ``DERMGATE_AUDIT_KEY`` / ``DERMGATE_AUDIT_SIGNING_KEY`` or
    key files (0600). In development only, missing keys are generated under
    ``<workdir>/keys`` so the demo needs no set-up; production refuses to start
    without configured keys rather than invent them, and refuses key files in
    the work dir or the trail's directory: whoever can write the trail must not
    also be able to read the key that signs it.

    The trail's head is published to the ``audit_anchor`` table of the service
    database (``audit.anchor``): a trail that is deleted, cut back or rolled back
    is then refused, and never repaired without ``dermgate audit repair --confirm``.
    """
    from audit.anchor import DbAnchor
    from audit.cli import open_configured_trail
    from audit.errors import AuditConfigError
    from audit.keys import KEY_ENV, KEYRING_FILE, SIGNING_KEY_ENV, SIGNING_KEY_FILE, init_keys
    a = settings.audit
    key_dir = settings.workdir / "keys"
    key_file = a.key_file or key_dir / KEYRING_FILE
    signing = a.signing_key_file or key_dir / SIGNING_KEY_FILE
    if settings.environment == "production":
        check_key_placement(settings)
    have_keys = (os.environ.get(KEY_ENV) or key_file.exists()) and (os.environ.get(SIGNING_KEY_ENV) or signing.exists())
    if not have_keys and settings.environment == "development" and a.key_file is None:
        try:
            init_keys(key_dir)
            log.warning("audit_keys_generated", directory=str(key_dir), note="development only")
        except AuditConfigError:
            pass   # another process of this work dir made them first

    anchor = DbAnchor(make_engine(settings.db_url), AuditAnchor.__table__, owns_engine=True)
    trail = open_configured_trail(settings.audit_dir, key_file, signing, checkpoint_every=a.checkpoint_every,
                                  public_key_files=public_key_files, anchor=anchor,
                                  syslog_host=a.syslog_host, syslog_port=a.syslog_port,
                                  syslog_ca_file=a.syslog_ca_file)
    return TimedAudit(trail)


def check_key_placement(settings: Settings) -> None:
    """Production: each audit key comes from the environment (or a KMS), or from a file outside the
    work dir and the audit directory (a systemd credential, a mounted Secret)."""
    from audit.errors import AuditConfigError
    from audit.keys import KEY_ENV, SIGNING_KEY_ENV
    a = settings.audit
    for env, path, setting in ((SIGNING_KEY_ENV, a.signing_key_file, "audit.signing_key_file"),
                               (KEY_ENV, a.key_file, "audit.key_file")):
        if os.environ.get(env):
            continue
        if path is None:
            raise AuditConfigError(f"production: set {env} or {setting} (a file outside the work dir); "
                                   "keys are not generated or looked for beside the trail")
        resolved = Path(path).resolve()
        for folder in (settings.audit_dir, settings.workdir):
            if resolved.is_relative_to(Path(folder).resolve()):
                raise AuditConfigError(f"production: {setting} {path} lies inside {folder}, beside the audit trail: "
                                       "whoever can write the trail could read the key and re-sign a rewritten "
                                       f"trail; keep it apart (systemd credential, Secret, or {env})")


def workdir_from(path: str | Path | None) -> Path:
    return Path(path or os.environ.get("DERMGATE_WORKDIR") or Path.cwd()).resolve()
