"""`chtsync superset bundle | import`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from chtsync.cli import load_config
from chtsync.config import Config
from chtsync.errors import ChtsyncError
from chtsync.superset import DatabaseURI, SupersetError, build_files, import_bundle, to_zip


def _uri(cfg: Config, args: argparse.Namespace) -> DatabaseURI:
    override = args.database_uri or os.environ.get("CHTSYNC_SUPERSET_DATABASE_URI")
    return DatabaseURI.parse(override) if override else DatabaseURI.from_config(cfg)


def cmd_bundle(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    try:
        uri = _uri(cfg, args)
        data = to_zip(build_files(cfg.schema, uri))
        Path(args.out).write_bytes(data)
    except (SupersetError, OSError) as exc:
        print(f"chtsync superset bundle: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({len(data)} bytes; schema {cfg.schema}; database {uri.masked})")
    return 0


def _changes(before: dict[str, int], after: dict[str, int]) -> Iterator[str]:
    for key in before:
        delta = after[key] - before[key]
        yield f"{key}s {after[key]}" + (f" ({delta:+d})" if delta else "")


def cmd_import(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    url = args.url or os.environ.get("SUPERSET_URL")
    user = args.user or os.environ.get("SUPERSET_USER")
    password = args.password or os.environ.get("SUPERSET_PASSWORD")
    try:
        password_file = args.password_file or os.environ.get("SUPERSET_PASSWORD_FILE")
        if not password and password_file:
            try:
                password = Path(password_file).read_text().rstrip("\r\n")
            except OSError as exc:
                raise SupersetError(f"cannot read {password_file}: {exc.strerror}") from None
        if not (url and user and password):
            raise SupersetError(
                "give --url, --user and --password (or SUPERSET_URL, SUPERSET_USER,"
                " SUPERSET_PASSWORD / SUPERSET_PASSWORD_FILE)"
            )
        uri = _uri(cfg, args)
        result = import_bundle(url, user, password, cfg.schema, uri, verify=not args.no_verify)
    except (SupersetError, ChtsyncError) as exc:
        text = str(exc)
        for secret in [*cfg.secrets(), password or ""]:
            if secret and len(secret) >= 3:
                text = text.replace(secret, "***")
        print(f"chtsync superset import: {text}", file=sys.stderr)
        return 1
    print(f"imported the CHT overview dashboard into {url} (database {uri.masked})")
    print("in Superset now: " + ", ".join(_changes(result.before, result.after)))
    if args.no_verify:
        return 0
    for name, error in sorted(result.failures.items()):
        print(f"chart {name!r}: data request failed: {error}", file=sys.stderr)
    ok = len(result.charts) - len(result.failures)
    print(f"{ok}/{len(result.charts)} charts answered their data request"
          f" ({url}/superset/dashboard/{result.dashboard_id}/)")
    return 1 if result.failures else 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("superset", help="the CHT overview dashboard for Apache Superset")
    cmds = p.add_subparsers(dest="superset_command", metavar="COMMAND")
    cmds.required = True
    uri_help = ("Postgres URI Superset should connect with, e.g. a read-only role"
                " (default: chtsync's own connection; env CHTSYNC_SUPERSET_DATABASE_URI)")

    b = cmds.add_parser("bundle", parents=[common], help="write the dashboard bundle (zip)")
    b.add_argument("--out", required=True, metavar="ZIP", help="file to write, e.g. cht.zip")
    b.add_argument("--database-uri", metavar="URI", help=uri_help)
    b.set_defaults(func=cmd_bundle)

    i = cmds.add_parser("import", parents=[common],
                        help="import the dashboard into a running Superset and check its charts")
    i.add_argument("--url", help="Superset's base URL, e.g. http://localhost:8088 (SUPERSET_URL)")
    i.add_argument("--user", help="Superset admin user (SUPERSET_USER)")
    i.add_argument("--password", help="its password (SUPERSET_PASSWORD)")
    i.add_argument("--password-file", metavar="PATH",
                   help="read the password from a file (SUPERSET_PASSWORD_FILE)")
    i.add_argument("--database-uri", metavar="URI", help=uri_help)
    i.add_argument("--no-verify", action="store_true",
                   help="skip asking every chart for its data after the import")
    i.set_defaults(func=cmd_import)
