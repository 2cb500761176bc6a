"""Holding up under floods: failure counters with lockout, and audit records coalesced per source.

Both the HTTP API (failed authentication) and the DICOM SCP (refused and silent
connections) use them, so an attacker can neither guess without limit nor turn
the durable (fsynced) audit trail into the bottleneck:

* :class:`FailureLimiter` counts failures per key (a source address, a token
  digest) in a sliding window; ``limit`` failures within ``window_s`` lock the
  key for ``lockout_s``. Memory is bounded: the least recently failed keys go
  first.
* :class:`AuditCoalescer` records the first event of a key at once and counts
  the repeats within ``window_s``; when the window closes (checked by a
  background thread, and on :meth:`AuditCoalescer.close`) one summary record
  carries their number, first and last time. No failure is lost from the trail:
  each is either a record or counted in one.

Keys for IPv6 sources are their /64 (:func:`source_key`): one host is given a
/64, so rotating addresses inside it does not escape the limit.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import structlog

from audit.api import AuditEvent, AuditSink

log = structlog.get_logger("dermgate.throttle")

Clock = Callable[[], float]
DEFAULT_MAX_KEYS = 10_000


def source_key(host: str | None) -> str:
    """The address a limit applies to: IPv4 as is (IPv4-mapped IPv6 unwrapped), IPv6 as its /64."""
    if not host:
        return "unknown"
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


class FailureLimiter:
    """``limit`` failures of one key within ``window_s`` lock it for ``lockout_s`` seconds."""

    def __init__(self, limit: int, window_s: float, lockout_s: float, *, clock: Clock = time.monotonic,
                 max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.limit, self.window_s, self.lockout_s = limit, window_s, lockout_s
        self.clock, self.max_keys = clock, max_keys
        self._lock = threading.Lock()
        self._failures: OrderedDict[Hashable, deque[float]] = OrderedDict()
        self._locked_until: dict[Hashable, float] = {}

    def retry_after(self, key: Hashable) -> float:
        """Seconds ``key`` stays locked (0: not locked)."""
        with self._lock:
            return self._remaining(key, self.clock())

    def _remaining(self, key: Hashable, now: float) -> float:
        until = self._locked_until.get(key)
        if until is None:
            return 0.0
        if until <= now:
            del self._locked_until[key]
            return 0.0
        return until - now

    def failure(self, key: Hashable) -> float:
        """Count one failure; returns the lockout now in force for ``key`` (0: none)."""
        with self._lock:
            now = self.clock()
            times = self._failures.pop(key, None) or deque(maxlen=self.limit)
            times.append(now)
            self._failures[key] = times                 # most recent last
            while len(self._failures) > self.max_keys:
                self._failures.popitem(last=False)
            if len(times) >= self.limit and now - times[0] <= self.window_s:
                self._locked_until[key] = now + self.lockout_s
                times.clear()
                if len(self._locked_until) > self.max_keys:
                    expired = [k for k, t in self._locked_until.items() if t <= now]
                    for k in expired:
                        del self._locked_until[k]
            return self._remaining(key, now)


@dataclass
class _Open:
    """A coalescing window of one key: its first record is written, the rest counted."""
    started: float
    first_at: datetime
    last_at: datetime
    last_event: AuditEvent
    repeats: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class AuditCoalescer:
    """The first event of a key per window is recorded at once; its repeats become one summary record."""

    def __init__(self, audit: AuditSink, window_s: float = 60.0, *, clock: Clock = time.monotonic,
                 max_keys: int = DEFAULT_MAX_KEYS, tick_s: float = 1.0) -> None:
        self.audit, self.window_s, self.clock, self.max_keys = audit, window_s, clock, max_keys
        self.tick_s = min(tick_s, max(window_s / 4, 0.05))
        self._lock = threading.Lock()
        self._open: OrderedDict[Hashable, _Open] = OrderedDict()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, key: Hashable, event: AuditEvent) -> None:
        """Record ``event`` now, or count it into the open window of ``key``."""
        now, wall = self.clock(), event.time or datetime.now(timezone.utc)
        due: list[AuditEvent] = []
        with self._lock:
            entry = self._open.get(key)
            if entry is not None and now - entry.started < self.window_s:
                entry.repeats += 1
                entry.last_at, entry.last_event = wall, event
                reason = str(event.detail.get("reason", ""))
                entry.reasons[reason] = entry.reasons.get(reason, 0) + 1
                self._open.move_to_end(key)
                self._ensure_thread()
                return
            if entry is not None:
                due.extend(self._summary(entry))
                del self._open[key]
            self._open[key] = _Open(started=now, first_at=wall, last_at=wall, last_event=event)
            while len(self._open) > self.max_keys:
                _, oldest = self._open.popitem(last=False)
                due.extend(self._summary(oldest))
            due.append(event)
        self._write(due)

    def flush(self, *, everything: bool = False) -> int:
        """Write the summaries of closed windows (all windows with ``everything``); returns how many."""
        now = self.clock()
        due: list[AuditEvent] = []
        with self._lock:
            for key in [k for k, e in self._open.items() if everything or now - e.started >= self.window_s]:
                due.extend(self._summary(self._open.pop(key)))
        self._write(due)
        return len(due)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush(everything=True)

    def _summary(self, entry: _Open) -> list[AuditEvent]:
        if not entry.repeats:
            return []
        detail: dict[str, Any] = {**entry.last_event.detail, "coalesced": entry.repeats,
                                  "coalesced_reasons": dict(entry.reasons),
                                  "first_at": entry.first_at.isoformat(), "last_at": entry.last_at.isoformat(),
                                  "window_s": self.window_s}
        return [replace(entry.last_event, detail=detail, time=entry.last_at)]

    def _write(self, events: list[AuditEvent]) -> None:
        for event in events:
            try:
                self.audit.record(event)
            except Exception:  # noqa: BLE001 - the caller answers the peer either way
                log.exception("coalesced_audit_failed", event=event.event.value)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="audit-coalescer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            self.flush()
            with self._lock:
                if not self._open:
                    self._thread = None
                    return
