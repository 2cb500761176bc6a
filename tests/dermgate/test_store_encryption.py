"""Issue 12, data at rest: received objects, derived objects and FHIR bundle files are AES-256-GCM
encrypted on disk (on by default in production), and everything that reads them -- the worker, the
FHIR planner, the DICOM forwarder, the API -- goes through the one store interface.

End to end with real peers: dcmtk storescu as the modality, Orthanc as the PACS, the committed
model, the API over TestClient, the FHIR bundle folder as the EHR.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from dermgate.app import Runtime
from dermgate.db import JobState
from dermgate.service import Service
from dermgate.settings import Settings, StoreSettings
from dermgate.store import MAGIC, KEY_ENV, ObjectStore, StoreCipher, StoreIntegrityError, StoreKeyError, store_cipher
from tests.dermgate.test_service_e2e import MODALITY_AE, PATIENTS, make_settings, make_sources, wait_for
from tests.peers.dcmtk import storescu
from tests.peers.orthanc import OrthancPeer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _files(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]


def test_objects_outputs_and_bundles_are_encrypted_on_disk_and_still_flow_end_to_end(
        tmp_path: Path, orthanc: OrthancPeer) -> None:
    """Attack: anyone who could read the work dir read every image, SC, SR and FHIR bundle in the clear.
    Now none of those files holds a patient identifier, a name, a DICOM or a PNG header; the PACS and
    the EHR folder still get what they got, and the API still serves the heatmap."""
    settings = make_settings(tmp_path / "work", orthanc)
    settings.store = StoreSettings(encrypt=True)
    settings.fhir_bundle_dir = settings.workdir / "fhir-bundles"
    rt = Runtime(settings)
    assert rt.store.encrypted
    service = Service(rt, roles={"scp", "worker", "dispatcher"})
    service.start()
    try:
        files = make_sources(tmp_path / "src")
        sent = storescu("127.0.0.1", settings.dicom.port, files, calling=MODALITY_AE, called="DERMGATE",
                        options=["-xy", "-R"])
        assert sent.returncode == 0, sent.stderr
        jobs = wait_for(rt, len(files))
    finally:
        service.stop()
    assert all(j.state is JobState.DELIVERED for j in jobs), [j.last_error for j in jobs]

    on_disk = _files(settings.store_dir, settings.fhir_bundle_dir)
    assert len(on_disk) >= 4 * len(files)          # object, SC, SR, PNG per image, and the bundles
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    uids = [str(h.StudyInstanceUID) for h in heads] + [str(h.SOPInstanceUID) for h in heads]
    assert not [p for p in on_disk for uid in uids if uid in str(p)]    # not even in the folder names
    for path in on_disk:
        blob = path.read_bytes()
        assert blob.startswith(MAGIC), path
        assert b"DICM" not in blob and PNG_SIGNATURE not in blob and b"\xff\xd8\xff" not in blob[:64], path
        for pid in PATIENTS:
            assert pid.encode() not in blob and f"Testperson^{pid[-4:]}".encode() not in blob, path

    # The forwarder decrypted: the PACS holds the SC and SR of every image.
    for src in files:
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        arrived = orthanc.study_instances(ds.StudyInstanceUID)
        assert sorted(i["SOPClassUID"] for i in arrived) == ["1.2.840.10008.5.1.4.1.1.7",
                                                             "1.2.840.10008.5.1.4.1.1.88.34"]
    # The EHR stand-in's bundles decrypt to the patient's report.
    bundles = ObjectStore(settings.fhir_bundle_dir, rt.store.cipher)
    docs = [json.loads(bundles.read_at(p)) for p in _files(settings.fhir_bundle_dir)]
    assert "DiagnosticReport" in {e["resource"]["resourceType"] for d in docs for e in d["entry"]}
    first_sop = str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
    assert any(first_sop in json.dumps(d) for d in docs)
    # The API reads through the store too.
    from dermgate.api.main import create_app
    token = subprocess.run([sys.executable, "-m", "dermgate.cli", "api-token", "add", "--name", "dr.enc",
                            "--workdir", str(settings.workdir)], capture_output=True, text=True, check=True)
    sop = pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID
    client = TestClient(create_app(rt, check_model=False))
    png = client.get(f"/api/v1/results/{sop}/heatmap.png", headers={"Authorization": f"Bearer {token.stdout.strip()}"})
    assert png.status_code == 200 and png.content.startswith(PNG_SIGNATURE)
    rt.close()


@pytest.fixture
def cipher(tmp_path: Path) -> StoreCipher:
    settings = Settings(workdir=tmp_path / "work", store=StoreSettings(encrypt=True))
    c = store_cipher(settings)
    assert c is not None
    return c


def test_an_altered_truncated_or_moved_file_does_not_decrypt(tmp_path: Path, cipher: StoreCipher) -> None:
    store = ObjectStore(tmp_path / "store", cipher)
    a, _ = store.put_object(b"first object " * 100)
    b, _ = store.put_object(b"second object " * 100)
    assert store.read(a) == b"first object " * 100
    blob = bytearray(store.path(a).read_bytes())
    blob[-40] ^= 0x01
    store.path(a).write_bytes(bytes(blob))
    with pytest.raises(StoreIntegrityError):
        store.read(a)
    store.path(a).write_bytes(store.path(b).read_bytes())           # another object's ciphertext, moved here
    with pytest.raises(StoreIntegrityError):
        store.read(a)
    store.path(b).write_bytes(store.path(b).read_bytes()[:-1])
    with pytest.raises(StoreIntegrityError):
        store.read(b)


def test_a_plaintext_file_is_refused_unless_migration_is_allowed(tmp_path: Path, cipher: StoreCipher) -> None:
    (tmp_path / "store" / "objects").mkdir(parents=True)
    (tmp_path / "store" / "objects" / "old.dcm").write_bytes(b"written before encryption")
    with pytest.raises(StoreIntegrityError, match="not encrypted"):
        ObjectStore(tmp_path / "store", cipher).read("objects/old.dcm")
    lenient = StoreCipher(cipher.provider, accept_plaintext=True)
    assert ObjectStore(tmp_path / "store", lenient).read("objects/old.dcm") == b"written before encryption"
    rel = ObjectStore(tmp_path / "store", cipher).put("objects/new.dcm", b"new")
    with pytest.raises(StoreIntegrityError, match="no store key"):
        ObjectStore(tmp_path / "store").read(str(rel.relative_to(tmp_path / "store")))


def test_after_a_key_rotation_old_files_still_decrypt(tmp_path: Path) -> None:
    work = tmp_path / "work"
    settings = Settings(workdir=work, store=StoreSettings(encrypt=True))
    old = ObjectStore(work / "store", store_cipher(settings))
    rel, _ = old.put_object(b"before rotation")
    subprocess.run([sys.executable, "-m", "dermgate.cli", "store", "rotate-key", "--workdir", str(work)],
                   check=True, capture_output=True, env={"DERMGATE_STORE__ENCRYPT": "true", "PATH": "/usr/bin"})
    new = ObjectStore(work / "store", store_cipher(settings))
    rel2, _ = new.put_object(b"after rotation")
    assert new.read(rel) == b"before rotation" and new.read(rel2) == b"after rotation"
    kids = {new.path(r).read_bytes()[5:5 + new.path(r).read_bytes()[4]] for r in (rel, rel2)}
    assert len(kids) == 2


def test_production_encrypts_by_default_and_will_not_start_without_a_key(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: production stored PHI in the clear with nothing said. Now encryption is its default; no key,
    no start; turning it off needs the operator's word that the volume is encrypted."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    production = Settings(workdir=tmp_path / "work", environment="production")
    assert production.store_encrypted
    with pytest.raises(StoreKeyError, match="no store key"):
        Runtime(production)
    with pytest.raises(ValidationError, match="encrypted_volume"):
        Settings(workdir=tmp_path / "work", environment="production", store=StoreSettings(encrypt=False))
    confirmed = Settings(workdir=tmp_path / "work", environment="production",
                         store=StoreSettings(encrypt=False, encrypted_volume=True))
    assert not confirmed.store_encrypted
    import base64
    import os
    monkeypatch.setenv(KEY_ENV, base64.b64encode(os.urandom(32)).decode())
    rt = Runtime(production)
    rel, _ = rt.store.put_object(b"PHI")
    assert rt.store.path(rel).read_bytes().startswith(MAGIC) and rt.store.read(rel) == b"PHI"
    rt.close()


def test_store_cat_decrypts_one_file_for_an_operator_and_audits_it(tmp_path: Path) -> None:
    work = tmp_path / "work"
    env = {"DERMGATE_STORE__ENCRYPT": "true", "PATH": "/usr/bin"}
    subprocess.run([sys.executable, "-m", "dermgate.cli", "migrate", "--workdir", str(work)],
                   check=True, capture_output=True, env=env)   # a work dir first: only serve/demo/migrate make one
    subprocess.run([sys.executable, "-m", "dermgate.cli", "store", "init-key", "--workdir", str(work)],
                   check=True, capture_output=True, env=env)
    again = subprocess.run([sys.executable, "-m", "dermgate.cli", "store", "init-key", "--workdir", str(work)],
                           capture_output=True, text=True, env=env)
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr
    settings = Settings(workdir=work, store=StoreSettings(encrypt=True))
    rel, _ = ObjectStore(settings.store_dir, store_cipher(settings)).put_object(b"the object")
    out = subprocess.run([sys.executable, "-m", "dermgate.cli", "store", "cat", rel, "--workdir", str(work)],
                         check=True, capture_output=True, env=env)
    assert out.stdout == b"the object"
    rt = Runtime(settings)
    reads = [r.event for r in rt.audit.events() if r.event.detail.get("what") == "store cat"]
    assert reads and reads[0].detail["path"] == rel
    rt.close()
