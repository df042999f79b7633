"""Migrations: tables created in the configured schema, idempotent, safe to run twice."""

import psycopg

from chtsync import migrate
from tests.conftest import make_config


def test_template_has_tables(pg: psycopg.Connection) -> None:
    tables = {r[0] for r in pg.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'v1'")}
    assert {"couchdb", "couchdb_progress", "chtsync_errors", "chtsync_sources"} <= tables


def test_custom_schema_and_table(dbname: str, pg: psycopg.Connection) -> None:
    cfg = make_config(dbname, POSTGRES_SCHEMA="cht_raw", POSTGRES_TABLE="docs")
    applied = migrate.apply(cfg)
    assert "0001.raw-tables" in applied
    cols = [r[0] for r in pg.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = 'cht_raw' AND table_name = 'docs' ORDER BY ordinal_position")]
    assert cols[:5] == ["saved_timestamp", "_id", "_deleted", "source", "doc"]
    # A second run finds nothing to do.
    assert migrate.apply(cfg) == []
    assert migrate.plan(cfg).pending == []


def test_dry_run_changes_nothing(dbname: str, pg: psycopg.Connection) -> None:
    cfg = make_config(dbname, POSTGRES_SCHEMA="not_yet")
    plan = migrate.plan(cfg)
    assert plan.applied == [] and plan.pending[0] == "0001.raw-tables"
    assert pg.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'not_yet'").fetchone() == (0,)


def test_a_migrate_killed_midway_does_not_block_the_next(dbname: str, pg: psycopg.Connection) -> None:
    """A process killed during its migrations (SIGKILL, OOM, SIGTERM) once left yoyo's lock row
    behind, and every later start failed with a LockTimeout. The row of such a process is
    ignored: the advisory lock that serialises migrations ended with its session."""
    cfg = make_config(dbname, POSTGRES_SCHEMA="killed")
    migrate._ensure_schema(cfg)
    migrate._backend(cfg).connection.close()  # yoyo's own tables, as a started migrate has them
    pg.execute("INSERT INTO killed.yoyo_lock (locked, ctime, pid) VALUES (1, now(), 999999)")
    assert "0001.raw-tables" in migrate.apply(cfg)  # before the fix: LockTimeout after 10 s
    assert migrate.plan(cfg).pending == []
