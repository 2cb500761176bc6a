"""HL7 v2.5.1 ORU^R01 over MLLP against a real listener on loopback (tests/peers/mllp.py).

The listener parses and validates every message with hl7apy and answers with ACKs
built by hl7apy; faults (AE, AR, a dropped connection after the commit) are scripted.
"""

from __future__ import annotations

import base64
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from audit.api import EventType, Outcome
from dermgate.records import Outputs
from dermgate.store import ObjectStore
from inference.result import Risk
from integration.fhir.resources import Thresholds
from integration.hl7v2.channel import Hl7Planner, MllpChannel
from integration.hl7v2.message import build_message, control_id, parse, parse_ack
from integration.hl7v2.settings import Hl7Settings, MessageType
from tests.integration.fhir.data import cam_png, synthetic_prediction
from tests.integration.fhir.peer import ListAuditSink
from tests.integration.fhir.test_fhir_dialects import image
from tests.peers.mllp import MllpListener, free_port, mllp_listener

ISSUED = datetime(2026, 3, 12, 11, 0, tzinfo=timezone.utc)
PDF = b"%PDF-1.4 stand-in report"


@pytest.fixture
def listener() -> Any:
    with mllp_listener() as peer:
        yield peer


def settings(peer: MllpListener | None = None, **kw: Any) -> Hl7Settings:
    return Hl7Settings(host=peer.host if peer else "127.0.0.1", port=peer.port if peer else free_port(),
                       sending_application="DERMGATE", sending_facility="DERMCLINIC",
                       receiving_application="RHAPSODY", receiving_facility="GENHOSP",
                       ack_timeout_s=2.0, **kw)


def payload(hl7: Hl7Settings, n: int = 1, prediction: Any = None) -> dict[str, Any]:
    key = f"1.2.826.0.1.3680043.10.1099.3.{n}:report"
    built = build_message(image(n), prediction or synthetic_prediction(64, 64), PDF, hl7, issued=ISSUED,
                          business_key=key, study_time=ISSUED, thresholds=Thresholds(0.08, 0.5))
    return {"kind": "report", "business_key": key, "message_type": built.message_type,
            "control_id": built.control_id, "message": built.er7, "image": {"patient_id": "MRN-0001",
                                                                             "sop_instance_uid": key[:-7]}}


# ---- the message -----------------------------------------------------------------------------------

def test_oru_r01_has_the_segments_and_field_types_of_v251_and_carries_the_result() -> None:
    built = build_message(image(), synthetic_prediction(64, 64), PDF, settings(), issued=ISSUED,
                          business_key="k", study_time=ISSUED, thresholds=Thresholds(0.08, 0.5))
    msg = parse(built.er7)                                   # hl7apy structure validation
    segments = [s.split("|", 1)[0] for s in built.er7.split("\r") if s]
    assert segments == ["MSH", "PID", "PV1", "ORC", "OBR", "NTE", "OBX", "OBX", "OBX", "OBX", "OBX"]
    assert msg.msh.msh_9.value == "ORU^R01^ORU_R01" and msg.msh.msh_12.value == "2.5.1"
    assert msg.msh.msh_3.value == "DERMGATE" and msg.msh.msh_6.value == "GENHOSP"
    assert msg.msh.msh_10.value == control_id("k")
    seg = {s.split("|", 1)[0] + (s.split("|")[1] if s.startswith("OBX") else ""): s.split("|")
           for s in built.er7.split("\r") if s}
    assert seg["PID"][3] == "MRN-0001^^^TESTHOSP^MR" and seg["PID"][5] == "Test^Pat" and seg["PID"][7] == "19700101"
    assert seg["OBR"][2] == "PLC-1" and seg["OBR"][3] == "FIL-1"        # placer and filler order numbers
    assert seg["OBR"][18] == "ACC0001" and seg["OBR"][19] == "RP1" and seg["OBR"][25] == "P"
    assert [seg[f"OBX{i}"][2] for i in range(1, 6)] == ["NM", "CWE", "CWE", "CWE", "ED"]
    assert seg["OBX1"][5] == "28.00" and seg["OBX1"][6] == "%^percent^UCUM" and seg["OBX1"][8] == "A"
    assert seg["OBX2"][5].startswith("400096001^Melanocytic nevus^SCT^ham10000-nv")
    assert base64.b64decode(seg["OBX5"][5].split("^")[4]) == PDF
    assert "not a diagnosis" in seg["NTE"][3]


def test_high_risk_is_flagged_high_and_abnormal() -> None:
    high = synthetic_prediction(64, 64)
    object.__setattr__(high, "risk", Risk.HIGH)
    built = build_message(image(), high, None, settings(include_pdf=False), issued=ISSUED, business_key="k")
    risk = next(s for s in built.er7.split("\r") if s.startswith("OBX|3|"))
    assert risk.split("|")[8] == "H~A"


def test_mdm_t02_option_is_a_valid_document_notification_with_the_pdf() -> None:
    built = build_message(image(), synthetic_prediction(64, 64), PDF, settings(message_type=MessageType.MDM_T02),
                          issued=ISSUED, business_key="k")
    assert parse(built.er7).name == "MDM_T02"
    assert [s[:3] for s in built.er7.split("\r") if s] == ["MSH", "EVN", "PID", "PV1", "TXA", "OBX"]


def test_the_listener_rejects_a_structurally_invalid_message(listener: MllpListener) -> None:
    good = payload(settings(listener))
    broken = dict(good, message=good["message"].replace("\rOBR|", "\rXXX|"))   # no OBR in the order group
    outcome = MllpChannel(settings(listener), ListAuditSink()).deliver(broken)
    assert not outcome.ok and not outcome.retryable and "rejected" in (outcome.reason or "")
    assert listener.state.invalid and not listener.accepted


# ---- delivery: ACK, NAK, dropped connection, exactly once ----------------------------------------------

def test_accepted_message_is_sent_and_audited_with_its_msa(listener: MllpListener) -> None:
    audit = ListAuditSink()
    hl7 = settings(listener)
    p = payload(hl7)
    outcome = MllpChannel(hl7, audit).deliver(p)
    assert outcome.ok, outcome.reason
    assert list(listener.accepted) == [p["control_id"]]
    [event] = audit.events
    assert event.event is EventType.HL7_DELIVERY and event.outcome is Outcome.SUCCESS
    assert event.detail["msa"] == {"code": "AA", "control_id": p["control_id"], "text": ""}


def test_application_error_is_retried_and_the_result_is_filed_once(listener: MllpListener) -> None:
    audit = ListAuditSink()
    listener.fault("AE", "AE")
    hl7 = settings(listener)
    channel, p = MllpChannel(hl7, audit), payload(hl7)
    outcomes = [channel.deliver(p) for _ in range(3)]
    assert [(o.ok, o.retryable) for o in outcomes] == [(False, True), (False, True), (True, True)]
    assert len(listener.accepted) == 1 and listener.state.duplicates == 0
    assert audit.events[0].detail["msa"]["code"] == "AE" and audit.events[0].detail["err"][0].startswith("ERR|")


def test_reject_is_dead_lettered_with_msa_and_err_in_the_audit(listener: MllpListener) -> None:
    audit = ListAuditSink()
    listener.fault("AR")
    hl7 = settings(listener)
    outcome = MllpChannel(hl7, audit).deliver(payload(hl7))
    assert not outcome.ok and not outcome.retryable and "MSA AR" in (outcome.reason or "")
    assert audit.events[0].outcome is Outcome.SERIOUS_FAILURE
    assert "refused by the engine" in audit.events[0].detail["err"][0]


def test_connection_dropped_after_the_engine_stored_the_message_is_retried_and_filed_once(
        listener: MllpListener) -> None:
    listener.fault("drop")
    hl7 = settings(listener)
    channel, p = MllpChannel(hl7, ListAuditSink()), payload(hl7)
    first, second = channel.deliver(p), channel.deliver(p)
    assert not first.ok and first.retryable and "closed before the ACK" in (first.reason or "")
    assert second.ok
    assert len(listener.accepted) == 1 and listener.state.duplicates == 1    # the same MSH-10, filed once


def test_engine_down_is_retryable() -> None:
    hl7 = settings()
    outcome = MllpChannel(hl7, ListAuditSink()).deliver(payload(hl7))
    assert not outcome.ok and outcome.retryable


def test_ack_parsing_reads_msa_and_err() -> None:
    ack = parse_ack("MSH|^~\\&|E|H|D|D|20260312||ACK^R01^ACK|1|P|2.5.1\rMSA|AE|ABC|busy\rERR|||207^x^HL70357|E")
    assert (ack.code, ack.control_id, ack.text) == ("AE", "ABC", "busy") and ack.errors[0].startswith("ERR")


def test_planner_builds_the_message_from_the_stored_heatmap_and_the_same_bytes_on_every_retry(
        tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    (tmp_path / "cam.png").write_bytes(cam_png())
    outputs = Outputs(sc_path="sc", sc_sop_instance_uid="1", sr_path="sr", sr_sop_instance_uid="2",
                      cam_png_path="cam.png")
    planned = Hl7Planner("hl7v2", settings()).plan(image(), synthetic_prediction(64, 64), outputs, store)
    assert planned is not None and parse(planned["message"]).name == "ORU_R01"
    assert planned["control_id"] == control_id(f"{image().sop_instance_uid}:report")
    assert "context" not in planned["image"]
