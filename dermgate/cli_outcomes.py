"""``dermgate outcomes``, ``dermgate monitor`` and ``dermgate model``: the post-market commands.

    dermgate outcomes import FILE.csv      accession_number, diagnosis, date[, source, fitzpatrick]
    dermgate outcomes list [--unlinked] [--json]
    dermgate outcomes link OUTCOME_ID SOP_UID | --auto      a person links; --auto retries the rules
    dermgate outcomes unlink OUTCOME_ID SOP_UID
    dermgate outcomes pull-fhir            pathology DiagnosticReports of patients with AI results
    dermgate monitor report [--since DATE] [--json] [--out DIR]
    dermgate model recall --version V --reason TEXT

Registered into the ``dermgate`` parser by :func:`add_commands` (one line in dermgate/cli.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _runtime(args: argparse.Namespace) -> Any:
    """The CLI's runtime factory, handed over by ``add_commands`` (no import of dermgate.cli: no cycle)."""
    return args.make_runtime(args)


def cmd_outcomes(args: argparse.Namespace) -> int:
    from dermgate import outcomes as oc
    rt = _runtime(args)
    window = rt.settings.outcomes.link_window_days
    try:
        if args.action == "import":
            if not args.args:
                print("error: outcomes import FILE.csv", file=sys.stderr)
                return 2
            report = oc.import_csv(rt.sessions, rt.audit, Path(args.args[0]), actor=args.user, window_days=window)
            print(json.dumps(report.to_json(), indent=1))
            return 1 if report.errors and not report.created and not report.duplicates else 0
        if args.action == "list":
            rows = oc.list_outcomes(rt.sessions, unlinked_only=args.unlinked, limit=args.limit)
            if args.json:
                print(json.dumps(rows, indent=1))
                return 0
            from dermgate.tables import table
            print(table([(r["id"], r["date"], r["diagnosis"], r["source"], r["accession_number"],
                           r["fitzpatrick"], ", ".join(f"{lk['sop_instance_uid'][-20:]} ({lk['method']})"
                                                       for lk in r["links"]) or "UNLINKED")
                          for r in rows], ["id", "date", "diagnosis", "source", "accession", "fitz", "linked to"]))
            return 0
        if args.action == "link" and args.auto:
            print(json.dumps(oc.relink(rt.sessions, rt.audit, actor=args.user, window_days=window)))
            return 0
        if args.action in ("link", "unlink"):
            if len(args.args) != 2 or not args.args[0].isdigit():
                print(f"error: outcomes {args.action} OUTCOME_ID SOP_INSTANCE_UID", file=sys.stderr)
                return 2
            fn = oc.link_manual if args.action == "link" else oc.unlink
            changed = fn(rt.sessions, rt.audit, int(args.args[0]), args.args[1], actor=args.user)
            print(f"{args.action}ed" if changed else f"nothing to {args.action}")
            return 0
        # pull-fhir
        from dermgate.outcomes_fhir import pull_fhir
        print(json.dumps(pull_fhir(rt, actor=args.user), indent=1))
        return 0
    except oc.OutcomeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def cmd_monitor(args: argparse.Namespace) -> int:
    from dermgate.monitor import build_report, jsonable, write_report
    from dermgate.outcomes import parse_date
    rt = _runtime(args)
    since = parse_date(args.since) if args.since else None
    report = build_report(rt, since=since)
    if args.out:
        path = write_report(report, Path(args.out))
        print(f"report written to {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(jsonable(report["summary"] | {"report": report})))
    elif not args.out:
        from dermgate.monitor import text_summary
        print(text_summary(report))
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from dermgate.recall import RecallError, recall_model
    rt = _runtime(args)
    try:
        out = recall_model(rt, version=args.version, reason=args.reason, actor=args.user,
                           fhir_action=args.fhir_action)
    except RecallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1))
    return 0


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
                 make_runtime: Any) -> None:
    o = sub.add_parser("outcomes", parents=[common], help="import, list and link outcomes (histopathology truth)")
    o.add_argument("action", choices=["import", "list", "link", "unlink", "pull-fhir"])
    o.add_argument("args", nargs="*", help="import: FILE.csv; link/unlink: OUTCOME_ID SOP_INSTANCE_UID")
    o.add_argument("--unlinked", action="store_true", help="list: only outcomes linked to no result")
    o.add_argument("--auto", action="store_true", help="link: retry the automatic rules for unlinked outcomes")
    o.add_argument("--json", action="store_true")
    o.add_argument("--limit", type=int, default=500)
    o.set_defaults(func=cmd_outcomes, make_runtime=make_runtime)

    m = sub.add_parser("monitor", parents=[common], help="live performance, drift and alarms")
    m.add_argument("action", choices=["report"])
    m.add_argument("--since", help="only results on or after this date (YYYY-MM-DD)")
    m.add_argument("--json", action="store_true", help="print one JSON object")
    m.add_argument("--out", help="write report.html with its plots into this folder")
    m.set_defaults(func=cmd_monitor, make_runtime=make_runtime)

    md = sub.add_parser("model", parents=[common], help="model life cycle: recall a model version")
    md.add_argument("action", choices=["recall"])
    md.add_argument("--version", required=True, help="the model version whose results are recalled")
    md.add_argument("--reason", required=True, help="why (sent to the EHR and the PACS, audited)")
    md.add_argument("--fhir-action", choices=["entered-in-error", "amended"], default=None,
                    help="default: recall.fhir_action in the settings")
    md.set_defaults(func=cmd_model, make_runtime=make_runtime)
