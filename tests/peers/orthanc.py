"""A real Orthanc PACS for tests: Debian's ``/usr/sbin/Orthanc`` on free loopback ports.

Fixtures (registered in tests/conftest.py):

- ``orthanc`` (session): plain DICOM; accepts C-STORE only from the AE titles
  in ``ORTHANC_ALLOWED_CALLERS`` on 127.0.0.1 (unknown callers are refused).
- ``orthanc_tls`` (session): the same over DICOM TLS with a test CA; client
  certificates required. Its ``tls`` field holds the CA and a client key pair.

Each runs with its own storage folder and is stopped at teardown. The REST API
(via httpx) is how tests see what arrived. Orthanc missing -> the tests skip,
except under CI (``CI=true``), where that is a failure.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.peers.process import stop

ORTHANC_BIN = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
ORTHANC_AET = "ORTHANC"
ORTHANC_ALLOWED_CALLERS = ("DERMGATE", "DERMGATE_TEST")
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a throwaway CA, the server's and a client's key pairs."""
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@dataclass(frozen=True)
class OrthancPeer:
    aet: str
    host: str
    dicom_port: int
    http_port: int
    storage: Path
    tls: TlsFiles | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10.0)

    def get(self, path: str) -> Any:
        with self.client() as c:
            resp = c.get(path)
            resp.raise_for_status()
            return resp.json()

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """Simplified tags of every instance Orthanc holds for a Study Instance UID."""
        with self.client() as c:
            found = c.post("/tools/find", json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}})
            found.raise_for_status()
            return [c.get(f"/instances/{oid}/simplified-tags").raise_for_status().json() for oid in found.json()]


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _require_orthanc() -> None:
    if not Path(ORTHANC_BIN).exists():
        if os.environ.get("CI") == "true":
            pytest.fail("Orthanc is not installed; .ci/run must apt-get install orthanc")
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")


def _config(root: Path, dicom_port: int, http_port: int, tls: TlsFiles | None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "Name": "dermgate-test-pacs",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "Plugins": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": ORTHANC_AET,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": False,        # only the modalities below may store
        "DicomCheckModalityHost": True,
        "DicomModalities": {ae.lower(): [ae, "127.0.0.1", 104] for ae in ORTHANC_ALLOWED_CALLERS},
        "UnknownSopClassAccepted": False,
        "ConcurrentJobs": 1,
        "HttpThreadsCount": 4,
        "SaveJobs": False,
        "StableAge": 1,
    }
    if tls is not None:
        cfg.update({
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(tls.server_cert),
            "DicomTlsPrivateKey": str(tls.server_key),
            "DicomTlsTrustedCertificates": str(tls.ca_cert),
            "DicomTlsRemoteCertificateRequired": True,
        })
    return cfg


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")   # Debian's orthanc-dicomweb


def dicomweb_client_config(servers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Orthanc settings that load the DICOMweb plugin and declare DICOMweb servers it can STOW to."""
    if not DICOMWEB_PLUGIN.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("the Orthanc DICOMweb plugin is missing; .ci/run must apt-get install orthanc-dicomweb")
        pytest.skip("the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    return {"Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": servers}}


@contextlib.contextmanager
def run_orthanc(root: Path, tls: TlsFiles | None = None, extra: dict[str, Any] | None = None) -> Iterator[OrthancPeer]:
    """Start Orthanc in ``root`` (``extra``: settings merged over the defaults) and stop it on exit."""
    _require_orthanc()
    root.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    config = root / "orthanc.json"
    config.write_text(json.dumps({**_config(root, dicom_port, http_port, tls), **(extra or {})}, indent=2))
    log = open(root / "orthanc.log", "wb")
    proc = subprocess.Popen([ORTHANC_BIN, f"--logdir={root}", str(config)], stdout=log, stderr=subprocess.STDOUT)
    peer = OrthancPeer(ORTHANC_AET, "127.0.0.1", dicom_port, http_port, root / "storage", tls)
    try:
        _wait_ready(peer, proc, root)
        yield peer
    finally:
        stop(proc, timeout=15)
        log.close()


def _wait_ready(peer: OrthancPeer, proc: subprocess.Popen[bytes], root: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {proc.returncode}: {(root / 'orthanc.log').read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{peer.url}/system", timeout=1.0).status_code == 200:
                with contextlib.closing(socket.create_connection((peer.host, peer.dicom_port), timeout=1.0)):
                    return
        time.sleep(0.1)
    raise RuntimeError(f"Orthanc did not start within {START_TIMEOUT_S}s")


def make_test_pki(folder: Path, *, hostname: str = "localhost") -> TlsFiles:
    """A CA and CA-signed server and client certificates (EC P-256), valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def save(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, stem: str) -> tuple[Path, Path]:
        cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder().subject_name(name("dermgate test CA")).issuer_name(name("dermgate test CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage: x509.ObjectIdentifier) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        return key, cert

    ca_path, _ = save(ca_key, ca_cert, "ca")
    server_cert, server_key = save(*leaf(hostname, ExtendedKeyUsageOID.SERVER_AUTH), "server")
    client_cert, client_key = save(*leaf("DERMGATE", ExtendedKeyUsageOID.CLIENT_AUTH), "client")
    return TlsFiles(ca_path, server_cert, server_key, client_cert, client_key)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPeer]:
    """A running Orthanc PACS on loopback (plain DICOM)."""
    with run_orthanc(tmp_path_factory.mktemp("orthanc")) as peer:
        yield peer


@pytest.fixture(scope="session")
def orthanc_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPeer]:
    """A running Orthanc PACS on loopback that speaks only DICOM TLS and requires client certificates."""
    root = tmp_path_factory.mktemp("orthanc-tls")
    with run_orthanc(root, tls=make_test_pki(root / "pki")) as peer:
        yield peer
