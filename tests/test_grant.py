"""Least privilege: a read-only role for Superset that reads the models but not the documents."""

from __future__ import annotations

import psycopg
import pytest

from chtsync import grant, migrate
from tests.conftest import PG_HOST, PG_PORT, make_config


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
