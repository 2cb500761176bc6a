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

Signed records are sent at least once while the process lives: they have a
spool of their own, sent ahead of events; those written to a connection that
then broke are sent again on the next one (a successful send only means the
kernel has the bytes); and ``close()`` ends with a TLS close_notify and waits
for the collector to close its side, because closing a socket with unread
bytes (the TLS 1.3 session tickets a server sends) makes the kernel reset the
connection, and the collector then loses whatever it had not read yet. What
``close()`` cannot deliver in time is counted in ``stats`` and logged with the
signed records' sequence numbers (no PHI).
"""

from __future__ import annotations

import json
import os
import select
import socket
import ssl
import threading
import time
from collections import deque
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
SIGNED_SPOOL_SIZE = 10_000              # signed records held for the collector (about one per 100 events)
RESEND_WINDOW = 16                      # signed records re-sent when their connection breaks (the newest count)
RECV_CHUNK = 4096
CLOSE_WAIT_MIN_S = 0.5                  # for the close_notify exchange even when close() ran out of time
STOP_JOIN_S = 1.0


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
    dropped: int = 0                    # events (or, past SIGNED_SPOOL_SIZE, signed records) never sent
    connect_failures: int = 0
    resent: int = 0                     # signed records sent again after their connection broke
    undelivered: int = 0                # still queued when close() ran out of time
    unconfirmed: int = 0                # signed records sent on a connection the collector did not close cleanly


@dataclass(frozen=True)
class _Frame:
    data: bytes
    signed_seq: int | None = None       # set for a signed record (at-least-once), None for an event (best effort)


class SyslogTlsForwarder:
    """A :class:`audit.trail.RecordListener` that ships events to a syslog-TLS collector, best effort.

    Signed records (the collector's witness of the chain head) get more than
    events: a spool of their own that a full event queue never takes from, a
    re-send of those the last connection may not have delivered, and, on
    close, a TLS close_notify and a wait for the collector to close its side,
    so whatever is still not delivered is counted and logged, never lost silently.
    """

    def __init__(self, host: str, port: int = ATNA_TLS_PORT, *, tls: ssl.SSLContext,
                 ctx: ExportContext | None = None, app_name: str = "dermgate", queue_size: int = 10_000,
                 connect_timeout: float = 5.0, backoff_initial: float = 0.5, backoff_max: float = 30.0) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.ctx = ctx or ExportContext()
        self.app_name = app_name
        self.connect_timeout = connect_timeout
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.stats = ForwarderStats()
        self._queue_size = queue_size
        self._events: deque[tuple[int, AuditEvent]] = deque()
        self._signed: deque[bytes] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._close_deadline = 0.0
        self._stop = threading.Event()               # close() ran out of time: give up what is left
        self._sock: ssl.SSLSocket | None = None
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    # --- producer side: never blocks -----------------------------------------------------------

    def on_record(self, seq: int, event: AuditEvent) -> None:
        with self._cond:
            if self._closing:
                return
            if len(self._events) >= self._queue_size:
                self.stats.dropped += 1
                if self.stats.dropped == 1 or self.stats.dropped % 1000 == 0:
                    log.warning("audit_syslog_queue_full", dropped=self.stats.dropped)
                return
            self._events.append((seq, event))           # rendering happens on the sender thread
            self.stats.queued += 1
            self._cond.notify()

    def on_signed(self, line: bytes) -> None:
        """Queue a signed record of the trail (genesis, checkpoint, repair) for the collector, ahead of events."""
        with self._cond:
            if self._closing:
                return
            if len(self._signed) >= SIGNED_SPOOL_SIZE:  # the newest head is the one the witness needs
                self._signed.popleft()
                self.stats.dropped += 1
                log.warning("audit_syslog_signed_spool_full", dropped=self.stats.dropped)
            self._signed.append(line)
            self.stats.queued += 1
            self._cond.notify()

    # --- sender thread -------------------------------------------------------------------------------

    def _connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        try:
            return self.tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise

    def _take(self) -> tuple[int, AuditEvent] | bytes | None:
        """The next signed record, else the next event; None once closing and empty, or stopped."""
        with self._cond:
            while not self._stop.is_set():
                if self._signed:
                    return self._signed.popleft()
                if self._events:
                    return self._events.popleft()
                if self._closing:
                    return None
                self._cond.wait()
            return None

    def _run(self) -> None:
        delay = self.backoff_initial
        outbox: deque[_Frame] = deque()                  # rendered, not yet written to a live connection
        unconfirmed: deque[_Frame] = deque(maxlen=RESEND_WINDOW)   # signed, written to the current connection
        while True:
            if not outbox:
                item = self._take()
                if item is None:
                    break
                rendered = self._render_item(item)
                if rendered is None:
                    continue
                outbox.append(rendered)
            try:
                if self._sock is None:
                    self._sock = self._connect()
                    delay = self.backoff_initial
                elif self._peer_closed(self._sock):
                    raise ConnectionAbortedError("the collector closed the connection")
                self._sock.sendall(outbox[0].data)
                sent = outbox.popleft()
                self.stats.sent += 1
                if sent.signed_seq is not None:
                    unconfirmed.append(sent)
            except OSError as exc:                       # ssl.SSLError and socket.timeout included
                self._drop_socket()
                # sendall succeeding only means the kernel has the bytes: what the collector had not read when
                # the connection broke is gone, so the signed records sent on it go out again (duplicates are
                # harmless to ``verify --witness``).
                self.stats.resent += len(unconfirmed)
                outbox.extendleft(reversed(unconfirmed))
                unconfirmed.clear()
                self.stats.connect_failures += 1
                log.warning("audit_syslog_unavailable", host=self.host, port=self.port, error=type(exc).__name__,
                            retry_in_s=delay)
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, self.backoff_max)
        if self._sock is not None:
            if not self._close_gracefully(self._sock, max(self._close_deadline - time.monotonic(), CLOSE_WAIT_MIN_S)):
                self.stats.unconfirmed += len(unconfirmed)
                if unconfirmed:
                    log.warning("audit_syslog_unconfirmed", host=self.host, port=self.port,
                                signed_seqs=[f.signed_seq for f in unconfirmed])
            self._sock = None
        self._report_undelivered(outbox)

    def _render_item(self, item: tuple[int, AuditEvent] | bytes) -> _Frame | None:
        """Render on the sender thread; a record that cannot be rendered is counted, not fatal to the thread."""
        try:
            if isinstance(item, bytes):
                return _Frame(self._render_signed(item), signed_seq=int(json.loads(item)["seq"]))
            return _Frame(self._render(*item))
        except Exception as exc:
            self.stats.dropped += 1
            log.warning("audit_syslog_render_failed", error=type(exc).__name__, dropped=self.stats.dropped)
            return None

    def _render(self, seq: int, event: AuditEvent) -> bytes:
        xml = to_dicom_xml(event, self.ctx)
        return frame(syslog_message(xml, seq=seq, time=event.time or datetime.now().astimezone(),
                                    hostname=self.ctx.hostname, app_name=self.app_name))

    def _render_signed(self, line: bytes) -> bytes:
        env = json.loads(line)
        return frame(syslog_message(line.decode("utf-8").rstrip("\n"), seq=max(1, int(env["seq"])),
                                    time=datetime.now().astimezone(), hostname=self.ctx.hostname,
                                    app_name=self.app_name, msgid=SIGNED_MSGID))

    @staticmethod
    def _peer_closed(sock: ssl.SSLSocket) -> bool:
        """Whether the collector has closed its side; reads (and discards) what it sent, such as TLS 1.3 tickets.

        A collector sends nothing at the syslog layer (RFC 5425), so readable means TLS housekeeping or EOF.
        Left unread, those bytes would also turn our eventual close into a TCP reset that discards what the
        collector has not read yet.
        """
        poller = select.poll()                           # not select(): a busy service has descriptors past 1024
        poller.register(sock, select.POLLIN)
        if not poller.poll(0) and not sock.pending():
            return False
        timeout = sock.gettimeout()
        sock.settimeout(0)
        try:
            while True:
                if not sock.recv(RECV_CHUNK):
                    return True
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return False
        finally:
            sock.settimeout(timeout)

    @staticmethod
    def _close_gracefully(sock: ssl.SSLSocket, timeout: float) -> bool:
        """TLS close_notify (RFC 5425 4.4), then wait up to ``timeout`` for the collector to close its side.

        True when it did: it has read everything sent before the close_notify. Closing at once, with
        bytes unread, makes the kernel reset the connection, and the collector loses what it had not read.
        """
        confirmed = False
        try:
            sock.settimeout(timeout)
            sock.unwrap()                                # returns once the collector answers with its close_notify
            confirmed = True
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            confirmed = True                             # it closed without a close_notify: still after reading all
        except (OSError, ValueError):
            pass                                         # reset, or no answer in time
        finally:
            try:
                sock.shutdown(socket.SHUT_WR)            # also drops the TLS layer: what follows reads raw bytes
                sock.settimeout(0)
                while sock.recv(RECV_CHUNK):             # nothing left unread, so the close below is no reset
                    pass
            except OSError:
                pass
            sock.close()
        return confirmed

    def _report_undelivered(self, outbox: deque[_Frame]) -> None:
        """Count and log (sequence numbers only, no PHI) what close() had no time to deliver."""
        with self._cond:
            signed = [f.signed_seq for f in outbox if f.signed_seq is not None]
            signed += [int(json.loads(line)["seq"]) for line in self._signed]
            events = sum(1 for f in outbox if f.signed_seq is None) + len(self._events)
            self._signed.clear()
            self._events.clear()
        self.stats.undelivered += len(signed) + events
        if signed or events:
            log.warning("audit_syslog_undelivered", host=self.host, port=self.port, events=events,
                        signed_seqs=signed)

    def _drop_socket(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued and close the connection cleanly, within ``timeout`` seconds, then stop."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._close_deadline = time.monotonic() + timeout
            self._cond.notify_all()
        self._thread.join(timeout)
        self._stop.set()                                 # out of time (collector away, in back-off): give up the rest
        self._thread.join(STOP_JOIN_S)
