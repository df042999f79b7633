"""Checks of the environment that must pass before chtsync writes anything.

Settings and files are checked by config.load and the models file by pipeline.load; what needs
a server (privileges, an applied schema) is checked here, read-only, on the session about to be
used. Each failure is one ConfigError subclass naming the setting and the fix.
"""

from __future__ import annotations

import psycopg

from chtsync import queries
from chtsync.config import Config
from chtsync.errors import NotMigrated, PrivilegeError


def require_create(cfg: Config, conn: psycopg.Connection) -> None:
    """The role can create the schema (if missing) and tables in it: migrations will not stop
    half-way on `permission denied`."""
    with conn.transaction():  # leaves the session idle, as the caller had it
        exists, allowed, user, database = conn.execute(
            queries.get("preflight_schema_privileges"), (cfg.schema,)).fetchone()
    if allowed:
        return
    if exists:
        raise PrivilegeError(
            f"POSTGRES_USER: role {user} may not create tables in schema {cfg.schema}: run"
            f" `GRANT USAGE, CREATE ON SCHEMA {cfg.schema} TO {user}` as its owner, or use another role")
    raise PrivilegeError(
        f"POSTGRES_USER: role {user} may not create schema {cfg.schema} in database {database}: run"
        f" `CREATE SCHEMA {cfg.schema} AUTHORIZATION {user}` (or `GRANT CREATE ON DATABASE {database}"
        f" TO {user}`) as a superuser, or use another role")


def require_migrated(cfg: Config, conn: psycopg.Connection) -> None:
    """chtsync's tables exist in the schema (commands other than migrate, sync and run need them)."""
    with conn.transaction():
        migrated = conn.execute(queries.get("preflight_migrated"),
                                {"schema": cfg.schema, "table": cfg.table}).fetchone()[0]
    if not migrated:
        raise NotMigrated(
            f"POSTGRES_SCHEMA: schema {cfg.schema} of {cfg.postgres.describe()} has no chtsync tables:"
            " run `chtsync migrate` first (or check POSTGRES_DB / POSTGRES_SCHEMA)")


def require_create_role(conn: psycopg.Connection, role: str) -> None:
    with conn.transaction():
        allowed = conn.execute(queries.get("preflight_can_create_role"), {"role": role}).fetchone()[0]
    if not allowed:
        raise PrivilegeError(
            f"POSTGRES_USER: role {role} does not exist and this role may not create roles: create it"
            " as a superuser (CREATE ROLE ... LOGIN) or run grant-reader as a role with CREATEROLE")
