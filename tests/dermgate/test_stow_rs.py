"""DICOMweb STOW-RS in (PS3.18 10.5) against the running service, with independent clients.

``dicomweb-client`` (the reference Python DICOMweb client) stores instances over
HTTP; httpx sends the malformed ones. Every instance goes through the admission
C-STORE uses; every accepted one becomes a delivered job; bad parts get their
failure reasons and nothing accepted is lost.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from sqlalchemy import select

from audit.api import EventType
from dermgate.api.deps import hash_token
from dermgate.app import Runtime
from dermgate.db import Instance, Job, JobState
from dermgate.demo import SAMPLES, load_samples
from dermgate.service import Service
from dermgate.settings import ApiSettings
from tests.dermgate.test_service_e2e import make_settings
from tests.peers.orthanc import free_port

TOKEN, CLINICIAN_TOKEN = "scope-token", "clin-token"
FAILURE_REASON, REFERENCED, FAILED = "00081197", "00081199", "00081198"
SOP_INSTANCE = "00081155"


@pytest.fixture
def service(tmp_path: Path) -> Any:
    tokens = tmp_path / "tokens.json"
    created = datetime.now(timezone.utc).isoformat()            # tokens live api.token_lifetime_days from here
    tokens.write_text(json.dumps({hash_token(TOKEN): {"user": "scope-1", "role": "modality", "created": created},
                                  hash_token(CLINICIAN_TOKEN): {"user": "dr.derm", "role": "clinician",
                                                                "created": created}}))
    settings = make_settings(tmp_path / "work", None)
    settings.api = ApiSettings(port=free_port(), tokens_file=tokens)
    settings.fhir_bundle_dir = tmp_path / "bundles"
    rt = Runtime(settings)
    svc = Service(rt, roles={"api", "worker", "dispatcher"})
    svc.start()
    _wait_http(f"http://127.0.0.1:{settings.api.port}/healthz")
    try:
        yield rt, f"http://127.0.0.1:{settings.api.port}/dicomweb"
    finally:
        svc.stop()
        rt.close()


def _wait_http(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("API did not start")


def datasets(n: int) -> list[Dataset]:
    return [ds for _, ds, _ in load_samples(SAMPLES)[:n]]


def part10(ds: Dataset) -> bytes:
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def multipart(parts: list[tuple[str, bytes]], boundary: str = "dermgate-test") -> tuple[bytes, str]:
    body = b"".join(f"--{boundary}\r\nContent-Type: {ct}\r\n\r\n".encode() + data + b"\r\n" for ct, data in parts)
    return body + f"--{boundary}--\r\n".encode(), f'multipart/related; type="application/dicom"; boundary={boundary}'


def wait_jobs(rt: Runtime, uids: set[str], timeout: float = 120) -> dict[str, JobState]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with rt.sessions() as s:
            rows = s.execute(select(Instance.sop_instance_uid, Job.state).join(Job, Job.instance_id == Instance.id)
                             .where(Instance.sop_instance_uid.in_(uids))).all()
        states = dict(rows)
        if len(states) == len(uids) and all(v in (JobState.DELIVERED, JobState.FAILED) for v in states.values()):
            return states
        time.sleep(0.2)
    raise AssertionError(f"jobs not finished: {states}")


def test_dicomweb_client_stores_instances_that_become_delivered_jobs(service: Any) -> None:
    from dicomweb_client.api import DICOMwebClient
    rt, url = service
    client = DICOMwebClient(url=url, headers={"Authorization": f"Bearer {TOKEN}"})
    sent = datasets(3)
    response = client.store_instances(datasets=sent)
    stored = {str(item.ReferencedSOPInstanceUID) for item in response.ReferencedSOPSequence}
    assert stored == {str(ds.SOPInstanceUID) for ds in sent}
    assert "FailedSOPSequence" not in response
    states = wait_jobs(rt, stored)
    assert set(states.values()) == {JobState.DELIVERED}
    # The same instances again: stored once (duplicates), still one job each.
    again = client.store_instances(datasets=sent)
    assert len(again.ReferencedSOPSequence) == 3
    with rt.sessions() as s:
        assert len(list(s.scalars(select(Job)))) == 3
    received = [r.event for r in rt.audit.events() if r.event.event is EventType.STORE_RECEIVED]
    assert len(received) == 6 and all(e.detail["transport"] == "stow-rs" for e in received)
    assert {e.actor for e in received} == {"scope-1"}


def test_bad_parts_get_their_failure_reasons_and_the_good_one_is_not_lost(service: Any) -> None:
    rt, url = service
    good, corrupt, other_study = datasets(3)
    jpeg = corrupt.PixelData
    corrupt.PixelData = encapsulate([bytes(jpeg[16:len(jpeg) // 4])])     # a truncated JPEG frame
    corrupt["PixelData"].VR = "OB"
    study = str(good.StudyInstanceUID)
    corrupt.StudyInstanceUID = good.StudyInstanceUID
    other_study.StudyInstanceUID = "1.2.3.999"
    body, content_type = multipart([("application/dicom", part10(good)), ("application/dicom", part10(corrupt)),
                                    ("application/dicom", part10(other_study)), ("application/dicom", b"not dicom"),
                                    ("application/json", b"{}")])
    r = httpx.post(f"{url}/studies/{study}", content=body, timeout=60,
                   headers={"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}",
                            "Accept": "application/dicom+json"})
    assert r.status_code == 202, r.text
    assert r.headers["content-type"].startswith("application/dicom+json")
    doc = r.json()
    assert [i[SOP_INSTANCE]["Value"][0] for i in doc[REFERENCED]["Value"]] == [str(good.SOPInstanceUID)]
    failed = {(i.get(SOP_INSTANCE, {}).get("Value", ["?"])[0], i[FAILURE_REASON]["Value"][0])
              for i in doc[FAILED]["Value"]}
    assert (str(corrupt.SOPInstanceUID), 0xC004) in failed          # pixel data does not decode
    assert (str(other_study.SOPInstanceUID), 0xA900) in failed      # not the study of the URL
    assert len(failed) == 4
    assert set(wait_jobs(rt, {str(good.SOPInstanceUID)}).values()) == {JobState.DELIVERED}


def test_stow_needs_a_modality_token_and_a_dicom_multipart_body(service: Any) -> None:
    _, url = service
    body, content_type = multipart([("application/dicom", part10(datasets(1)[0]))])
    assert httpx.post(f"{url}/studies", content=body, headers={"Content-Type": content_type}).status_code == 401
    clinician = httpx.post(f"{url}/studies", content=body,
                           headers={"Content-Type": content_type, "Authorization": f"Bearer {CLINICIAN_TOKEN}"})
    assert clinician.status_code == 403
    wrong = httpx.post(f"{url}/studies", content=b"{}", headers={"Content-Type": "application/json",
                                                                  "Authorization": f"Bearer {TOKEN}"})
    assert wrong.status_code == 415
    only_bad, ct = multipart([("application/dicom", b"not dicom")])
    none = httpx.post(f"{url}/studies", content=only_bad, headers={"Content-Type": ct,
                                                                   "Authorization": f"Bearer {TOKEN}"})
    assert none.status_code == 409


def test_orthanc_dicomweb_plugin_stows_a_study_that_becomes_delivered_jobs(service: Any, tmp_path: Path) -> None:
    """Orthanc (Debian's orthanc-dicomweb) as the sending archive: its STOW-RS client, our server."""
    from tests.peers.orthanc import dicomweb_client_config, run_orthanc
    rt, url = service
    extra = dicomweb_client_config({"dermgate": {"Url": url + "/",
                                                 "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"}}})
    sent = datasets(2)
    with run_orthanc(tmp_path / "orthanc", extra=extra) as orthanc, orthanc.client() as c:
        ids = [c.post("/instances", content=part10(ds)).raise_for_status().json()["ID"] for ds in sent]
        r = c.post("/dicom-web/servers/dermgate/stow", json={"Resources": ids, "Synchronous": True}, timeout=60)
        assert r.status_code == 200, r.text
    states = wait_jobs(rt, {str(ds.SOPInstanceUID) for ds in sent})
    assert set(states.values()) == {JobState.DELIVERED}
    received = [r.event for r in rt.audit.events() if r.event.event is EventType.STORE_RECEIVED]
    assert len(received) == 2 and all(e.outcome.value == "0" for e in received)
