"""The DICOM SCP: wiring only -- the AE, its contexts and timeouts, the handlers, the servers.

What each piece decides lives elsewhere: association policy in ``policy.py``,
connection limits before any association in ``guard.py``, certificate binding in
``identity.py``, C-ECHO / C-STORE in ``handlers.py``, TLS in ``tls.py``, pixel
decoding in ``decode.py``, status codes in ``status.py``. The conformance
statement is ``docs/dicom-conformance.md``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog
from pynetdicom import AE, evt

from audit.api import AuditSink
from dermgate.intake import Intake
from dermgate.settings import DicomSettings
from dermgate.store import ObjectStore
from dermgate.throttle import AuditCoalescer
from integration.dicom_scp import incoming
from integration.dicom_scp.guard import ConnectionGuard, GuardedAssociationServer
from integration.dicom_scp.handlers import handle_echo, handle_store, utcnow
from integration.dicom_scp.policy import AssociationPolicy, handle_accepted, handle_rejected, handle_requested
from integration.dicom_scp.tls import handle_conn_open, server_context
from integration.dicom_scp.uids import (SCP_STORAGE_SOP_CLASSES, SCP_TRANSFER_SYNTAXES,
                                        UNCOMPRESSED_TRANSFER_SYNTAXES, VERIFICATION)

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]
_STOP_POLL_S = 0.05
AUDIT_COALESCE_S = 60.0                 # refused / silent connections: one audit record per source and reason per minute


def build_ae(cfg: DicomSettings) -> AE:
    """The acceptor AE: own title, the explicit SOP class / transfer syntax list, limits, timeouts."""
    ae = AE(ae_title=cfg.ae_title)
    for sop_class in SCP_STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(SCP_TRANSFER_SYNTAXES))
    ae.add_supported_context(VERIFICATION, list(UNCOMPRESSED_TRANSFER_SYNTAXES))
    ae.maximum_associations = cfg.max_associations
    ae.acse_timeout = cfg.acse_timeout
    ae.dimse_timeout = cfg.dimse_timeout
    ae.network_timeout = cfg.network_timeout
    ae.maximum_pdu_size = cfg.max_pdu
    ae.require_called_aet = True
    # Defence in depth: pynetdicom's own check, should the EVT_REQUESTED policy ever not run.
    if not cfg.accept_unknown_callers and cfg.allowed_callers:
        ae.require_calling_aet = [c.ae_title for c in cfg.allowed_callers]
    return ae


class DicomService:
    """The SCP on its plain port and/or its TLS port; stop() drains in-flight associations."""

    def __init__(self, cfg: DicomSettings, intake: Intake, audit: AuditSink, store: ObjectStore,
                 clock: Clock = utcnow, *, coalesce_s: float = AUDIT_COALESCE_S) -> None:
        self.cfg = cfg
        self.intake = intake
        self.audit = audit
        self.store = store
        self.clock = clock
        self.policy = AssociationPolicy(cfg)
        self.coalescer = AuditCoalescer(audit, coalesce_s)
        self.guard = ConnectionGuard(self.policy, cfg.max_connections_per_host, cfg.pre_association_timeout,
                                     self.coalescer, clock)
        self.ae = build_ae(cfg)
        # Received data sets go to files in the store's incoming/ folder as they arrive (incoming.py);
        # without a store (a service that only answers C-ECHO, tests) they stay in memory.
        if store is not None:
            setattr(self.ae, incoming.SPOOL_ATTR, incoming.SpoolSettings(
                folder=store.root / incoming.INCOMING_DIR, max_bytes=cfg.max_object_bytes,
                max_pixels=cfg.max_pixels))
        self.servers: dict[str, GuardedAssociationServer] = {}

    def handlers(self) -> list[tuple[Any, ...]]:
        """pynetdicom event bindings: ``(event, handler, [dependencies])``."""
        cfg, audit, clock = self.cfg, self.audit, self.clock
        return [
            (evt.EVT_CONN_OPEN, handle_conn_open, [cfg.network_timeout, cfg.pre_association_timeout,
                                                   self.coalescer, clock]),
            (evt.EVT_REQUESTED, handle_requested, [self.policy, audit, clock]),
            (evt.EVT_ACCEPTED, handle_accepted, [audit, clock]),
            (evt.EVT_REJECTED, handle_rejected, [audit, clock]),
            (evt.EVT_C_ECHO, handle_echo, [audit, clock]),
            (evt.EVT_C_STORE, handle_store, [self.intake, audit, cfg, self.store, clock]),
        ]

    def start(self) -> None:
        """Listen on the plain port (unless ``plain_listener`` is off) and on the TLS port when TLS is
        enabled (non-blocking)."""
        ssl_context = server_context(self.cfg.tls) if self.cfg.tls.enabled else None   # fail before listening
        incoming.install()
        if self.cfg.plain_listener:
            self.servers["plain"] = self._serve(self.cfg.port, None, "plain")
        if ssl_context is not None:
            self.servers["tls"] = self._serve(self.cfg.tls.port, ssl_context, "tls")
        log.info("scp_started", ae_title=self.cfg.ae_title, host=self.cfg.host, port=self.port,
                 tls_port=self.tls_port, per_host=self.cfg.max_connections_per_host,
                 pre_association_timeout=self.cfg.pre_association_timeout)

    def _serve(self, port: int, ssl_context: Any, kind: str) -> GuardedAssociationServer:
        """pynetdicom's non-blocking server, made with the guarded server class (what ``start_server`` does)."""
        server = self.ae.make_server((self.cfg.host, port), ssl_context=ssl_context, evt_handlers=self.handlers(),
                                     server_class=GuardedAssociationServer, guard=self.guard, port_kind=kind)
        assert isinstance(server, GuardedAssociationServer)
        thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer-{kind}", daemon=True)
        thread.start()
        self.ae._servers.append(server)
        return server

    @property
    def port(self) -> int | None:
        """The bound plain port (the real one when configured as 0)."""
        server = self.servers.get("plain")
        return int(server.server_address[1]) if server else None

    @property
    def tls_port(self) -> int | None:
        server = self.servers.get("tls")
        return int(server.server_address[1]) if server else None

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let in-flight associations finish for up to ``timeout`` s, then abort the rest."""
        for server in self.servers.values():
            server.shutdown()                 # closes the listening socket; association threads go on
        self.servers.clear()
        deadline = time.monotonic() + timeout
        while self._acceptors() and time.monotonic() < deadline:
            time.sleep(_STOP_POLL_S)
        remaining = self._acceptors()
        for assoc in remaining:
            assoc.abort()
        self.coalescer.close()
        log.info("scp_stopped", aborted=len(remaining))

    def _acceptors(self) -> list[Any]:
        return [a for a in self.ae.active_associations if a.is_acceptor]
