"""Verify an audit log: canonical form, sequence, hash chain, signatures, decryption, witness.

Reads the directory directly (no writer needed, no lock taken) and stops at the
first record that fails, naming its sequence number and why. What each check
catches:

- canonical form and record hash: a changed byte anywhere in a record;
- sequence numbers: deleted, inserted or reordered records;
- ``prev`` links: a record replaced by one from elsewhere (another log, or
  forged), and inserted records;
- Ed25519 signatures of genesis/checkpoint/repair records under the trusted
  public keys: checkpoints re-signed (or a chain rebuilt) by someone without the
  signing key;
- AES-GCM tags (the AAD binds log id, seq and prev): ciphertext edits and
  splices, even when the attacker recomputed the keyless hash chain;
- the witness (copy of the newest signed record): records cut off the end,
  unless ``checkpoint.json`` was rolled back with them (it lies beside the log);
- the outside anchor (``audit.anchor``: the database's newest head, and signed
  records a syslog collector received): records cut off the end, a trail rolled
  back to an older copy or checkpoint, cut to its genesis, replaced or deleted;
- the last line: a torn tail from a crash mid-write (or a cut mid-record).

Records after the newest signed record are ``unsealed``: intact by the chain;
cutting them off shows only against the database anchor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from audit.errors import AuditError, AuditKeyError, IntegrityError, SigningKeyError
from audit.anchor import AnchorState
from audit.format import (GENESIS_PREV, LOG_FILE, SIGNED_KINDS, WITNESS_FILE, Kind, body_to_event, canonical_json,
                          record_hash, signed_payload)
from audit.keys import KeyProvider, RecordCipher, TrustedKeys

REPAIR_HINT = ("if a crash tore it (and no outside anchor shows the records were complete), "
               "`dermgate audit repair --confirm` seals it")


@dataclass(frozen=True)
class BadRecord:
    seq: int
    reason: str
    offset: int                      # byte offset of the line in audit.log


@dataclass
class VerifyReport:
    ok: bool = True
    log_id: str | None = None
    records: int = 0
    last_seq: int | None = None
    checkpoints: int = 0
    repairs: list[int] = field(default_factory=list)
    unsealed: int = 0                # records after the newest signed record
    key_ids: list[str] = field(default_factory=list)
    decrypted: bool = False
    first_bad: BadRecord | None = None
    signers: list[str] = field(default_factory=list)   # fingerprints that signed this log
    anchor: str | None = None                           # what the outside anchor check found
    witnessed: int = 0                                  # outside signed records the log matched

    def summary(self) -> str:
        if self.first_bad is not None:
            return f"FAILED at record {self.first_bad.seq}: {self.first_bad.reason}"
        parts = [f"OK: {self.records} records (0..{self.last_seq}), {self.checkpoints} signed checkpoints"]
        if self.decrypted:
            parts.append(f"all events decrypt (key ids: {', '.join(self.key_ids) or 'none'})")
        if self.repairs:
            parts.append(f"repaired at {', '.join(map(str, self.repairs))}")
        if self.unsealed:
            parts.append(f"{self.unsealed} records after the last checkpoint are not yet signed")
        if self.anchor:
            parts.append(self.anchor)
        if self.witnessed:
            parts.append(f"matches {self.witnessed} signed records held by the outside witness")
        return "; ".join(parts)


class _Fail(Exception):
    def __init__(self, seq: int, reason: str) -> None:
        self.seq, self.reason = seq, reason


def verify_log(directory: Path, trusted: TrustedKeys, keys: KeyProvider | None = None, *,
               anchor: AnchorState | None = None, anchor_error: str | None = None,
               witnesses: Sequence[dict[str, Any]] = ()) -> VerifyReport:
    """Check the log in ``directory``; ``keys=None`` skips decryption (integrity only).

    ``anchor`` is the head the database recorded (read *before* this call),
    ``anchor_error`` why it could not be read (a failure: truncation cannot be
    ruled out); ``witnesses`` are signed records received by an outside
    collector. Each must be found in the log, none beyond its end.
    """
    path = Path(directory) / LOG_FILE
    report = VerifyReport(decrypted=keys is not None)
    if anchor_error is not None:
        report.ok = False
        report.first_bad = BadRecord(0, anchor_error, 0)
        return report
    if not path.exists() or path.stat().st_size == 0:
        report.ok = False
        reason = f"{path} does not exist" if not path.exists() else f"{path} is empty"
        if anchor is not None:
            reason += (f", but the database anchors log {anchor.log_id} with records 0..{anchor.seq}: "
                       "the trail was deleted or emptied")
        elif witnesses:
            reason += ", but the outside witness holds signed records of it: the trail was deleted or emptied"
        report.first_bad = BadRecord(0, reason, 0)
        return report
    wanted = _wanted_positions(anchor, witnesses)
    seen: dict[int, str] = {}
    signers: set[str] = set()
    signed_hashes: dict[int, str] = {}
    key_ids: set[str] = set()
    cipher: RecordCipher | None = None
    expected, prev, offset = 0, GENESIS_PREV, 0
    try:
        with open(path, "rb") as fh:
            for line in fh:
                env = _check_line(line, expected, prev)
                kind = env["kind"]
                if expected == 0:
                    if kind != Kind.GENESIS.value:
                        raise _Fail(0, "first record is not the genesis record")
                    report.log_id = str(env.get("log"))
                    if keys is not None:
                        cipher = RecordCipher(keys, report.log_id)
                elif kind == Kind.GENESIS.value:
                    raise _Fail(expected, "a second genesis record (records from another log)")
                if expected in wanted:
                    seen[expected] = env["hash"]
                if kind in SIGNED_KINDS:
                    _check_signature(env, report.log_id, trusted)
                    signers.add(str(env.get("signer")))
                    signed_hashes[expected] = env["hash"]
                    report.unsealed = 0
                    if kind == Kind.CHECKPOINT.value:
                        report.checkpoints += 1
                    elif kind == Kind.REPAIR.value:
                        report.repairs.append(expected)
                elif kind == Kind.EVENT.value:
                    report.unsealed += 1
                    key_ids.add(str(env.get("kid")))
                    if cipher is not None:
                        _check_decrypt(cipher, env)
                else:
                    raise _Fail(expected, f"unknown record kind {kind!r}")
                report.records += 1
                report.last_seq = expected
                prev, expected = env["hash"], expected + 1
                offset += len(line)
        if report.records == 0:
            raise _Fail(0, "the log is empty (no genesis record)")
        _check_witness(Path(directory) / WITNESS_FILE, report, signed_hashes, trusted)
        _check_anchor(anchor, report, seen)
        _check_outside_witnesses(witnesses, report, seen, trusted)
    except _Fail as fail:
        report.ok = False
        report.first_bad = BadRecord(fail.seq, fail.reason, offset)
    report.key_ids = sorted(key_ids)
    report.signers = sorted(signers)
    return report


def _wanted_positions(anchor: AnchorState | None, witnesses: Sequence[dict[str, Any]]) -> set[int]:
    wanted = {int(w["seq"]) for w in witnesses if isinstance(w.get("seq"), int)}
    if anchor is not None:
        wanted.add(anchor.seq)
        if anchor.checkpoint_seq is not None:
            wanted.add(anchor.checkpoint_seq)
    return wanted


def _check_anchor(anchor: AnchorState | None, report: VerifyReport, seen: dict[int, str]) -> None:
    """The log must be the anchored one and reach, unchanged, the head the database recorded."""
    if anchor is None:
        report.anchor = "no database anchor recorded yet"
        return
    assert report.last_seq is not None
    if anchor.log_id != report.log_id:
        raise _Fail(0, f"this trail is log {report.log_id}, but the database anchors log {anchor.log_id} "
                       f"(records 0..{anchor.seq}): the trail was replaced")
    if anchor.seq > report.last_seq:
        raise _Fail(report.last_seq + 1, f"truncated: the database anchors record {anchor.seq} but the log ends at "
                                         f"record {report.last_seq}; records {report.last_seq + 1}..{anchor.seq} "
                                         "are missing (cut back or rolled back)")
    for seq, digest in ((anchor.seq, anchor.hash), (anchor.checkpoint_seq, anchor.checkpoint_hash)):
        if seq is not None and seen.get(seq) != digest:
            raise _Fail(seq, "differs from the record the database anchors at this position "
                             "(rolled back and rewritten)")
    report.anchor = f"reaches the database anchor (record {anchor.seq})"


def _check_outside_witnesses(witnesses: Sequence[dict[str, Any]], report: VerifyReport, seen: dict[int, str],
                             trusted: TrustedKeys) -> None:
    """Every signed record an outside collector received for this log is in it, unchanged."""
    assert report.last_seq is not None
    for env in sorted(witnesses, key=lambda e: int(e.get("seq", -1))):
        if env.get("log") != report.log_id:
            continue                                       # another log (another installation, or an older log)
        seq = int(env["seq"])
        if record_hash(env) != env.get("hash"):
            raise _Fail(seq, "a witnessed record is altered (hash mismatch): the witness file is damaged")
        _check_signature(env, report.log_id, trusted)
        if seq > report.last_seq:
            raise _Fail(report.last_seq + 1, f"truncated: the outside witness holds signed record {seq} but the log "
                                             f"ends at record {report.last_seq}; records "
                                             f"{report.last_seq + 1}..{seq} are missing")
        if seen.get(seq) != env["hash"]:
            raise _Fail(seq, "differs from the signed record the outside witness holds for this position")
        report.witnessed += 1
    if witnesses and not report.witnessed:
        raise _Fail(0, f"the outside witness holds no record of log {report.log_id}: wrong witness file, "
                       "or the trail was replaced")


def read_witness(path: Path) -> list[dict[str, Any]]:
    """Signed records (genesis, checkpoint, repair) from a file a syslog collector wrote.

    Each line holding such a record as JSON counts: the collector's raw RFC 5424
    messages (``audit.syslog`` sends them with MSGID ``DERMGATE-SIGNED``), or
    bare JSON lines. Other lines (audit messages, other senders) are skipped.
    """
    records: list[dict[str, Any]] = []
    decoder = json.JSONDecoder()
    for raw in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        start = raw.find('{"')
        if start < 0:
            continue
        try:
            env, _ = decoder.raw_decode(raw, start)
        except ValueError:
            continue
        if isinstance(env, dict) and env.get("kind") in SIGNED_KINDS and isinstance(env.get("seq"), int):
            records.append(env)
    return records


def _check_line(line: bytes, expected: int, prev: str) -> dict[str, Any]:
    if not line.endswith(b"\n"):
        raise _Fail(expected, f"torn tail: the last {len(line)} bytes are an incomplete record "
                              f"(crash mid-write, or the log was truncated); {REPAIR_HINT}")
    try:
        env = json.loads(line)
    except ValueError:
        raise _Fail(expected, "not a readable record (bytes altered or corrupted)") from None
    if not isinstance(env, dict) or canonical_json(env) + b"\n" != line:
        raise _Fail(expected, "record is not in canonical form (bytes altered)")
    seq = env.get("seq")
    if seq != expected:
        if isinstance(seq, int) and seq > expected:
            raise _Fail(expected, f"found record {seq} where record {expected} belongs: records deleted or reordered")
        raise _Fail(expected, f"found record {seq!r} where record {expected} belongs: records inserted or reordered")
    if env.get("prev") != prev:
        raise _Fail(expected, "chain broken: prev does not match the hash of the record before "
                              "(record replaced, inserted, or taken from another log)")
    if record_hash(env) != env.get("hash"):
        raise _Fail(expected, "hash mismatch: record content altered")
    return env


def _check_signature(env: dict[str, Any], log_id: str | None, trusted: TrustedKeys) -> None:
    seq = env["seq"]
    if env.get("log") != log_id:
        raise _Fail(seq, f"{env['kind']} record signed for another log ({env.get('log')!r})")
    try:
        trusted.verify(str(env.get("signer")), str(env.get("sig")), signed_payload(env))
    except SigningKeyError as exc:
        raise _Fail(seq, f"{env['kind']} signature invalid: {exc}") from None


def _check_decrypt(cipher: RecordCipher, env: dict[str, Any]) -> None:
    seq = env["seq"]
    try:
        body_to_event(json.loads(cipher.decrypt(env)))
    except IntegrityError as exc:
        raise _Fail(seq, exc.reason) from None
    except AuditKeyError as exc:
        raise _Fail(seq, f"does not decrypt: {exc}") from None
    except (ValueError, KeyError, TypeError):
        raise _Fail(seq, "decrypted body is not a valid audit event") from None


def _check_witness(path: Path, report: VerifyReport, signed_hashes: dict[int, str], trusted: TrustedKeys) -> None:
    assert report.last_seq is not None
    after = report.last_seq + 1
    try:
        env = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise _Fail(after, f"witness file {path.name} is missing: records cut off the end cannot be ruled out") from None
    except ValueError:
        raise _Fail(after, f"witness file {path.name} is corrupted") from None
    if record_hash(env) != env.get("hash"):
        raise _Fail(after, f"witness file {path.name} altered")
    _check_signature(env, report.log_id, trusted)
    seq = env["seq"]
    if seq > report.last_seq:
        raise _Fail(after, f"truncated: the signed witness covers record {seq} but the log ends at record "
                           f"{report.last_seq}; at least records {after}..{seq} are missing")
    if signed_hashes.get(seq) != env["hash"]:
        raise _Fail(seq, "differs from the signed witness of this record (record replaced)")


def verify_or_raise(directory: Path, trusted: TrustedKeys, keys: KeyProvider | None = None,
                    **outside: Any) -> VerifyReport:
    """As :func:`verify_log`, raising :class:`IntegrityError` on the first bad record."""
    report = verify_log(directory, trusted, keys, **outside)
    if report.first_bad is not None:
        raise IntegrityError(report.first_bad.seq, report.first_bad.reason)
    return report


__all__ = ["BadRecord", "VerifyReport", "read_witness", "verify_log", "verify_or_raise", "AuditError"]
