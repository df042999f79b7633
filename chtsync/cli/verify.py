"""`chtsync verify [--repair]`: run chtsync.verify and print its reports."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

import psycopg

from chtsync import db
from chtsync.cli import load_config
from chtsync.verify import KINDS, MISSING, PAGE_SIZE, STALE, VANISHED, SourceReport, exit_code, verify


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "verify", parents=[common],
        help="compare every CouchDB database with Postgres (ids and revisions); --repair fixes",
        description="Compare each CouchDB database with Postgres without stopping the sync. "
                    "Exit code 0 when equal, 1 when they differ, 2 when a database could not be "
                    "verified.",
    )
    p.add_argument("--repair", action="store_true",
                   help="fetch missing and stale documents, mark vanished ones deleted, re-verify")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--source", action="append", default=[], metavar="NAME",
                   help="only this database (db name or instance/db); repeatable")
    p.add_argument("--page-size", type=int, default=PAGE_SIZE, metavar="N",
                   help=f"_all_docs rows per page (default {PAGE_SIZE})")
    p.add_argument("--settle", type=float, default=1.0, metavar="SECONDS",
                   help="time the live sync gets before differences are rechecked (default 1)")
    p.add_argument("--max-ids", type=int, default=1000, metavar="N",
                   help="ids listed per kind in --json output (default 1000)")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    known = {d for s in cfg.sources for d in s.dbs} | {s.source_name(d) for s in cfg.sources for d in s.dbs}
    unknown = [name for name in args.source if name not in known]
    if unknown:
        print(f"chtsync: --source {unknown[0]}: not a configured database ({', '.join(sorted(known))})",
              file=sys.stderr)
        return 2
    try:
        reports = asyncio.run(verify(
            cfg, repair=args.repair, only=args.source, page_size=args.page_size, settle=args.settle))
    except psycopg.OperationalError as exc:
        print(f"chtsync: {db.describe_error(cfg, exc)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({
            "equal": all(r.equal for r in reports),
            "repair": args.repair,
            "sources": [r.as_json(args.max_ids) for r in reports],
        }, indent=2))
    else:
        print_table(reports, repair=args.repair)
    return exit_code(reports)


def _pair(a: int | None, b: int | None) -> str:
    return "-" if a is None else f"{a}/{b or 0}"


def print_table(reports: Sequence[SourceReport], *, repair: bool, out: Any = None) -> None:
    out = out or sys.stdout
    width = max([len("source"), *(len(r.source) for r in reports)])
    head = (f"{'source':<{width}}  {'couch docs/del':>15} {'pg docs/del':>15} {'missing':>8}"
            f" {'stale':>6} {'vanished':>8} {'repaired':>8}  {'result':<9} {'time':>7}")
    print(head, file=out)
    for r in reports:
        repaired = "-" if r.repaired is None else str(r.repaired)
        print(f"{r.source:<{width}}  {_pair(r.couch_docs, r.couch_deleted):>15}"
              f" {_pair(r.pg_docs, r.pg_deleted):>15} {r.count(MISSING):>8} {r.count(STALE):>6}"
              f" {r.count(VANISHED):>8} {repaired:>8}  {r.result():<9} {r.seconds:>6.1f}s", file=out)
    for r in reports:
        if r.error or r.skipped:
            print(f"  {r.source}: {r.error or r.skipped}", file=out)
            continue
        for kind in KINDS:
            ids = r.ids(kind, "remaining" if repair else "found")
            if ids:
                more = f" … (+{len(ids) - 5})" if len(ids) > 5 else ""
                label = f"{kind} (left after repair)" if repair else kind
                print(f"  {r.source}: {label}: {', '.join(ids[:5])}{more}", file=out)
        if r.refused:
            print(f"  {r.source}: {r.refused} document(s) refused by Postgres (see chtsync_errors)",
                  file=out)
