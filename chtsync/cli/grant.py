"""`chtsync grant-reader ROLE`."""

from __future__ import annotations

import argparse
import getpass
import os

from chtsync.cli import load_config
from chtsync.config import IDENT, ConfigError
from chtsync.grant import grant_reader


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("grant-reader", parents=[common],
                       help="create a read-only role for Superset, limited to the model schema")
    p.add_argument("role", help="role name, e.g. superset_reader")
    p.add_argument("--password-env", metavar="VAR",
                   help="let the role log in with the password in this environment variable")
    p.add_argument("--ask-password", action="store_true", help="let the role log in; ask for its password")
    p.add_argument("--with-raw", action="store_true", help="also allow reading the raw documents table")
    p.set_defaults(func=cmd_grant_reader)


def cmd_grant_reader(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if not IDENT.match(args.role):
        raise ConfigError(f"role name {args.role!r}: use letters, digits and underscores")
    if args.role.lower() in ("public", "none") or args.role.lower().startswith("pg_"):
        raise ConfigError(f"role name {args.role!r} is reserved by Postgres: choose another, e.g. superset_reader")
    password = None
    if args.password_env:
        password = os.environ.get(args.password_env)
        if not password:
            raise ConfigError(f"--password-env: {args.password_env} is not set")
    elif args.ask_password:
        password = getpass.getpass(f"password for {args.role}: ")
    for line in grant_reader(cfg, args.role, password, args.with_raw):
        print(line)
    return 0
