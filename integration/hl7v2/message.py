"""HL7 v2.5.1 messages for one AI result, built and parsed with hl7apy.

ORU^R01 (default)::

    MSH  sending/receiving application and facility from [hl7]; MSH-10 derived from
         the SOP Instance UID, so every retry carries the same control id
    PID  PID-3 patient id^^^issuer^MR, PID-5 name, PID-7 birth date, PID-8 sex (DICOM header)
    PV1  PV1-2 patient class U (unknown to a modality), PV1-19 the Admission ID when known
    ORC  RE, ORC-2/3 placer and filler order numbers (Referenced Request Sequence)
    OBR  OBR-2/3 placer/filler, OBR-4 LOINC 18748-4 + local code, OBR-7 study date/time
         (DICOM Timezone Offset From UTC, else the site zone), OBR-18 accession number,
         OBR-19 requested procedure id, OBR-22 issued, OBR-25 P (preliminary)
    NTE  "AI result for clinical decision support, not a diagnosis" + the referral threshold
    OBX  1 NM  malignancy probability, % (UCUM), OBX-7 the referral range, OBX-8 H/A/N
         2 CWE the most likely class (SNOMED CT where confirmed, and the local code)
         3 CWE the risk category, OBX-8 abnormal flags
         4 CWE low confidence (HL7 table 0136 Y/N)
         5 ED  the PDF report (^AP^PDF^Base64^...)
    every OBX: OBX-11 P, OBX-14 study date/time, OBX-18 the model (name version^^device UID^ISO)

MDM^T02 (option): MSH, EVN, PID, PV1, TXA (type DI, AP, completion DO, available AV), OBX ED with the PDF.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_message

from dermgate.records import ImageRef
from inference.result import CLASS_NAMES, DISCLAIMER, Prediction, Risk
from integration.hl7v2.settings import Hl7Settings, MessageType

VERSION = "2.5.1"
TOLERANT = VALIDATION_LEVEL.TOLERANT      # lengths are not enforced (ED with a PDF); structure is, by validate()
LOCAL = "L"
LOINC_REPORT = ("18748-4", "Diagnostic imaging study", "LN")
CLASS_SNOMED = {"akiec": "201101007", "bcc": "254701007", "mel": "93655004", "nv": "400096001"}
RISK_CODES = {Risk.LOW: "low", Risk.MEDIUM: "medium", Risk.HIGH: "high", Risk.NOT_ASSESSABLE: "not-assessable"}
RISK_FLAGS = {Risk.HIGH: ("H", "A"), Risk.MEDIUM: ("A",), Risk.LOW: ("N",), Risk.NOT_ASSESSABLE: ()}


def escape(text: str | None) -> str:
    """HL7 escape sequences for the delimiters (|^~\\&) in a text value."""
    if not text:
        return ""
    out = text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
    return out.replace("&", "\\T\\").replace("~", "\\R\\").replace("\r", " ").replace("\n", " ")


def control_id(business_key: str) -> str:
    """MSH-10 (ST, 20): the same for every retry of one image's message, so the engine can dedupe."""
    return hashlib.sha1(business_key.encode()).hexdigest()[:20].upper()


def hl7_ts(moment: datetime | None) -> str:
    if moment is None:
        return ""
    return moment.strftime("%Y%m%d%H%M%S%z") if moment.tzinfo else moment.strftime("%Y%m%d%H%M%S")


def hl7_date(value: Any) -> str:
    """A study date/time (datetime or date) as an HL7 TS."""
    if isinstance(value, datetime):
        return hl7_ts(value)
    return value.strftime("%Y%m%d") if value is not None else ""


@dataclass(frozen=True)
class Built:
    er7: str
    control_id: str
    message_type: str


def _xpn(pn: str | None) -> str:
    if not pn:
        return ""
    return "^".join(escape(part) for part in pn.split("=")[0].split("^")[:5])


def build_message(image: ImageRef, prediction: Prediction, pdf: bytes | None, settings: Hl7Settings, *,
                  issued: datetime, business_key: str, study_time: Any = None, thresholds: Any = None) -> Built:
    """The ER7 text of the result message; validated by hl7apy before it is returned."""
    ctrl = control_id(business_key)
    mtype = settings.message_type
    structure = "ORU_R01" if mtype is MessageType.ORU_R01 else "MDM_T02"
    msg = Message(structure, version=VERSION, validation_level=TOLERANT)
    msh = msg.msh
    msh.msh_3 = escape(settings.sending_application)
    msh.msh_4 = escape(settings.sending_facility)
    msh.msh_5 = escape(settings.receiving_application)
    msh.msh_6 = escape(settings.receiving_facility)
    msh.msh_7 = hl7_ts(issued)
    msh.msh_9 = f"{mtype.value}^{structure}"
    msh.msh_10 = ctrl
    msh.msh_11 = settings.processing_id
    msh.msh_12 = VERSION
    ctx = image.context
    when = hl7_date(study_time)
    orders = ctx.orders if ctx else ()
    placer = orders[0].placer_order_number if orders else None
    filler = orders[0].filler_order_number if orders else None
    authority = settings.patient_identifier_authority or image.issuer_of_patient_id or ""

    def patient(into: Any) -> None:
        pid = into.add_segment("PID")
        pid.pid_1 = "1"
        pid.pid_3 = f"{escape(image.patient_id)}^^^{escape(authority)}^MR"
        pid.pid_5 = _xpn(ctx.patient_name if ctx else None) or "UNKNOWN"
        if ctx and ctx.patient_birth_date:
            pid.pid_7 = ctx.patient_birth_date
        if ctx and ctx.patient_sex in ("M", "F", "O", "U"):
            pid.pid_8 = ctx.patient_sex

    def visit(into: Any) -> None:
        pv1 = into.add_segment("PV1")
        pv1.pv1_1 = "1"
        pv1.pv1_2 = "U"
        if ctx and ctx.admission_id:
            pv1.pv1_19 = escape(ctx.admission_id)

    if mtype is MessageType.MDM_T02:
        evn = msg.add_segment("EVN")
        evn.evn_1 = "T02"
        evn.evn_2 = hl7_ts(issued)
        patient(msg)
        visit(msg)
        txa = msg.add_segment("TXA")
        txa.txa_1 = "1"
        txa.txa_2 = "DI"        # HL7 table 0270: diagnostic imaging
        txa.txa_3 = "AP"
        txa.txa_4 = when or hl7_ts(issued)
        txa.txa_12 = ctrl
        txa.txa_17 = "DO"       # HL7 table 0271: documented (not authenticated: the AI's, before review)
        txa.txa_19 = "AV"
        obs = msg.add_group("MDM_T02_OBXNTE_SUPPGRP")
        _pdf_obx(obs.add_segment("OBX"), 1, pdf or b"", when, prediction)
        return _checked(msg, ctrl, mtype.value)

    result = msg.add_group("ORU_R01_PATIENT_RESULT")
    pt = result.add_group("ORU_R01_PATIENT")
    patient(pt)
    visit(pt.add_group("ORU_R01_VISIT"))
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    orc = order.add_segment("ORC")
    orc.orc_1 = "RE"
    if placer:
        orc.orc_2 = escape(placer)
    if filler:
        orc.orc_3 = escape(filler)
    obr = order.add_segment("OBR")
    obr.obr_1 = "1"
    if placer:
        obr.obr_2 = escape(placer)
    if filler:
        obr.obr_3 = escape(filler)
    obr.obr_4 = "^".join(LOINC_REPORT) + "^dermoscopy-ai-report^Dermoscopy AI decision-support report^L"
    if when:
        obr.obr_7 = when
    if image.accession_number:
        obr.obr_18 = escape(image.accession_number)
    if ctx and ctx.requested_procedure_id:
        obr.obr_19 = escape(ctx.requested_procedure_id)
    obr.obr_22 = hl7_ts(issued)
    obr.obr_25 = "P"
    note = order.add_segment("NTE")
    note.nte_1 = "1"
    note.nte_2 = "L"
    note.nte_3 = escape(f"{DISCLAIMER} {threshold_note(thresholds) or ''}".strip())

    n = 0

    def obx(value_type: str, code: str, text: str, value: str, **extra: str) -> Any:
        nonlocal n
        n += 1
        group = order.add_group("ORU_R01_OBSERVATION")
        seg = group.add_segment("OBX")
        seg.obx_1 = str(n)
        seg.obx_2 = value_type
        seg.obx_3 = f"{code}^{escape(text)}^{LOCAL}"
        seg.obx_5 = value
        for name, v in extra.items():
            for rep in v.split("~"):              # a repeating field: one hl7apy field per repetition
                seg.add_field(name).value = rep
        seg.obx_11 = "P"
        if when:
            seg.obx_14 = when
        seg.obx_18 = _equipment(prediction)
        return group

    p = prediction
    flags = "~".join(RISK_FLAGS[p.risk])
    if p.assessable:
        rng = f"<{100 * thresholds.referral:.1f}" if thresholds is not None else ""
        obx("NM", "malignancy-probability", "AI probability of a malignant lesion", f"{100 * p.malignancy_probability:.2f}",
            obx_6="%^percent^UCUM", **({"obx_7": rng} if rng else {}), **({"obx_8": flags} if flags else {}))
        top = p.top_class
        name = escape(CLASS_NAMES[top])
        value = (f"{CLASS_SNOMED[top]}^{name}^SCT^ham10000-{top}^{name}^L" if top in CLASS_SNOMED
                 else f"ham10000-{top}^{name}^L")
        obx("CWE", "predicted-class", "AI predicted lesion class", value)
    risk_text = escape(p.risk.value)
    risk = obx("CWE", "risk-category", "AI risk category", f"{RISK_CODES[p.risk]}^{risk_text}^L",
               **({"obx_8": flags} if flags else {}))
    if not p.assessable:
        nte = risk.add_segment("NTE")
        nte.nte_1 = "1"
        nte.nte_3 = escape(f"Not assessable: {p.reason or 'unknown reason'}")
    else:
        yes = ("Y^Yes^HL70136" if p.low_confidence else "N^No^HL70136")
        obx("CWE", "low-confidence", "AI result has low confidence", yes)
    if settings.include_pdf and pdf:
        n += 1
        group = order.add_group("ORU_R01_OBSERVATION")
        _pdf_obx(group.add_segment("OBX"), n, pdf, when, prediction)
    return _checked(msg, ctrl, mtype.value)


def _equipment(p: Prediction) -> str:
    return f"{escape(p.model.name)} {escape(p.model.version)}^^{p.model.device_uid}^ISO"


def _pdf_obx(seg: Any, n: int, pdf: bytes, when: str, p: Prediction) -> None:
    seg.obx_1 = str(n)
    seg.obx_2 = "ED"
    seg.obx_3 = "report-pdf^AI decision-support report (PDF)^L"
    seg.obx_5 = "^AP^PDF^Base64^" + base64.b64encode(pdf).decode("ascii")
    seg.obx_11 = "P"
    if when:
        seg.obx_14 = when
    seg.obx_18 = _equipment(p)


def threshold_note(thresholds: Any) -> str | None:
    if thresholds is None:
        return None
    return (f"Referral threshold: p(malignant) >= {100 * thresholds.referral:.1f}% (refer); "
            f">= {100 * thresholds.high:.1f}% High risk.")


def _checked(msg: Message, ctrl: str, mtype: str) -> Built:
    msg.validate()                          # structure: required segments, groups, order (hl7apy, v2.5.1)
    er7 = msg.to_er7()
    return Built(er7=er7, control_id=ctrl, message_type=mtype)


def parse(er7: str) -> Message:
    """Parse and validate a v2.5.1 message (hl7apy raises on a structural error)."""
    msg = parse_message(er7.replace("\n", "\r"), validation_level=TOLERANT, find_groups=True)
    msg.validate()
    return msg


@dataclass(frozen=True)
class Ack:
    code: str                 # MSA-1: AA/CA accepted, AE/CE error (retry), AR/CR rejected
    control_id: str           # MSA-2: the message it answers
    text: str                 # MSA-3
    errors: tuple[str, ...]   # the ERR segments as sent


def parse_ack(er7: str) -> Ack:
    """MSA and ERR of an ACK. Read segment by segment: an engine's ACK need not validate to be read."""
    segments = [s for s in er7.replace("\n", "\r").split("\r") if s]
    msa = next((s for s in segments if s.startswith("MSA")), None)
    if msa is None or not segments[0].startswith("MSH"):
        raise ValueError("not an ACK: no MSH/MSA segment")
    sep = segments[0][3]
    fields = msa.split(sep)
    return Ack(code=fields[1] if len(fields) > 1 else "", control_id=fields[2] if len(fields) > 2 else "",
               text=fields[3] if len(fields) > 3 else "", errors=tuple(s for s in segments if s.startswith("ERR")))
