"""The append-only audit trail: one directory, one log file, many writers.

``AuditTrail.record(event)`` builds the record the way a structlog pipeline
would (time, canonical body, encrypt, chain, write), except that it never drops
an event: it returns the sequence number only after the line is on disk
(``fdatasync``), or raises :class:`AuditWriteError` so the caller does not
acknowledge the action it was auditing.

Concurrency: processes serialise on ``flock`` of the log file and read the
chain head (last record's seq and hash) under the lock, so any number of
processes can append without breaking the chain. Threads of one process use
group commit: whoever holds the lock writes every event queued meanwhile with a
single write and a single fsync, so throughput grows with concurrency instead
of being capped at one fsync per event.

Sealing: a signed checkpoint is appended at every ``checkpoint_every``-th
sequence number, when the newest signed record is older than
``checkpoint_seconds``, and on close. The newest signed record is also copied to
``checkpoint.json`` (the witness), so cutting records off the end of the log
shows. A crash mid-write leaves a torn tail: ``record`` refuses to chain onto it
(:class:`TornTailError`) until an operator runs ``repair`` (never automatic),
which cuts it off, keeps the bytes in a ``torn-*.bin`` file, and appends a
signed ``repair`` record that names them and who asked.

Outside anchor (``audit.anchor``): every durable write publishes the new head
to the database; a trail that is missing, shorter than the anchored head, or
holds another record there is refused (``record`` raises, ``verify`` fails),
and ``repair`` refuses to cut a tail the anchor shows was once complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
import weakref
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audit.anchor import Anchor, AnchorError, AnchorState
from audit.api import AuditEvent, EventType, Outcome
from audit.errors import (AuditConfigError, AuditError, AuditWriteError, IntegrityError, SigningKeyError,
                          TornTailError, TruncatedError, WrongKeyError)
from audit.format import (FORMAT_VERSION, GENESIS_PREV, LOG_FILE, SIGNED_KINDS, TORN_PREFIX, WITNESS_FILE,
                          AuditRecord, Kind, body_to_event, canonical_json, event_to_body, format_time, parse_time,
                          record_hash, seal, signed_payload)
from audit.keys import KeyProvider, RecordCipher, Signer, TrustedKeys, load_public_key, load_signer, write_secret
from audit.verify import VerifyReport, verify_log

log = structlog.get_logger("audit.trail")

DEFAULT_CHECKPOINT_EVERY = 100
DEFAULT_CHECKPOINT_SECONDS = 60.0
_TAIL_CHUNK = 4096
_DIR_MODE = 0o700
_FILE_MODE = 0o600


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class RecordListener(Protocol):
    """Told about each event after it is durable (e.g. the syslog forwarder); must not block."""

    def on_record(self, seq: int, event: AuditEvent) -> None: ...

    # optional: ``on_signed(line: bytes)`` is told each signed record (genesis, checkpoint, repair) as
    # written, e.g. to keep a copy of the chain head at a syslog collector (an outside witness).


@dataclass(frozen=True)
class _Tail:
    seq: int
    hash: str
    kind: str
    kid: str | None
    kcv: str | None
    time: datetime


@dataclass(frozen=True)
class RepairResult:
    """What ``repair`` did: the torn bytes it cut (0 if none) and the signed record it appended."""
    torn_bytes: int
    torn_offset: int | None
    saved_as: Path | None
    sealed_seq: int | None           # seq of the repair/checkpoint record written, None if nothing to do


class _Pending:
    __slots__ = ("event", "body", "seq", "error", "done")

    def __init__(self, event: AuditEvent, body: bytes) -> None:
        self.event = event
        self.body = body
        self.seq: int | None = None
        self.error: BaseException | None = AuditWriteError("audit record was not written")
        self.done = False


class AuditTrail:
    """Encrypted, hash-chained, signed, append-only audit log in ``directory`` (an :class:`AuditSink`)."""

    def __init__(self, directory: Path, keys: KeyProvider, signer: Signer | None, *,
                 trusted_keys: Sequence[Ed25519PublicKey] = (),
                 checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
                 checkpoint_seconds: float | None = DEFAULT_CHECKPOINT_SECONDS,
                 durable: bool = True,
                 anchor: Anchor | None = None,
                 listeners: Sequence[RecordListener] = (),
                 clock: Callable[[], datetime] = utcnow) -> None:
        if checkpoint_every < 2:
            raise AuditConfigError("checkpoint_every must be at least 2")
        self.directory = Path(directory)
        self.path = self.directory / LOG_FILE
        self.witness_path = self.directory / WITNESS_FILE
        self.keys = keys
        self.signer = signer
        self.checkpoint_every = checkpoint_every
        self.checkpoint_seconds = checkpoint_seconds
        self.durable = durable                  # False only for benchmarks: records are not crash-safe
        self.anchor = anchor
        self.listeners = list(listeners)
        self._clock = clock
        trusted = list(trusted_keys) + ([signer.public_key] if signer else [])
        self.trusted = TrustedKeys(trusted)
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._leader = False
        self._io = threading.Lock()             # one committer / repairer per process at a time
        self._closed = False
        self._broken: IntegrityError | None = None
        self.log_id = ""
        self._fd = -1
        # the anchor first: a head published after this read is never ahead of the trail read next
        anchored = anchor.current() if anchor is not None else None
        if anchored is not None and (not self.path.exists() or self.path.stat().st_size == 0):
            # the trail is gone (or emptied): never start a fresh one over it
            self._broken = TruncatedError(anchored.seq, f"the audit trail {self.path} is missing or empty, but the "
                                          f"database anchors log {anchored.log_id} with records 0..{anchored.seq}: "
                                          "it was deleted or cut back; restore it from backup")
        else:
            self.directory.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
            os.chmod(self.directory, _DIR_MODE)         # owner only, whatever the umask or an older mkdir left
            self._fd = self._open_log()
            try:
                self.log_id = self._open_genesis(anchored)
                if anchored is not None:
                    self._check_anchor(anchored)
            except IntegrityError as exc:             # still open, so verify can name the damage
                self._broken = exc
            except BaseException:
                self._closed = True
                os.close(self._fd)
                raise
        self._reopen_after_fork()
        self._cipher = RecordCipher(keys, self.log_id)

    # --- opening -----------------------------------------------------------------------------

    def _open_log(self) -> int:
        return os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)

    def _reopen_after_fork(self) -> None:
        """A forked child gets its own file description: an inherited one would share the flock
        with the parent, and the two would no longer exclude each other."""
        ref = weakref.ref(self)

        def reopen() -> None:
            trail = ref()
            if trail is None or trail._closed or trail._fd < 0:
                return
            inherited, trail._fd = trail._fd, trail._open_log()
            os.close(inherited)
            trail._cond = threading.Condition()
            trail._queue, trail._leader = [], False
            trail._io = threading.Lock()

        os.register_at_fork(after_in_child=reopen)

    def _open_genesis(self, anchored: AnchorState | None) -> str:
        with self._flock():
            if os.fstat(self._fd).st_size == 0:
                if anchored is not None:            # emptied between the check above and the lock
                    raise TruncatedError(anchored.seq, f"the audit trail {self.path} is empty, but the database "
                                                       f"anchors records 0..{anchored.seq}; restore it from backup")
                if self.signer is None:
                    raise SigningKeyError(f"{self.path} is new and needs a signing key for its genesis record")
                log_id = hashlib.sha256(os.urandom(32)).hexdigest()[:32]
                self.log_id = log_id
                now = self._clock()
                line, _ = self._signed_line(Kind.GENESIS, 0, GENESIS_PREV, now, log_id=log_id,
                                            extra={"format": "dermgate-audit", "created": format_time(now)})
                self._write(line, 0, signed_line=line)
                self._fsync_dir()
                if self.anchor is not None:         # at once: from now on this log must exist
                    digest = json.loads(line)["hash"]
                    try:
                        self.anchor.advance(AnchorState(log_id, 0, digest, 0, digest))
                    except AnchorError as exc:      # published again (and retried) with the next write
                        log.warning("audit_anchor_write_failed", error=str(exc), seq=0)
                log.info("audit_log_created", directory=str(self.directory))
                return log_id
        first = self._read_first_line()
        try:
            genesis = json.loads(first)
            if genesis.get("kind") != Kind.GENESIS.value or genesis.get("seq") != 0:
                raise ValueError("first record is not a genesis record")
            if canonical_json(genesis) + b"\n" != first or record_hash(genesis) != genesis.get("hash"):
                raise ValueError("genesis record altered")
            # appending to a log someone else created (and signed) would launder it
            self.trusted.verify(str(genesis.get("signer")), str(genesis.get("sig")), signed_payload(genesis))
            return str(genesis["log"])
        except (ValueError, KeyError, TypeError, AttributeError, SigningKeyError) as exc:
            raise IntegrityError(0, f"genesis record invalid ({exc}); run `dermgate audit verify`") from None

    def _check_anchor(self, anchored: AnchorState) -> None:
        """Refuse a trail that is not the anchored log, ends before the anchored head, or differs there."""
        if anchored.log_id != self.log_id:
            raise TruncatedError(0, f"this trail is log {self.log_id}, but the database anchors log "
                                    f"{anchored.log_id} (records 0..{anchored.seq}): the trail was replaced")
        with self._flock():
            complete = self._complete_records_end()
            last = self._last_complete(complete)
        if last is None or last[0] < anchored.seq:
            end = -1 if last is None else last[0]
            raise TruncatedError(end + 1, f"truncated: the database anchors record {anchored.seq} but the trail "
                                          f"ends at record {end}; records {end + 1}..{anchored.seq} are missing "
                                          "(cut back or rolled back); restore audit.log from backup")
        if last[0] == anchored.seq and last[1] != anchored.hash:
            raise TruncatedError(anchored.seq, "differs from the record the database anchors at this position "
                                               "(trail rolled back and rewritten)")

    def _complete_records_end(self) -> int:
        """Offset just past the last complete record (before a torn tail, if any). Caller holds the flock."""
        torn = self._torn()
        return torn[0] if torn is not None else os.fstat(self._fd).st_size

    def _last_complete(self, end: int) -> tuple[int, str] | None:
        if end == 0:
            return None
        _, line = self._last_line(end)
        try:
            env = json.loads(line)
            return int(env["seq"]), str(env["hash"])
        except (ValueError, KeyError, TypeError):
            return None

    def _read_first_line(self) -> bytes:
        with open(self.path, "rb") as fh:
            return fh.readline()

    # --- writing -----------------------------------------------------------------------------

    def record(self, event: AuditEvent) -> int:
        """Append ``event`` and return its sequence number once it is on disk."""
        return self.record_many([event])[0]

    def record_many(self, events: Sequence[AuditEvent]) -> list[int]:
        """Append ``events`` with one write and one fsync; their sequence numbers once on disk.

        They are queued together, so one commit writes them all: every one is
        durable, or the error is raised and none is acknowledged.
        """
        if self._closed:
            raise AuditConfigError("audit trail is closed")
        if self._broken is not None:
            raise self._broken
        if self.signer is None:
            raise SigningKeyError("this audit trail was opened read-only (no signing key); it cannot record")
        pendings = [_Pending(event, canonical_json(event_to_body(event)))
                    for event in (e if e.time is not None else replace(e, time=self._clock()) for e in events)]
        last = pendings[-1] if pendings else None
        with self._cond:
            self._queue.extend(pendings)
            while last is not None and not last.done:
                if self._leader:
                    self._cond.wait()
                    continue
                self._leader = True
                batch, self._queue = self._queue, []
                self._cond.release()
                try:
                    with self._io:
                        self._commit(batch)
                except Exception as exc:   # every caller in the batch learns its record is not durable
                    error = exc if isinstance(exc, AuditError) else AuditWriteError(f"audit write failed: {exc}")
                    if error is not exc:
                        error.__cause__ = exc
                    for item in batch:
                        item.error = error
                finally:
                    self._cond.acquire()
                    for item in batch:
                        item.done = True
                    self._leader = False
                    self._cond.notify_all()
        for pending in pendings:
            if pending.error is not None:
                raise pending.error
        seqs = []
        for pending in pendings:
            assert pending.seq is not None
            self._notify(pending.seq, pending.event)
            seqs.append(pending.seq)
        return seqs

    def _commit(self, batch: list[_Pending]) -> None:
        with self._flock():
            tail = self._read_tail()
            kid, kcv = self._cipher.active()
            if tail.kid == kid and tail.kcv != kcv:
                raise WrongKeyError(f"the active audit key {kid!r} is not the key that encrypted record {tail.seq}; "
                                    "the keyring on this host differs from the one that wrote the log")
            now = max(self._clock(), tail.time)           # record times never go backwards
            stamp = format_time(now)
            seq, prev = tail.seq, tail.hash
            lines: list[bytes] = []
            last_signed: bytes | None = None
            for item in batch:
                seq += 1
                if seq % self.checkpoint_every == 0:
                    line, prev = self._signed_line(Kind.CHECKPOINT, seq, prev, now)
                    lines.append(line)
                    last_signed = line
                    seq += 1
                envelope: dict[str, Any] = {"v": FORMAT_VERSION, "seq": seq, "kind": Kind.EVENT.value,
                                            "time": stamp, "prev": prev, "kid": kid, "kcv": kcv}
                self._cipher.encrypt(envelope, item.body)
                line = seal(envelope)
                prev = envelope["hash"]
                lines.append(line)
                item.seq = seq
            if last_signed is None and self._witness_stale(now):
                line, prev = self._signed_line(Kind.CHECKPOINT, seq + 1, prev, now)
                lines.append(line)
                last_signed = line
            self._write(b"".join(lines), os.fstat(self._fd).st_size, signed_line=last_signed)
        for item in batch:
            item.error = None

    def _witness_stale(self, now: datetime) -> bool:
        if self.checkpoint_seconds is None:
            return False
        try:
            age = time.time() - self.witness_path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age >= self.checkpoint_seconds

    def _signed_line(self, kind: Kind, seq: int, prev: str, now: datetime, *, log_id: str | None = None,
                     extra: dict[str, Any] | None = None) -> tuple[bytes, str]:
        if self.signer is None:
            raise SigningKeyError("this audit trail was opened without a signing key; it cannot write")
        envelope: dict[str, Any] = {"v": FORMAT_VERSION, "seq": seq, "kind": kind.value, "time": format_time(now),
                                    "prev": prev, "log": log_id or self.log_id, "signer": self.signer.fingerprint,
                                    **(extra or {})}
        envelope["sig"] = self.signer.sign(signed_payload(envelope))
        line = seal(envelope)
        return line, envelope["hash"]

    def _write(self, data: bytes, size_before: int, *, signed_line: bytes | None) -> None:
        """Append, fsync, update the witness and publish the head; on failure cut back to ``size_before``."""
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if self.durable:
                os.fdatasync(self._fd)
        except OSError as exc:
            try:
                os.ftruncate(self._fd, size_before)
            except OSError:
                pass                                    # verify/repair will report the torn tail
            raise AuditWriteError(f"audit log {self.path} could not be written: {exc.strerror}") from exc
        if signed_line is not None:
            write_secret(self.witness_path, signed_line, mode=_FILE_MODE)
            self._notify_signed(signed_line)
        if self.anchor is not None and self.log_id:
            head = json.loads(data[data.rfind(b"\n", 0, len(data) - 1) + 1:])
            signed = json.loads(signed_line) if signed_line is not None else None
            self.anchor.publish(AnchorState(self.log_id, int(head["seq"]), str(head["hash"]),
                                            signed["seq"] if signed else None, signed["hash"] if signed else None))

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- the chain head ----------------------------------------------------------------------------

    def _flock(self) -> _FileLock:
        return _FileLock(self._fd)

    def _torn(self) -> tuple[int, int] | None:
        """(offset, length) of an incomplete last record, or None. Caller holds the flock."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return None
        start, data = self._last_line(size)
        if data.endswith(b"\n"):
            try:
                json.loads(data)
                return None
            except ValueError:
                return start, size - start
        return start, size - start

    def _last_line(self, size: int) -> tuple[int, bytes]:
        """Start offset and bytes of the last line (which may lack its newline)."""
        chunk = _TAIL_CHUNK
        while True:
            start = max(0, size - chunk)
            data = os.pread(self._fd, size - start, start)
            idx = data.rfind(b"\n", 0, len(data) - 1)
            if idx >= 0 or start == 0:
                return start + idx + 1, data[idx + 1:]
            chunk *= 4

    def _read_tail(self) -> _Tail:
        torn = self._torn()
        if torn is not None:
            raise TornTailError(f"audit log {self.path} ends in an incomplete record ({torn[1]} bytes at offset "
                                f"{torn[0]}), left by a crash mid-write (or a cut); see `dermgate audit verify`, "
                                "then `dermgate audit repair --confirm`",
                                offset=torn[0], length=torn[1])
        size = os.fstat(self._fd).st_size
        _, line = self._last_line(size)
        env = json.loads(line)
        return _Tail(seq=int(env["seq"]), hash=str(env["hash"]), kind=str(env["kind"]), kid=env.get("kid"),
                     kcv=env.get("kcv"), time=parse_time(env["time"]))

    # --- sealing -------------------------------------------------------------------------------------

    def checkpoint(self) -> int | None:
        """Append a signed checkpoint now unless the newest record is already signed; returns its seq."""
        if self._broken is not None:
            raise self._broken
        with self._io, self._flock():
            tail = self._read_tail()
            if tail.kind in SIGNED_KINDS:
                return None
            now = max(self._clock(), tail.time)
            line, _ = self._signed_line(Kind.CHECKPOINT, tail.seq + 1, tail.hash, now)
            self._write(line, os.fstat(self._fd).st_size, signed_line=line)
            return tail.seq + 1

    def repair(self, actor: str) -> RepairResult:
        """Cut off a torn tail (kept in ``torn-*.bin``) and seal the log with a signed record naming ``actor``.

        An operator's act, never automatic: refused when the trail is damaged
        otherwise, or when the outside anchor shows the cut-off bytes belonged to
        records that were once complete (that is a cut, not a crash).
        """
        if self._broken is not None:
            raise type(self._broken)(self._broken.seq, f"refusing to repair: {self._broken.reason}")
        anchored = self.anchor.current() if self.anchor is not None else None
        with self._io, self._flock():
            if anchored is not None:
                self._check_anchor_locked(anchored)
            return self._repair_locked(actor)

    def _check_anchor_locked(self, anchored: AnchorState) -> None:
        last = self._last_complete(self._complete_records_end())
        if anchored.log_id == self.log_id and (last is None or last[0] < anchored.seq):
            raise TruncatedError(anchored.seq, f"refusing to repair: the database anchors record {anchored.seq} but "
                                               f"the complete records end at {None if last is None else last[0]}; "
                                               "records were cut off, not torn by a crash: restore from backup")

    def _repair_locked(self, actor: str) -> RepairResult:
        torn = self._torn()
        if torn is None:
            tail = self._read_tail()
            if tail.kind in SIGNED_KINDS:
                return RepairResult(0, None, None, None)
            now = max(self._clock(), tail.time)
            line, _ = self._signed_line(Kind.CHECKPOINT, tail.seq + 1, tail.hash, now)
            self._write(line, os.fstat(self._fd).st_size, signed_line=line)
            return RepairResult(0, None, None, tail.seq + 1)
        offset, length = torn
        data = os.pread(self._fd, length, offset)
        os.ftruncate(self._fd, offset)
        os.fsync(self._fd)
        tail = self._read_tail()
        now = max(self._clock(), tail.time)
        saved = self.directory / f"{TORN_PREFIX}{tail.seq + 1}-{now.strftime('%Y%m%dT%H%M%S%fZ')}.bin"
        write_secret(saved, data, mode=_FILE_MODE)
        line, _ = self._signed_line(Kind.REPAIR, tail.seq + 1, tail.hash, now, extra={"by": actor, "torn": {
            "bytes": length, "offset": offset, "sha256": hashlib.sha256(data).hexdigest(), "saved_as": saved.name}})
        self._write(line, offset, signed_line=line)
        log.warning("audit_torn_tail_repaired", torn_bytes=length, sealed_seq=tail.seq + 1)
        return RepairResult(length, offset, saved, tail.seq + 1)

    def torn_tail(self) -> tuple[int, int] | None:
        """(offset, length) of a torn tail if the log has one."""
        if self._broken is not None:
            raise self._broken
        with self._io, self._flock():
            return self._torn()

    # --- reading -------------------------------------------------------------------------------------

    def records(self, *, decrypt: bool = True, since: datetime | None = None) -> Iterator[AuditRecord]:
        """Every complete record in order; events decrypted (clear errors for wrong/missing keys).

        ``since`` skips records written before it without decrypting them (an
        event never happens after its record is written).
        """
        if self._broken is not None:
            raise self._broken
        with open(self.path, "rb") as fh:
            for line in fh:
                if not line.endswith(b"\n"):
                    return                              # torn or in-flight tail: not a record yet
                env = json.loads(line)
                written = parse_time(env["time"])
                if since is not None and written < since:
                    continue
                event = None
                if env["kind"] == Kind.EVENT.value and decrypt:
                    event = body_to_event(json.loads(self._cipher.decrypt(env)))
                yield AuditRecord(seq=env["seq"], kind=env["kind"], time=written, key_id=env.get("kid"),
                                  event=event, envelope=env)

    def events(self, **kwargs: Any) -> Iterator[AuditRecord]:
        return (r for r in self.records(**kwargs) if r.event is not None)

    def verify(self, *, decrypt: bool = True, trusted: TrustedKeys | None = None,
               witnesses: Sequence[dict[str, Any]] = ()) -> VerifyReport:
        """Verify the whole log (see :mod:`audit.verify`) under ``trusted`` (default: this trail's keys),
        against the database anchor and any ``witnesses`` (signed records kept elsewhere)."""
        anchored: AnchorState | None = None
        anchor_error: str | None = None
        if self.anchor is not None:
            try:
                anchored = self.anchor.current()      # before reading the log (see audit.anchor)
            except AnchorError as exc:
                anchor_error = str(exc)
        return verify_log(self.directory, trusted or self.trusted, self.keys if decrypt else None,
                          anchor=anchored, anchor_error=anchor_error, witnesses=witnesses)

    # --- keys ------------------------------------------------------------------------------------------

    def rotate_key(self, actor: str, *, key_id: str | None = None) -> str:
        """Make a fresh AES key active (old records keep theirs) and audit the change; returns its id."""
        rotate = getattr(self.keys, "rotate", None)
        if rotate is None:
            raise AuditConfigError("this key provider cannot rotate keys (environment or KMS): rotate at the source "
                                   "and restart with the new keyring")
        old, new = rotate(key_id)
        self.record(AuditEvent(event=EventType.KEY_CHANGE, outcome=Outcome.SUCCESS, actor=actor, action="U",
                               detail={"change": "audit key rotated", "old_key_id": old, "new_key_id": new}))
        return new

    # --- lifecycle -------------------------------------------------------------------------------------

    def _notify_signed(self, line: bytes) -> None:
        for listener in self.listeners:
            on_signed = getattr(listener, "on_signed", None)
            if on_signed is None:
                continue
            try:
                on_signed(line)
            except Exception as exc:                  # best effort, as for events
                log.warning("audit_listener_failed", listener=type(listener).__name__, error=type(exc).__name__)

    def _notify(self, seq: int, event: AuditEvent) -> None:
        for listener in self.listeners:
            try:
                listener.on_record(seq, event)
            except Exception as exc:                  # forwarding is best effort; the record is already durable
                log.warning("audit_listener_failed", listener=type(listener).__name__, error=type(exc).__name__)

    def close(self) -> None:
        """Seal with a closing checkpoint (unless torn or already sealed) and release the file."""
        if self._closed:
            return
        try:
            if self.signer is not None and self._fd >= 0:
                self.checkpoint()
        except AuditError as exc:                      # torn or damaged: leave it for verify/repair
            log.warning("audit_close_unsealed", error=type(exc).__name__)
        finally:
            self._closed = True
            if self._fd >= 0:
                os.close(self._fd)
            if self.anchor is not None:
                self.anchor.close()
            for listener in self.listeners:
                closer = getattr(listener, "close", None)
                if closer is not None:
                    closer()

    def __enter__(self) -> AuditTrail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _FileLock:
    """``flock(LOCK_EX)`` for the duration of a with-block (processes on one host)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)


def open_trail(directory: Path, key_provider: KeyProvider, signing_key: Signer | Path | None, *,
               trusted_public_keys: Sequence[Path | Ed25519PublicKey] = (),
               checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
               checkpoint_seconds: float | None = DEFAULT_CHECKPOINT_SECONDS,
               anchor: Anchor | None = None,
               listeners: Sequence[RecordListener] = (),
               clock: Callable[[], datetime] = utcnow,
               durable: bool = True) -> AuditTrail:
    """Open (creating if needed) the trail in ``directory``.

    ``signing_key`` is a :class:`Signer` or a PEM path (None: read-only use such
    as verify). ``trusted_public_keys`` adds public keys, e.g. those of retired
    signing keys, whose checkpoints still count as valid.
    """
    signer = load_signer(signing_key) if isinstance(signing_key, Path) else signing_key
    trusted = [k if isinstance(k, Ed25519PublicKey) else load_public_key(k) for k in trusted_public_keys]
    if signer is None and not trusted:
        raise SigningKeyError("open_trail needs a signing key or at least one trusted public key")
    return AuditTrail(directory, key_provider, signer, trusted_keys=trusted, checkpoint_every=checkpoint_every,
                      checkpoint_seconds=checkpoint_seconds, durable=durable, anchor=anchor,
                      listeners=listeners, clock=clock)
