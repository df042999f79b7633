"""`chtsync models plan | apply | refresh | rebuild NAME | sql NAME | fields FORM | test [NAME...]`."""

from __future__ import annotations

import argparse

from chtsync import db, preflight, queries
from chtsync.cli import load_config
from chtsync.config import Config
from chtsync.errors import ConfigError
from chtsync.pipeline import datatests, forms, graph
from chtsync.pipeline.apply import Plan, apply, plan
from chtsync.pipeline.refresh import refresh_once
from chtsync.pipeline.session import autocommit
from chtsync.pipeline.shadow import rebuild


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

    p = msub.add_parser("sql", parents=[common], help="print a model's SQL (generated for form models)")
    p.add_argument("name", help="the model's name")
    p.set_defaults(func=cmd_sql)

    p = msub.add_parser("fields", parents=[common],
                        help="list the paths seen in a form's reports, with JSON types and frequency")
    p.add_argument("form", help="the form's name (the reports' `form`)")
    p.add_argument("--sample-rows", type=_at_least_one, default=forms.SAMPLE_ROWS, metavar="N",
                   help=f"read a sample when the raw table is larger than N rows (default {forms.SAMPLE_ROWS})")
    p.set_defaults(func=cmd_fields)

    p = msub.add_parser("test", parents=[common], help="run the models' data tests and record the results")
    p.add_argument("names", nargs="*", metavar="NAME", help="only these models (default: all)")
    p.set_defaults(func=cmd_test)


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


def _model(cfg: Config, name: str) -> graph.Model:
    model = graph.load(cfg).models.get(name)
    if model is None:
        raise ConfigError(f"model '{name}' is not an enabled model of {cfg.models}")
    return model


def _at_least_one(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of rows, at least 1, got {text!r}")
    return number


def cmd_sql(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    print(_model(cfg, args.name).spec.sql.rstrip())
    return 0


def cmd_fields(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    with db.connect(cfg, autocommit=True) as conn:
        seen, total, percent = forms.discover(conn, db.table_ident(cfg), f"{cfg.schema}.{cfg.table}", args.form,
                                              args.sample_rows)
    sampled = f" (a {percent:g}% sample of {cfg.table})" if percent else ""
    if not total:
        print(f"no report of form '{args.form}'{sampled}")
        return 1
    print(f"{total} report(s) of form '{args.form}'{sampled}")
    width = max(len(f.path) for f in seen)
    for f in seen:
        print(f"{f.path:<{width}}  {f.types:<16} {f.reports:>8} {100 * f.reports / total:6.1f}%")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    pipeline = graph.load(cfg)
    names = args.names or list(pipeline.models)
    for name in names:
        if name not in pipeline.models:
            raise ConfigError(f"model '{name}' is not an enabled model of {cfg.models}")
    with db.connect(cfg) as conn, autocommit(conn):
        if not conn.execute(queries.get("has_tests_table")).fetchone()[0]:
            raise ConfigError(f"schema {cfg.schema} has no chtsync_model_tests table: run `chtsync migrate`")
        results = datatests.run(conn, pipeline, names)
    for r in results:
        failures = "" if r.failures is None else str(r.failures)
        print(f"{r.status:<6} {r.model:<28} {r.name:<32} {failures:>8}  {r.message}".rstrip())
    counts = {s: sum(1 for r in results if r.status == s) for s in ("pass", "warn", "fail", "error")}
    print(", ".join(f"{n} {s}" for s, n in counts.items()) if results else "no data tests declared")
    return 1 if counts["fail"] or counts["error"] else 0
