"""Tampering with a closed log is detected, and verify names the first bad record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from audit.format import LOG_FILE, WITNESS_FILE, canonical_json, record_hash, signed_payload
from audit.keys import Keyring, Signer, TrustedKeys
from audit.trail import AuditTrail
from audit.verify import verify_log
from tests.audit.helpers import store_event

EVENTS = 12
CHECKPOINT_EVERY = 5          # checkpoints at seq 5 and 10, plus the closing one


def _build(directory: Path, keyring: Keyring, signer: Signer, events: int = EVENTS) -> list[bytes]:
    trail = AuditTrail(directory, keyring, signer, checkpoint_every=CHECKPOINT_EVERY, checkpoint_seconds=None)
    for i in range(events):
        trail.record(store_event(i, patient=f"PAT-{i % 3}"))
    trail.close()
    return _read(directory)


def _read(directory: Path) -> list[bytes]:
    return (directory / LOG_FILE).read_bytes().splitlines(keepends=True)


def _write(directory: Path, lines: list[bytes]) -> None:
    (directory / LOG_FILE).write_bytes(b"".join(lines))


def _verify(directory: Path, keyring: Keyring, signer: Signer):
    return verify_log(directory, TrustedKeys([signer.public_key]), keyring)


def _rechain(lines: list[bytes], start: int, renumber: bool = False, resign: Signer | None = None) -> list[bytes]:
    """What an attacker without the AES key can do: recompute the keyless hash chain from ``start`` on."""
    envs = [json.loads(line) for line in lines]
    for i in range(start, len(envs)):
        env = envs[i]
        if renumber:
            env["seq"] = i
        env["prev"] = envs[i - 1]["hash"]
        if resign is not None and "sig" in env:
            env["signer"] = resign.fingerprint
            env["sig"] = resign.sign(signed_payload(env))
        env["hash"] = record_hash(env)
    return [canonical_json(env) + b"\n" for env in envs]


@pytest.fixture
def log(audit_dir, keyring, signer) -> list[bytes]:
    lines = _build(audit_dir, keyring, signer)
    assert _verify(audit_dir, keyring, signer).ok
    return lines


def test_an_untouched_log_verifies(audit_dir, keyring, signer, log):
    report = _verify(audit_dir, keyring, signer)
    assert report.ok and report.first_bad is None
    assert report.records == len(log) and report.checkpoints == 3 and report.unsealed == 0


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9, -3])
def test_flipping_one_byte_is_detected_at_that_record(audit_dir, keyring, signer, log, where):
    target = 7
    line = bytearray(log[target])
    pos = int(len(line) * where) if where > 0 else len(line) + where
    line[pos] ^= 0x01
    _write(audit_dir, log[:target] + [bytes(line)] + log[target + 1:])
    bad = _verify(audit_dir, keyring, signer).first_bad
    assert bad is not None and bad.seq == target, bad


def test_deleting_a_record_is_detected_at_its_position(audit_dir, keyring, signer, log):
    _write(audit_dir, log[:4] + log[5:])
    bad = _verify(audit_dir, keyring, signer).first_bad
    assert bad.seq == 4 and "deleted" in bad.reason


def test_inserting_a_record_is_detected_where_it_was_inserted(audit_dir, keyring, signer, log):
    _write(audit_dir, log[:6] + [log[3]] + log[6:])
    bad = _verify(audit_dir, keyring, signer).first_bad
    assert bad.seq == 6 and "inserted" in bad.reason


def test_reordering_two_records_is_detected_at_the_first_moved_one(audit_dir, keyring, signer, log):
    _write(audit_dir, log[:7] + [log[8], log[7]] + log[9:])
    bad = _verify(audit_dir, keyring, signer).first_bad
    assert bad.seq == 7 and "reordered" in bad.reason


def test_cutting_whole_records_off_the_end_is_detected_by_the_witness(audit_dir, keyring, signer, log):
    _write(audit_dir, log[:-3])
    bad = _verify(audit_dir, keyring, signer).first_bad
    assert bad.seq == len(log) - 3 and "truncated" in bad.reason


def test_cutting_the_log_mid_record_is_reported_as_a_torn_tail(audit_dir, keyring, signer, log):
    _write(audit_dir, log[:-1] + [log[-1][:40]])
    bad = _verify(audit_dir, keyring, signer).first_bad
    assert bad.seq == len(log) - 1 and "torn tail" in bad.reason


def test_deleting_the_witness_is_reported(audit_dir, keyring, signer, log):
    (audit_dir / WITNESS_FILE).unlink()
    bad = _verify(audit_dir, keyring, signer).first_bad
    assert bad is not None and "witness" in bad.reason


def test_a_record_spliced_in_from_another_log_is_detected_at_that_record(tmp_path, audit_dir, keyring, signer, log):
    other = _build(tmp_path / "other", keyring, signer)       # same keys, same shape, different log
    _write(audit_dir, log[:3] + [other[3]] + log[4:])
    bad = _verify(audit_dir, keyring, signer).first_bad
    assert bad.seq == 3 and "chain broken" in bad.reason


def test_a_spliced_record_with_a_rebuilt_chain_still_fails_to_decrypt(tmp_path, audit_dir, keyring, signer, log):
    other = _build(tmp_path / "other", keyring, signer)
    forged = _rechain(log[:3] + [other[3]] + log[4:], start=3, resign=signer)
    _write(audit_dir, forged)
    bad = _verify(audit_dir, keyring, signer).first_bad
    assert bad.seq == 3 and "another log" in bad.reason        # key check value differs per log


def test_a_checkpoint_re_signed_with_a_wrong_key_is_detected_at_that_checkpoint(audit_dir, keyring, signer, log):
    attacker = Signer.generate()
    forged = _rechain(log, start=CHECKPOINT_EVERY, resign=attacker)
    _write(audit_dir, forged)
    bad = _verify(audit_dir, keyring, signer).first_bad
    assert bad.seq == CHECKPOINT_EVERY and "not a trusted audit signing key" in bad.reason


def test_a_deletion_hidden_by_renumbering_and_rechaining_fails_decryption_at_the_gap(audit_dir, keyring, signer, log):
    attacker_without_keys = _rechain(log[:2] + log[3:], start=2, renumber=True, resign=signer)
    _write(audit_dir, attacker_without_keys)
    bad = _verify(audit_dir, keyring, signer).first_bad
    assert bad.seq == 2 and "authentication tag" in bad.reason


def test_an_edited_ciphertext_with_a_rebuilt_chain_fails_its_authentication_tag(audit_dir, keyring, signer, log):
    env = json.loads(log[8])
    ct = bytearray(env["ct"].encode())
    ct[10] = ord("A") if ct[10] != ord("A") else ord("B")
    env["ct"] = ct.decode()
    forged = _rechain(log[:8] + [canonical_json(env) + b"\n"] + log[9:], start=8, resign=signer)
    _write(audit_dir, forged)
    bad = _verify(audit_dir, keyring, signer).first_bad
    assert bad.seq == 8 and "authentication tag" in bad.reason


def test_integrity_can_be_checked_without_the_aes_key(audit_dir, keyring, signer, log):
    assert verify_log(audit_dir, TrustedKeys([signer.public_key]), None).ok
    _write(audit_dir, log[:4] + log[5:])
    assert verify_log(audit_dir, TrustedKeys([signer.public_key]), None).first_bad.seq == 4


def test_a_damaged_genesis_is_reported_at_record_0_and_the_trail_refuses_to_append(audit_dir, keyring, signer, log):
    from audit.errors import IntegrityError
    _write(audit_dir, [log[0][:20] + b"X" + log[0][21:]] + log[1:])
    assert _verify(audit_dir, keyring, signer).first_bad.seq == 0
    trail = AuditTrail(audit_dir, keyring, signer, checkpoint_seconds=None)
    with pytest.raises(IntegrityError, match="record 0"):
        trail.record(store_event())
    trail.close()
