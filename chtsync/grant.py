"""`chtsync grant-reader ROLE`: a read-only role for Superset, limited to the model schema.

The raw table and chtsync_errors (which hold whole documents) are withheld unless --with-raw:
the models are views and tables owned by chtsync, so the role reads them without reading the
documents behind them.
"""

from __future__ import annotations

from psycopg import sql

from chtsync import db, preflight, queries
from chtsync.config import Config, ConfigError

WITHHELD = ("chtsync_errors",)  # plus the raw table


def grant_reader(cfg: Config, role: str, password: str | None = None, with_raw: bool = False) -> list[str]:
    """Create (if needed) and grant the role; return what was done, for the user."""
    done = []
    ident = {"role": sql.Identifier(role), "schema": sql.Identifier(cfg.schema)}
    with db.connect(cfg) as conn, conn.transaction():
        preflight.require_migrated(cfg, conn)
        if conn.execute(queries.get("role_writes_chtsync"), {"role": role, "schema": cfg.schema}).fetchone()[0]:
            raise ConfigError(f"role {role} is chtsync's own Postgres user or owns its tables in schema"
                              f" {cfg.schema}: give Superset a role of its own, e.g. superset_reader")
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
