"""FhirChannel against a real FHIR server on loopback: reports land once, faults lose and duplicate nothing.

Every test sends through the real channel and httpx stack to the Medplum-based
server, then reads back and searches on the server. Every resource the channel
sent is checked against the R4 JSON schema when the test ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from audit.api import EventType, Outcome
from dermgate.records import ImageRef
from integration.fhir.channel import FhirChannel
from integration.fhir.resources import Review, ReviewDecision
from integration.fhir.settings import FhirSettings, ProfileName
from tests.integration.fhir.data import ISSUER, PATIENT_SYSTEM, STUDY_UID, cam_png, image_ref, synthetic_prediction
from tests.integration.fhir.peer import (
    FhirTestServer,
    ListAuditSink,
    R4Schema,
    RecordingTransport,
    free_port,
    settle,
    start_fhir_server,
    utc,
)

PDF = b"%PDF-1.4 small stand-in: the real PDF is tested in test_fhir_resources"
ChannelFactory = Callable[..., FhirChannel]


@pytest.fixture
def make_channel(fhir: FhirTestServer, audit_sink: ListAuditSink, fhir_schema: R4Schema) -> Iterator[ChannelFactory]:
    """Builds FhirChannels on the test server (settings overridable); checks all they sent at the end."""
    recorders: list[RecordingTransport] = []
    channels: list[FhirChannel] = []

    def make(base_url: str | None = None, *, check_sent: bool = True,
             before_request: Callable[[httpx.Request], None] | None = None, imitate_vendor: bool = True,
             **overrides: Any) -> FhirChannel:
        profile = ProfileName(overrides.get("profile", ProfileName.GENERIC_R4))
        if imitate_vendor and base_url is None:      # the server refuses what the vendor's API documents it refuses
            fhir.configure(vendor=VENDOR_MODE.get(profile))
        if profile is ProfileName.ORACLE_HEALTH and "author_reference" not in overrides:
            overrides["author_reference"] = service_practitioner(fhir)
        settings = FhirSettings(**{"base_url": base_url or fhir.base_url,
                                   "patient_identifier_systems": {ISSUER: PATIENT_SYSTEM},
                                   "timeouts": {"connect_s": 2.0, "read_s": 5.0, "write_s": 5.0, "pool_s": 2.0},
                                   **overrides})
        recorder = RecordingTransport(before=before_request)
        channel = FhirChannel.from_settings(settings, audit_sink, transport=recorder, clock=lambda: utc(2026, 3, 12, 11))
        if check_sent:
            recorders.append(recorder)
        channels.append(channel)
        return channel

    yield make
    for channel in channels:
        channel.close()
    for recorder in recorders:
        for body in recorder.resources():
            fhir_schema.assert_valid(body)


VENDOR_MODE = {ProfileName.EPIC: "epic", ProfileName.ORACLE_HEALTH: "oracle"}


def service_practitioner(fhir: FhirTestServer) -> str:
    """dermgate's service account as the EHR registers it: a Practitioner (Oracle's documents need one)."""
    found = fhir.search("Practitioner", identifier="urn:test:staff|dermgate")
    practitioner = found[0] if found else fhir.create({
        "resourceType": "Practitioner", "identifier": [{"system": "urn:test:staff", "value": "dermgate"}],
        "name": [{"text": "dermgate AI service"}]})
    return f"Practitioner/{practitioner['id']}"


def prepare(channel: FhirChannel, n: int = 1, **image_changes: Any) -> dict[str, Any]:
    return channel.prepare(image_ref(n, **image_changes), synthetic_prediction(64, 64), cam_png(), pdf=PDF)


def reports(fhir: FhirTestServer, image: ImageRef, rtype: str = "DiagnosticReport") -> list[dict[str, Any]]:
    return fhir.search(rtype, identifier=f"urn:dermgate:report|{image.sop_instance_uid}")


def observations(fhir: FhirTestServer, image: ImageRef) -> list[dict[str, Any]]:
    return [o for o in fhir.search("Observation")
            if o["identifier"][0]["value"].startswith(image.sop_instance_uid + ":")]


# ---- the report lands, with everything it references ----------------------------------------------

def test_report_lands_with_observations_device_attachments_and_the_patient_as_subject(
        fhir: FhirTestServer, patient: dict[str, Any], make_channel: ChannelFactory) -> None:
    channel = make_channel()
    outcome = channel.deliver(prepare(channel))
    assert outcome.ok, outcome.reason
    [report] = reports(fhir, image_ref())
    assert outcome.remote_ref == f"DiagnosticReport/{report['id']}"
    assert report["status"] == "preliminary"
    assert report["subject"]["reference"] == f"Patient/{patient['id']}"
    assert {f["contentType"] for f in report["presentedForm"]} == {"application/pdf"}
    assert fhir.read(report["media"][0]["link"]["reference"])["content"]["contentType"] == "image/png"
    results = [fhir.read(r["reference"]) for r in report["result"]]
    assert sorted(o["code"]["coding"][0]["code"] for o in results) == [
        "low-confidence", "malignancy-probability", "predicted-class", "risk-category"]
    devices = {o["device"]["reference"] for o in results}
    assert len(devices) == 1 and fhir.read(devices.pop())["identifier"][0]["value"] == "ab" * 32
    assert all(o["subject"]["reference"] == f"Patient/{patient['id']}" for o in results)


def test_redelivering_the_same_report_creates_nothing_new(
        fhir: FhirTestServer, patient: dict[str, Any], make_channel: ChannelFactory) -> None:
    channel = make_channel()
    payload = prepare(channel)
    first, second = channel.deliver(payload), channel.deliver(payload)
    assert first.ok and second.ok and first.remote_ref == second.remote_ref
    assert len(reports(fhir, image_ref())) == 1
    assert len(observations(fhir, image_ref())) == 4
    assert len(fhir.search("Device")) == 1


def test_reports_of_two_images_share_one_device_for_the_model(
        fhir: FhirTestServer, patient: dict[str, Any], make_channel: ChannelFactory) -> None:
    channel = make_channel()
    assert channel.deliver(prepare(channel, 1)).ok and channel.deliver(prepare(channel, 2)).ok
    assert len(fhir.search("DiagnosticReport")) == 2
    assert len(fhir.search("Device")) == 1


def test_epic_profile_creates_one_report_with_contained_results_once(
        fhir: FhirTestServer, patient: dict[str, Any], make_channel: ChannelFactory) -> None:
    channel = make_channel(profile=ProfileName.EPIC)
    payload = prepare(channel)
    assert channel.deliver(payload).ok and channel.deliver(payload).ok
    [report] = reports(fhir, image_ref())
    assert len(report["contained"]) == 6          # Device, 4 Observations, the heatmap Media
    assert not fhir.search("Observation") and not fhir.search("Device")
    assert not fhir.requests("POST", "/"), "epic: no transaction bundles"


def test_oracle_profile_creates_a_document_reference_and_observations_once(
        fhir: FhirTestServer, patient: dict[str, Any], make_channel: ChannelFactory) -> None:
    channel = make_channel(profile=ProfileName.ORACLE_HEALTH)
    payload = prepare(channel)
    assert channel.deliver(payload).ok and channel.deliver(payload).ok
    assert not fhir.search("DiagnosticReport")
    [doc] = reports(fhir, image_ref(), "DocumentReference")
    assert [c["attachment"]["contentType"] for c in doc["content"]] == ["application/pdf"]
    assert len(observations(fhir, image_ref())) == 4
    related = {r["reference"] for r in doc["context"]["related"]}
    assert related == {f"Observation/{o['id']}" for o in observations(fhir, image_ref())}


def test_report_links_the_ehrs_imaging_study_when_it_has_one(
        fhir: FhirTestServer, patient: dict[str, Any], make_channel: ChannelFactory) -> None:
    study = fhir.create({"resourceType": "ImagingStudy", "status": "available",
                         "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"}],
                         "subject": {"reference": f"Patient/{patient['id']}"}})
    channel = make_channel()
    assert channel.deliver(prepare(channel)).ok
    [report] = reports(fhir, image_ref())
    assert report["imagingStudy"] == [{"reference": f"ImagingStudy/{study['id']}"}]
    assert all(o["derivedFrom"] == [{"reference": f"ImagingStudy/{study['id']}"}]
               for o in observations(fhir, image_ref()))


# ---- patient matching ------------------------------------------------------------------------------

def test_no_matching_patient_dead_letters_with_the_reason_by_default(
        fhir: FhirTestServer, make_channel: ChannelFactory, audit_sink: ListAuditSink) -> None:
    channel = make_channel()
    outcome = channel.deliver(prepare(channel))
    assert not outcome.ok and not outcome.retryable
    assert "no Patient" in (outcome.reason or "")
    assert not fhir.search("DiagnosticReport")
    assert audit_sink.events[-1].detail["patient_match"] == "none"
    assert audit_sink.events[-1].outcome is Outcome.SERIOUS_FAILURE


def test_no_matching_patient_is_retried_under_the_retry_policy_until_the_ehr_knows_the_patient(
        fhir: FhirTestServer, make_channel: ChannelFactory) -> None:
    channel = make_channel(on_no_patient="retry")
    payload = prepare(channel)
    outcome = channel.deliver(payload)
    assert not outcome.ok and outcome.retryable
    patient = fhir.create({"resourceType": "Patient", "identifier": [{"system": PATIENT_SYSTEM, "value": "MRN-0001"}]})
    assert channel.deliver(payload).ok
    assert reports(fhir, image_ref())[0]["subject"]["reference"] == f"Patient/{patient['id']}"


@pytest.mark.parametrize("profile", [ProfileName.GENERIC_R4, ProfileName.ORACLE_HEALTH])
def test_placeholder_policy_creates_one_identifier_only_patient_and_reuses_it(
        fhir: FhirTestServer, make_channel: ChannelFactory, profile: ProfileName) -> None:
    channel = make_channel(on_no_patient="create-placeholder", profile=profile)
    payload = prepare(channel)
    assert channel.deliver(payload).ok and channel.deliver(payload).ok
    assert channel.deliver(prepare(channel, 2)).ok
    [patient] = fhir.search("Patient")
    assert patient["identifier"] == [{"system": PATIENT_SYSTEM, "value": "MRN-0001"}]
    rtype = "DocumentReference" if profile is ProfileName.ORACLE_HEALTH else "DiagnosticReport"
    assert {r["subject"]["reference"] for r in fhir.search(rtype)} == {f"Patient/{patient['id']}"}


def test_several_matching_patients_are_never_guessed_between(
        fhir: FhirTestServer, make_channel: ChannelFactory, audit_sink: ListAuditSink) -> None:
    for _ in range(2):
        fhir.create({"resourceType": "Patient", "identifier": [{"system": PATIENT_SYSTEM, "value": "MRN-0001"}]})
    channel = make_channel()
    outcome = channel.deliver(prepare(channel))
    assert not outcome.ok and not outcome.retryable and "2 Patients" in (outcome.reason or "")
    assert audit_sink.events[-1].detail["patient_match"] == "multiple"
    assert not fhir.search("DiagnosticReport")


def test_unmapped_issuer_of_patient_id_is_dead_lettered(
        fhir: FhirTestServer, patient: dict[str, Any], make_channel: ChannelFactory) -> None:
    channel = make_channel()
    outcome = channel.deliver(prepare(channel, issuer_of_patient_id="OTHERHOSP"))
    assert not outcome.ok and not outcome.retryable and "OTHERHOSP" in (outcome.reason or "")


# ---- faults: nothing lost, nothing duplicated, every attempt audited -----------------------------

def _assert_exactly_one_report(fhir: FhirTestServer, image: ImageRef) -> None:
    assert len(reports(fhir, image)) == 1
    assert len(observations(fhir, image)) == 4
    assert len(fhir.search("Device")) == 1


def _assert_every_attempt_audited(audit_sink: ListAuditSink, attempts: int) -> None:
    events = [e for e in audit_sink.events if e.event is EventType.FHIR_DELIVERY]
    assert len(events) == attempts
    assert all(e.patient_id == "MRN-0001" and e.sop_instance_uids for e in events)


def test_server_down_at_start_then_up_delivers_once(
        audit_sink: ListAuditSink, make_channel: ChannelFactory) -> None:
    port = free_port()
    channel = make_channel(base_url=f"http://127.0.0.1:{port}/fhir/R4/")
    payload = prepare(channel)
    down = channel.deliver(payload)
    assert not down.ok and down.retryable and "FhirUnavailable" in (down.reason or "")
    with start_fhir_server(port) as late:
        late.create({"resourceType": "Patient", "identifier": [{"system": PATIENT_SYSTEM, "value": "MRN-0001"}]})
        result = settle(channel.deliver, {"r": payload})
        assert result.sent == {"r"}
        _assert_exactly_one_report(late, image_ref())
    _assert_every_attempt_audited(audit_sink, 1 + result.attempts())
    assert audit_sink.events[0].outcome is Outcome.MINOR_FAILURE


def test_server_errors_are_retried_and_the_report_lands_once(
        fhir: FhirTestServer, patient: dict[str, Any], audit_sink: ListAuditSink, make_channel: ChannelFactory) -> None:
    fhir.fault("status", status=500, method="POST", path_prefix="/", times=2)
    channel = make_channel()
    result = settle(channel.deliver, {"r": prepare(channel)})
    assert result.sent == {"r"}
    assert [o.ok for o in result.outcomes["r"]] == [False, False, True]
    assert all(o.retryable for o in result.outcomes["r"])
    _assert_exactly_one_report(fhir, image_ref())
    _assert_every_attempt_audited(audit_sink, 3)


@pytest.mark.parametrize(("status", "retry_after", "expected_s"), [
    (429, "7", 7.0),
    (503, "3", 3.0),
])
def test_throttling_is_retried_after_the_servers_retry_after(
        fhir: FhirTestServer, patient: dict[str, Any], make_channel: ChannelFactory,
        status: int, retry_after: str, expected_s: float) -> None:
    fhir.fault("status", status=status, retry_after=retry_after, method="POST", path_prefix="/")
    channel = make_channel()
    result = settle(channel.deliver, {"r": prepare(channel)})
    assert result.sent == {"r"}
    assert result.retry_after_seen == [expected_s]
    assert f"HTTP {status}" in (result.outcomes["r"][0].reason or "")
    _assert_exactly_one_report(fhir, image_ref())


def test_connection_cut_after_commit_leaves_exactly_one_report(
        fhir: FhirTestServer, patient: dict[str, Any], audit_sink: ListAuditSink, make_channel: ChannelFactory) -> None:
    """The server commits the transaction, then the response is lost: the retry must not duplicate."""
    fhir.fault("cut-after-commit", method="POST", path_prefix="/")
    channel = make_channel()
    result = settle(channel.deliver, {"r": prepare(channel)})
    assert [o.ok for o in result.outcomes["r"]] == [False, True]
    assert result.outcomes["r"][0].retryable
    assert [r["status"] for r in fhir.requests("POST", "/")] == [-2, 200]   # committed, then found existing
    _assert_exactly_one_report(fhir, image_ref())
    _assert_every_attempt_audited(audit_sink, 2)


@pytest.mark.parametrize("profile", [ProfileName.EPIC, ProfileName.ORACLE_HEALTH])
def test_connection_cut_after_commit_in_sequential_profiles_leaves_exactly_one_report(
        fhir: FhirTestServer, patient: dict[str, Any], make_channel: ChannelFactory, profile: ProfileName) -> None:
    rtype = "DocumentReference" if profile is ProfileName.ORACLE_HEALTH else "DiagnosticReport"
    fhir.fault("cut-after-commit", method="POST", path_prefix=f"/{rtype}")
    channel = make_channel(profile=profile)
    result = settle(channel.deliver, {"r": prepare(channel)})
    assert [o.ok for o in result.outcomes["r"]] == [False, True]
    assert len(reports(fhir, image_ref(), rtype)) == 1
    assert len(fhir.search("Observation")) == (4 if profile is ProfileName.ORACLE_HEALTH else 0)


def test_timeout_is_retryable_and_the_late_commit_is_not_duplicated(
        fhir: FhirTestServer, patient: dict[str, Any], make_channel: ChannelFactory) -> None:
    fhir.fault("delay", delay_ms=1500, method="POST", path_prefix="/")
    channel = make_channel(timeouts={"connect_s": 1.0, "read_s": 0.5, "write_s": 1.0, "pool_s": 1.0})
    payload = prepare(channel)
    first = channel.deliver(payload)
    assert not first.ok and first.retryable and "FhirTimeout" in (first.reason or "")
    deadline = time.monotonic() + 10                      # the server finishes the slow request meanwhile
    while not reports(fhir, image_ref()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert channel.deliver(payload).ok
    _assert_exactly_one_report(fhir, image_ref())


def test_invalid_resource_is_dead_lettered_with_the_servers_reason_and_not_retried(
        fhir: FhirTestServer, patient: dict[str, Any], audit_sink: ListAuditSink, make_channel: ChannelFactory) -> None:
    channel = make_channel(check_sent=False)          # it sends an invalid resource on purpose
    payload = prepare(channel)
    payload["bundle"]["entry"][-1]["resource"]["aiVerdict"] = "benign"   # no such element in R4
    result = settle(channel.deliver, {"r": payload})
    assert result.dead == {"r"} and result.attempts() == 1
    reason = result.outcomes["r"][0].reason or ""
    assert "HTTP 400" in reason and "aiVerdict" in reason
    assert len(fhir.requests("POST", "/")) == 1
    assert not fhir.search("DiagnosticReport") and not fhir.search("Observation")
    assert audit_sink.events[-1].outcome is Outcome.SERIOUS_FAILURE


def test_mixed_faults_over_many_reports_lose_and_duplicate_nothing(
        fhir: FhirTestServer, patient: dict[str, Any], audit_sink: ListAuditSink, make_channel: ChannelFactory) -> None:
    fhir.fault("status", status=503, method="POST", path_prefix="/", times=2)
    fhir.fault("cut-after-commit", method="POST", path_prefix="/", times=2)
    fhir.fault("status", status=429, retry_after=1, method="POST", path_prefix="/", times=1)
    fhir.fault("cut-before", method="GET", path_prefix="/Patient", times=1)
    channel = make_channel()
    payloads = {str(n): prepare(channel, n) for n in range(1, 7)}
    result = settle(channel.deliver, payloads)
    assert result.sent == set(payloads) and not result.dead
    assert len(fhir.search("DiagnosticReport")) == 6
    for n in range(1, 7):
        assert len(reports(fhir, image_ref(n))) == 1 and len(observations(fhir, image_ref(n))) == 4
    assert len(fhir.search("Device")) == 1
    _assert_every_attempt_audited(audit_sink, result.attempts())
    assert result.attempts() == 6 + 6        # six faults, six successes


# ---- clinician review ------------------------------------------------------------------------------

def _review(decision: ReviewDecision, review_id: str = "1", diagnosis: str | None = None) -> Review:
    return Review(review_id=review_id, decision=decision, reviewer="Dr. Derm", diagnosis=diagnosis,
                  reviewed_at=utc(2026, 3, 13, 9))


@pytest.mark.parametrize("profile", list(ProfileName))
def test_confirm_then_override_update_the_report_with_versioned_updates(
        fhir: FhirTestServer, patient: dict[str, Any], make_channel: ChannelFactory, profile: ProfileName) -> None:
    channel = make_channel(profile=profile)
    rtype = "DocumentReference" if profile is ProfileName.ORACLE_HEALTH else "DiagnosticReport"
    status_field = "docStatus" if rtype == "DocumentReference" else "status"
    assert channel.deliver(prepare(channel)).ok
    confirm = channel.prepare_review(image_ref(), _review(ReviewDecision.CONFIRM, "1"))
    assert channel.deliver(confirm).ok
    assert reports(fhir, image_ref(), rtype)[0][status_field] == "final"
    override = channel.prepare_review(image_ref(), _review(ReviewDecision.OVERRIDE, "2", "mel"))
    outcome = channel.deliver(override)
    assert outcome.ok
    [report] = reports(fhir, image_ref(), rtype)
    # A change after final: R4 "corrected" when the diagnosis changes (docStatus knows only "amended").
    assert report[status_field] == ("amended" if rtype == "DocumentReference" else "corrected")
    if rtype == "DiagnosticReport":
        assert report["conclusionCode"][0]["text"] == "Melanoma"
        assert report["resultsInterpreter"] == [{"display": "Dr. Derm"}]
    puts = [p for p in fhir.requests("PUT") if p["path"].startswith(f"/{rtype}/")]
    assert len(puts) == 2 and all(p["status"] == 200 for p in puts)
    assert len(fhir.history(f"{rtype}/{report['id']}")) == 3


def test_redelivered_review_changes_nothing_more(
        fhir: FhirTestServer, patient: dict[str, Any], make_channel: ChannelFactory) -> None:
    channel = make_channel()
    assert channel.deliver(prepare(channel)).ok
    payload = channel.prepare_review(image_ref(), _review(ReviewDecision.CONFIRM))
    assert channel.deliver(payload).ok and channel.deliver(payload).ok
    [report] = reports(fhir, image_ref())
    assert len(fhir.history(f"DiagnosticReport/{report['id']}")) == 2


def test_review_before_its_report_reached_the_ehr_waits(
        fhir: FhirTestServer, patient: dict[str, Any], make_channel: ChannelFactory) -> None:
    channel = make_channel()
    review = channel.prepare_review(image_ref(), _review(ReviewDecision.CONFIRM))
    early = channel.deliver(review)
    assert not early.ok and early.retryable and "ReportNotYetDelivered" in (early.reason or "")
    assert channel.deliver(prepare(channel)).ok and channel.deliver(review).ok


def test_review_racing_another_update_gets_412_and_succeeds_on_the_retry(
        fhir: FhirTestServer, patient: dict[str, Any], make_channel: ChannelFactory) -> None:
    """If-Match protects a concurrent change: the stale PUT is refused, the retry re-reads and wins."""
    edits: list[str] = []

    def edit_in_the_ehr_first(request: httpx.Request) -> None:
        if request.method == "PUT" and not edits:          # between the channel's read and its PUT
            [current] = reports(fhir, image_ref())
            fhir.put({**current, "conclusion": current["conclusion"] + " (edited in the EHR)"})
            edits.append(current["id"])

    channel = make_channel(before_request=edit_in_the_ehr_first)
    assert channel.deliver(prepare(channel)).ok
    payload = channel.prepare_review(image_ref(), _review(ReviewDecision.CONFIRM))
    stale = channel.deliver(payload)
    assert not stale.ok and stale.retryable and "HTTP 412" in (stale.reason or "")
    assert channel.deliver(payload).ok
    [final] = reports(fhir, image_ref())
    assert final["status"] == "final" and "(edited in the EHR)" in final["conclusion"]


def test_retry_after_as_an_http_date_is_honoured(
        fhir: FhirTestServer, patient: dict[str, Any], make_channel: ChannelFactory) -> None:
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=120), usegmt=True)
    fhir.fault("status", status=503, retry_after=when, method="POST", path_prefix="/")
    channel = make_channel()
    outcome = channel.deliver(prepare(channel))
    assert not outcome.ok and outcome.retryable
    assert outcome.retry_after_s is not None and 110 <= outcome.retry_after_s <= 120
