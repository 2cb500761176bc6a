"""The ``dermgate`` command.

    dermgate serve        SCP + worker + dispatcher + HTTP API (or some of them: --roles)
    dermgate demo         the whole path on loopback with the bundled samples
    dermgate jobs         list, show and retry jobs
    dermgate outbox       list, retry and purge deliveries
    dermgate review       confirm or override an AI result (clinician)
    dermgate evaluate     evaluate the model on a labelled image folder
    dermgate audit        verify, search, export the audit trail
    dermgate migrate      create / upgrade the database schema
    dermgate verify-model check the model file against its manifest
    dermgate api-token    issue, list or revoke HTTP API bearer tokens
    dermgate outcomes     import, list and link outcomes (histopathology truth)
    dermgate monitor      live performance, drift and alarms (report)
    dermgate model        recall a model version from the PACS and the EHR
    dermgate store        store encryption key: init-key, rotate-key; cat a stored file (decrypted)
    dermgate user         add, list, disable, enable or reset local console accounts

Every command acts on a work dir: ``--workdir``, else ``$DERMGATE_WORKDIR``,
else the current directory. Only ``serve``, ``demo`` and ``migrate`` may create one (and
migrate its database); every other command refuses a work dir that holds no dermgate
state, so a mistyped ``--workdir`` creates nothing, and never migrates. Actions are audited under the caller's
authenticated identity (``audit.identity``): the OS user (``os:<user>``), or
the holder of the API token in ``$DERMGATE_API_TOKEN``; a name typed with
``--user``, ``--reviewer`` or ``--as`` counts only when that token proves it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from dermgate import __version__
from dermgate.tables import table as _table

# Commands that may make a new work dir and migrate its database.
CREATES_WORKDIR = frozenset({"serve", "demo", "migrate"})
# Commands that read nothing from the work dir (``config`` shows what the settings would be).
NO_WORKDIR_STATE = frozenset({"config"})


def _settings(args: argparse.Namespace):  # noqa: ANN202 - Settings import is deferred for start-up time
    import os

    from dermgate.app import workdir_from
    from dermgate.settings import Settings
    from dermgate.app import WorkdirError, has_state
    wd = workdir_from(getattr(args, "workdir", None))
    os.environ.setdefault("DERMGATE_WORKDIR", str(wd))
    settings = Settings(workdir=wd)
    command = getattr(args, "command", None)
    if command not in CREATES_WORKDIR | NO_WORKDIR_STATE and not has_state(settings):
        raise WorkdirError(f"{wd} holds no dermgate state: check --workdir or $DERMGATE_WORKDIR "
                           f"('dermgate {' / '.join(sorted(CREATES_WORKDIR))}' create a work dir)")
    return settings


def _logged_settings(args: argparse.Namespace):  # noqa: ANN202
    from dermgate import logs
    settings = _settings(args)
    logs.configure(settings.log_level, None if settings.log_stderr_only else settings.log_dir / "dermgate.log",
                   console=getattr(args, "verbose", False) or settings.log_stderr_only)
    return settings


def _runtime(args: argparse.Namespace):  # noqa: ANN202
    from dermgate.app import Runtime
    return Runtime(_logged_settings(args), create=args.command in CREATES_WORKDIR)


class _Refused(Exception):
    """The command line claims an identity it has not proved (exit 2)."""


def _identity(args: argparse.Namespace, settings, claimed: str | None = None,  # noqa: ANN001
              option: str = "--user"):  # noqa: ANN202
    from audit.identity import IdentityError, resolve
    try:
        return resolve(settings.api_tokens_file, claimed_user=claimed, option=option)
    except IdentityError as exc:
        raise _Refused(str(exc)) from None


# ---- serve ------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from dermgate.service import Service
    rt = _runtime(args)
    roles = set(args.roles.split(","))
    service = Service(rt, roles=roles, workers=args.workers)
    stop = threading.Event()

    def _graceful(signum: int, _frame: object) -> None:
        stop.set()
    signal.signal(signal.SIGTERM, _graceful)
    signal.signal(signal.SIGINT, _graceful)
    service.start()
    print(f"dermgate {__version__} serving ({', '.join(sorted(roles))}); work dir {rt.settings.workdir}",
          file=sys.stderr)
    stop.wait()
    service.stop()
    rt.close()
    return 0


# ---- jobs / outbox ----------------------------------------------------------------------------

def cmd_jobs(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from audit.api import AuditEvent, EventType, Outcome
    from dermgate.db import Instance, Job, JobState, utcnow
    settings = _logged_settings(args)
    who = _identity(args, settings, args.user)
    from dermgate.app import Runtime
    rt = Runtime(settings, create=args.command in CREATES_WORKDIR)
    with rt.sessions.begin() as s:
        if args.action == "list":
            q = select(Job, Instance).join(Instance, Instance.id == Job.instance_id).order_by(Job.id)
            if args.state:
                q = q.where(Job.state == JobState(args.state))
            rows = [(j.id, j.state.value, j.attempts, (i.sop_instance_uid or "")[-24:],
                     (j.result or {}).get("top_class", ""), (j.result or {}).get("risk", ""),
                     f"RECALLED #{j.recall_id}" if j.recall_id else "",
                     j.updated_at.strftime("%Y-%m-%d %H:%M:%S"), (j.last_error or "")[:60])
                    for j, i in s.execute(q.limit(args.limit))]
            print(_table(rows, ["id", "state", "tries", "sop uid (tail)", "top", "risk", "recall", "updated",
                                "last error"]))
            return 0
        ids = args.ids or [j.id for j in s.scalars(select(Job).where(Job.state == JobState.FAILED))]
        n = 0
        for job in s.scalars(select(Job).where(Job.id.in_(ids))):
            if job.state != JobState.FAILED:
                continue
            job.state = JobState.CLASSIFIED if job.result else JobState.RECEIVED
            job.attempts, job.next_attempt_at, job.lease_owner, job.lease_expires_at = 0, utcnow(), None, None
            n += 1
    rt.audit.record(AuditEvent(event=EventType.JOB_ADMIN, outcome=Outcome.SUCCESS, actor=who.actor,
                               actor_role=who.role, action="U", detail={"retry_jobs": ids[:100], "count": n}))
    print(f"{n} job(s) queued for retry")
    return 0


def cmd_outbox(args: argparse.Namespace) -> int:
    from sqlalchemy import delete, select

    from audit.api import AuditEvent, EventType, Outcome
    from dermgate.db import OutboxItem, OutboxState, utcnow
    settings = _logged_settings(args)
    who = _identity(args, settings, args.user)
    from dermgate.app import Runtime
    rt = Runtime(settings, create=args.command in CREATES_WORKDIR)
    with rt.sessions.begin() as s:
        if args.action == "list":
            q = select(OutboxItem).order_by(OutboxItem.id)
            if args.state:
                q = q.where(OutboxItem.state == OutboxState(args.state))
            rows = [(o.id, o.channel, o.kind, o.state.value, o.attempts,
                     o.next_attempt_at.strftime("%H:%M:%S"), o.remote_ref, (o.last_error or "")[:60])
                    for o in s.scalars(q.limit(args.limit))]
            print(_table(rows, ["id", "channel", "kind", "state", "tries", "next", "remote", "last error"]))
            return 0
        if args.action == "retry":
            q = select(OutboxItem).where(OutboxItem.state == OutboxState.DEAD)
            if args.ids:
                q = q.where(OutboxItem.id.in_(args.ids))
            items = list(s.scalars(q))
            for o in items:
                o.state, o.attempts, o.next_attempt_at = OutboxState.PENDING, 0, utcnow()
            s.flush()
            _reopen_jobs(s, {o.job_id for o in items if o.job_id is not None})
            detail = {"retry": [o.id for o in items][:100], "count": len(items)}
        else:  # purge: delivered rows older than --older-than-days (payloads hold PHI)
            cutoff = utcnow() - timedelta(days=args.older_than_days)
            res = s.execute(delete(OutboxItem).where(OutboxItem.state == OutboxState.SENT,
                                                     OutboxItem.sent_at < cutoff))
            detail = {"purged": res.rowcount, "older_than_days": args.older_than_days}
    rt.audit.record(AuditEvent(event=EventType.JOB_ADMIN, outcome=Outcome.SUCCESS, actor=who.actor,
                               actor_role=who.role, action="U" if args.action == "retry" else "D",
                               detail={"outbox": args.action, **detail}))
    print(detail)
    return 0


def _reopen_jobs(s, job_ids: set[int]) -> None:  # noqa: ANN001 - a Session
    """A job that failed only in delivery goes back to ``rendered`` once none of its deliveries is
    dead any more, so the dispatcher marks it ``delivered`` when the retried ones succeed."""
    from sqlalchemy import func, select

    from dermgate.db import Job, JobState, OutboxItem, OutboxState
    for job in s.scalars(select(Job).where(Job.id.in_(job_ids), Job.state == JobState.FAILED)):
        dead = s.scalar(select(func.count()).select_from(OutboxItem).where(
            OutboxItem.job_id == job.id, OutboxItem.state == OutboxState.DEAD))
        if dead == 0 and job.outputs is not None:
            job.state, job.last_error = JobState.RENDERED, None


# ---- review -----------------------------------------------------------------------------------

def cmd_review(args: argparse.Namespace) -> int:
    """The reviewer is the OS user (``os:<user>``) or the clinician whose API token is in
    ``$DERMGATE_API_TOKEN``; ``--reviewer`` must name that same person."""
    from dermgate.app import Runtime
    from dermgate.review import ReviewError, submit_review
    settings = _logged_settings(args)
    who = _identity(args, settings, args.reviewer, "--reviewer")
    if who.via == "token" and who.role != "clinician":
        raise _Refused(f"the API token of {who.actor} has role {who.role}; only a clinician may review")
    rt = Runtime(settings, create=args.command in CREATES_WORKDIR)
    try:
        review = submit_review(rt, args.sop_instance_uid, reviewer=who.actor, role=who.role,
                               decision="override" if args.override else "confirm",
                               diagnosis=args.override, comment=args.comment)
    except ReviewError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"review {review['id']} recorded ({review['decision']}); report update queued")
    return 0


# ---- misc -------------------------------------------------------------------------------------

def cmd_evaluate(args: argparse.Namespace) -> int:
    from inference.engine import Engine
    from inference.evaluate import run_evaluate
    metrics = run_evaluate(Path(args.images), Path(args.labels), Path(args.out), Engine(tta=args.tta))
    import json
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}, indent=2))
    return 0


def cmd_verify_model(args: argparse.Namespace) -> int:
    from inference.engine import Engine
    from inference.errors import InferenceError
    try:
        eng = Engine(args.model_dir, warmup=True)
    except InferenceError as exc:
        print(f"model verification FAILED: {exc}", file=sys.stderr)
        return 1
    info = eng.model_info
    print(f"model {info.name} {info.version} sha256 {info.sha256} OK; providers {eng.providers}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from dermgate.migrate import upgrade
    settings = _settings(args)
    settings.workdir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.db_url)
    print("database schema is at head")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import json
    print(json.dumps(_settings(args).public_dict(), indent=2))
    return 0


def cmd_api_token(args: argparse.Namespace) -> int:
    """Issue, list or revoke HTTP API bearer tokens. Only sha256 digests are stored (0600);
    a new token is printed once. Every change is audited."""
    import json
    import secrets

    from audit.api import AuditEvent, EventType, Outcome
    from dermgate.api.deps import ROLES, hash_token, load_tokens
    from dermgate.db import utcnow
    from dermgate.durable import write_atomic
    settings = _logged_settings(args)   # tokens file and audit trail only: no database, no migrations
    who = _identity(args, settings, args.user)
    path = settings.api_tokens_file
    tokens = load_tokens(path)
    if args.action == "list":
        from dermgate.api.security import token_expiry
        now = utcnow()

        def _expiry(entry: dict) -> tuple[str, str]:
            expires = token_expiry(entry, settings.api.token_lifetime_days)
            if expires is None:
                return "", "expired (no lifetime: reissue)"
            return expires.isoformat(timespec="seconds"), "expired" if expires <= now else "valid"
        rows = [(v["user"], v["role"], v.get("created", ""), *_expiry(v), k[:12])
                for k, v in sorted(tokens.items(), key=lambda kv: kv[1]["user"])]
        print(_table(rows, ["user", "role", "created", "expires", "status", "sha256 (head)"]))
        return 0
    if not args.name:
        print("error: --name is required", file=sys.stderr)
        return 2
    if args.action == "add":
        if args.role not in ROLES:
            print(f"error: --role must be one of {', '.join(ROLES)}", file=sys.stderr)
            return 2
        days = args.days if args.days is not None else settings.api.token_lifetime_days
        if not days > 0:
            print("error: --days must be positive", file=sys.stderr)
            return 2
        token = secrets.token_urlsafe(32)
        issued = utcnow()
        expires = issued + timedelta(days=days)
        tokens[hash_token(token)] = {"user": args.name, "role": args.role, "created": issued.isoformat(),
                                     "expires": expires.isoformat()}
    else:
        before = len(tokens)
        tokens = {k: v for k, v in tokens.items() if v["user"] != args.name}
        if len(tokens) == before:
            print(f"no token for {args.name}", file=sys.stderr)
            return 1
    from dermgate.app import open_audit
    audit = open_audit(settings)
    try:
        write_atomic(path, json.dumps(tokens, indent=1).encode(), mode=0o600, dir_mode=0o700)
        audit.record(AuditEvent(event=EventType.KEY_CHANGE, outcome=Outcome.SUCCESS, actor=who.actor,
                                actor_role=who.role, action="C" if args.action == "add" else "D",
                                detail={"api_token": args.action, "for_user": args.name,
                                        "role": getattr(args, "role", None),
                                        **({"expires": expires.isoformat()} if args.action == "add" else {})}))
    finally:
        audit.close()
    if args.action == "add":
        print(token)
        print(f"token for {args.name} ({args.role}) issued, valid until {expires.isoformat(timespec='seconds')}; "
              "it is shown only this once", file=sys.stderr)
    else:
        print(f"tokens of {args.name} revoked", file=sys.stderr)
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    """The store's encryption key (create, rotate: audited) and reading one stored file (audited)."""
    from audit.api import AuditEvent, EventType, Outcome
    from dermgate.app import open_audit
    from dermgate.store import ObjectStore, create_store_key, store_cipher
    settings = _logged_settings(args)
    path = settings.store_key_file
    if args.action == "cat":
        if not args.path:
            print("error: cat needs the file's path (relative to the store, or absolute)", file=sys.stderr)
            return 2
        target = Path(args.path)
        bundles = settings.fhir_bundle_dir
        inside_bundles = bundles is not None and target.is_absolute() and bundles in target.parents
        store = ObjectStore(bundles if inside_bundles else settings.store_dir, store_cipher(settings))
        data = store.read_at(target) if target.is_absolute() else store.read(args.path)
    audit = open_audit(settings)
    try:
        if args.action == "cat":
            audit.record(AuditEvent(event=EventType.API_ACCESS, outcome=Outcome.SUCCESS, actor=args.user,
                                    actor_role="operator", action="R",
                                    detail={"what": "store cat", "path": store.rel(target)}))
            sys.stdout.buffer.write(data)
            return 0
        if args.action == "init-key":
            create_store_key(path)
            detail = {"store_key": "created", "file": str(path)}
        else:
            from audit.keys import FileKeyProvider
            old, new = FileKeyProvider(path).rotate()
            detail = {"store_key": "rotated", "file": str(path), "old_key_id": old, "new_key_id": new}
        audit.record(AuditEvent(event=EventType.KEY_CHANGE, outcome=Outcome.SUCCESS, actor=args.user,
                                actor_role="operator", action="C" if args.action == "init-key" else "U",
                                detail=detail))
    finally:
        audit.close()
    print(f"store key {detail['store_key']}: {path}", file=sys.stderr)
    return 0


def cmd_user(args: argparse.Namespace) -> int:
    """Local console accounts (Argon2id). A new or reset password is read from stdin with
    --password-stdin, else generated and printed once. Every change is audited."""
    import secrets

    from audit.api import AuditEvent, EventType, Outcome
    from dermgate.console.accounts import AccountError, Accounts, console_key, totp_uri
    rt = _runtime(args)
    accounts = Accounts(rt.sessions, rt.settings.console, console_key(rt.settings.workdir))
    try:
        if args.action == "list":
            rows = [(a.username, a.role, a.display_name or "", "disabled" if a.disabled else "active",
                     a.locked_until.strftime("%Y-%m-%d %H:%M") if a.locked_until else "", "yes" if a.totp else "no",
                     a.practitioner_reference or "", a.last_login_at.strftime("%Y-%m-%d %H:%M") if a.last_login_at
                     else "") for a in accounts.list()]
            print(_table(rows, ["user", "role", "name", "state", "locked until", "totp", "practitioner",
                                "last sign-in"]))
            return 0
        if not args.name:
            print("error: the user name is required", file=sys.stderr)
            return 2
        password = None
        if args.action in ("add", "reset"):
            generated = not args.password_stdin
            password = sys.stdin.readline().rstrip("\n") if args.password_stdin else secrets.token_urlsafe(15)
        secret = None
        if args.action == "add":
            secret = accounts.add(args.name, args.role, password or "", display_name=args.display_name,
                                  practitioner_reference=args.practitioner, totp=args.totp)
        elif args.action == "reset":
            secret = accounts.reset(args.name, password or "", totp=True if args.totp else None)
        else:
            accounts.set_disabled(args.name, args.action == "disable")
    except AccountError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rt.audit.record(AuditEvent(event=EventType.USER_ADMIN, outcome=Outcome.SUCCESS, actor=args.user,
                               actor_role="admin", action="C" if args.action == "add" else "U",
                               detail={"user_admin": args.action, "for_user": args.name,
                                       "role": args.role if args.action == "add" else None,
                                       "totp": bool(secret)}))
    if password and generated:
        print(f"password for {args.name}: {password}  (shown only this once)")
    if secret:
        print(f"TOTP secret for {args.name}: {secret}\n  {totp_uri(secret, args.name)}")
    print(f"user {args.name}: {args.action} done", file=sys.stderr)
    rt.close()
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from audit.cli import run
    if args.audit_command == "init-keys":
        return int(run(args, None) or 0)
    from dermgate.app import open_audit
    settings = _logged_settings(args)
    pin = getattr(args, "pin_key", None)
    # the trail and its anchor row: no migrations (a compliance officer's command changes no schema)
    audit = open_audit(settings, public_key_files=[pin] if pin else [])
    try:
        return int(run(args, audit.trail, tokens_file=settings.api_tokens_file) or 0)
    finally:
        audit.close()


class _WithParents:
    """Adds common options (``--workdir``) to sub-commands another package defines."""

    def __init__(self, subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
        self._sub, self._parents = subparsers, parents

    def add_parser(self, name: str, **kwargs: object) -> argparse.ArgumentParser:
        kwargs["parents"] = [*kwargs.get("parents", []), *self._parents]  # type: ignore[misc]
        return self._sub.add_parser(name, **kwargs)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dermgate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"dermgate {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workdir", help="work dir (default: $DERMGATE_WORKDIR or the current directory)")
    common.add_argument("--user", default=None,
                        help="who is acting; recorded only when $DERMGATE_API_TOKEN is that user's token "
                             "(default: the OS user, recorded as os:<user>)")
    common.add_argument("-v", "--verbose", action="store_true", help="also log to stderr")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", parents=[common], help="run the service")
    s.add_argument("--roles", default="scp,worker,dispatcher,api",
                   help="comma-separated subset of scp,worker,dispatcher,api (scale-out: run them apart)")
    s.add_argument("--workers", type=int, default=1, help="worker threads in this process")
    s.set_defaults(func=cmd_serve)

    from dermgate.demo import add_arguments as demo_args, cmd_demo
    d = sub.add_parser("demo", parents=[common], help="run the whole path on loopback with the samples")
    demo_args(d)
    d.set_defaults(func=cmd_demo)

    j = sub.add_parser("jobs", parents=[common], help="list or retry jobs")
    j.add_argument("action", choices=["list", "retry"])
    j.add_argument("ids", nargs="*", type=int, help="job ids to retry (default: all failed)")
    j.add_argument("--state", choices=["received", "classified", "rendered", "delivered", "failed"])
    j.add_argument("--limit", type=int, default=200)
    j.set_defaults(func=cmd_jobs)

    o = sub.add_parser("outbox", parents=[common], help="list, retry or purge deliveries")
    o.add_argument("action", choices=["list", "retry", "purge"])
    o.add_argument("ids", nargs="*", type=int, help="outbox ids to retry (default: all dead)")
    o.add_argument("--state", choices=["pending", "sent", "dead"])
    o.add_argument("--limit", type=int, default=200)
    o.add_argument("--older-than-days", type=float, default=30.0, help="purge: sent rows older than this")
    o.set_defaults(func=cmd_outbox)

    r = sub.add_parser("review", parents=[common], help="confirm or override an AI result")
    r.add_argument("sop_instance_uid", help="SOP Instance UID of the reviewed image")
    r.add_argument("--reviewer", help="the clinician; accepted only with that clinician's API token in "
                                      "$DERMGATE_API_TOKEN (default: the OS user, recorded as os:<user>)")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--confirm", action="store_true")
    g.add_argument("--override", choices=["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
                   help="the clinician's diagnosis")
    r.add_argument("--comment")
    r.set_defaults(func=cmd_review)

    e = sub.add_parser("evaluate", help="evaluate the model on labelled images")
    e.add_argument("--images", required=True)
    e.add_argument("--labels", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time augmentation (default: as the manifest says)")
    e.set_defaults(func=cmd_evaluate)

    v = sub.add_parser("verify-model", help="verify the model file against its manifest and load it")
    v.add_argument("--model-dir", type=Path)
    v.set_defaults(func=cmd_verify_model)

    m = sub.add_parser("migrate", parents=[common], help="create or upgrade the database schema")
    m.set_defaults(func=cmd_migrate)

    t = sub.add_parser("api-token", parents=[common], help="issue, list or revoke HTTP API bearer tokens")
    t.add_argument("action", choices=["add", "list", "revoke"])
    t.add_argument("--name", help="the person or system the token is for")
    t.add_argument("--role", default="clinician", help="clinician, compliance, operator or modality (STOW-RS)")
    t.add_argument("--days", type=float, help="add: lifetime in days (default: api.token_lifetime_days, 90)")
    t.set_defaults(func=cmd_api_token)

    k = sub.add_parser("store", parents=[common], help="store encryption key; read a stored file decrypted")
    k.add_argument("action", choices=["init-key", "rotate-key", "cat"])
    k.add_argument("path", nargs="?", help="cat: a stored file (relative to the store, or absolute)")
    k.set_defaults(func=cmd_store)

    u = sub.add_parser("user", parents=[common], help="local console accounts (add, list, disable, enable, reset)")
    u.add_argument("action", choices=["add", "list", "disable", "enable", "reset"])
    u.add_argument("name", nargs="?", help="the account's user name")
    u.add_argument("--role", default="clinician", choices=["clinician", "compliance", "operator", "admin"])
    u.add_argument("--display-name", help="the name shown in the console and in review reports")
    u.add_argument("--practitioner", help="FHIR Practitioner reference for reviews, e.g. Practitioner/123")
    u.add_argument("--totp", action="store_true", help="add: enrol a TOTP second factor; reset: a new one")
    u.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    u.set_defaults(func=cmd_user)

    c = sub.add_parser("config", parents=[common], help="show the effective settings (no secrets)")
    c.set_defaults(func=cmd_config)

    from dermgate.cli_outcomes import add_commands
    add_commands(sub, common, make_runtime=_runtime)

    workdir_only = argparse.ArgumentParser(add_help=False)
    workdir_only.add_argument("--workdir", help="work dir (default: $DERMGATE_WORKDIR or the current directory)")
    workdir_only.add_argument("-v", "--verbose", action="store_true", help="also log to stderr")
    a = sub.add_parser("audit", parents=[workdir_only], help="verify, search and export the audit trail")
    from audit.cli import add_arguments as audit_args
    audit_args(_WithParents(a.add_subparsers(dest="audit_command", required=True), [workdir_only]))
    a.set_defaults(func=cmd_audit)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from dermgate.app import WorkdirError
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (WorkdirError, _Refused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
