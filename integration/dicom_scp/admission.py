"""Admission of one received DICOM object, whatever carried it (C-STORE or STOW-RS).

The same checks, in order of cost, for every transport: parse the Part 10 stream
(refusing truncations), read the identifiers the service needs, let the transport
check what only it knows (the C-STORE request's SOP Class/Instance, the STOW-RS
URL's study), check the image geometry, the store's free-space reserve, that the
pixels decode, and only then make the object durable and queue its job
(:class:`~dermgate.intake.Intake`). The result is a DICOM status with its reason:
C-STORE answers it, STOW-RS reports it per instance (PS3.18 Failure Reason).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dermgate.intake import Intake, IntakeStatus
from dermgate.records import ImageRef
from dermgate.settings import DicomSettings
from dermgate.store import ObjectStore
from integration.dicom_scp import status as st
from integration.dicom_scp.decode import DecodeError, check_image, geometry, verify_decodable


def admit(encoded: bytes, calling_ae: str, intake: Intake, cfg: DicomSettings, store: ObjectStore, *,
          check: Callable[[ImageRef], None] | None = None) -> Any:
    """One object through every admission check; a ``StoreOutcome`` (status, reason, image, intake result).
    ``check(image)`` raises ``Refusal`` for a transport-specific mismatch."""
    from integration.dicom_scp.handlers import Refusal, StoreOutcome, _accept, _decode_status, image_ref, parse
    image: ImageRef | None = None
    details: dict[str, Any] = {}
    try:
        ds = parse(encoded)
        image = image_ref(ds, calling_ae)
        if check is not None:
            check(image)
        geo = geometry(ds)
        details.update(rows=geo.rows, columns=geo.columns, photometric=geo.photometric)
        check_image(geo, cfg.max_pixels)
        if store.free_bytes() < cfg.min_free_bytes:
            raise Refusal(st.OUT_OF_RESOURCES, "storage below its free-space reserve")
        verify_decodable(ds, geo)
        result = _accept(intake, encoded, image, geo.transfer_syntax)
    except Refusal as refusal:
        return StoreOutcome(refusal.status, refusal.reason, image, None, details)
    except DecodeError as exc:
        return StoreOutcome(_decode_status(exc), str(exc), image, None, details)
    if result.status is IntakeStatus.CONFLICT:
        return StoreOutcome(st.SOP_INSTANCE_CONFLICT, "SOP Instance UID already received with other content",
                            image, result, details)
    return StoreOutcome(st.SUCCESS, None, image, result, details)
