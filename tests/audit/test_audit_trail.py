"""The trail as a sink: durable, encrypted, chained, sealed, shared by threads and processes, keyed."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest

from audit.api import AuditEvent, EventType, Outcome
from audit.errors import AuditConfigError, MissingKeyError, SigningKeyError, WrongKeyError
from audit.format import LOG_FILE, WITNESS_FILE
from audit.keys import (KEY_ENV, EnvKeyProvider, FileKeyProvider, Keyring, Signer, init_keys, key_provider,
                        load_signer, private_pem)
from audit.trail import AuditTrail, open_trail
from tests.audit.helpers import store_event


def _lines(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / LOG_FILE).read_bytes().splitlines()]


def test_record_returns_consecutive_sequence_numbers_and_the_line_is_in_the_file_on_return(make_trail, audit_dir):
    trail = make_trail()
    seqs = [trail.record(store_event(i)) for i in range(3)]
    assert seqs == [1, 2, 3]                                  # 0 is the signed genesis record
    on_disk = _lines(audit_dir)                               # read by another handle, before close
    assert [r["seq"] for r in on_disk] == [0, 1, 2, 3]
    assert on_disk[0]["kind"] == "genesis"


def test_record_bodies_are_encrypted_and_phi_never_appears_in_clear(make_trail, audit_dir):
    trail = make_trail()
    trail.record(store_event(patient="SMITH^JOHN-PHI-4711", detail={"reason": "secret-detail-xyz"}))
    raw = (audit_dir / LOG_FILE).read_bytes()
    assert b"SMITH" not in raw and b"4711" not in raw and b"secret-detail" not in raw
    assert b"DERMCAM1" not in raw                             # even the actor is inside the ciphertext


def test_events_decrypt_back_to_what_was_recorded_with_utc_time_filled_in(make_trail):
    trail = make_trail()
    event = store_event(7, destination=None)
    trail.record(event)
    (record,) = list(trail.events())
    assert record.event is not None and record.key_id == "k1"
    assert record.event.patient_id == "PAT-0001" and record.event.detail["n"] == 7
    assert record.event.sop_instance_uids == event.sop_instance_uids
    assert record.event.time is not None and record.event.time.tzinfo is not None
    assert record.event.time.utcoffset().total_seconds() == 0


def test_records_are_canonical_json_lines(make_trail, audit_dir):
    make_trail().record(store_event())
    for line in (audit_dir / LOG_FILE).read_bytes().splitlines():
        assert line == json.dumps(json.loads(line), sort_keys=True, separators=(",", ":")).encode()


def test_hash_chain_links_each_record_to_the_previous_one(make_trail, audit_dir):
    trail = make_trail()
    for i in range(4):
        trail.record(store_event(i))
    records = _lines(audit_dir)
    for before, after in zip(records, records[1:]):
        assert after["prev"] == before["hash"]


def test_a_signed_checkpoint_is_written_every_n_records_and_on_close(make_trail, audit_dir):
    trail = make_trail(checkpoint_every=5)
    for i in range(11):
        trail.record(store_event(i))
    kinds = {r["seq"]: r["kind"] for r in _lines(audit_dir)}
    assert kinds[5] == "checkpoint" and kinds[10] == "checkpoint"
    trail.close()
    last = _lines(audit_dir)[-1]
    assert last["kind"] == "checkpoint" and last["sig"]
    witness = json.loads((audit_dir / WITNESS_FILE).read_bytes())
    assert witness["seq"] == last["seq"] and witness["hash"] == last["hash"]
    report = trail.verify()
    assert report.ok, report.summary()
    assert report.unsealed == 0 and report.checkpoints == 3


def test_a_checkpoint_is_added_when_the_newest_signature_is_older_than_checkpoint_seconds(make_trail, audit_dir):
    trail = make_trail(checkpoint_seconds=0.0)
    trail.record(store_event())
    assert [r["kind"] for r in _lines(audit_dir)] == ["genesis", "event", "checkpoint"]


def test_log_and_key_files_are_private(make_trail, audit_dir, tmp_path):
    make_trail().record(store_event())
    assert stat.S_IMODE((audit_dir / LOG_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(audit_dir.stat().st_mode) == 0o700
    files = init_keys(tmp_path / "keys")
    assert stat.S_IMODE(files.keyring.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.signing_key.stat().st_mode) == 0o600


def test_many_threads_recording_at_once_keep_one_intact_chain(make_trail):
    trail = make_trail(checkpoint_every=16)
    seqs: list[int] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        for i in range(25):
            seq = trail.record(store_event(t * 100 + i))
            with lock:
                seqs.append(seq)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(set(seqs)) == 200
    report = trail.verify()
    assert report.ok, report.summary()
    assert len(list(trail.events())) == 200


def _writer_process(directory: str, ring_json: str, signer_pem: bytes, tag: str, count: int) -> None:
    keys = Keyring.from_text(ring_json, origin="test")
    from cryptography.hazmat.primitives import serialization
    signer = Signer(serialization.load_pem_private_key(signer_pem, password=None))  # type: ignore[arg-type]
    trail = AuditTrail(Path(directory), keys, signer, checkpoint_every=10, checkpoint_seconds=None)
    for i in range(count):
        trail.record(store_event(i, actor=tag))
    trail.close()


def test_two_writer_processes_at_once_keep_one_intact_chain(audit_dir, keyring, signer):
    AuditTrail(audit_dir, keyring, signer).close()            # both processes append to an existing log
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer_process,
                         args=(str(audit_dir), keyring.to_json(), private_pem(signer), tag, 60))
             for tag in ("WRITER_A", "WRITER_B")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    trail = AuditTrail(audit_dir, keyring, signer, checkpoint_seconds=None)
    report = trail.verify()
    assert report.ok, report.summary()
    actors = [r.event.actor for r in trail.events() if r.event]
    assert actors.count("WRITER_A") == 60 and actors.count("WRITER_B") == 60
    trail.close()


def _inherited_writer(trail: AuditTrail, tag: str, count: int) -> None:
    for i in range(count):
        trail.record(store_event(i, actor=tag))


def test_processes_forked_after_the_trail_was_opened_still_exclude_each_other(make_trail):
    """An inherited file description would share the parent's flock; the trail reopens its file after fork."""
    trail = make_trail(checkpoint_every=10)
    trail.record(store_event(0, actor="PARENT"))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_inherited_writer, args=(trail, tag, 60)) for tag in ("CHILD_A", "CHILD_B")]
    for p in procs:
        p.start()
    _inherited_writer(trail, "PARENT", 30)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    report = trail.verify()
    assert report.ok, report.summary()
    actors = [r.event.actor for r in trail.events() if r.event]
    assert actors.count("CHILD_A") == actors.count("CHILD_B") == 60 and actors.count("PARENT") == 31


def test_key_rotation_keeps_old_records_readable_without_rewriting_them(tmp_path, audit_dir, signer):
    files = init_keys(tmp_path / "keys")
    provider = FileKeyProvider(files.keyring)
    trail = AuditTrail(audit_dir, provider, signer, checkpoint_seconds=None)
    trail.record(store_event(1))
    before = (audit_dir / LOG_FILE).read_bytes()
    old_id = provider.active_key_id()
    new_id = trail.rotate_key("security-officer")
    trail.record(store_event(2))
    assert new_id != old_id
    assert (audit_dir / LOG_FILE).read_bytes().startswith(before)      # nothing rewritten
    records = list(trail.events())
    assert [r.key_id for r in records] == [old_id, new_id, new_id]      # event, key change, event
    assert records[1].event.event is EventType.KEY_CHANGE
    assert records[1].event.detail == {"change": "audit key rotated", "old_key_id": old_id, "new_key_id": new_id}
    assert trail.verify().ok
    assert new_id in files.keyring.read_text() and old_id in files.keyring.read_text()


def test_reading_with_a_wrong_key_raises_a_clear_error(make_trail, audit_dir, signer):
    make_trail().record(store_event())
    impostor = AuditTrail(audit_dir, Keyring.generate("k1"), signer, checkpoint_seconds=None)
    with pytest.raises(WrongKeyError, match="not the key this record was encrypted with"):
        list(impostor.events())
    report = impostor.verify()
    assert not report.ok and report.first_bad.seq == 1 and "does not decrypt" in report.first_bad.reason
    impostor.close()


def test_writing_with_a_wrong_key_is_refused_before_the_log_mixes_keys(make_trail, audit_dir, signer):
    make_trail().record(store_event())
    impostor = AuditTrail(audit_dir, Keyring.generate("k1"), signer, checkpoint_seconds=None)
    with pytest.raises(WrongKeyError, match="active audit key 'k1' is not the key"):
        impostor.record(store_event())
    impostor.close()


def test_a_record_under_a_key_id_missing_from_the_keyring_names_that_id(make_trail, audit_dir, signer):
    make_trail().record(store_event())
    other = AuditTrail(audit_dir, Keyring.generate("k2"), signer, checkpoint_seconds=None)
    with pytest.raises(MissingKeyError, match="'k1' is not in the keyring"):
        list(other.events())
    other.close()


def test_missing_key_configuration_is_a_clear_error_not_a_crash(tmp_path):
    with pytest.raises(MissingKeyError, match=KEY_ENV):
        key_provider(None, environ={})
    with pytest.raises(MissingKeyError, match="does not exist"):
        FileKeyProvider(tmp_path / "absent.key").active_key_id()
    with pytest.raises(MissingKeyError, match=KEY_ENV):
        EnvKeyProvider(environ={})
    with pytest.raises(SigningKeyError, match="does not exist"):
        load_signer(tmp_path / "absent.pem", environ={})


def test_a_key_file_readable_by_others_is_refused(tmp_path):
    files = init_keys(tmp_path / "keys")
    os.chmod(files.keyring, 0o644)
    with pytest.raises(AuditConfigError, match="chmod 600"):
        FileKeyProvider(files.keyring).active_key_id()


def test_keys_from_the_environment_as_keyring_or_single_key(keyring):
    import base64
    assert EnvKeyProvider(environ={KEY_ENV: keyring.to_json()}).key("k1") == keyring.key("k1")
    single = base64.b64encode(b"\x01" * 32).decode()
    provider = EnvKeyProvider(environ={KEY_ENV: single})
    assert provider.key(provider.active_key_id()) == b"\x01" * 32
    assert provider.active_key_id() == EnvKeyProvider(environ={KEY_ENV: single}).active_key_id()


def test_key_errors_never_contain_key_material(keyring):
    secret = keyring.to_json()
    assert "k1" in repr(keyring) and keyring.keys["k1"].hex() not in repr(keyring)
    with pytest.raises(AuditConfigError) as info:
        Keyring.from_text(secret.replace('"active"', '"actif"'), origin="test")
    assert json.loads(secret)["keys"]["k1"] not in str(info.value)


def test_a_new_log_needs_a_signing_key_and_a_read_only_trail_cannot_record(audit_dir, keyring, signer):
    with pytest.raises(SigningKeyError):
        AuditTrail(audit_dir, keyring, None)
    AuditTrail(audit_dir, keyring, signer).close()
    reader = open_trail(audit_dir, keyring, None, trusted_public_keys=[signer.public_key])
    assert reader.verify().ok
    with pytest.raises(SigningKeyError, match="read-only"):
        reader.record(store_event())
    reader.close()


def test_record_times_never_go_backwards_even_if_the_clock_does(make_trail, audit_dir):
    times = iter([datetime(2030, 1, 1, tzinfo=timezone.utc), datetime(2020, 1, 1, tzinfo=timezone.utc)])
    trail = make_trail(clock=lambda: next(times, datetime(2020, 1, 1, tzinfo=timezone.utc)))
    trail.record(AuditEvent(EventType.APP_START, Outcome.SUCCESS, actor="dermgate"))
    trail.record(AuditEvent(EventType.APP_STOP, Outcome.SUCCESS, actor="dermgate"))
    stamps = [r["time"] for r in _lines(audit_dir)]
    assert stamps == sorted(stamps)
