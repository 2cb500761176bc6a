"""DICOM TLS for the SCP (PS3.15 B.12 / B.13, BCP 195 non-downgrading).

TLS 1.2 is the minimum and 1.3 is negotiated when the peer offers it; TLS 1.2
suites are ECDHE with AES-GCM or ChaCha20-Poly1305 only (forward secrecy,
AEAD), TLS 1.3 keeps OpenSSL's AEAD suites. Client certificates are verified
against ``ca_file`` when one is configured, and required when
``require_client_cert`` is set.

The handshake is moved off pynetdicom's accept loop: pynetdicom wraps each
accepted socket in the listener thread, so a client that connects and never
completes a handshake would stall every other TLS caller. The context below
defers the handshake; :func:`handle_conn_open` runs it in the connection's own
thread under the pre-association timeout.

Exceptions::

    TlsConfigError      the TLS settings cannot make a server context (missing files, CA required)
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

import structlog
from pynetdicom.events import Event

from audit.api import AuditEvent, AuditSink, EventType, Outcome
from dermgate.settings import TlsSettings
from dermgate.throttle import AuditCoalescer, source_key

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]

# TLS 1.2 suites (OpenSSL names): ECDHE key exchange with AEAD ciphers only.
BCP195_TLS12_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
MINIMUM_VERSION: Final = ssl.TLSVersion.TLSv1_2


class TlsConfigError(Exception):
    """The TLS settings do not describe a usable server context."""


class DeferredHandshakeContext(ssl.SSLContext):
    """An SSLContext whose server sockets do not handshake inside ``wrap_socket``."""

    def wrap_socket(self, sock: socket.socket, server_side: bool = False, do_handshake_on_connect: bool = True,
                    suppress_ragged_eofs: bool = True, server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        return super().wrap_socket(sock, server_side=server_side,
                                   do_handshake_on_connect=do_handshake_on_connect and not server_side,
                                   suppress_ragged_eofs=suppress_ragged_eofs,
                                   server_hostname=server_hostname, session=session)


def server_context(cfg: TlsSettings) -> ssl.SSLContext:
    """The SCP's server context; raises :class:`TlsConfigError` on incomplete settings."""
    if cfg.cert_file is None or cfg.key_file is None:
        raise TlsConfigError("TLS enabled without cert_file and key_file")
    if cfg.require_client_cert and cfg.ca_file is None:
        raise TlsConfigError("require_client_cert needs ca_file to verify client certificates")
    ctx = DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_VERSION
    ctx.set_ciphers(BCP195_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(certfile=cfg.cert_file, keyfile=cfg.key_file)
        if cfg.ca_file is not None:
            ctx.load_verify_locations(cafile=cfg.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"cannot load TLS key material: {exc}") from exc
    if cfg.ca_file is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_cert else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def handle_conn_open(event: Event, network_timeout: float, pre_association_timeout: float,
                     audit: AuditSink | AuditCoalescer, clock: Clock) -> None:
    """EVT_CONN_OPEN (in the connection's own thread): bound socket I/O, and finish a TLS handshake.

    The handshake and the A-ASSOCIATE-RQ together must come within
    ``pre_association_timeout`` seconds of the TCP accept; the association's ACSE
    timeout is set to what is left of it (``handle_requested`` restores the
    configured ACSE timeout once the request is in). A failed handshake (old
    protocol, no acceptable suite, bad client certificate, silence) is audited
    as a security event (coalesced per source) and the connection shut down;
    the association then ends at once without ever reading a PDU.
    """
    assoc = event.assoc
    sock: Any = getattr(assoc.dul.socket, "socket", None)
    if sock is None:
        return
    started = getattr(assoc, "_dermgate_accepted_at", None) or time.monotonic()
    address = getattr(event, "address", None)          # EVT_CONN_OPEN's (host, port)
    host = str(address[0]) if isinstance(address, tuple) else str(address)
    if isinstance(sock, ssl.SSLSocket):
        sock.settimeout(pre_association_timeout)
        try:
            sock.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            assoc._dermgate_handshake_failed = True  # type: ignore[attr-defined]
            reason = getattr(exc, "reason", None) or type(exc).__name__
            log.warning("tls_handshake_failed", host=host, reason=reason)
            record = AuditEvent(event=EventType.AUTH_FAILURE, outcome=Outcome.MINOR_FAILURE,
                                actor="unknown", actor_role="modality", source=host,
                                detail={"protocol": "dicom-tls", "reason": f"TLS handshake failed: {reason}"},
                                time=clock())
            try:
                if isinstance(audit, AuditCoalescer):
                    audit.record((source_key(host), "tls-handshake", str(reason)), record)
                else:
                    audit.record(record)
            except Exception:
                log.exception("tls_audit_failed")
            try:
                # The plain socket's shutdown: SSLSocket.shutdown would drop the TLS state and let
                # pynetdicom read the peer's ciphertext as PDUs; this way its next read fails cleanly.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
            return
    sock.settimeout(network_timeout)      # a peer that stalls mid-PDU cannot pin a thread forever
    assoc.acse_timeout = max(0.5, pre_association_timeout - (time.monotonic() - started))
