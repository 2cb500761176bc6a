"""``dermgate audit ...`` commands, run stand-alone through ``audit.cli.main`` as an operator would."""

from __future__ import annotations

import argparse
import json
import stat
from pathlib import Path

import pytest

from audit import cli
from audit.api import EventType
from audit.format import LOG_FILE
from audit.keys import init_keys, load_signer
from audit.trail import AuditTrail
from audit.keys import FileKeyProvider
from audit.identity import os_user
from tests.audit.helpers import store_event


@pytest.fixture
def setup(tmp_path: Path):
    keys = init_keys(tmp_path / "keys")
    directory = tmp_path / "audit"
    trail = AuditTrail(directory, FileKeyProvider(keys.keyring), load_signer(keys.signing_key),
                       checkpoint_every=5, checkpoint_seconds=None)
    for i in range(6):
        trail.record(store_event(i, patient="PAT-CLI" if i % 2 else "PAT-OTHER"))
    trail.close()
    base = ["--dir", str(directory), "--key-file", str(keys.keyring), "--signing-key", str(keys.signing_key)]
    return directory, keys, base


def _events(directory: Path, keys) -> list:
    trail = AuditTrail(directory, FileKeyProvider(keys.keyring), load_signer(keys.signing_key))
    events = [r.event for r in trail.events()]
    trail.close()
    return events


def test_verify_exits_zero_on_an_intact_log_and_audits_itself(setup, capsys):
    directory, keys, base = setup
    assert cli.main(base + ["verify"]) == cli.EXIT_OK
    assert capsys.readouterr().out.startswith("OK:")
    last = _events(directory, keys)[-1]
    assert last.event is EventType.AUDIT_QUERY and last.actor == f"os:{os_user()}"
    assert last.detail["command"] == "verify"


def test_verify_exits_non_zero_and_names_the_first_bad_record(setup, capsys):
    directory, keys, base = setup
    lines = (directory / LOG_FILE).read_bytes().splitlines(keepends=True)
    (directory / LOG_FILE).write_bytes(b"".join(lines[:3] + lines[4:]))
    assert cli.main(base + ["verify"]) == cli.EXIT_VERIFY_FAILED
    out = capsys.readouterr().out
    assert out.startswith("FAILED at record 3:")


def test_verify_without_any_aes_key_checks_integrity_only(setup, capsys, monkeypatch):
    directory, keys, _ = setup
    monkeypatch.delenv("DERMGATE_AUDIT_KEY", raising=False)
    assert cli.main(["--dir", str(directory), "--signing-key", str(keys.signing_key), "verify", "--no-decrypt"]) == 0
    assert cli.main(["--dir", str(directory), "--signing-key", str(keys.signing_key), "verify"]) == 1
    assert "no audit key configured" in capsys.readouterr().out


def test_search_prints_a_table_and_the_count(setup, capsys):
    _, _, base = setup
    assert cli.main(base + ["search", "--patient", "PAT-CLI", "--event", "dicom.store"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("SEQ") and out[-1] == "3 record(s)"
    assert all("PAT-CLI" in line for line in out[2:-1])


def test_export_writes_a_private_file_in_the_requested_format(setup, tmp_path):
    _, _, base = setup
    target = tmp_path / "export.json"
    assert cli.main(base + ["export", "--format", "fhir", "--output", str(target)]) == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert json.loads(target.read_text())["resourceType"] == "Bundle"


def test_disclosures_report_for_one_patient(setup, capsys):
    directory, keys, base = setup
    assert cli.main(base + ["export", "--format", "csv", "--patient", "PAT-CLI", "-o", str(directory.parent / "x.csv")]) == 0
    assert cli.main(base + ["disclosures", "--patient", "PAT-CLI", "--format", "json"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert [i["event"] for i in items] == ["audit.export"]


def test_repair_and_rotate_key_are_audited(setup, capsys):
    directory, keys, base = setup
    with open(directory / LOG_FILE, "ab") as fh:
        fh.write(b'{"ct":"half a rec')
    assert cli.main(base + ["verify"]) == 1
    assert cli.main(base + ["repair"]) == cli.EXIT_ERROR           # without --confirm: says what it would cut
    assert "would cut 17 torn bytes" in capsys.readouterr().out
    assert cli.main(base + ["verify"]) == 1                         # ... and cut nothing
    assert cli.main(base + ["repair", "--confirm"]) == 0
    assert "cut 17 torn bytes" in capsys.readouterr().out
    assert cli.main(base + ["rotate-key"]) == 0
    assert cli.main(base + ["verify"]) == 0
    events = _events(directory, keys)
    assert [e.event for e in events[-3:]] == [EventType.CONFIG_CHANGE, EventType.KEY_CHANGE, EventType.AUDIT_QUERY]


def test_rotate_key_with_keys_from_the_environment_explains_itself(setup, capsys, monkeypatch):
    directory, keys, base = setup
    monkeypatch.setenv("DERMGATE_AUDIT_KEY", keys.keyring.read_text())
    assert cli.main(["--dir", str(directory), "--signing-key", str(keys.signing_key), "rotate-key"]) == cli.EXIT_ERROR
    assert "cannot rotate keys" in capsys.readouterr().err


def test_init_keys_refuses_to_overwrite(tmp_path, capsys):
    assert cli.main(["init-keys", "--dir", str(tmp_path / "k")]) == 0
    assert cli.main(["init-keys", "--dir", str(tmp_path / "k")]) == cli.EXIT_ERROR
    assert "refusing to overwrite" in capsys.readouterr().err


def test_add_arguments_plugs_into_a_host_parser():
    parser = argparse.ArgumentParser(prog="dermgate")
    audit_parser = parser.add_subparsers(dest="command").add_parser("audit")
    cli.add_arguments(audit_parser.add_subparsers(dest="audit_command", required=True))
    args = parser.parse_args(["audit", "export", "--format", "dicom", "--ae", "PACS", "--since", "2025-01-01"])
    assert args.audit_command == "export" and args.export_format == "dicom" and args.ae == "PACS"
    assert args.since.tzinfo is not None
    with pytest.raises(SystemExit):
        parser.parse_args(["audit", "search", "--event", "no.such.event"])
