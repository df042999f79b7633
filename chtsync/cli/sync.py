"""Commands of the sync engine and the service: migrate, sync, run."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from chtsync import migrate, service
from chtsync.cli import load_config
from chtsync.couch import short_seq
from chtsync.follower import SourceStats

log = logging.getLogger("chtsync")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("migrate", parents=[common], help="create or upgrade chtsync's own tables")
    p.add_argument("--dry-run", action="store_true", help="list pending migrations, change nothing")
    p.add_argument("--legacy-source", metavar="INSTANCE/DB",
                   help="source for rows CHT Sync before 2.0 stored without one (docs/switching.md)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("sync", parents=[common], help="follow every CouchDB database into Postgres")
    p.add_argument("--once", action="store_true",
                   help="stop when every database is caught up and print a summary")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("run", parents=[common],
                       help="the service: migrations, models, sync and refresh in one process")
    p.set_defaults(func=cmd_run)


def cmd_migrate(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if args.dry_run:
        plan = migrate.plan(cfg, args.legacy_source)
        if plan.adoption is not None and (plan.adoption.changed or plan.adoption.layout != "chtsync"):
            print("\n".join(plan.adoption.lines()))
        for mid in plan.pending:
            print(f"pending  {mid}")
        print(f"{len(plan.applied)} applied, {len(plan.pending)} pending (schema {cfg.schema})")
        return 0
    applied = migrate.apply(cfg, args.legacy_source)
    print(f"{len(applied)} migration(s) applied to schema {cfg.schema}" if applied
          else f"schema {cfg.schema} is up to date")
    return 0


async def _sync(args: argparse.Namespace) -> list[SourceStats]:
    cfg = load_config(args)
    stop = asyncio.Event()
    remove = service.install_signal_handlers(stop)
    try:
        if not await service.prepare(cfg, stop, models=False):
            return []  # stopped before the migrations were applied: nothing was followed
        return await service.follow_all(cfg, stop, once=args.once)
    finally:
        remove()


def cmd_sync(args: argparse.Namespace) -> int:
    started = time.monotonic()
    stats = asyncio.run(_sync(args))
    if args.once:
        elapsed = time.monotonic() - started
        print(f"{'source':<40} {'state':<10} {'written':>9} {'refused':>8} {'docs/s':>8}  seq")
        for s in stats:
            rate = s.docs_written / elapsed if elapsed > 0 else 0.0
            seq = short_seq(s.seq, 20)
            print(f"{s.source:<40} {s.state:<10} {s.docs_written:>9} {s.refused:>8} {rate:>8.0f}  {seq}")
    failed = [s for s in stats if s.state == "error"]
    for s in failed:
        print(f"chtsync: {s.source}: {s.reason}", file=sys.stderr)
    return 1 if failed else 0


async def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    stop = asyncio.Event()
    remove = service.install_signal_handlers(stop)
    try:
        return await service.serve(cfg, stop)
    finally:
        remove()


def cmd_run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))
