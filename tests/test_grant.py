"""Least privilege: a read-only role for Superset that reads the models but not the documents."""

from __future__ import annotations

import psycopg
import pytest

from chtsync import grant, migrate
from chtsync.errors import ConfigError
from tests.conftest import PG_HOST, PG_PORT, PG_USER, make_config


def test_reader_reads_models_not_raw_documents(dbname: str, pg: psycopg.Connection) -> None:
    cfg = make_config(dbname)
    migrate.apply(cfg)
    pg.execute("CREATE VIEW v1.report_count AS SELECT count(*) AS n FROM v1.couchdb")
    role = f"reader_{dbname}"
    try:
        done = grant.grant_reader(cfg, role, password="reader-pass")
        assert any("cannot read v1.couchdb" in line for line in done)
        # A model created after the grant is readable too (default privileges).
        pg.execute("CREATE TABLE v1.later_model AS SELECT 1 AS x")
        with psycopg.connect(host=PG_HOST, port=PG_PORT, user=role, dbname=dbname, autocommit=True) as reader:
            assert reader.execute("SELECT n FROM v1.report_count").fetchone() == (0,)
            assert reader.execute("SELECT x FROM v1.later_model").fetchone() == (1,)
            for withheld in ("v1.couchdb", "v1.chtsync_errors"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    reader.execute(f"SELECT * FROM {withheld}")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                reader.execute("INSERT INTO v1.later_model VALUES (2)")
        # Granting again is harmless.
        assert grant.grant_reader(cfg, role)[0].startswith(role)
    finally:
        if pg.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            pg.execute(f'DROP OWNED BY "{role}"')
            pg.execute(f'DROP ROLE "{role}"')


def test_the_writer_itself_is_refused(dbname: str, pg: psycopg.Connection) -> None:
    """grant-reader given chtsync's own user, or a role owning its tables, would revoke that
    role's access to the raw table (an owner may revoke its own privileges): refused, nothing
    changed."""
    cfg = make_config(dbname)
    migrate.apply(cfg)
    acl = "SELECT relacl::text FROM pg_class WHERE oid = 'v1.couchdb'::regclass"
    before = pg.execute(acl).fetchone()
    with pytest.raises(ConfigError, match="is chtsync's own Postgres user or owns its tables"):
        grant.grant_reader(cfg, PG_USER)
    owner = f"owner_{dbname}"
    pg.execute(f'CREATE ROLE "{owner}"')
    try:
        pg.execute(f'ALTER TABLE v1.chtsync_errors OWNER TO "{owner}"')
        with pytest.raises(ConfigError, match=f"role {owner} is chtsync's own Postgres user or owns"):
            grant.grant_reader(cfg, owner)
    finally:
        pg.execute(f'DROP OWNED BY "{owner}"')
        pg.execute(f'DROP ROLE "{owner}"')
    assert pg.execute(acl).fetchone() == before
