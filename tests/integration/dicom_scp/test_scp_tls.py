"""DICOM TLS (BCP 195): dcmtk's storescu over TLS with a client certificate; TLS 1.0/1.1, CBC
suites, missing or foreign client certificates are refused by the SCP (and audited)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydicom import dcmread

from audit.api import EventType
from dermgate.settings import TlsSettings
from integration.dicom_scp.scp import DicomService
from integration.dicom_scp.tls import TlsConfigError, server_context
from tests.integration.dicom_scp.scp_support import (LOCALHOST, MODALITY, SCP_AET, Harness, ListAudit,
                                                     dicom_settings, running_scp, wait_for)
from tests.peers.dcmtk import echoscu, img2dcm, sample_jpeg, storescu, tls_options

SAMPLE = "ISIC_0024309.jpg"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path          # a client certificate from another CA
    rogue_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dermgate tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey,
          *, ca: bool, usage: list[x509.ObjectIdentifier], path: Path) -> Path:
    now = datetime.now(timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                      content_commitment=False, key_encipherment=False,
                                                      data_encipherment=False, key_agreement=False,
                                                      encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False).add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(IPv4Address(LOCALHOST))]),
            critical=False)
    path.write_bytes(builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server and a client certificate (and a rogue CA's client), made with cryptography."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("dermgate test CA", ca_key, _name("dermgate test CA"), ca_key, ca=True, usage=[], path=d / "ca.pem")
    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("server", "client", "rogue")}
    return Pki(
        ca=ca,
        server_cert=_cert("DERMGATE", keys["server"], _name("dermgate test CA"), ca_key, ca=False,
                          usage=[ExtendedKeyUsageOID.SERVER_AUTH], path=d / "server.pem"),
        server_key=_write_key(keys["server"], d / "server.key"),
        client_cert=_cert(MODALITY, keys["client"], _name("dermgate test CA"), ca_key, ca=False,
                          usage=[ExtendedKeyUsageOID.CLIENT_AUTH], path=d / "client.pem"),
        client_key=_write_key(keys["client"], d / "client.key"),
        rogue_cert=_cert(MODALITY, keys["rogue"], _name("rogue CA"), rogue_ca_key, ca=False,
                         usage=[ExtendedKeyUsageOID.CLIENT_AUTH], path=d / "rogue.pem"),
        rogue_key=_write_key(keys["rogue"], d / "rogue.key"),
    )


def _tls(pki: Pki, *, require_client_cert: bool = True) -> TlsSettings:
    return TlsSettings(enabled=True, port=0, cert_file=pki.server_cert, key_file=pki.server_key,
                       ca_file=pki.ca, require_client_cert=require_client_cert)


@pytest.fixture(scope="module")
def scp(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with running_scp(tmp_path_factory.mktemp("scp"), dicom_settings(tls=_tls(pki))) as harness:
        yield harness


def _tls_port(scp: Harness) -> int:
    assert scp.service.tls_port is not None
    return scp.service.tls_port


def _handshake_failures(scp: Harness) -> list[str]:
    return [e.detail["reason"] for e in scp.audit.of(EventType.AUTH_FAILURE)]


def test_storescu_over_tls_with_client_certificate_is_stored(scp: Harness, pki: Pki, tmp_path: Path) -> None:
    src = img2dcm(sample_jpeg(SAMPLE), tmp_path / "vl.dcm")
    res = storescu(LOCALHOST, _tls_port(scp), src, calling=MODALITY, called=SCP_AET,
                   options=["-v", "-xy", *tls_options(pki.client_key, pki.client_cert, pki.ca)])
    assert "Received Store Response (Success)" in res.stdout + res.stderr, res.stdout + res.stderr
    assert scp.instance(str(dcmread(src).SOPInstanceUID)) is not None
    accepted = [e.detail for e in scp.audit.of(EventType.ASSOCIATION) if e.detail["result"] == "accepted"][-1]
    assert accepted["tls"] is True and accepted["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert "ECDHE" in accepted["cipher"] or accepted["tls_version"] == "TLSv1.3"
    assert f"commonName={MODALITY}" in accepted["client_cert"]


def test_plain_port_still_serves_beside_tls(scp: Harness) -> None:
    assert echoscu(LOCALHOST, scp.port, calling=MODALITY, called=SCP_AET).returncode == 0


def test_anonymous_tls_client_is_refused_when_certificates_are_required(scp: Harness, pki: Pki) -> None:
    before = len(_handshake_failures(scp))
    res = echoscu(LOCALHOST, _tls_port(scp), calling=MODALITY, called=SCP_AET, options=tls_options(None, None, pki.ca))
    assert res.returncode != 0
    assert wait_for(lambda: len(_handshake_failures(scp)) == before + 1)


def test_client_certificate_from_another_ca_is_refused(scp: Harness, pki: Pki) -> None:
    before = len(_handshake_failures(scp))
    res = echoscu(LOCALHOST, _tls_port(scp), calling=MODALITY, called=SCP_AET,
                  options=tls_options(pki.rogue_key, pki.rogue_cert, pki.ca))
    assert res.returncode != 0
    assert wait_for(lambda: len(_handshake_failures(scp)) == before + 1)
    assert "CERTIFICATE" in _handshake_failures(scp)[before].upper()


def _client(pki: Pki, *, max_version: ssl.TLSVersion, ciphers: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca)
    ctx.load_cert_chain(pki.client_cert, pki.client_key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = max_version
    ctx.set_ciphers(ciphers or "DEFAULT:@SECLEVEL=0")     # let the client offer what it is told to
    return ctx


def _handshake(port: int, ctx: ssl.SSLContext) -> str:
    with socket.create_connection((LOCALHOST, port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return str(tls.version())


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_1_0_and_1_1_are_refused_by_the_server(scp: Harness, pki: Pki, version: ssl.TLSVersion) -> None:
    """The client offers only the old protocol; the refusal comes from (and is audited by) the SCP."""
    before = len(_handshake_failures(scp))
    with pytest.raises(ssl.SSLError):
        _handshake(_tls_port(scp), _client(pki, max_version=version))
    assert wait_for(lambda: len(_handshake_failures(scp)) == before + 1)
    assert "PROTOCOL" in _handshake_failures(scp)[before].upper()


def test_tls_1_2_cbc_suites_are_refused(scp: Harness, pki: Pki) -> None:
    before = len(_handshake_failures(scp))
    with pytest.raises(ssl.SSLError):
        _handshake(_tls_port(scp), _client(pki, max_version=ssl.TLSVersion.TLSv1_2,
                                           ciphers="ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384"))
    assert wait_for(lambda: len(_handshake_failures(scp)) == before + 1)
    assert "CIPHER" in _handshake_failures(scp)[before].upper()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_1_2_aead_and_1_3_are_accepted(scp: Harness, pki: Pki, version: ssl.TLSVersion) -> None:
    assert _handshake(_tls_port(scp), _client(pki, max_version=version)) == version.name.replace("_", ".")


def test_stalled_tls_client_does_not_block_other_callers(scp: Harness, pki: Pki, tmp_path: Path) -> None:
    """A peer that connects to the TLS port and says nothing does not hold up the next caller."""
    with socket.create_connection((LOCALHOST, _tls_port(scp)), timeout=10):
        res = echoscu(LOCALHOST, _tls_port(scp), calling=MODALITY, called=SCP_AET,
                      options=["-to", "5", *tls_options(pki.client_key, pki.client_cert, pki.ca)])
        assert res.returncode == 0, res.stdout + res.stderr


def test_required_client_certificates_need_a_ca(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError):
        server_context(TlsSettings(enabled=True, cert_file=pki.server_cert, key_file=pki.server_key,
                                   require_client_cert=True))
    service = DicomService(dicom_settings(tls=TlsSettings(enabled=True, port=0)), None, ListAudit(), None)  # type: ignore[arg-type]
    with pytest.raises(TlsConfigError):
        service.start()
    assert service.port is None                                 # refused before listening
