"""The structlog processor blanks PHI-looking fields before a log line is rendered."""

from __future__ import annotations

import io
import json

import structlog

from audit.phi import REDACTED, make_phi_redactor, redact_phi


def _render(processors, **fields) -> dict:
    out = io.StringIO()
    logger = structlog.wrap_logger(structlog.PrintLogger(out), processors=processors + [
        structlog.processors.JSONRenderer()])
    logger.info("job_done", **fields)
    return json.loads(out.getvalue())


def test_phi_keys_in_any_spelling_and_depth_are_redacted_and_the_rest_kept():
    line = _render([redact_phi], patient_id="PAT-0001", PatientName="DOE^JANE", birth_date="19700101",
                   job={"dob": "1970-01-01", "study_uid": "1.2.3", "items": [{"MRN": "4711"}]},
                   sop_instance_uid="1.2.3.4")
    assert line["patient_id"] == line["PatientName"] == line["birth_date"] == REDACTED
    assert line["job"]["dob"] == REDACTED and line["job"]["items"][0]["MRN"] == REDACTED
    assert line["job"]["study_uid"] == "1.2.3" and line["sop_instance_uid"] == "1.2.3.4"
    assert line["event"] == "job_done"
    text = json.dumps(line)
    assert "PAT-0001" not in text and "DOE" not in text and "1970" not in text and "4711" not in text


def test_extra_keys_can_be_declared_phi():
    line = _render([make_phi_redactor(["accession_number"])], AccessionNumber="ACC123", calling_ae="CAM1")
    assert line["AccessionNumber"] == REDACTED and line["calling_ae"] == "CAM1"


def test_values_inside_messages_and_reasons_are_redacted_not_only_keys():
    """Issue 12: other libraries and free-text reasons put raw values in the text itself."""
    from audit.phi import redact_text
    line = _render([redact_phi], reason="classification failed: Unable to convert '1970-01-31' to 'DA' object",
                   detail={"note": "Invalid value for VR PN: \"Doe^Jane\""},
                   url="https://ehr/fhir/Patient?identifier=s|MRN-7",
                   dsn="postgresql://dermgate:pw123@db/dermgate", sop_instance_uid="1.2.826.0.1.3680043.8.498.19700131")
    text = json.dumps(line)
    for phi in ("1970-01-31", "Doe", "Jane", "MRN-7", "pw123"):
        assert phi not in text, phi
    assert line["sop_instance_uid"] == "1.2.826.0.1.3680043.8.498.19700131"       # UIDs are kept
    assert redact_text("born 19700131 and 31.01.1970") == f"born {REDACTED} and {REDACTED}"
    assert redact_text('File "/srv/x.py", line 3') == 'File "/srv/x.py", line 3'   # tracebacks keep their files
