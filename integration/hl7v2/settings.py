"""HL7 v2 delivery settings, nested into the service settings as ``settings.hl7``.

The contract (kept stable): a ``[hl7]`` section with ``host``, ``port``,
``sending_application``, ``sending_facility``, ``receiving_application`` and
``receiving_facility``; the rest has defaults.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict


class MessageType(str, Enum):
    ORU_R01 = "ORU^R01"        # observation result (default)
    MDM_T02 = "MDM^T02"        # original document notification and content (the PDF as a document)


class Hl7Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str | None = None                  # None: HL7 v2 delivery is off
    port: int = 2575                         # IANA-registered port for HL7 over MLLP
    sending_application: str = "DERMGATE"
    sending_facility: str = "DERMGATE"
    receiving_application: str = "EHR"
    receiving_facility: str = "HOSPITAL"

    message_type: MessageType = MessageType.ORU_R01
    processing_id: Literal["P", "T", "D"] = "P"   # MSH-11: production / training / debug
    include_pdf: bool = True                  # OBX ED with the PDF (Base64)
    patient_identifier_authority: str | None = None   # PID-3.4; default: the Issuer of Patient ID
    connect_timeout_s: float = 5.0
    ack_timeout_s: float = 30.0               # wait this long for the ACK, then retry (the engine may have it)
