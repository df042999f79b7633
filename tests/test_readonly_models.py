"""A model is one read-only SELECT: statements that write are refused before anything is built,
and functions that may write are refused by Postgres' own resolution of the query."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.conftest import PG_HOST, PG_PORT, PG_USER
from tests.pipeline_helpers import Docs, ModelsFile


def run_apply(dbname: str, models: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COUCHDB_", "POSTGRES_", "CHTSYNC_"))}
    env |= {"CHTSYNC_CONFIG": os.devnull, "COUCHDB_URL": "http://127.0.0.1:9", "POSTGRES_HOST": PG_HOST,
            "POSTGRES_PORT": str(PG_PORT), "POSTGRES_USER": PG_USER, "POSTGRES_DB": dbname,
            "CHTSYNC_MODELS": str(models)}
    return subprocess.run([sys.executable, "-m", "chtsync", "models", "apply"], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("body", "message"), [
    ("WITH d AS (DELETE FROM couchdb RETURNING _id) SELECT _id AS x FROM d", "holds DELETE"),
    ("WITH d AS (DELETE FROM public.keep RETURNING id) SELECT id AS x FROM d", "holds DELETE"),
    ("SELECT x FROM (WITH u AS (UPDATE couchdb SET doc = '{}' RETURNING _id AS x) SELECT x FROM u) AS s",
     "holds UPDATE"),
    ("SELECT _id FROM couchdb FOR UPDATE", "must not lock rows"),
    ("SELECT pg_advisory_lock(1) AS x", "calls pg_advisory_lock()"),
    ("SELECT public.wipe() AS x", "calls wipe(), which may write"),
    ("SELECT x FROM (SELECT 1 + public.wipe() AS x) AS s", "calls wipe(), which may write"),
])
def test_a_model_that_writes_is_refused_and_nothing_changes(
        pg: psycopg.Connection, dbname: str, tmp_path: Path, body: str, message: str) -> None:
    Docs(pg).put({"_id": "a", "type": "person"}, {"_id": "b", "type": "clinic"})
    pg.execute("CREATE TABLE public.keep (id text)")
    pg.execute("INSERT INTO public.keep VALUES ('mine')")
    pg.execute("CREATE FUNCTION public.wipe() RETURNS int LANGUAGE sql VOLATILE"
               " AS 'DELETE FROM public.keep; DELETE FROM v1.couchdb; SELECT 1'")
    models = ModelsFile(tmp_path).set("fine", "SELECT _id FROM couchdb").set("bad", body, kind="table")
    r = run_apply(dbname, models.path)
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("chtsync: model 'bad'") and message in line, line
    assert pg.execute("SELECT count(*) FROM v1.couchdb").fetchone()[0] == 2
    assert pg.execute("SELECT id FROM public.keep").fetchall() == [("mine",)]
    # Nothing was built: apply is one transaction.
    assert pg.execute("SELECT to_regclass('v1.fine'), to_regclass('v1.bad')").fetchone() == (None, None)


def test_value_producing_volatile_builtins_are_allowed(pg: psycopg.Connection, dbname: str, tmp_path: Path) -> None:
    Docs(pg).put({"_id": "a", "type": "person"})
    models = ModelsFile(tmp_path).set(
        "sampled", "SELECT _id, random() AS r, clock_timestamp() AS at FROM couchdb", kind="table")
    r = run_apply(dbname, models.path)
    assert r.returncode == 0, r.stderr
    assert pg.execute("SELECT _id FROM v1.sampled").fetchall() == [("a",)]
