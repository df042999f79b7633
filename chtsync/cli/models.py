"""`chtsync models plan | apply | refresh | rebuild NAME`."""

from __future__ import annotations

import argparse

from chtsync import db, preflight
from chtsync.cli import load_config
from chtsync.pipeline.apply import Plan, apply, plan
from chtsync.pipeline.refresh import rebuild, refresh_once


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    models = sub.add_parser("models", help="create, change and refresh the SQL models")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION")
    msub.required = True

    p = msub.add_parser("plan", parents=[common], help="list what apply would create, replace or drop")
    p.set_defaults(func=cmd_plan)

    p = msub.add_parser("apply", parents=[common], help="make the schema match models.yaml (one transaction)")
    p.add_argument("--adopt", action="store_true",
                   help="replace existing objects of the models' names that chtsync did not create")
    p.set_defaults(func=cmd_apply)

    p = msub.add_parser("refresh", parents=[common], help="refresh the models whose inputs changed")
    p.add_argument("--force", action="store_true", help="refresh every model, ignoring change checks and intervals")
    p.set_defaults(func=cmd_refresh)

    p = msub.add_parser("rebuild", parents=[common], help="recompute one model from scratch")
    p.add_argument("name", help="the model's name")
    p.set_defaults(func=cmd_rebuild)


def _print_plan(result: Plan) -> None:
    for step in result.steps:
        print(f"{step.action:<10} {step.name:<32} {step.kind:<18} {step.reason}".rstrip())


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    with db.connect(cfg) as conn:
        preflight.require_migrated(cfg, conn)
        result = plan(cfg, conn)
    _print_plan(result)
    if result.conflicts:
        print(f"not created by chtsync (apply needs --adopt): {', '.join(result.conflicts)}")
    print(result.summary())
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    with db.connect(cfg) as conn:
        preflight.require_migrated(cfg, conn)
        result = apply(cfg, conn, adopt=args.adopt)
    _print_plan(result)
    print(f"applied: {result.summary()}" if result.changed else "models are up to date")
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    with db.connect(cfg) as conn:
        preflight.require_migrated(cfg, conn)
        results = refresh_once(cfg, conn, force=args.force)
    for r in results:
        rows = "" if r.rows is None else str(r.rows)
        detail = r.error or ("" if r.changed is None else f"{r.changed} document(s) re-derived")
        print(f"{r.status:<10} {r.name:<32} {rows:>10} {r.duration_ms:>8.0f} ms  {detail}".rstrip())
    return 1 if any(r.status in ("error", "blocked", "unapplied") for r in results) else 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    with db.connect(cfg) as conn:
        preflight.require_migrated(cfg, conn)
        r = rebuild(cfg, conn, args.name)
    print(f"rebuilt {r.name} ({r.kind}): {'' if r.rows is None else r.rows} rows in {r.duration_ms:.0f} ms")
    return 0
