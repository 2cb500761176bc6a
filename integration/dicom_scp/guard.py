"""Connections before associations: who may hold a socket, and for how long.

pynetdicom counts every accepted TCP connection against ``max_associations``
from the moment it is accepted, and waits ``acse_timeout`` for its
A-ASSOCIATE-RQ: a few silent connections would lock every modality out. So,
at TCP accept and before any thread or PDU:

* a connection from a host on no allow-list entry is closed at once (when
  unknown callers are not accepted it could never associate);
* a host may hold at most ``max_connections_per_host`` connections (IPv6: per /64);
* a connection must complete its TLS handshake and send its A-ASSOCIATE-RQ
  within ``pre_association_timeout`` seconds (the ACSE timeout applies after).

Every refused connection and every connection that ends without an
association request is audited (``dicom.association``, result ``refused`` or
``no-association``), coalesced per source and reason so that a flood becomes
one record per window with its count.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog
from pynetdicom import evt
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from audit.api import AuditEvent, EventType, Outcome
from dermgate import metrics
from dermgate.throttle import AuditCoalescer, source_key
from integration.dicom_scp.policy import AssociationPolicy

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]
ROLE_MODALITY = "modality"
_GRACE_S = 0.25


class ConnectionGuard:
    """Per-host connection counts and the audit of refused or silent connections."""

    def __init__(self, policy: AssociationPolicy, per_host: int, pre_association_timeout: float,
                 coalescer: AuditCoalescer, clock: Clock) -> None:
        self.policy, self.per_host, self.timeout = policy, per_host, pre_association_timeout
        self.coalescer, self.clock = coalescer, clock
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    def admit(self, host: str, port_kind: str) -> bool:
        """At TCP accept: take a slot for ``host``, or refuse (audited) and return False."""
        if not self.policy.host_listed(host):
            self.refused(host, port_kind, "source host on no allow-list entry")
            return False
        key = source_key(host)
        with self._lock:
            n = self._open.get(key, 0)
            if n >= self.per_host:
                over = True
            else:
                over = False
                self._open[key] = n + 1
        if over:
            self.refused(host, port_kind, f"more than {self.per_host} concurrent connections from this host")
            return False
        return True

    def release(self, host: str) -> None:
        key = source_key(host)
        with self._lock:
            n = self._open.get(key, 0) - 1
            if n > 0:
                self._open[key] = n
            else:
                self._open.pop(key, None)

    def open_connections(self, host: str) -> int:
        with self._lock:
            return self._open.get(source_key(host), 0)

    def refused(self, host: str, port_kind: str, reason: str) -> None:
        metrics.CONNECTIONS_REFUSED.labels(reason="per-host limit" if "concurrent" in reason
                                           else "host not listed").inc()
        log.warning("dicom_connection_refused", host=host, port=port_kind, reason=reason)
        self._audit(host, port_kind, "refused", reason)

    def ended_without_association(self, host: str, port_kind: str, seconds: float) -> None:
        timed_out = seconds >= self.timeout * 0.9
        reason = (f"no A-ASSOCIATE-RQ within {self.timeout:g} s (pre-association timeout)" if timed_out
                  else "closed before requesting an association")
        metrics.CONNECTIONS_REFUSED.labels(reason="pre-association timeout" if timed_out else "no association").inc()
        log.info("dicom_connection_without_association", host=host, port=port_kind, reason=reason,
                 seconds=round(seconds, 2))
        self._audit(host, port_kind, "no-association", reason, seconds=round(seconds, 2))

    def _audit(self, host: str, port_kind: str, result: str, reason: str, **extra: Any) -> None:
        event = AuditEvent(event=EventType.ASSOCIATION, outcome=Outcome.MINOR_FAILURE, actor="unknown",
                           actor_role=ROLE_MODALITY, source=host,
                           detail={"result": result, "reason": reason, "port": port_kind, **extra},
                           time=self.clock())
        self.coalescer.record((source_key(host), result, reason), event)


class GuardedHandler(RequestHandler):
    """pynetdicom's request handler, kept alive until its association ends so the slot is released then."""

    server: GuardedAssociationServer

    def handle(self) -> None:
        started = time.monotonic()
        assoc = self._create_association()
        assoc._dermgate_accepted_at = started  # type: ignore[attr-defined] # read by handle_conn_open: the time budget
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        if getattr(assoc, "_dermgate_handshake_failed", False):
            self.server.shutdown_request(self.request)  # audited by handle_conn_open; nothing to run
            return
        assoc.start()
        # pynetdicom checks its timers between PDUs only: a peer that drips its A-ASSOCIATE-RQ a
        # byte at a time would keep the read going. Past the deadline the socket is cut.
        assoc.join(max(0.0, started + self.server.guard.timeout - time.monotonic()) + _GRACE_S)
        if assoc.is_alive() and assoc.requestor.primitive is None:
            raw = getattr(assoc.dul.socket, "socket", None)
            if raw is not None:
                try:
                    socket.socket.shutdown(raw, socket.SHUT_RDWR)
                except OSError:
                    pass
        assoc.join()
        if assoc.requestor.primitive is None:
            self.server.guard.ended_without_association(str(self.client_address[0]), self.server.port_kind,
                                                        time.monotonic() - started)


class GuardedAssociationServer(ThreadedAssociationServer):
    """A ThreadedAssociationServer that asks the :class:`ConnectionGuard` before taking a connection."""

    daemon_threads = True
    block_on_close = False          # stop() drains associations itself, with a deadline

    def __init__(self, *args: Any, guard: ConnectionGuard, port_kind: str, **kwargs: Any) -> None:
        self.guard, self.port_kind = guard, port_kind
        super().__init__(*args, request_handler=GuardedHandler, **kwargs)  # type: ignore[misc]

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.guard.admit(str(client_address[0]), self.port_kind)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.guard.release(str(client_address[0]))
