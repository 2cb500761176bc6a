"""DICOMweb STOW-RS in (PS3.18 10.5): ``POST /dicomweb/studies[/{study}]`` on the API port.

Each ``application/dicom`` part of the ``multipart/related`` body goes through the
same admission as a C-STORE (integration/dicom_scp/admission.py): parse, identifiers,
geometry, free-space reserve, decodable pixels, then durable store + job, then an
audit record (DCM 110104, as for C-STORE) before the instance counts as stored.
The answer is the Store Instances Response Module as ``application/dicom+json``:

    200  every instance stored (ReferencedSOPSequence)
    202  some stored, some failed (FailedSOPSequence with the Failure Reason (0008,1197)
         of each: the DICOM status C-STORE would have answered, e.g. 0xC004 pixels do not
         decode, 0xA700 out of resources, 0xA900 study differs from the URL)
    409  none stored
    415  the request is not multipart/related; type="application/dicom"

Authentication: a bearer token of role ``modality`` (or ``operator``), from
``dermgate api-token add --role modality``; mutual TLS is left to the ingress.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response, status
from pydicom.dataset import Dataset

from audit.api import AuditEvent, EventType, Outcome
from dermgate.api.deps import RuntimeDep, User, require

DICOM_JSON = "application/dicom+json"
MAX_BODY_BYTES = 1 << 30                   # 1 GiB per request
UID_RE = re.compile(r"^[0-9.]{1,64}$")
ROLE = "modality"


def parse_multipart(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(part content type, part body) of a multipart/related body (RFC 2387)."""
    params = dict(_params(content_type))
    boundary = params.get("boundary")
    if not content_type.lower().startswith("multipart/related") or not boundary:
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                            'expected multipart/related; type="application/dicom" with a boundary')
    kind = params.get("type", "application/dicom").lower()
    if kind != "application/dicom":
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                            f"type {kind} is not supported: only application/dicom instances")
    delimiter = b"--" + boundary.encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break                                       # the close delimiter
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        if data.endswith(b"\r\n"):
            data = data[:-2]
        headers = dict(_header(line) for line in head.decode("latin-1").split("\r\n") if ":" in line)
        parts.append((headers.get("content-type", "application/dicom").split(";")[0].strip().lower(), data))
    return parts


def _params(content_type: str) -> list[tuple[str, str]]:
    out = []
    for item in content_type.split(";")[1:]:
        key, _, value = item.strip().partition("=")
        out.append((key.strip().lower(), value.strip().strip('"')))
    return out


def _header(line: str) -> tuple[str, str]:
    key, _, value = line.partition(":")
    return key.strip().lower(), value.strip()


def part10(data: bytes) -> bytes:
    """A part that starts with the File Meta Information but no preamble (as pydicom writes a data set
    read without one, e.g. from dicomweb-client) gets the 128-byte preamble and "DICM" prefix."""
    if data[:4] == b"\x02\x00\x00\x00" or data[:4] == b"\x02\x00\x01\x00" or data[:4] == b"\x02\x00\x02\x00":
        return b"\x00" * 128 + b"DICM" + data
    return data


def router() -> APIRouter:
    r = APIRouter(tags=["dicomweb"])
    modality = require(ROLE, "operator")

    @r.post("/dicomweb/studies")
    async def stow(request: Request, rt: RuntimeDep, user: User = modality) -> Response:
        return await _stow(request, rt, user, None)

    @r.post("/dicomweb/studies/{study}")
    async def stow_study(study: str, request: Request, rt: RuntimeDep, user: User = modality) -> Response:
        if not UID_RE.match(study):
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "the study in the URL is not a UID")
        return await _stow(request, rt, user, study)

    return r


async def _stow(request: Request, rt: Any, user: User, study: str | None) -> Response:
    import anyio
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, "request larger than 1 GiB")
    parts = parse_multipart(request.headers.get("content-type", ""), body)
    if not parts:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "no parts in the multipart body")
    host = request.client.host if request.client else None
    # The admission does blocking I/O (fsync, database): off the event loop.
    response = await anyio.to_thread.run_sync(lambda: store_parts(rt, user, host, study, parts))
    stored, failed = len(response.get("ReferencedSOPSequence", [])), len(response.get("FailedSOPSequence", []))
    code = status.HTTP_200_OK if not failed else (status.HTTP_202_ACCEPTED if stored else status.HTTP_409_CONFLICT)
    return Response(json.dumps(response.to_json_dict()), status_code=code, media_type=DICOM_JSON)


def store_parts(rt: Any, user: User, host: str | None, study: str | None,
                parts: list[tuple[str, bytes]]) -> Dataset:
    """Admit each part; the Store Instances Response (PS3.18 Table 10.5.3-1)."""
    from integration.dicom_scp import status as st
    from integration.dicom_scp.admission import admit
    from integration.dicom_scp.admission import Refusal, StoreOutcome
    response = Dataset()
    referenced: list[Dataset] = []
    failed: list[Dataset] = []
    intake = rt.intake()
    for content_type, data in parts:
        if content_type != "application/dicom":
            outcome = StoreOutcome(st.CANNOT_UNDERSTAND, f"part of type {content_type} is not application/dicom")
        else:
            def same_study(image: Any) -> None:
                from integration.dicom_scp.uids import SCP_STORAGE_SOP_CLASSES
                if image.sop_class_uid not in {str(u) for u in SCP_STORAGE_SOP_CLASSES}:
                    raise Refusal(st.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                                  "SOP Class not accepted (the storage SOP classes of the conformance statement)")
                if study and image.study_instance_uid != study:
                    raise Refusal(st.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                                  "Study Instance UID differs from the study in the URL")
            try:
                outcome = admit(part10(data), f"STOW:{user.name}"[:16], intake, rt.settings.dicom, rt.store,
                                check=same_study)
            except Exception as exc:  # noqa: BLE001 - one bad part must not fail the others
                outcome = StoreOutcome(st.CANNOT_UNDERSTAND, f"internal error: {type(exc).__name__}")
        outcome = _audit(rt, user, host, outcome)
        item = Dataset()
        if outcome.image is not None:
            item.ReferencedSOPClassUID = outcome.image.sop_class_uid
            item.ReferencedSOPInstanceUID = outcome.image.sop_instance_uid
        if outcome.status == st.SUCCESS:       # new, or the same bytes stored before (nothing done twice)
            referenced.append(item)
        else:
            item.FailureReason = outcome.status
            failed.append(item)
    if referenced:
        response.ReferencedSOPSequence = referenced
    if failed:
        response.FailedSOPSequence = failed
    return response


def _audit(rt: Any, user: User, host: str | None, outcome: Any) -> Any:
    """As for C-STORE: no audit record, no stored instance (0xA700, the client may retry)."""
    from integration.dicom_scp import status as st
    from integration.dicom_scp.admission import StoreOutcome
    image = outcome.image
    detail: dict[str, Any] = {"status": f"0x{outcome.status:04X}", "status_name": st.status_name(outcome.status),
                              "result": outcome.label, "transport": "stow-rs", **outcome.details}
    if outcome.reason:
        detail["reason"] = outcome.reason
    if outcome.result is not None:
        detail.update(sha256=outcome.result.sha256, job_id=outcome.result.job_id,
                      correlation_id=outcome.result.correlation_id)
    try:
        rt.audit.record(AuditEvent(
            event=EventType.STORE_RECEIVED, outcome=Outcome.SUCCESS if outcome.status == st.SUCCESS
            else Outcome.MINOR_FAILURE, actor=user.name, action="C", actor_role=user.role, source=host,
            destination="dermgate STOW-RS", patient_id=image.patient_id if image else None,
            study_uid=image.study_instance_uid if image else None,
            sop_instance_uids=(image.sop_instance_uid,) if image else (), detail=detail))
    except Exception:  # noqa: BLE001
        if outcome.status == st.SUCCESS:
            return StoreOutcome(st.OUT_OF_RESOURCES, "audit trail unavailable", image, outcome.result)
    return outcome
