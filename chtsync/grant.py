"""`chtsync grant-reader ROLE`: a read-only role for Superset, limited to the model schema.

The raw table and chtsync_errors (which hold whole documents) are withheld unless --with-raw:
the models are views and tables owned by chtsync, so the role reads them without reading the
documents behind them.
"""

from __future__ import annotations

import argparse
import getpass
import os

from psycopg import sql

from chtsync import db, preflight, queries
from chtsync.config import IDENT, Config, ConfigError

WITHHELD = ("chtsync_errors",)  # plus the raw table


def grant_reader(cfg: Config, role: str, password: str | None = None, with_raw: bool = False) -> list[str]:
    """Create (if needed) and grant the role; return what was done, for the user."""
    done = []
    ident = {"role": sql.Identifier(role), "schema": sql.Identifier(cfg.schema)}
    with db.connect(cfg) as conn, conn.transaction():
        preflight.require_migrated(cfg, conn)
        preflight.require_create_role(conn, role)
        if not conn.execute(queries.get("role_exists"), (role,)).fetchone():
            conn.execute(queries.compose("create_role", **ident))
            done.append(f"created role {role}")
        if password:
            conn.execute(queries.compose("set_login_password", password=sql.Literal(password), **ident))
            done.append(f"role {role} may log in with the given password")
        for name in ("grant_schema", "grant_tables", "grant_future_tables"):
            conn.execute(queries.compose(name, **ident))
        done.append(f"{role} can read every table, view and materialized view in schema {cfg.schema},"
                    " including models created later")
        if not with_raw:
            for table in (cfg.table, *WITHHELD):
                conn.execute(queries.compose("revoke_table", table=sql.Identifier(cfg.schema, table), **ident))
            done.append(f"{role} cannot read {cfg.schema}.{cfg.table} or {cfg.schema}.chtsync_errors"
                        " (whole documents); use --with-raw to allow it")
    return done


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
    from chtsync.cli import load_config

    cfg = load_config(args)
    if not IDENT.match(args.role):
        raise ConfigError(f"role name {args.role!r}: use letters, digits and underscores")
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
