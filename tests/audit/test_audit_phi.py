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
