"""Forward audit events to an IHE ATNA Audit Record Repository: syslog over TLS.

Each event, once durable in the local trail, becomes a DICOM PS3.15 A.5 audit
message in an RFC 5424 syslog message (facility 10 security/authorization,
severity 5 notice, MSGID ``IHE+RFC-3881``, the trail's sequence number in the
standard ``meta sequenceId`` parameter), framed with RFC 5425 octet counting
(``MSG-LEN SP SYSLOG-MSG``) over TLS 1.2 or later (BCP 195).

Each signed record of the trail (genesis, checkpoints, repairs: envelope
only, no PHI) is also sent, as its canonical JSON with MSGID
``DERMGATE-SIGNED``: the collector then holds the chain head outside the
trail's reach, and ``dermgate audit verify --witness FILE`` checks the trail
against the messages it stored (a trail cut back or rolled back no longer
reaches the newest of them).

Best effort by design: the local trail is the record of truth, so forwarding
must never block nor fail an audited action. ``on_record`` only puts the
message on a bounded queue (dropping it, and counting the drop, when the queue
is full); a daemon thread connects, sends, and reconnects with exponential
back-off. Anything dropped can be re-sent later from ``audit export --format dicom``.
"""

from __future__ import annotations

import os
import queue
import socket
import ssl
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import structlog

from audit.api import AuditEvent
from audit.export import ExportContext, to_dicom_xml
from audit.format import format_time

log = structlog.get_logger("audit.syslog")

ATNA_TLS_PORT = 6514                    # RFC 5425 syslog over TLS
FACILITY_AUTH = 10                      # security/authorization messages (RFC 5424 table 1)
SEVERITY_NOTICE = 5
MSGID = "IHE+RFC-3881"                  # IHE ITI-20: DICOM/RFC 3881 audit message in MSG
SIGNED_MSGID = "DERMGATE-SIGNED"        # a signed record of the trail (the outside witness of its head)
BOM = "\ufeff"                          # RFC 5424 MSG-UTF8 starts with a byte order mark
NILVALUE = "-"
SEQUENCE_ID_MAX = 2_147_483_647         # RFC 5424 7.3.1 sequenceId range


def client_tls_context(ca_file: Path | None, *, cert_file: Path | None = None,
                       key_file: Path | None = None) -> ssl.SSLContext:
    """Verify the collector against ``ca_file`` (system store if None); TLS 1.2+; optional client cert (ATNA)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return context


def _header_field(value: str, limit: int) -> str:
    """PRINTUSASCII (33..126), at most ``limit`` characters, or the NILVALUE."""
    cleaned = "".join(ch for ch in value if 33 <= ord(ch) <= 126)[:limit]
    return cleaned or NILVALUE


def syslog_message(xml: str, *, seq: int, time: datetime, hostname: str, app_name: str = "dermgate",
                   procid: str | None = None, msgid: str = MSGID) -> bytes:
    """One RFC 5424 message carrying one audit message (or, with ``SIGNED_MSGID``, one signed record)."""
    pri = FACILITY_AUTH * 8 + SEVERITY_NOTICE
    sequence = (seq - 1) % SEQUENCE_ID_MAX + 1
    header = " ".join([f"<{pri}>1", format_time(time), _header_field(hostname, 255), _header_field(app_name, 48),
                       _header_field(procid or str(os.getpid()), 128), msgid])
    return f'{header} [meta sequenceId="{sequence}"] {BOM}{xml}'.encode("utf-8")


def frame(message: bytes) -> bytes:
    """RFC 5425 octet counting."""
    return str(len(message)).encode("ascii") + b" " + message


@dataclass
class ForwarderStats:
    queued: int = 0
    sent: int = 0
    dropped: int = 0
    connect_failures: int = 0


class SyslogTlsForwarder:
    """A :class:`audit.trail.RecordListener` that ships events to a syslog-TLS collector, best effort."""

    def __init__(self, host: str, port: int = ATNA_TLS_PORT, *, tls: ssl.SSLContext,
                 ctx: ExportContext | None = None, app_name: str = "dermgate", queue_size: int = 10_000,
                 connect_timeout: float = 5.0, backoff_initial: float = 0.5, backoff_max: float = 30.0) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.ctx = ctx or ExportContext()
        self.app_name = app_name
        self.connect_timeout = connect_timeout
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.stats = ForwarderStats()
        self._queue: queue.Queue[tuple[int, AuditEvent] | bytes | None] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._sock: ssl.SSLSocket | None = None
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    # --- producer side: never blocks -----------------------------------------------------------

    def on_record(self, seq: int, event: AuditEvent) -> None:
        if self._stop.is_set():
            return
        try:
            self._queue.put_nowait((seq, event))       # rendering happens on the sender thread
            self.stats.queued += 1
        except queue.Full:
            self.stats.dropped += 1
            if self.stats.dropped == 1 or self.stats.dropped % 1000 == 0:
                log.warning("audit_syslog_queue_full", dropped=self.stats.dropped)

    def on_signed(self, line: bytes) -> None:
        """Queue a signed record of the trail (genesis, checkpoint, repair) for the collector."""
        if self._stop.is_set():
            return
        try:
            self._queue.put_nowait(line)
            self.stats.queued += 1
        except queue.Full:
            self.stats.dropped += 1

    # --- sender thread -------------------------------------------------------------------------------

    def _connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        try:
            return self.tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise

    def _run(self) -> None:
        delay = self.backoff_initial
        pending: bytes | None = None
        while True:
            if pending is None:
                try:
                    item = self._queue.get(timeout=0.2)
                except queue.Empty:
                    if self._stop.is_set():
                        break
                    continue
                if item is None:                          # close() sentinel: queue drained
                    break
                pending = self._render_signed(item) if isinstance(item, bytes) else self._render(*item)
            try:
                if self._sock is None:
                    self._sock = self._connect()
                    delay = self.backoff_initial
                self._sock.sendall(pending)
                self.stats.sent += 1
                pending = None
            except (OSError, ssl.SSLError) as exc:
                self._drop_socket()
                self.stats.connect_failures += 1
                log.warning("audit_syslog_unavailable", host=self.host, port=self.port, error=type(exc).__name__,
                            retry_in_s=delay)
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, self.backoff_max)
        self._drop_socket()

    def _render(self, seq: int, event: AuditEvent) -> bytes:
        xml = to_dicom_xml(event, self.ctx)
        return frame(syslog_message(xml, seq=seq, time=event.time or datetime.now().astimezone(),
                                    hostname=self.ctx.hostname, app_name=self.app_name))

    def _render_signed(self, line: bytes) -> bytes:
        import json
        env = json.loads(line)
        return frame(syslog_message(line.decode("utf-8").rstrip("\n"), seq=max(1, int(env["seq"])),
                                    time=datetime.now().astimezone(), hostname=self.ctx.hostname,
                                    app_name=self.app_name, msgid=SIGNED_MSGID))

    def _drop_socket(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (up to ``timeout`` seconds), then stop."""
        if self._stop.is_set():
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._stop.set()
        self._thread.join(1.0)
