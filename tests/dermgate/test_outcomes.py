"""Outcomes: recorded, linked by accession / study / patient + body site, kept unlinked, audited (SQLite + PostgreSQL)."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from audit.api import EventType
from dermgate.db import Instance, Job, JobState, OutcomeLink
from dermgate.outcomes import (OutcomeError, OutcomeIn, diagnosis_from_text, import_csv, link_manual,
                               list_outcomes, normalise_diagnosis, record_outcome, relink, unlink)
from tests.peers.audit import ListAudit


def add_image(sessions: sessionmaker, n: int, *, patient: str = "P1", accession: str | None = None,
              study: str | None = None, body_site: str | None = None, study_date: str = "20260110") -> int:
    with sessions.begin() as s:
        inst = Instance(sop_instance_uid=f"1.2.9.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.7",
                        study_instance_uid=study or f"1.2.8.{n}", series_instance_uid=f"1.2.7.{n}",
                        patient_id=patient, issuer_of_patient_id=None, accession_number=accession,
                        study_date=study_date, study_time=None, modality="DMS", body_site=body_site,
                        calling_ae="SCOPE", transfer_syntax_uid="1.2.840.10008.1.2.1", sha256="0" * 64,
                        size=1, path=f"x/{n}")
        s.add(inst)
        s.flush()
        job = Job(instance_id=inst.id, state=JobState.DELIVERED, correlation_id=f"c{n}",
                  result={"top_class": "nv", "malignancy_probability": 0.1})
        s.add(job)
        s.flush()
        return job.id


def links(sessions: sessionmaker) -> set[tuple[int, int, str]]:
    with sessions() as s:
        return {(lk.outcome_id, lk.job_id, lk.method) for lk in s.scalars(select(OutcomeLink))}


def test_diagnosis_names_map_to_the_seven_classes() -> None:
    assert normalise_diagnosis("MEL") == "mel"
    assert normalise_diagnosis("Malignant") == "malignant"
    assert diagnosis_from_text("Compound melanocytic naevus, completely excised") == "nv"
    assert diagnosis_from_text("Superficial spreading malignant melanoma, Breslow 0.4 mm") == "mel"
    assert diagnosis_from_text("Nodular basal cell carcinoma") == "bcc"
    assert diagnosis_from_text("Seborrhoeic keratosis") == "bkl"
    assert diagnosis_from_text("Bowen's disease") == "akiec"
    assert diagnosis_from_text("Dermatofibroma") == "df"
    assert diagnosis_from_text("Cherry angioma") == "vasc"
    assert diagnosis_from_text("no evidence of malignancy") == "benign"
    assert diagnosis_from_text("inflamed skin") is None
    with pytest.raises(OutcomeError):
        normalise_diagnosis("psoriasis")


def test_accession_study_and_patient_body_site_rules_link_and_are_audited(sessions: sessionmaker) -> None:
    audit = ListAudit()
    j1 = add_image(sessions, 1, accession="ACC1")
    j2 = add_image(sessions, 2, study="1.2.3.44")
    j3 = add_image(sessions, 3, patient="P3", body_site="Upper back", study_date="20260105")
    r1 = record_outcome(sessions, audit, OutcomeIn("mel", date(2026, 2, 1), accession_number="ACC1"), actor="t")
    r2 = record_outcome(sessions, audit, OutcomeIn("bcc", date(2026, 2, 1), study_instance_uid="1.2.3.44"), actor="t")
    r3 = record_outcome(sessions, audit, OutcomeIn("nv", date(2026, 2, 20), patient_id="P3", body_site="UPPERBACK"),
                        actor="t", window_days=90)
    assert links(sessions) == {(r1.outcome_id, j1, "accession"), (r2.outcome_id, j2, "study_uid"),
                               (r3.outcome_id, j3, "patient_body_site")}
    kinds = [(e.detail.get("link"), e.patient_id) for e in audit.of(EventType.OUTCOME) if "link" in e.detail]
    assert sorted(kinds) == [("accession", "P1"), ("patient_body_site", "P3"), ("study_uid", "P1")]
    # Idempotent: the same outcome again records nothing new.
    again = record_outcome(sessions, audit, OutcomeIn("mel", date(2026, 2, 1), accession_number="ACC1"), actor="t")
    assert again.outcome_id == r1.outcome_id and not again.created


def test_out_of_window_and_ambiguous_outcomes_stay_unlinked_for_a_person(sessions: sessionmaker) -> None:
    audit = ListAudit()
    add_image(sessions, 1, patient="P5", body_site="arm", study_date="20250101")
    far = record_outcome(sessions, audit, OutcomeIn("nv", date(2026, 3, 1), patient_id="P5", body_site="arm"),
                         actor="t", window_days=30)
    assert far.links == [] and "no image" in (far.unlinked_reason or "")
    add_image(sessions, 2, patient="P6", body_site="leg", study_date="20260101")
    add_image(sessions, 3, patient="P6", body_site="leg", study_date="20260115")
    amb = record_outcome(sessions, audit, OutcomeIn("mel", date(2026, 1, 20), patient_id="P6", body_site="leg"),
                         actor="t")
    assert amb.links == [] and "ambiguous" in (amb.unlinked_reason or "")
    assert {o["id"] for o in list_outcomes(sessions, unlinked_only=True)} == {far.outcome_id, amb.outcome_id}
    # A person links one; then unlinks it; each audited.
    assert link_manual(sessions, audit, amb.outcome_id, "1.2.9.3", actor="dr.path")
    assert not link_manual(sessions, audit, amb.outcome_id, "1.2.9.3", actor="dr.path")
    assert {o["id"] for o in list_outcomes(sessions, unlinked_only=True)} == {far.outcome_id}
    assert unlink(sessions, audit, amb.outcome_id, "1.2.9.3", actor="dr.path")
    manual = [e for e in audit.of(EventType.OUTCOME) if e.actor == "dr.path"]
    assert [(e.action, e.detail["link"]) for e in manual] == [("C", "manual"), ("D", "unlinked")]
    with pytest.raises(OutcomeError):
        link_manual(sessions, audit, 9999, "1.2.9.3", actor="x")


def test_csv_import_reports_bad_lines_links_later_images_on_relink(sessions: sessionmaker, tmp_path: Path) -> None:
    audit = ListAudit()
    j1 = add_image(sessions, 1, accession="A1")
    csv_file = tmp_path / "outcomes.csv"
    csv_file.write_text("accession_number,diagnosis,date,source,fitzpatrick\n"
                        "A1,mel,2026-02-01,histopathology,II\n"
                        "A2,benign,2026-02-02,follow-up,5\n"
                        "A3,psoriasis,2026-02-02,,\n"
                        "A4,nv,not-a-date,,\n")
    rep = import_csv(sessions, audit, csv_file, actor="importer")
    assert (rep.created, rep.linked, rep.unlinked) == (2, 1, 1)
    assert [line for line, _ in rep.errors] == [4, 5]
    again = import_csv(sessions, audit, csv_file, actor="importer")
    assert (again.created, again.duplicates) == (0, 2)
    rows = {r["accession_number"]: r for r in list_outcomes(sessions)}
    assert rows["A1"]["fitzpatrick"] == "II" and rows["A2"]["fitzpatrick"] == "V"
    assert rows["A1"]["links"][0]["job_id"] == j1 and rows["A1"]["malignant"]
    j2 = add_image(sessions, 2, accession="A2")
    assert relink(sessions, audit, actor="cron") == {"linked": 1, "unlinked": 0}
    assert {lk[1] for lk in links(sessions)} == {j1, j2}


def test_age_from_patients_age_or_birth_date() -> None:
    from integration.dicom_scp.handlers import age_years
    assert age_years("045Y", None, None) == 45
    assert age_years("018M", None, None) == 1
    assert age_years(None, "19700615", "20250614") == 54
    assert age_years(None, "19700615", "20250615") == 55
    assert age_years("bad", "nonsense", "20250101") is None
