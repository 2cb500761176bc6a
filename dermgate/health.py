"""Readiness: is each dependency of this process usable right now (database, model, store, EHR token)?

Used by ``/readyz`` (orchestrators) and by the console's IT page.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from dermgate.app import Runtime


def readiness(rt: Runtime, check_model: bool = True, check_ehr: bool = False) -> dict[str, dict[str, Any]]:
    """Each check: ok + detail. Ready only when all are ok. The model is checked only
    where this process classifies (worker role): an SCP-only pod needs no model. The EHR is
    checked only where this process delivers to it (dispatcher role), with the token it
    already holds: an EHR outage must never turn the SCPs NotReady and stop DICOM intake."""
    checks: dict[str, dict[str, Any]] = {}
    try:
        with rt.db.connect() as c:
            c.execute(text("SELECT 1"))
        checks["database"] = {"ok": True}
    except Exception as exc:  # noqa: BLE001
        checks["database"] = {"ok": False, "detail": type(exc).__name__}
    if check_model:
        try:
            eng = rt.classifier
            checks["model"] = {"ok": eng.file_intact(), "providers": eng.providers}
        except Exception as exc:  # noqa: BLE001
            checks["model"] = {"ok": False, "detail": str(exc)[:200]}
    try:
        probe = rt.store.root / ".readyz"
        probe.write_bytes(b"ok")
        probe.unlink()
        free = rt.store.free_bytes()
        checks["store"] = {"ok": free >= rt.settings.dicom.min_free_bytes, "free_bytes": free}
    except OSError as exc:
        checks["store"] = {"ok": False, "detail": exc.strerror}
    if check_ehr and rt.settings.fhir is not None and rt.settings.fhir.token_url:
        try:
            from dermgate.channels import fhir_token_ready
            checks["fhir_token"] = {"ok": fhir_token_ready(rt.settings, rt.channels)}
        except Exception as exc:  # noqa: BLE001
            checks["fhir_token"] = {"ok": False, "detail": type(exc).__name__}
    return checks
