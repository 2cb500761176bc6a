"""The trail's head kept outside the trail, so a trail cut back, rolled back or deleted shows.

Someone who can write the audit directory but holds no signing key cannot forge
a record, but can make the trail *shorter*: cut records off the end together
with ``checkpoint.json``, keep an older copy, or delete the directory. Every
signature in what remains still verifies. What catches that is a record of how
far the trail had got, kept where the trail's files are not:

- :class:`DbAnchor`, the ``audit_anchor`` table of the service database, which
  every dermgate process already writes. Each durable write publishes the new
  head (newest seq and hash, and the newest signed checkpoint); the row only
  moves forward. Opening a trail that is missing, shorter, or holds another
  record at the anchored position is refused, and ``verify`` fails on it.
- the syslog collector (``audit.syslog``): every signed checkpoint is also sent
  there; ``verify --witness FILE`` checks the trail against what it received.

A published head is never ahead of the trail (it is published after the
fdatasync), so reading the anchor *before* the trail gives no false alarm
while other processes append.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Protocol

import structlog

from audit.errors import AuditConfigError

log = structlog.get_logger("audit.anchor")

ANCHOR_TABLE = "audit_anchor"
RETRY_S = 1.0                               # a database blip delays the anchor, never an audited action
CLOSE_FLUSH_S = 5.0
MIN_INTERVAL_S = 0.25                       # at most 4 anchor commits a second: the head lags by at most this


@dataclass(frozen=True)
class AnchorState:
    """How far one log had got: its newest durable record and its newest signed record."""
    log_id: str
    seq: int
    hash: str
    checkpoint_seq: int | None = None
    checkpoint_hash: str | None = None
    updated_at: datetime | None = None

    def merged(self, newer: AnchorState) -> AnchorState:
        """The furthest of both (same log): heads only move forward."""
        head = newer if newer.seq > self.seq else self
        ckpt = newer if (newer.checkpoint_seq or -1) > (self.checkpoint_seq or -1) else self
        return replace(head, checkpoint_seq=ckpt.checkpoint_seq, checkpoint_hash=ckpt.checkpoint_hash)


class Anchor(Protocol):
    """Where the trail's head is kept outside the trail."""

    def current(self) -> AnchorState | None:
        """The most recently anchored log, or None when nothing was ever anchored."""
        ...

    def advance(self, state: AnchorState) -> None:
        """Record ``state`` now (monotonic: an older head never replaces a newer one)."""
        ...

    def publish(self, state: AnchorState) -> None:
        """Record ``state`` soon, without blocking the audited action."""
        ...

    def flush(self, timeout: float = 10.0) -> None: ...

    def close(self) -> None: ...


class AnchorError(AuditConfigError):
    """The anchor store cannot be read or written."""


class DbAnchor:
    """The ``audit_anchor`` table on an SQLAlchemy engine; the service injects its
    definition (``dermgate.db.AuditAnchor.__table__``), so this package imports nothing of the service.

    Writes happen on a background thread that writes the newest head it was
    given, at most every ``min_interval_s`` (coalescing), so an audit write costs
    no extra database round trip and the disk no more than a few commits a
    second. On SQLite the anchor's commits are not fsynced (``synchronous=NORMAL``
    in WAL mode): a power loss can only make the anchor older, never ahead.
    """

    def __init__(self, engine: Any, table: Any, *, owns_engine: bool = False,
                 min_interval_s: float = MIN_INTERVAL_S) -> None:
        self.engine = engine
        self.owns_engine = owns_engine              # dispose it on close
        self.min_interval_s = min_interval_s
        self._urgent = False                        # flush() asked: write now, not after the interval
        if engine.dialect.name == "sqlite" and owns_engine:
            from sqlalchemy import event

            @event.listens_for(engine, "connect")
            def _no_fsync(dbapi_conn: Any, _: Any) -> None:
                dbapi_conn.execute("PRAGMA synchronous=NORMAL")
        self.table = table
        self._cond = threading.Condition()
        self._pending: AnchorState | None = None
        self._busy = False
        self._thread: threading.Thread | None = None
        self._closed = False
        self._exists: bool | None = None
        ref = weakref.ref(self)

        def after_fork() -> None:               # threads do not survive fork; connections must not be shared
            anchor = ref()
            if anchor is not None:
                anchor._cond, anchor._thread, anchor._pending, anchor._busy = threading.Condition(), None, None, False
                anchor.engine.dispose(close=False)

        os.register_at_fork(after_in_child=after_fork)

    # --- reading ---------------------------------------------------------------------------------

    def _table_exists(self) -> bool:
        """False until ``dermgate migrate`` made the table: then nothing is anchored, nor written."""
        if not self._exists:
            from sqlalchemy import inspect
            self._exists = bool(inspect(self.engine).has_table(ANCHOR_TABLE))
            if not self._exists:
                log.warning("audit_anchor_table_missing", note="run `dermgate migrate`: until then a cut-back "
                                                              "trail is not detected by the database anchor")
        return self._exists

    def current(self) -> AnchorState | None:
        from sqlalchemy import select
        from sqlalchemy.exc import SQLAlchemyError
        t = self.table
        try:
            if not self._table_exists():        # database not migrated yet: nothing anchored
                return None
            with self.engine.connect() as conn:
                row = conn.execute(select(t).order_by(t.c.updated_at.desc(), t.c.seq.desc()).limit(1)).first()
        except SQLAlchemyError as exc:
            raise AnchorError(f"the audit anchor in the database cannot be read ({type(exc).__name__}); "
                              "truncation of the trail cannot be ruled out") from None
        if row is None:
            return None
        return AnchorState(log_id=row.log_id, seq=int(row.seq), hash=row.hash, checkpoint_seq=row.checkpoint_seq,
                           checkpoint_hash=row.checkpoint_hash, updated_at=_aware(row.updated_at))

    # --- writing ---------------------------------------------------------------------------------

    def advance(self, state: AnchorState) -> None:
        from sqlalchemy import insert, or_, select, update
        from sqlalchemy.exc import IntegrityError, SQLAlchemyError
        t = self.table
        try:
            if not self._table_exists():
                return
        except SQLAlchemyError as exc:
            raise AnchorError(f"the audit anchor could not be written ({type(exc).__name__})") from None
        now = datetime.now(timezone.utc)
        for attempt in (1, 2):
            try:
                with self.engine.begin() as conn:
                    moved = conn.execute(update(t).where(t.c.log_id == state.log_id, t.c.seq < state.seq)
                                         .values(seq=state.seq, hash=state.hash, updated_at=now)).rowcount
                    if state.checkpoint_seq is not None:
                        conn.execute(update(t).where(t.c.log_id == state.log_id, or_(
                            t.c.checkpoint_seq.is_(None), t.c.checkpoint_seq < state.checkpoint_seq))
                            .values(checkpoint_seq=state.checkpoint_seq, checkpoint_hash=state.checkpoint_hash))
                    if not moved and conn.scalar(select(t.c.seq).where(t.c.log_id == state.log_id)) is None:
                        conn.execute(insert(t).values(log_id=state.log_id, seq=state.seq, hash=state.hash,
                                                      checkpoint_seq=state.checkpoint_seq,
                                                      checkpoint_hash=state.checkpoint_hash,
                                                      created_at=now, updated_at=now))
                return
            except IntegrityError:
                if attempt == 2:                # another process inserted the row first: update it
                    raise AnchorError("the audit anchor row could not be written") from None
            except SQLAlchemyError as exc:
                raise AnchorError(f"the audit anchor could not be written ({type(exc).__name__})") from None

    def publish(self, state: AnchorState) -> None:
        with self._cond:
            if self._closed or self._exists is False:
                return
            self._pending = state if self._pending is None else self._pending.merged(state)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-anchor", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                state, self._pending, self._busy = self._pending, None, True
            try:
                self.advance(state)
                failed = False
            except AnchorError as exc:
                log.warning("audit_anchor_write_failed", error=str(exc), seq=state.seq)
                failed = True
            with self._cond:
                self._busy = False
                if failed:
                    self._pending = state if self._pending is None else state.merged(self._pending)
                self._cond.notify_all()
                if failed and self._closed:
                    return
                self._cond.wait_for(lambda: self._closed or self._urgent,
                                    RETRY_S if failed else self.min_interval_s)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every published head is in the database (or ``timeout``)."""
        with self._cond:
            self._urgent = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._pending is None and not self._busy, timeout)
            self._urgent = False

    def close(self) -> None:
        self.flush(CLOSE_FLUSH_S)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(5.0)
        if self.owns_engine:
            self.engine.dispose()


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value
