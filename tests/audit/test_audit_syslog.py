"""Forwarding audit messages to an ATNA collector over syslog TLS (RFC 5424 + RFC 5425).

The collector here is a minimal one written for the test (a Python ``ssl``
server that splits RFC 5425 octet-counted frames): a real TLS peer on
loopback with a self-signed certificate generated in the test.
"""

from __future__ import annotations

import datetime as dt
import json
import ipaddress
import re
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from structlog.testing import capture_logs

from audit.syslog import BOM, MSGID, SyslogTlsForwarder, client_tls_context
from tests.audit.helpers import store_event


RFC5424 = re.compile(r"<(?P<pri>\d+)>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<pid>\S+) (?P<msgid>\S+) "
                     r"(?P<sd>-|(?:\[[^\]]*\])+) (?P<msg>.*)", re.S)


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class MiniCollector:
    """Accepts TLS connections and collects RFC 5425 frames (``LEN SP MSG``).

    ``read_gate``: connections wait for it to be set before reading (a collector too busy to read).
    """

    def __init__(self, cert: Path, key: Path, *, port: int = 0, read_gate: threading.Event | None = None) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert), str(key))
        self.sock = socket.create_server(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.messages: list[bytes] = []
        self.tls_versions: list[str | None] = []
        self.read_gate = read_gate
        self.connections: list[ssl.SSLSocket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                raw, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._handle, args=(raw,), daemon=True).start()

    def _handle(self, raw: socket.socket) -> None:
        try:
            conn = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        self.tls_versions.append(conn.version())
        self.connections.append(conn)
        if self.read_gate is not None:
            self.read_gate.wait()
        buf = b""
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)
                except (ssl.SSLError, OSError):
                    return
                if not chunk:
                    return
                buf += chunk
                while b" " in buf:
                    length_text, rest = buf.split(b" ", 1)
                    length = int(length_text)
                    if len(rest) < length:
                        break
                    self.messages.append(rest[:length])
                    buf = rest[length:]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.messages

    def drop_connections(self) -> None:
        """Close every connection without reading what is pending (a collector restart): the sender gets a reset."""
        for conn in self.connections:
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self._thread.join(2)


@pytest.fixture
def certs(tmp_path: Path) -> tuple[Path, Path]:
    return _self_signed(tmp_path, "collector")


@pytest.fixture
def collector(certs):
    server = MiniCollector(*certs)
    yield server
    server.close()


def _poll(condition, timeout: float = 10.0) -> None:
    """Wait for ``condition()`` with a deadline (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_durable_event_reaches_the_collector_as_an_rfc5424_dicom_audit_message(make_trail, collector, certs):
    forwarder = SyslogTlsForwarder("127.0.0.1", collector.port, tls=client_tls_context(certs[0]))
    trail = make_trail(listeners=[forwarder])
    seqs = [trail.record(store_event(i)) for i in range(3)]
    collector.wait_for(4)                                    # the genesis record, then the three events
    messages = [m for m in collector.messages if f" {MSGID} ".encode() in m]
    assert len(messages) == 3
    text = messages[0].decode("utf-8")
    assert text.startswith("<85>1 ")                         # facility 10 (auth), severity 5 (notice), version 1
    match = RFC5424.match(text)
    assert match is not None, text[:200]
    assert match["app"] == "dermgate" and match["msgid"] == MSGID
    assert match["sd"] == f'[meta sequenceId="{seqs[0]}"]'
    xml = match["msg"]
    assert xml.startswith(BOM)
    root = ET.fromstring(xml[1:].encode("utf-8"))
    assert root.tag == "AuditMessage"
    assert root.find("EventIdentification/EventID").get("csd-code") == "110104"
    assert collector.tls_versions[0] in ("TLSv1.2", "TLSv1.3")
    forwarder.close()


def test_a_collector_that_is_down_never_blocks_or_loses_the_local_record(make_trail, certs):
    forwarder = SyslogTlsForwarder("127.0.0.1", _free_port(), tls=client_tls_context(certs[0]), queue_size=5,
                                   connect_timeout=0.5, backoff_initial=0.05)
    trail = make_trail(listeners=[forwarder])
    start = time.monotonic()
    for i in range(30):
        trail.record(store_event(i))
    assert time.monotonic() - start < 5.0
    assert forwarder.stats.sent == 0 and forwarder.stats.dropped >= 30 - 5 - 1
    assert len(list(trail.events())) == 30                   # every record is in the trail
    with capture_logs() as logs:
        forwarder.close(timeout=0.5)
    # what close() could not deliver is counted and logged, the genesis record by its sequence number
    assert forwarder.stats.undelivered == 1 + 5                # the genesis record and the queued events
    assert [e["signed_seqs"] for e in logs if e["event"] == "audit_syslog_undelivered"] == [[0]]


def test_queued_messages_are_delivered_once_the_collector_comes_up(make_trail, certs):
    port = _free_port()
    forwarder = SyslogTlsForwarder("127.0.0.1", port, tls=client_tls_context(certs[0]), backoff_initial=0.05,
                                   backoff_max=0.2, connect_timeout=0.5)
    trail = make_trail(listeners=[forwarder])
    trail.record(store_event(1))
    trail.record(store_event(2))
    _poll(lambda: forwarder.stats.connect_failures >= 1)   # it tried while nobody listened
    server = MiniCollector(*certs, port=port)
    try:
        assert len(server.wait_for(3)) == 3                 # the genesis record and both events
        assert forwarder.stats.connect_failures >= 1
    finally:
        forwarder.close()
        server.close()


def test_a_collector_with_an_untrusted_certificate_gets_nothing(make_trail, collector, tmp_path):
    other_ca, _ = _self_signed(tmp_path, "someone-else")
    forwarder = SyslogTlsForwarder("127.0.0.1", collector.port, tls=client_tls_context(other_ca),
                                   backoff_initial=0.05)
    trail = make_trail(listeners=[forwarder])
    trail.record(store_event(1))
    _poll(lambda: forwarder.stats.connect_failures >= 1)   # the handshake was tried and refused
    assert collector.messages == [] and forwarder.stats.sent == 0 and forwarder.stats.connect_failures >= 1
    forwarder.close(timeout=0.2)


def test_the_client_refuses_tls_below_1_2(certs):
    assert client_tls_context(certs[0]).minimum_version >= ssl.TLSVersion.TLSv1_2


def test_the_collector_witnesses_the_chain_head_so_a_rollback_with_its_checkpoint_fails_verify(
        make_trail, collector, certs, audit_dir, tmp_path, keyring, signer):
    """Issue 12: the trail cut back to an earlier checkpoint (checkpoint.json rolled back with it, and no
    database anchor to help) verifies on its own; against the collector's copy of the signed records it fails."""
    from audit import cli
    from audit.format import LOG_FILE, WITNESS_FILE
    from audit.keys import TrustedKeys, public_pem
    from audit.syslog import SIGNED_MSGID
    from audit.verify import read_witness, verify_log
    forwarder = SyslogTlsForwarder("127.0.0.1", collector.port, tls=client_tls_context(certs[0]))
    trail = make_trail(listeners=[forwarder], checkpoint_every=10)
    for i in range(35):
        trail.record(store_event(i))
    trail.close()
    forwarder.close()

    def signed_messages() -> list[bytes]:
        return [m for m in collector.messages if f" {SIGNED_MSGID} ".encode() in m]
    deadline = time.monotonic() + 15            # the collector reads on its own thread: poll, do not sleep
    while len(signed_messages()) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    signed = signed_messages()
    assert len(signed) >= 5                                   # genesis, checkpoints at 10, 20, 30, the close
    received = tmp_path / "collector.log"                     # what the collector stored, one message a line
    received.write_bytes(b"\n".join(collector.messages) + b"\n")
    trusted = TrustedKeys([signer.public_key])
    assert verify_log(audit_dir, trusted, witnesses=read_witness(received)).ok      # honest trail
    kept = (audit_dir / LOG_FILE).read_bytes().splitlines(keepends=True)[:11]       # back to checkpoint 10
    (audit_dir / LOG_FILE).write_bytes(b"".join(kept))
    (audit_dir / WITNESS_FILE).write_bytes(kept[-1])
    assert verify_log(audit_dir, trusted).ok                                       # the attack, alone
    report = verify_log(audit_dir, trusted, witnesses=read_witness(received))
    assert not report.ok and "outside witness holds signed record" in report.first_bad.reason
    # the same through the command line, with the public key pinned
    pub = tmp_path / "pinned.pub"
    pub.write_bytes(public_pem(signer.public_key))
    key_file = tmp_path / "audit.key"
    key_file.write_text(keyring.to_json())
    key_file.chmod(0o600)
    base = ["--dir", str(audit_dir), "--key-file", str(key_file), "--public-key", str(pub)]
    assert cli.main(base + ["verify", "--no-decrypt", "--pin-key", str(pub)]) == cli.EXIT_OK
    assert cli.main(base + ["verify", "--no-decrypt", "--pin-key", str(pub), "--witness", str(received)]) == 1


UNREAD_CLOSE_TIMEOUT_S = 0.5            # close() waits this long for a collector that is not reading


def _signed_seqs_sent(audit_dir: Path) -> set[int]:
    """Sequence numbers of the signed records in the trail (what the collector must witness)."""
    from audit.format import LOG_FILE
    from audit.verify import SIGNED_KINDS
    envs = [json.loads(line) for line in (audit_dir / LOG_FILE).read_bytes().splitlines()]
    return {env["seq"] for env in envs if env["kind"] in SIGNED_KINDS}


def _signed_seqs_received(collector: MiniCollector) -> set[int]:
    from audit.syslog import SIGNED_MSGID
    return {json.loads(m.split(BOM.encode(), 1)[1])["seq"] for m in list(collector.messages)
            if f" {SIGNED_MSGID} ".encode() in m}


def test_closing_before_the_collector_has_read_loses_nothing_and_reports_the_unconfirmed(make_trail, certs):
    """Closing with unread TLS 1.3 tickets used to reset the connection: the collector lost what it had not read."""
    gate = threading.Event()
    server = MiniCollector(*certs, read_gate=gate)
    forwarder = SyslogTlsForwarder("127.0.0.1", server.port, tls=client_tls_context(certs[0]))
    trail = make_trail(listeners=[forwarder], checkpoint_every=5)
    try:
        for i in range(12):
            trail.record(store_event(i))
        _poll(lambda: forwarder.stats.sent == forwarder.stats.queued)
        with capture_logs() as logs:
            forwarder.close(timeout=UNREAD_CLOSE_TIMEOUT_S)          # the collector has read nothing yet
        gate.set()
        assert len(server.wait_for(forwarder.stats.sent)) == forwarder.stats.sent
        assert _signed_seqs_received(server) == {0, 5, 10}
        # it could not confirm the collector read them in time: counted and logged, by sequence number only
        assert forwarder.stats.unconfirmed == 3
        assert [e["signed_seqs"] for e in logs if e["event"] == "audit_syslog_unconfirmed"] == [[0, 5, 10]]
    finally:
        server.close()


def test_signed_records_written_while_the_collector_is_down_all_arrive_once_it_is_up(make_trail, certs, audit_dir):
    """The event queue overflows while the collector is away; no signed record is lost, the closing one included."""
    port = _free_port()
    forwarder = SyslogTlsForwarder("127.0.0.1", port, tls=client_tls_context(certs[0]), queue_size=2,
                                   backoff_initial=0.05, backoff_max=0.2, connect_timeout=0.5)
    trail = make_trail(listeners=[forwarder], checkpoint_every=5)
    for i in range(23):
        trail.record(store_event(i))
    _poll(lambda: forwarder.stats.connect_failures >= 1)
    assert forwarder.stats.dropped > 0                               # events were dropped ...
    server = MiniCollector(*certs, port=port)
    try:
        trail.close()                                                # the closing checkpoint, then close()
        assert _signed_seqs_received(server) == _signed_seqs_sent(audit_dir) == {0, 5, 10, 15, 20, 25, 29}
        assert forwarder.stats.undelivered == 0 and forwarder.stats.unconfirmed == 0
    finally:
        server.close()


def test_signed_records_a_collector_lost_on_a_reset_connection_are_sent_again(make_trail, certs, audit_dir):
    """Written to the socket is not delivered: a collector that drops the connection unread gets them again."""
    gate = threading.Event()
    server = MiniCollector(*certs, read_gate=gate)
    forwarder = SyslogTlsForwarder("127.0.0.1", server.port, tls=client_tls_context(certs[0]),
                                   backoff_initial=0.05, backoff_max=0.2)
    trail = make_trail(listeners=[forwarder], checkpoint_every=5)
    try:
        for i in range(6):
            trail.record(store_event(i))
        _poll(lambda: forwarder.stats.sent == forwarder.stats.queued and len(server.connections) == 1)
        server.drop_connections()                                    # unread: genesis and checkpoint 5 are gone
        gate.set()

        def delivered_again() -> bool:
            trail.record(store_event(99))                            # it learns of the reset on a later send
            return _signed_seqs_received(server) >= {0, 5}
        _poll(delivered_again)
        assert forwarder.stats.resent >= 2 and forwarder.stats.connect_failures >= 1
        trail.close()
        assert _signed_seqs_received(server) == _signed_seqs_sent(audit_dir)
    finally:
        server.close()
