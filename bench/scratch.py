"""What the benchmarks share: a Postgres database of their own (a name no other run uses, dropped
at the end), a chtsync configuration pointing at it, documents written as the followers write them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from chtsync import config, queries

ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


def dsn(dbname: str) -> str:
    return f"host=127.0.0.1 port=5432 user=postgres dbname={dbname}"


@contextmanager
def scratch_db(kind: str) -> Iterator[str]:
    """A new, empty database for this run, named after the benchmark and the process (two runs,
    or a run and the tests, never share one); dropped when the block ends."""
    name = f"chtsync_bench_{kind}_{os.getpid()}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def bench_config(dbname: str, models: Path | None = None, couch_url: str = "http://127.0.0.1:9",
                 **env: str) -> config.Config:
    """chtsync's configuration for the scratch database (models: a models file; env: more settings)."""
    base = {"COUCHDB_URL": couch_url, "POSTGRES_HOST": "127.0.0.1", "POSTGRES_USER": "postgres",
            "POSTGRES_DB": dbname, **({"CHTSYNC_MODELS": str(models)} if models else {}), **env}
    return config.load(env=base, search=False)


def ingest(conn: psycopg.Connection, docs: list[dict[str, Any]], seq: int = 0, source: str = "bench/medic") -> None:
    """Documents written as a follower writes them: one _changes page through the ingest function
    (with its checkpoint), each document as it stands (its `_rev` included)."""
    results = [{"seq": str(seq + k), "id": d["_id"], "changes": [{"rev": d["_rev"]}], "doc": d}
               for k, d in enumerate(docs)]
    page = json.dumps({"results": results, "last_seq": str(seq + len(docs))})
    conn.execute(queries.get("ingest_page"), ("couchdb", source, page, max(len(docs), 1), True))
