"""Issue 12, DICOM: the attacks on the listener, each against the real SCP (dcmtk, pynetdicom, raw sockets).

* the plain port beside a TLS port that requires client certificates (a way round mutual TLS);
* a valid certificate from the right CA, but another device's, presented for an AE title;
* idle TCP connections holding every association slot; silent and slow connections before
  the A-ASSOCIATE-RQ; floods of refused connections in the audit trail.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import ValidationError
from pydicom import dcmread
from pynetdicom import AE

from audit.api import EventType
from dermgate.settings import AllowedCaller, DicomSettings, Settings, TlsSettings
from integration.dicom_scp import status as st
from integration.dicom_scp import uids
from tests.integration.dicom_scp.scp_support import (LOCALHOST, MODALITY, SCP_AET, Harness, dicom_settings,
                                                     running_scp, wait_for)
from tests.peers.dcmtk import echoscu, img2dcm, sample_jpeg, storescu, tls_options

STORE_SUCCESS = "Received Store Response (Success)"
SECOND_HOST = "127.0.0.2"                 # the loopback net is ours: a second source address


# ---- a PKI whose CA issues certificates to two devices --------------------------------------------

@dataclass(frozen=True)
class DevicePki:
    ca: Path
    server_cert: Path
    server_key: Path
    scope_cert: Path            # the dermatoscope MODALITY: CN=MODALITY, SAN DNS:scope01.derm.example
    scope_key: Path
    other_cert: Path            # another device of the same hospital CA: CN=PRINTER07
    other_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dermgate tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(path: Path, cn: str, key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey, *,
           ca: bool = False, usage: x509.ObjectIdentifier | None = None, sans: list[x509.GeneralName] = ()) -> Path:
    now = datetime.now(timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name("device CA"))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    path.write_bytes(b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return path


def _key(path: Path) -> tuple[ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return key, path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevicePki:
    d = tmp_path_factory.mktemp("device-pki")
    ca_key, _ = _key(d / "ca.key")
    server_key, server_key_path = _key(d / "server.key")
    scope_key, scope_key_path = _key(d / "scope.key")
    other_key, other_key_path = _key(d / "other.key")
    server_sans = [x509.DNSName("localhost"), x509.IPAddress(IPv4Address(LOCALHOST))]
    return DevicePki(
        ca=_issue(d / "ca.pem", "device CA", ca_key, ca_key, ca=True),
        server_cert=_issue(d / "server.pem", "DERMGATE", server_key, ca_key, usage=ExtendedKeyUsageOID.SERVER_AUTH,
                           sans=server_sans),
        server_key=server_key_path,
        scope_cert=_issue(d / "scope.pem", MODALITY, scope_key, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH,
                          sans=[x509.DNSName("scope01.derm.example")]),
        scope_key=scope_key_path,
        other_cert=_issue(d / "other.pem", "PRINTER07", other_key, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH,
                          sans=[x509.DNSName("printer07.derm.example")]),
        other_key=other_key_path,
    )


def _tls(pki: DevicePki, *, require_client_cert: bool = True) -> TlsSettings:
    return TlsSettings(enabled=True, port=0, cert_file=pki.server_cert, key_file=pki.server_key, ca_file=pki.ca,
                       require_client_cert=require_client_cert)


def _audits(scp: Harness, actor: str | None = None) -> list[dict]:
    return [e.detail for e in scp.audit.of(EventType.ASSOCIATION) if actor is None or e.actor == actor]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


# ---- the plain port beside mutual TLS -----------------------------------------------------------

def test_production_with_required_client_certificates_refuses_a_plain_listener(pki: DevicePki) -> None:
    """Attack: with require_client_cert in production the plain port still took objects without any
    certificate. Now such settings are refused at start (and the plain listener can be switched off)."""
    callers = [AllowedCaller(ae_title=MODALITY, hosts=[LOCALHOST])]
    with pytest.raises(ValidationError, match="plain_listener"):
        Settings(environment="production", dicom=DicomSettings(allowed_callers=callers, tls=_tls(pki)))
    ok = Settings(environment="production", store={"encrypted_volume": True, "encrypt": False},
                  dicom=DicomSettings(allowed_callers=callers, tls=_tls(pki), plain_listener=False))
    assert ok.dicom.plain_listener is False
    with pytest.raises(ValidationError, match="nothing would listen"):
        DicomSettings(plain_listener=False)


def test_with_the_plain_listener_off_only_tls_with_a_certificate_stores(pki: DevicePki, tmp_path: Path) -> None:
    plain_port = _free_port()
    cfg = dicom_settings(port=plain_port, tls=_tls(pki), plain_listener=False)
    src = img2dcm(sample_jpeg(), tmp_path / "vl.dcm")
    with running_scp(tmp_path / "scp", cfg) as scp:
        assert scp.service.port is None and scp.service.tls_port
        plain = storescu(LOCALHOST, plain_port, src, calling=MODALITY, called=SCP_AET, options=["-xy", "-to", "5"])
        assert plain.returncode != 0 and STORE_SUCCESS not in plain.stdout + plain.stderr
        assert scp.instances() == []
        tls = storescu(LOCALHOST, scp.service.tls_port, src, calling=MODALITY, called=SCP_AET,
                       options=["-v", "-xy", *tls_options(pki.scope_key, pki.scope_cert, pki.ca)])
        assert STORE_SUCCESS in tls.stdout + tls.stderr, tls.stdout + tls.stderr
        assert scp.instance(str(dcmread(src).SOPInstanceUID)) is not None


# ---- certificates bound to AE titles -----------------------------------------------------------

@pytest.fixture(scope="module")
def bound_scp(pki: DevicePki, tmp_path_factory: pytest.TempPathFactory) -> Harness:
    """MODALITY must present its own certificate (subject); SCOPE2 is bound by a DNS SAN; the plain
    port stays on (development) to show that a bound title cannot use it."""
    callers = [AllowedCaller(ae_title=MODALITY, hosts=[LOCALHOST], cert_subjects=["O=dermgate tests, CN=MODALITY"]),
               AllowedCaller(ae_title="SCOPE2", hosts=[LOCALHOST], cert_subjects=["DNS:Scope01.derm.example"]),
               AllowedCaller(ae_title="OPENAE", hosts=[LOCALHOST])]
    with running_scp(tmp_path_factory.mktemp("bound"), dicom_settings(allowed_callers=callers,
                                                                       tls=_tls(pki))) as harness:
        yield harness


def test_a_valid_certificate_of_another_device_is_refused_for_a_bound_ae_title(
        bound_scp: Harness, pki: DevicePki, tmp_path: Path) -> None:
    """Attack: PRINTER07's certificate (same CA, valid) presented with calling AE title MODALITY."""
    src = img2dcm(sample_jpeg(), tmp_path / "vl.dcm")
    res = storescu(LOCALHOST, bound_scp.service.tls_port, src, calling=MODALITY, called=SCP_AET,
                   options=["-xy", *tls_options(pki.other_key, pki.other_cert, pki.ca)])
    assert res.returncode != 0 and "Calling AE Title Not Recognized" in res.stdout + res.stderr
    assert bound_scp.instance(str(dcmread(src).SOPInstanceUID)) is None
    refused = _audits(bound_scp, MODALITY)[-1]
    assert refused["result"] == "rejected" and refused["rejection"] == "1/1/3"
    assert refused["reason"] == "client certificate is not bound to this calling AE title"
    assert "CN=PRINTER07" in refused["client_cert"] or "commonName=PRINTER07" in refused["client_cert"]
    assert refused["client_cert_sans"] == ["DNS:printer07.derm.example"]


def test_the_bound_certificate_stores_by_subject_and_by_san(bound_scp: Harness, pki: DevicePki,
                                                            tmp_path: Path) -> None:
    for calling in (MODALITY, "SCOPE2"):
        src = img2dcm(sample_jpeg(), tmp_path / f"{calling}.dcm")
        res = storescu(LOCALHOST, bound_scp.service.tls_port, src, calling=calling, called=SCP_AET,
                       options=["-v", "-xy", *tls_options(pki.scope_key, pki.scope_cert, pki.ca)])
        assert STORE_SUCCESS in res.stdout + res.stderr, res.stdout + res.stderr
        assert _audits(bound_scp, calling)[-1]["reason"] == "allowed"


def test_a_bound_ae_title_cannot_use_the_plain_port(bound_scp: Harness) -> None:
    res = echoscu(LOCALHOST, bound_scp.port, calling=MODALITY, called=SCP_AET)
    assert res.returncode != 0 and "Calling AE Title Not Recognized" in res.stdout + res.stderr
    assert _audits(bound_scp, MODALITY)[-1]["reason"] == "calling AE title needs a TLS client certificate bound to it"
    assert echoscu(LOCALHOST, bound_scp.port, calling="OPENAE", called=SCP_AET).returncode == 0


def test_a_malformed_certificate_subject_is_a_settings_error() -> None:
    with pytest.raises(ValidationError, match="certificate subject"):
        AllowedCaller(ae_title=MODALITY, cert_subjects=["IP:not-an-address"])
    with pytest.raises(ValidationError, match="enable dicom.tls"):
        DicomSettings(allowed_callers=[AllowedCaller(ae_title=MODALITY, cert_subjects=["CN=X"])])


# ---- idle connections ---------------------------------------------------------------------------

def _idle(host: str, port: int, n: int, bind: str = LOCALHOST) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((bind, 0))
        s.connect((host, port))
        socks.append(s)
    return socks


def _closed_by_peer(sock: socket.socket, within: float) -> float | None:
    """Seconds until the server closes ``sock`` (None: still open after ``within``)."""
    sock.settimeout(within)
    t0 = time.monotonic()
    try:
        while sock.recv(4096):
            pass
    except socket.timeout:
        return None
    except OSError:
        pass
    return time.monotonic() - t0


def _echo_from(host: str, port: int) -> tuple[bool, float]:
    ae = AE(ae_title=MODALITY)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(uids.VERIFICATION)
    t0 = time.monotonic()
    assoc = ae.associate(LOCALHOST, port, ae_title=SCP_AET, bind_address=(host, 0))
    ok = assoc.is_established and assoc.send_c_echo().Status == st.SUCCESS
    if assoc.is_established:
        assoc.release()
    return ok, time.monotonic() - t0


def test_idle_connections_from_one_host_do_not_lock_out_other_modalities(tmp_path: Path) -> None:
    """Attack: as many idle TCP connections as max_associations locked every modality out for the ACSE
    timeout. Now one host holds at most max_connections_per_host; the rest are refused at accept."""
    cfg = dicom_settings(max_associations=4, max_connections_per_host=2, acse_timeout=30,
                         pre_association_timeout=20, host="0.0.0.0",
                         allowed_callers=[AllowedCaller(ae_title=MODALITY, hosts=["127.0.0.0/8"])])
    with running_scp(tmp_path, cfg) as scp:
        attacker = _idle(LOCALHOST, scp.port, 16)
        try:
            ok, seconds = _echo_from(SECOND_HOST, scp.port)
            assert ok and seconds < 3, seconds
            assert sum(_closed_by_peer(s, 2) is not None for s in attacker) == 14   # refused at once
            assert wait_for(lambda: any(d["result"] == "refused" for d in _audits(scp, "unknown")))
            refused = [d for d in _audits(scp, "unknown") if d["result"] == "refused"]
            assert refused[0]["reason"] == "more than 2 concurrent connections from this host"
        finally:
            for s in attacker:
                s.close()


def test_silent_connections_are_closed_at_the_pre_association_timeout_and_audited(tmp_path: Path) -> None:
    """Attack: a connection that sends nothing held its slot for the ACSE timeout (30 s)."""
    cfg = dicom_settings(acse_timeout=30, pre_association_timeout=1.0)
    with running_scp(tmp_path, cfg) as scp:
        idle = _idle(LOCALHOST, scp.port, 2)
        try:
            closed = [_closed_by_peer(s, 10) for s in idle]
            assert all(c is not None and c < 3 for c in closed), closed
        finally:
            for s in idle:
                s.close()
        assert echoscu(LOCALHOST, scp.port, calling=MODALITY, called=SCP_AET).returncode == 0
        assert wait_for(lambda: sum(d["result"] == "no-association" for d in _audits(scp, "unknown")) == 2)
        silent = [d for d in _audits(scp, "unknown") if d["result"] == "no-association"][0]
        assert silent["reason"].startswith("no A-ASSOCIATE-RQ within 1 s") and silent["seconds"] >= 0.9


def test_a_slowly_dripped_association_request_is_cut_at_the_pre_association_timeout(tmp_path: Path) -> None:
    """A peer that sends its A-ASSOCIATE-RQ a byte at a time (each byte inside every per-read timeout)."""
    cfg = dicom_settings(acse_timeout=30, network_timeout=30, pre_association_timeout=1.5)
    with running_scp(tmp_path, cfg) as scp:
        s = _idle(LOCALHOST, scp.port, 1)[0]
        t0 = time.monotonic()
        try:
            header = bytes([0x01, 0x00, 0x00, 0x00, 0x10, 0x00])        # A-ASSOCIATE-RQ, 4096 bytes to come
            for byte in header + b"\x00" * 64:
                s.sendall(bytes([byte]))
                time.sleep(0.25)
                if time.monotonic() - t0 > 8:
                    break
        except OSError:
            pass                                                         # the server closed it: expected
        finally:
            s.close()
        assert time.monotonic() - t0 < 5


def test_a_silent_tls_connection_is_cut_at_the_pre_association_timeout(pki: DevicePki, tmp_path: Path) -> None:
    cfg = dicom_settings(tls=_tls(pki), pre_association_timeout=1.0, network_timeout=30)
    with running_scp(tmp_path, cfg) as scp:
        s = _idle(LOCALHOST, scp.service.tls_port, 1)[0]
        try:
            closed = _closed_by_peer(s, 10)
        finally:
            s.close()
        assert closed is not None and closed < 3, closed
        assert wait_for(lambda: any("handshake" in e.detail["reason"] for e in scp.audit.of(EventType.AUTH_FAILURE)))


def test_a_flood_of_refused_connections_is_one_audit_record_per_window_with_its_count(tmp_path: Path) -> None:
    """Attack: 300 connections from a host on no allow-list entry; each used to be its own fsynced
    record (or none at all). Now: one record at once, the rest counted into one summary."""
    cfg = dicom_settings(host="0.0.0.0", allowed_callers=[AllowedCaller(ae_title=MODALITY, hosts=[SECOND_HOST])])
    with running_scp(tmp_path, cfg, coalesce_s=60) as scp:
        for _ in range(300):
            with socket.create_connection((LOCALHOST, scp.port), timeout=5) as s:
                s.settimeout(5)
                try:
                    s.recv(1)
                except OSError:
                    pass
        assert len(_audits(scp, "unknown")) == 1
        scp.service.coalescer.flush(everything=True)
        records = [d for d in _audits(scp, "unknown") if d["result"] == "refused"]
        assert len(records) == 2
        assert 1 + records[1]["coalesced"] == 300
        assert records[1]["reason"] == "source host on no allow-list entry"
        ok, _ = _echo_from(SECOND_HOST, scp.port)
        assert ok
