"""The `chtsync` command line: argparse, configuration loading, printing and exit codes.

Each command group lives in a module of this package and registers itself here. Nothing outside
chtsync/cli/ imports it; the engine modules return results and raise chtsync.errors types.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

import psycopg

from chtsync import __version__, logs
from chtsync.config import Config, load
from chtsync.errors import ChtsyncError

# Modules exposing `register(subparsers)`; each adds its commands with set_defaults(func=...).
# A command function takes (args) and returns an exit code.
COMMAND_MODULES = [
    "chtsync.cli.sync",
    "chtsync.cli.status",
    "chtsync.cli.grant",
    "chtsync.cli.superset",
    "chtsync.cli.sample",
    "chtsync.cli.models",
    "chtsync.cli.demo",
    "chtsync.cli.verify",
]

log = logging.getLogger("chtsync")


def load_config(args: argparse.Namespace) -> Config:
    """The configuration for a command, with logging set up from it (secrets masked)."""
    cfg = load(getattr(args, "config", None))
    logs.setup(cfg.log_level, cfg.log_format, cfg.secrets())
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chtsync",
        description="Follow CHT CouchDB databases into PostgreSQL and keep SQL models fresh.",
    )
    parser.add_argument("--version", action="version", version=f"chtsync {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", metavar="PATH",
        help="config.yaml to read (default: ./config.yaml if present, or CHTSYNC_CONFIG)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    parser.set_defaults(common_parent=common)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logs.setup()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ChtsyncError as exc:
        print(f"chtsync: {exc}", file=sys.stderr)
        return exc.exit_code
    except psycopg.errors.InsufficientPrivilege as exc:
        # Whatever statement met it, a missing grant is the admin's to fix, in one line.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "permission denied"
        print(f"chtsync: POSTGRES_USER: Postgres refused: {reason}: grant it to chtsync's role, or run"
              " chtsync as the owner of its schema", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
