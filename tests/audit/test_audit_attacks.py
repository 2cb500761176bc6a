"""Issue 12's attacks on the audit trail, by someone who can write the work dir but holds no key.

Each runs against a real work dir (the trail, its keys, the SQLite database that
anchors it) and the real ``dermgate audit verify`` command in a subprocess. The
assertions that call ``verify_log`` without the anchor show the attack is real:
signatures and the trail's own ``checkpoint.json`` alone do not catch it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from audit.errors import AuditConfigError
from audit.format import LOG_FILE, WITNESS_FILE
from audit.keys import TrustedKeys, fingerprint, init_keys, load_public_key, load_signer
from audit.trail import AuditTrail
from audit.keys import FileKeyProvider
from audit.verify import verify_log
from dermgate.app import open_audit
from audit.identity import os_user
from dermgate.migrate import upgrade
from dermgate.settings import AuditSettings, Settings
from tests.audit.helpers import store_event

EVENTS = 60
CHECKPOINT_EVERY = 20            # signed checkpoints at seq 20, 40, 60, and one on close


def dermgate(*args: str, work: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DERMGATE_")}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "dermgate.cli", *args, "--workdir", str(work)], text=True,
                          capture_output=True, timeout=120, env=environ, cwd=work)


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A development work dir whose trail holds EVENTS events, anchored in its SQLite database."""
    monkeypatch.delenv("DERMGATE_AUDIT_KEY", raising=False)
    monkeypatch.delenv("DERMGATE_AUDIT_SIGNING_KEY", raising=False)
    work = tmp_path / "work"
    settings = Settings(workdir=work, audit=AuditSettings(checkpoint_every=CHECKPOINT_EVERY))
    work.mkdir()
    upgrade(settings.db_url)
    audit = open_audit(settings)
    for i in range(EVENTS):
        audit.record(store_event(i))
    audit.close()
    return work


def trail_dir(work: Path) -> Path:
    return work / "audit-trail"


def lines(work: Path) -> list[bytes]:
    return (trail_dir(work) / LOG_FILE).read_bytes().splitlines(keepends=True)


def trusted(work: Path) -> TrustedKeys:
    return TrustedKeys([load_public_key(work / "keys" / "audit-signing.pub")])


def test_an_honest_trail_verifies_and_prints_the_fingerprint_to_pin(work: Path) -> None:
    run = dermgate("audit", "verify", work=work)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("OK:") and "reaches the database anchor" in run.stdout
    fp = fingerprint(load_public_key(work / "keys" / "audit-signing.pub"))
    assert f"--fingerprint {fp}" in run.stdout
    assert dermgate("audit", "verify", "--fingerprint", fp, work=work).returncode == 0
    assert dermgate("audit", "verify", "--pin-key", str(work / "keys" / "audit-signing.pub"), work=work).returncode == 0


def test_rollback_to_an_earlier_checkpoint_fails_verification(work: Path) -> None:
    """Keep the log up to the checkpoint at seq 20 and copy that line into checkpoint.json."""
    kept = lines(work)[:CHECKPOINT_EVERY + 1]
    assert json.loads(kept[-1])["kind"] == "checkpoint"
    (trail_dir(work) / LOG_FILE).write_bytes(b"".join(kept))
    (trail_dir(work) / WITNESS_FILE).write_bytes(kept[-1])
    assert verify_log(trail_dir(work), trusted(work)).ok          # the attack: every signature still holds
    run = dermgate("audit", "verify", work=work)
    assert run.returncode == 1
    assert "truncated: the database anchors record" in run.stdout and f"records {CHECKPOINT_EVERY + 1}.." in run.stdout


def test_keeping_only_the_genesis_record_fails_verification(work: Path) -> None:
    genesis = lines(work)[0]
    (trail_dir(work) / LOG_FILE).write_bytes(genesis)
    (trail_dir(work) / WITNESS_FILE).write_bytes(genesis)
    assert verify_log(trail_dir(work), trusted(work)).ok
    run = dermgate("audit", "verify", work=work)
    assert run.returncode == 1 and "truncated" in run.stdout and "records 1.." in run.stdout


def test_a_cut_in_the_middle_of_a_record_is_never_repaired_by_the_next_action_nor_laundered_by_repair(
        work: Path) -> None:
    data = (trail_dir(work) / LOG_FILE).read_bytes()
    middle = sum(len(line) for line in lines(work)[:30]) + 40   # 40 bytes into record 30
    (trail_dir(work) / LOG_FILE).write_bytes(data[:middle])
    first = dermgate("audit", "verify", work=work)
    assert first.returncode == 1 and "record 30" in first.stdout
    # the next audited action refuses to chain onto the cut (it used to "repair" it silently)
    search = dermgate("audit", "search", "--patient", "PAT-0001", work=work)
    assert search.returncode == 2 and "truncated" in search.stderr
    assert (trail_dir(work) / LOG_FILE).read_bytes() == data[:middle]
    # and the operator's repair refuses too: the anchor shows those records were complete
    repair = dermgate("audit", "repair", "--confirm", work=work)
    assert repair.returncode == 2 and "refusing to repair" in repair.stderr
    again = dermgate("audit", "verify", work=work)
    assert again.returncode == 1 and "truncated" in again.stdout


def test_a_torn_tail_left_by_a_crash_is_repaired_only_by_the_operator_and_the_repair_is_audited(work: Path) -> None:
    with open(trail_dir(work) / LOG_FILE, "ab") as fh:             # a crash mid-append after the last record
        fh.write(b'{"ct":"half a rec')
    assert dermgate("audit", "verify", work=work).returncode == 1
    dry = dermgate("audit", "repair", work=work)
    assert dry.returncode == 2 and "--confirm" in dry.stdout
    assert dermgate("audit", "repair", "--confirm", work=work).returncode == 0
    run = dermgate("audit", "verify", work=work)
    assert run.returncode == 0, run.stdout
    repairs = [json.loads(line) for line in lines(work) if b'"kind":"repair"' in line]
    assert len(repairs) == 1 and repairs[0]["by"] == f"os:{os_user()}"
    search = dermgate("audit", "search", "--event", "config.change", work=work)
    assert "audit log repair" in search.stdout or search.stdout.count("config.change") >= 1


def test_deleting_the_trail_fails_verification_and_no_new_trail_is_started(work: Path) -> None:
    shutil.rmtree(trail_dir(work))
    run = dermgate("audit", "verify", work=work)
    assert run.returncode == 1
    assert "does not exist" in run.stdout and "deleted" in run.stdout
    assert not (trail_dir(work) / LOG_FILE).exists()
    # the service's own writes refuse as well (no fresh trail over the deleted one)
    assert dermgate("audit", "search", work=work).returncode == 2
    assert not (trail_dir(work) / LOG_FILE).exists()


def test_a_trail_rebuilt_and_resigned_with_another_key_fails_against_the_pinned_key(work: Path,
                                                                                    tmp_path: Path) -> None:
    """The attacker rebuilds the trail under a key of their own and puts their public key beside it."""
    original = load_public_key(work / "keys" / "audit-signing.pub")
    pinned = tmp_path / "pinned.pub"
    shutil.copy(work / "keys" / "audit-signing.pub", pinned)
    forged_keys = init_keys(tmp_path / "attacker")
    forged = AuditTrail(tmp_path / "forged", FileKeyProvider(work / "keys" / "audit.key"),
                        load_signer(forged_keys.signing_key), checkpoint_seconds=None)
    for i in range(EVENTS - 10):
        forged.record(store_event(i))
    forged.close()
    shutil.rmtree(trail_dir(work))
    shutil.copytree(tmp_path / "forged", trail_dir(work))
    os.replace(forged_keys.signing_key, work / "keys" / "audit-signing.key")
    os.replace(forged_keys.public_key, work / "keys" / "audit-signing.pub")
    for how in (["--pin-key", str(pinned)], ["--fingerprint", fingerprint(original)]):
        run = dermgate("audit", "verify", *how, work=work)
        assert run.returncode == 1, run.stdout + run.stderr
        assert "not a trusted audit signing key" in run.stdout or "fingerprint" in run.stdout


def test_production_refuses_signing_keys_beside_the_trail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DERMGATE_AUDIT_KEY", raising=False)
    monkeypatch.delenv("DERMGATE_AUDIT_SIGNING_KEY", raising=False)
    work = tmp_path / "work"
    beside = work / "keys" / "audit-signing.key"
    with pytest.raises(ValueError, match="beside the trail"):
        Settings(workdir=work, environment="production", audit=AuditSettings(signing_key_file=beside))
    with pytest.raises(ValueError, match="beside the trail"):
        Settings(workdir=work, environment="production",
                 audit=AuditSettings(directory=tmp_path / "trail", signing_key_file=tmp_path / "trail" / "k"))
    with pytest.raises(AuditConfigError, match="DERMGATE_AUDIT_SIGNING_KEY"):   # nothing configured: no default
        open_audit(Settings(workdir=work, environment="production"))
    keys = init_keys(tmp_path / "credentials")                                    # apart: accepted
    audit = open_audit(Settings(workdir=work, environment="production",
                                audit=AuditSettings(key_file=keys.keyring, signing_key_file=keys.signing_key)))
    audit.record(store_event(1))
    audit.close()
