"""``dermgate audit ...`` sub-commands for compliance officers and operators.

The core CLI wires these in::

    audit_parser = subparsers.add_parser("audit", help="encrypted audit trail")
    audit.cli.add_arguments(audit_parser.add_subparsers(dest="audit_command", required=True))
    ...
    trail = audit.cli.open_configured_trail(settings.audit_dir, settings.audit.key_file, ...)
    return audit.cli.run(args, trail)          # init-keys needs no trail: run(args, None)

Every command that reads the trail is itself audited (search/disclosures/verify
as ``AUDIT_QUERY``, export as ``AUDIT_EXPORT``, rotate-key as ``KEY_CHANGE``,
repair as ``CONFIG_CHANGE``), under the caller's authenticated identity
(``audit.identity``: the OS user, or the holder of ``$DERMGATE_API_TOKEN``;
``--as``/``--role`` must agree with it). Exit status: 0 ok, 1 verification
failed (the first bad record is named), 2 any other audit error (message on
stderr).
``python -m audit.cli --dir ... <command>`` runs them stand-alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, time, timezone
from pathlib import Path
from typing import Any, Sequence, TextIO

from audit.api import AuditEvent, EventType, Outcome
from audit.errors import AuditConfigError, AuditError
from audit.export import (ExportContext, ExportFormat, disclosures, disclosures_csv, disclosures_table, export)
from audit.keys import (PUBLIC_KEY_FILE, SIGNING_KEY_ENV, TrustedKeys, fingerprint, init_keys, key_provider,
                        load_public_key, load_signer)
from audit.search import AuditQuery, records_table, search
from audit.trail import DEFAULT_CHECKPOINT_EVERY, AuditTrail, RecordListener, open_trail
from audit.verify import read_witness
from audit.identity import Identity, IdentityError, resolve

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_ERROR = 2
# --- argument parsing ---------------------------------------------------------------------------

def _parse_time(text: str, *, end_of_day: bool = False) -> datetime:
    """ISO date or date-time; naive values are UTC; a bare date as --until means the whole day."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date or date-time: {text!r}") from None
    if len(text) == 10 and end_of_day:
        value = datetime.combine(value.date(), time.max)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def _event_type(text: str) -> EventType:
    for member in EventType:
        if text in (member.value, member.name, member.name.lower()):
            return member
    choices = ", ".join(m.value for m in EventType)
    raise argparse.ArgumentTypeError(f"unknown event type {text!r} (one of: {choices})")


def _add_identity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--as", dest="requested_by", default=None,
                        help="who is asking; recorded only when $DERMGATE_API_TOKEN is that person's token "
                             "(default: the OS user, recorded as os:<user>)")
    parser.add_argument("--role", default=None,
                        help="role of the person asking, e.g. compliance; must be the role of $DERMGATE_API_TOKEN")
    parser.add_argument("--purpose", default=None, help="purpose of use, e.g. HOPERAT or a free text reason")


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patient", help="patient id")
    parser.add_argument("--user", help="user or actor (exact)")
    parser.add_argument("--ae", help="AE title (calling, called or destination)")
    parser.add_argument("--event", action="append", type=_event_type, default=[],
                        help="event type, e.g. dicom.store (repeatable)")
    parser.add_argument("--since", type=_parse_time, help="from this UTC date/time (ISO)")
    parser.add_argument("--until", type=lambda s: _parse_time(s, end_of_day=True), help="up to this UTC date/time")
    parser.add_argument("--limit", type=int, help="at most this many records")


def add_arguments(subparsers: Any) -> None:
    """Add the audit sub-commands to an ``add_subparsers()`` object."""
    p = subparsers.add_parser("verify", help="check hash chain, signatures and decryption; exit 1 on damage")
    p.add_argument("--no-decrypt", action="store_true", help="integrity only (no AES key needed)")
    pin = p.add_mutually_exclusive_group()
    pin.add_argument("--pin-key", type=Path, metavar="FILE",
                     help="trust only this Ed25519 public key (PEM), kept apart from the trail")
    pin.add_argument("--fingerprint", metavar="HEX",
                     help="trust only the configured public key with this fingerprint (as verify prints it)")
    p.add_argument("--witness", type=Path, action="append", default=[], metavar="FILE",
                   help="signed records a syslog collector received (its raw messages); the trail must hold "
                        "each of them and reach the newest (repeatable)")
    _add_identity(p)
    p.set_defaults(audit_command="verify")

    p = subparsers.add_parser("repair", help="seal a torn tail left by a crash (cut + signed repair record)")
    p.add_argument("--confirm", action="store_true",
                   help="really cut the torn tail (without it: only say what would be cut)")
    _add_identity(p)
    p.set_defaults(audit_command="repair")

    p = subparsers.add_parser("search", help="search by patient, user, AE title, event type, time range")
    _add_filters(p)
    _add_identity(p)
    p.add_argument("--format", choices=("table", "csv"), default="table", dest="output_format")
    p.set_defaults(audit_command="search")

    p = subparsers.add_parser("export", help="export as FHIR AuditEvent (IHE BALP), DICOM audit XML or CSV")
    p.add_argument("--format", required=True, choices=[f.value for f in ExportFormat], dest="export_format")
    p.add_argument("--output", "-o", type=Path, help="file to write (created 0600; default stdout)")
    _add_filters(p)
    _add_identity(p)
    p.set_defaults(audit_command="export")

    p = subparsers.add_parser("disclosures", help="accounting of disclosures for one patient")
    p.add_argument("--patient", required=True, help="patient id")
    p.add_argument("--include-failed", action="store_true", help="also list attempts that failed")
    p.add_argument("--since", type=_parse_time)
    p.add_argument("--until", type=lambda s: _parse_time(s, end_of_day=True))
    p.add_argument("--format", choices=("table", "csv", "json"), default="table", dest="output_format")
    _add_identity(p)
    p.set_defaults(audit_command="disclosures")

    p = subparsers.add_parser("rotate-key", help="make a new AES key active; old records keep their keys")
    _add_identity(p)
    p.set_defaults(audit_command="rotate-key")

    p = subparsers.add_parser("init-keys", help="create an AES keyring and an Ed25519 signing key (0600)")
    p.add_argument("--dir", dest="key_dir", type=Path, required=True, help="directory for the key files")
    p.add_argument("--force", action="store_true", help="overwrite existing key files")
    p.set_defaults(audit_command="init-keys")


# --- running ---------------------------------------------------------------------------------------

def identify(args: argparse.Namespace, tokens_file: Path | None) -> Identity:
    """The caller's authenticated identity; ``--as``/``--role`` must agree with it (IdentityError)."""
    return resolve(tokens_file, claimed_user=getattr(args, "requested_by", None),
                   claimed_role=getattr(args, "role", None))


def _actor(args: argparse.Namespace) -> str:
    return str(args.identity.actor)


def _role(args: argparse.Namespace) -> str | None:
    return args.identity.role


def _query(args: argparse.Namespace) -> AuditQuery:
    return AuditQuery(patient_id=args.patient, actor=args.user, ae_title=args.ae, event_types=tuple(args.event),
                      since=args.since, until=args.until, limit=args.limit)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)   # exports hold PHI
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def run(args: argparse.Namespace, trail: AuditTrail | None, *, out: TextIO | None = None,
        err: TextIO | None = None, tokens_file: Path | None = None) -> int:
    """Execute the parsed audit sub-command; returns the process exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    command = args.audit_command
    try:
        if getattr(args, "identity", None) is None:
            args.identity = identify(args, tokens_file)
    except IdentityError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_ERROR
    try:
        if command == "init-keys":
            files = init_keys(args.key_dir, force=args.force)
            print(f"keyring (0600):      {files.keyring}\nsigning key (0600):  {files.signing_key}\n"
                  f"public key:          {files.public_key}\n"
                  f"fingerprint to pin:  {fingerprint(load_public_key(files.public_key))}", file=out)
            return EXIT_OK
        if trail is None:
            print("error: the audit trail is not configured", file=err)
            return EXIT_ERROR
        handler = _HANDLERS[command]
        return handler(args, trail, out, err)
    except AuditError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_ERROR


def pinned_keys(trail: AuditTrail, pin_key: Path | None, pin_fingerprint: str | None) -> TrustedKeys | None:
    """The keys ``verify`` trusts when pinned: that public key only, or the configured one with that fingerprint."""
    if pin_key is not None:
        return TrustedKeys([load_public_key(pin_key)])
    if pin_fingerprint:
        wanted = pin_fingerprint.strip().lower().removeprefix("ed25519:")
        if wanted in {fp.removeprefix("ed25519:") for fp in trail.trusted.fingerprints}:
            return trail.trusted.only("ed25519:" + wanted)
        raise AuditConfigError(f"no configured audit public key has fingerprint ed25519:{wanted} (configured: "
                               f"{', '.join(trail.trusted.fingerprints)}): the key beside this trail is not "
                               "the pinned one")
    return None


def _verify(args: argparse.Namespace, trail: AuditTrail, out: TextIO, err: TextIO) -> int:
    try:
        trusted = pinned_keys(trail, args.pin_key, args.fingerprint)
    except AuditError as exc:
        print(f"FAILED: {exc}", file=out)
        return EXIT_VERIFY_FAILED
    witnesses = [w for path in args.witness for w in read_witness(path)]
    report = trail.verify(decrypt=not args.no_decrypt, trusted=trusted, witnesses=witnesses)
    print(report.summary(), file=out)
    for fp in report.signers:
        print(f"signed by {fp}: pin it with `dermgate audit verify --fingerprint {fp}`", file=out)
    if trusted is None:
        print("note: verified against the public key configured beside this installation; pin the expected "
              "key with --pin-key FILE or --fingerprint HEX", file=out)
    detail: dict[str, Any] = {"command": "verify", "ok": report.ok, "records": report.records,
                              "pinned": trusted is not None, "witnessed": report.witnessed}
    if report.first_bad is not None:
        detail["first_bad_seq"] = report.first_bad.seq
    try:
        trail.record(AuditEvent(event=EventType.AUDIT_QUERY, actor=_actor(args), actor_role=_role(args),
                                purpose=args.purpose, detail=detail,
                                outcome=Outcome.SUCCESS if report.ok else Outcome.SERIOUS_FAILURE))
    except AuditError as exc:           # a damaged log may refuse the append; the verdict stands
        print(f"note: this verification could not be recorded: {exc}", file=err)
    return EXIT_OK if report.ok else EXIT_VERIFY_FAILED


def _repair(args: argparse.Namespace, trail: AuditTrail, out: TextIO, err: TextIO) -> int:
    if not args.confirm:
        torn = trail.torn_tail()
        what = (f"cut {torn[1]} torn bytes at offset {torn[0]} and seal the log with a signed repair record"
                if torn else "seal the log with a signed checkpoint (no torn tail)")
        print(f"would {what}; run again with --confirm to do it (the repair is audited, and refused when the "
              "database anchor shows the cut records were complete)", file=out)
        return EXIT_ERROR
    result = trail.repair(_actor(args))
    if result.torn_bytes:
        print(f"cut {result.torn_bytes} torn bytes at offset {result.torn_offset} (kept in {result.saved_as}); "
              f"sealed with signed repair record {result.sealed_seq}", file=out)
    elif result.sealed_seq is not None:
        print(f"no torn tail; sealed with signed checkpoint {result.sealed_seq}", file=out)
    else:
        print("nothing to repair: the log ends in a signed record", file=out)
    trail.record(AuditEvent(event=EventType.CONFIG_CHANGE, outcome=Outcome.SUCCESS, actor=_actor(args), action="U",
                            actor_role=_role(args), detail={"change": "audit log repair",
                                                            "torn_bytes": result.torn_bytes,
                                                            "torn_offset": result.torn_offset,
                                                            "sealed_seq": result.sealed_seq}))
    return EXIT_OK


def _search(args: argparse.Namespace, trail: AuditTrail, out: TextIO, err: TextIO) -> int:
    records = search(trail, _query(args), requested_by=_actor(args), role=_role(args), purpose=args.purpose)
    if args.output_format == "csv":
        from audit.export import write_csv
        write_csv(records, out)
    else:
        print(records_table(records), file=out)
        print(f"{len(records)} record(s)", file=out)
    return EXIT_OK


def _export(args: argparse.Namespace, trail: AuditTrail, out: TextIO, err: TextIO) -> int:
    destination = str(args.output) if args.output else "stdout"
    text = export(trail, args.export_format, _query(args), requested_by=_actor(args), destination=destination,
                  role=_role(args), purpose=args.purpose, ctx=ExportContext(log_id=trail.log_id))
    if args.output:
        _write_private(args.output, text)
        print(f"wrote {args.output}", file=err)
    else:
        out.write(text)
    return EXIT_OK


def _disclosures(args: argparse.Namespace, trail: AuditTrail, out: TextIO, err: TextIO) -> int:
    items = disclosures(trail, args.patient, requested_by=_actor(args), include_failed=args.include_failed,
                        since=args.since, until=args.until, role=_role(args), purpose=args.purpose)
    if args.output_format == "csv":
        disclosures_csv(items, out)
    elif args.output_format == "json":
        json.dump([{"seq": d.seq, "time": d.time.isoformat(), "event": d.event.value, "recipient": d.recipient,
                    "by": d.by, "purpose": d.purpose, "what": d.what, "outcome": d.outcome.value} for d in items],
                  out, indent=2)
        out.write("\n")
    else:
        print(f"Accounting of disclosures for patient {args.patient}", file=out)
        print(disclosures_table(items), file=out)
        print(f"{len(items)} disclosure(s)", file=out)
    return EXIT_OK


def _rotate(args: argparse.Namespace, trail: AuditTrail, out: TextIO, err: TextIO) -> int:
    new = trail.rotate_key(_actor(args))
    print(f"new active audit key id: {new} (older keys stay in the keyring for older records)", file=out)
    return EXIT_OK


_HANDLERS = {"verify": _verify, "repair": _repair, "search": _search, "export": _export,
             "disclosures": _disclosures, "rotate-key": _rotate}


# --- opening a trail from configuration ---------------------------------------------------------------

def open_configured_trail(directory: Path, key_file: Path | None, signing_key_file: Path | None, *,
                          public_key_files: Sequence[Path] = (),
                          checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
                          anchor: Any = None,
                          syslog_host: str | None = None, syslog_port: int = 6514,
                          syslog_ca_file: Path | None = None,
                          syslog_cert_file: Path | None = None, syslog_key_file: Path | None = None,
                          listeners: Sequence[RecordListener] = ()) -> AuditTrail:
    """Build the trail from settings-style paths; env vars ``DERMGATE_AUDIT_KEY``/``..._SIGNING_KEY`` win.

    Without a signing key (and no env var) the trail opens read-only if a
    public key is available (``audit-signing.pub`` beside the key file, or
    ``public_key_files``): enough for ``verify``.
    """
    keys = key_provider(key_file, required=False)
    signer = None
    if os.environ.get(SIGNING_KEY_ENV) or (signing_key_file is not None and Path(signing_key_file).exists()):
        signer = load_signer(signing_key_file)
    publics = list(public_key_files)
    for candidate in (signing_key_file, key_file):
        if candidate is not None and (Path(candidate).parent / PUBLIC_KEY_FILE).exists():
            publics.append(Path(candidate).parent / PUBLIC_KEY_FILE)
            break
    all_listeners = list(listeners)
    if syslog_host:
        from audit.syslog import SyslogTlsForwarder, client_tls_context
        tls = client_tls_context(syslog_ca_file, cert_file=syslog_cert_file, key_file=syslog_key_file)
        all_listeners.append(SyslogTlsForwarder(syslog_host, syslog_port, tls=tls))
    if signer is None and not publics:
        load_signer(signing_key_file)       # raises the clear "no signing key" error
    return open_trail(Path(directory), keys, signer, trusted_public_keys=[load_public_key(p) for p in publics],
                      checkpoint_every=checkpoint_every, anchor=anchor, listeners=all_listeners)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m audit.cli --dir AUDIT_DIR [--key-file F] [--signing-key F] CMD``."""
    parser = argparse.ArgumentParser(prog="dermgate-audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("DERMGATE_AUDIT_DIR", "audit")),
                        help="audit directory (default $DERMGATE_AUDIT_DIR or ./audit)")
    parser.add_argument("--key-file", type=Path, help="AES keyring file (or set DERMGATE_AUDIT_KEY)")
    parser.add_argument("--signing-key", type=Path, help="Ed25519 signing key PEM (or DERMGATE_AUDIT_SIGNING_KEY)")
    parser.add_argument("--public-key", type=Path, action="append", default=[],
                        help="extra trusted public key (e.g. a retired signing key); repeatable")
    parser.add_argument("--tokens-file", type=Path, help="API tokens file, for --as/--role with $DERMGATE_API_TOKEN")
    add_arguments(parser.add_subparsers(dest="audit_command", required=True))
    args = parser.parse_args(argv)
    if args.audit_command == "init-keys":
        return run(args, None)
    try:
        trail = open_configured_trail(args.dir, args.key_file, args.signing_key,
                                      public_key_files=args.public_key + ([args.pin_key] if getattr(
                                          args, "pin_key", None) else []))
    except AuditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        return run(args, trail, tokens_file=args.tokens_file)
    finally:
        trail.close()


if __name__ == "__main__":
    raise SystemExit(main())
