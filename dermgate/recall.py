"""Model recall: withdraw every result of a model version from the PACS and the EHR.

    dermgate model recall --version V --reason TEXT [--fhir-action entered-in-error|amended]

In ONE transaction: a ``model_recalls`` row, ``jobs.recall_id`` set on each
result of that version (the worklist shows it), and one outbox row per result
and channel (business key ``<SOP UID>:recall:<recall id>``, so each step is
delivered exactly once even across restarts):

- PACS (each DICOM destination): an IHE IOCM rejection note, a Key Object
  Selection Document titled (113037, DCM, "Rejected for Patient Safety
  Reasons") that references the derived SC and SR, in the same study; a PACS
  that supports IOCM hides or deletes the rejected instances.
- EHR (FHIR): the report becomes ``entered-in-error`` (its Observations too), or
  ``amended`` with the recall notice and reason (``recall.fhir_action``), by a
  versioned update tagged with the recall id.

The recall and each recalled result are audit events (``model.recall``); each
delivery is audited by its channel, as every delivery is. Results already
recalled are not recalled twice; results still in progress are recalled from
whatever they reached (no outputs: nothing to reject in the PACS).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select

from audit.api import AuditEvent, EventType, Outcome
from dermgate.db import Instance, Job, ModelRecall, OutboxItem
from dermgate.pipeline import derived_dir
from dermgate.records import ImageRef

FHIR_ACTIONS = ("entered-in-error", "amended")
KIND = "recall"
REJECTED_FOR_PATIENT_SAFETY = ("113037", "DCM", "Rejected for Patient Safety Reasons")


class RecallError(Exception):
    pass


def write_rejection_note(store: Any, image: ImageRef, outputs: dict[str, Any], recall_id: int, reason: str) -> str:
    """The IOCM rejection note (KOS) for one result's SC and SR; its path relative to the store root."""
    import highdicom as hd
    from pydicom import dcmread
    from pydicom.sr.coding import Code

    from integration.dicom_scp.outputs import derived_uid
    evidence = [dcmread(store.path(outputs["sc_path"])), dcmread(store.path(outputs["sr_path"]))]
    title = Code(*REJECTED_FOR_PATIENT_SAFETY)
    content = hd.ko.KeyObjectSelection(document_title=title, referenced_objects=evidence,
                                       description=f"dermgate model recall {recall_id}: {reason}"[:1024])
    sc_uid = str(evidence[0].SOPInstanceUID)
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=evidence, content=content,
        series_instance_uid=derived_uid(sc_uid, "recall-series", str(recall_id)), series_number=9901,
        sop_instance_uid=derived_uid(sc_uid, "recall", str(recall_id)), instance_number=1,
        manufacturer="dermgate", institution_name=None)
    rel = f"{derived_dir(image)}/rejection-{recall_id}.dcm"
    path = store.path(rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    kos.save_as(path)
    return rel


def recall_model(rt: Any, *, version: str, reason: str, actor: str, fhir_action: str | None = None) -> dict[str, Any]:
    action = fhir_action or rt.settings.recall.fhir_action
    if action not in FHIR_ACTIONS:
        raise RecallError(f"fhir action must be one of {', '.join(FHIR_ACTIONS)}")
    if not reason.strip():
        raise RecallError("a recall needs a reason")
    with rt.sessions() as s:
        rows = [(j, i) for j, i in s.execute(select(Job, Instance).join(Instance, Instance.id == Job.instance_id)
                                              .where(Job.result.is_not(None), Job.recall_id.is_(None)))
                if ((j.result or {}).get("model") or {}).get("version") == version]
    if not rows:
        raise RecallError(f"no results of model version {version!r} that are not recalled already")
    now = datetime.now(timezone.utc)
    notes: dict[int, str] = {}
    dicom_planners = [p for p in rt.planners if p.channel.startswith("dicom:")]
    for job, _inst in rows:
        if dicom_planners and (job.outputs or {}).get("sc_path"):
            notes[job.id] = ""      # written below, once the recall id is known
    per_channel: dict[str, int] = {}
    with rt.sessions.begin() as s:
        recall = ModelRecall(model_version=version, reason=reason, fhir_action=action, created_by=actor,
                             created_at=now, n_results=len(rows))
        s.add(recall)
        s.flush()
        info = {"id": recall.id, "model_version": version, "reason": reason, "action": action,
                "recalled_at": now.isoformat(timespec="seconds")}
        for job, inst in rows:
            s.query(Job).filter(Job.id == job.id).update({"recall_id": recall.id})
            image = ImageRef.from_object(inst)
            key = f"{inst.sop_instance_uid}:recall:{recall.id}"
            for planner in rt.planners:
                payload: dict[str, Any] | None = None
                if planner.channel.startswith("dicom:"):
                    if job.id in notes:
                        rel = write_rejection_note(rt.store, image, job.outputs or {}, recall.id, reason)
                        payload = {"files": [rel], "study_instance_uid": inst.study_instance_uid, "kind": KIND}
                elif hasattr(planner, "plan_review"):      # a FHIR planner (EHR or bundle folder)
                    from integration.fhir.channel import prepare_recall_payload
                    payload = prepare_recall_payload(image, info, planner.settings)
                if payload is not None:
                    s.add(OutboxItem(job_id=None, channel=planner.channel, kind=KIND, payload=payload,
                                     business_key=key))
                    per_channel[planner.channel] = per_channel.get(planner.channel, 0) + 1
        recall_id = recall.id
    rt.audit.record(AuditEvent(event=EventType.MODEL_RECALL, outcome=Outcome.SUCCESS, actor=actor,
                               actor_role="operator", action="U",
                               detail={"recall_id": recall_id, "model_version": version, "reason": reason,
                                       "fhir_action": action, "results": len(rows), "deliveries": per_channel}))
    for job, inst in rows:
        rt.audit.record(AuditEvent(event=EventType.MODEL_RECALL, outcome=Outcome.SUCCESS, actor=actor,
                                   actor_role="operator", action="U", patient_id=inst.patient_id,
                                   study_uid=inst.study_instance_uid, sop_instance_uids=(inst.sop_instance_uid,),
                                   detail={"recall_id": recall_id, "job_id": job.id, "model_version": version}))
    return {"recall_id": recall_id, "model_version": version, "results": len(rows), "fhir_action": action,
            "deliveries_queued": per_channel}


def list_recalls(sessions: Any) -> list[dict[str, Any]]:
    with sessions() as s:
        return [{"id": r.id, "model_version": r.model_version, "reason": r.reason, "fhir_action": r.fhir_action,
                 "created_by": r.created_by, "created_at": r.created_at.isoformat(), "results": r.n_results}
                for r in s.scalars(select(ModelRecall).order_by(ModelRecall.id))]
