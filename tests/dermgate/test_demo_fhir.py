"""``dermgate demo --fhir-url URL`` as the README documents it, against the loopback FHIR server.

On the first run against an empty server every report must land, with each profile;
the Epic and Oracle runs meet the server in its vendor imitation (the refusals each
vendor documents: no transactions, no conditional create, searches by patient,
Oracle's one-PDF DocumentReference with a Practitioner author). The profile comes
from the flag, from ``DERMGATE_FHIR__PROFILE`` or from ``dermgate.toml``: the demo's
own settings never outrank the operator's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dermgate.test_cli import dermgate
from tests.integration.fhir.peer import FhirTestServer

DEMO_SYSTEM = "urn:dermgate:demo-hospital:mrn"
VENDOR = {"epic": "epic", "oracle-health": "oracle"}


def delivered_rows(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("ISIC_") and "delivered" in line]


@pytest.mark.parametrize("profile", ["generic-r4", "epic", "oracle-health"])
def test_demo_delivers_every_report_to_an_empty_fhir_server_on_the_first_run(
        tmp_path: Path, fhir: FhirTestServer, profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fhir.configure(vendor=VENDOR.get(profile))
    work = tmp_path / "demo"
    work.mkdir()
    args = ["demo", "--workdir", str(work), "--fhir-url", fhir.base_url]
    # The profile reaches the demo three ways; none of them is overridden by the demo's own defaults.
    if profile == "generic-r4":
        args += ["--fhir-profile", profile]
    elif profile == "epic":
        monkeypatch.setenv("DERMGATE_FHIR__PROFILE", "epic")
    else:
        (work / "dermgate.toml").write_text('[fhir]\nprofile = "oracle-health"\n')
    run = dermgate(*args, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert len(delivered_rows(run.stdout)) == 9, run.stdout
    assert f"(profile {profile})" in run.stdout

    patients = {p["id"]: p for p in fhir.search("Patient", _count="100")}
    assert sorted(p["identifier"][0]["value"] for p in patients.values()) == [f"DEMO-{i:04d}" for i in range(1, 10)]
    assert all(p["identifier"][0]["system"] == DEMO_SYSTEM for p in patients.values())
    rtype = "DocumentReference" if profile == "oracle-health" else "DiagnosticReport"
    reports = fhir.search(rtype, _count="100")
    assert len(reports) == 9
    assert {r["subject"]["reference"] for r in reports} == {f"Patient/{pid}" for pid in patients}
    refused = [e for e in fhir.stats()["log"] if e.get("refusal")]
    assert not refused, refused
    if profile == "oracle-health":
        assert all(len(r["content"]) == 1 and r["author"][0]["reference"].startswith("Practitioner/") for r in reports)
    if profile == "generic-r4":
        assert len(fhir.search("Provenance", _count="100")) == 9
        assert all(r["performer"][0]["reference"].startswith("Organization/") for r in reports)
    jobs = dermgate("jobs", "list", cwd=work)
    assert jobs.stdout.count("delivered") == 9


def test_demo_without_a_fhir_server_writes_bundles_in_the_chosen_profile(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    run = dermgate("demo", "--workdir", str(work), "--fhir-profile", "oracle-health", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files = sorted((work / "fhir-bundles").glob("*.json"))
    assert len(files) == 9
    for path in files:
        kinds = [e["resource"]["resourceType"] for e in json.loads(path.read_text())["entry"]]
        assert kinds[-1] == "DocumentReference" and "DiagnosticReport" not in kinds


def test_demo_reads_its_fhir_settings_from_the_environment_not_only_from_flags(
        tmp_path: Path, fhir: FhirTestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """DERMGATE_FHIR__BASE_URL alone sends the demo's reports to that server (no --fhir-url)."""
    monkeypatch.setenv("DERMGATE_FHIR__BASE_URL", fhir.base_url)
    run = dermgate("demo", "--workdir", str(tmp_path / "demo"), "--images", str(_two_images(tmp_path)),
                   cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert len(fhir.search("DiagnosticReport")) == 2
    assert not (tmp_path / "demo" / "fhir-bundles").exists()


def _two_images(tmp_path: Path) -> Path:
    from dermgate.demo import SAMPLES
    folder = tmp_path / "two"
    folder.mkdir()
    for path in sorted(SAMPLES.glob("*.jpg"))[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder
