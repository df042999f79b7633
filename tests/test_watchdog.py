"""CHT Watchdog's sql-exporter collector for cht-sync, query for query, on databases that
`chtsync run` keeps on a real CouchDB while nothing changes: a fresh chtsync schema, and a CHT
Sync 2 schema taken over with `migrate` + `models apply --adopt` (which had dbt's real
`dbt_results` table)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from chtsync import follower
from tests.conftest import PG_HOST, PG_PORT, PG_USER
from tests.servers import CouchAdmin
from tests.syncutil import BackgroundSync, wait_until
from tests.test_adopt import CHT_SYNC_2, DBT_TABLES, cht_docs, couch2pg

QUIET_SECONDS = 90  # longer than Watchdog's one-minute liveness window
SAMPLE_SECONDS = 5  # how often the liveness query is run during the quiet window

# medic/cht-watchdog exporters/postgres/cht_sync_collector.yml, verbatim but for the schema and
# table names, which the collector's users edit ("Update the schema and table names as needed").
COUCH2PG_QUERY = """
SELECT
  split_part(seq,'-',1) as sequence,
  pending as pending,
  CASE
    WHEN updated_at < NOW() - INTERVAL '1 minute' THEN 0
    ELSE 1
  END AS liveness,
  split_part(source,'/',2) as db,
  split_part(source,'/',1) as cht_instance
FROM
  {schema}.couchdb_progress
WHERE
  source like '%/%' and
  seq like '%-%'
ORDER BY
  cht_instance, db
"""
DBT_LATENCY = """
SELECT
  EXTRACT(EPOCH FROM(couchdb.latest - dbt_root.latest)) AS dbt_latency
FROM
  (SELECT MAX(saved_timestamp) as latest FROM {schema}.document_metadata) dbt_root,
  (SELECT MAX(saved_timestamp) as latest FROM {schema}.couchdb) couchdb
"""
DBT_RUN_STATS = """
SELECT
  status,
  execution_time,
  name as table_name
FROM
  {schema}.dbt_results
"""
SOURCES = ["127.0.0.1/medic", "127.0.0.1/medic-sentinel"]


def watchdog(pg: psycopg.Connection, schema: str) -> dict[str, Any]:
    """The three collector queries, as sql_exporter runs them (a NULL value breaks a metric)."""
    # psycopg reads '%' as a placeholder only when parameters are passed: none are.
    progress = pg.execute(COUCH2PG_QUERY.format(schema=schema)).fetchall()
    (latency,) = pg.execute(DBT_LATENCY.format(schema=schema)).fetchall()
    stats = pg.execute(DBT_RUN_STATS.format(schema=schema)).fetchall()
    return {"progress": progress, "latency": latency[0], "stats": stats}


def quiet_state(pg: psycopg.Connection, schema: str) -> tuple[Any, ...]:
    """What a data write would change: raw rows and their transaction ids, models' refresh marks."""
    return (
        pg.execute(f"SELECT count(*), max(_xid::text::bigint), max(saved_timestamp) FROM {schema}.couchdb"
                   ).fetchone(),
        pg.execute(f"SELECT source, seq FROM {schema}.couchdb_progress ORDER BY 1").fetchall(),
    )


def test_watchdog_queries_on_quiet_databases(
    pg: psycopg.Connection, dbname: str, couch: CouchAdmin, couchdb_server: Any, tmp_path: Path,
) -> None:
    couch.create_db("medic")
    couch.create_db("medic-sentinel")
    couch.bulk("medic", cht_docs(3, 60))
    couch.bulk("medic-sentinel", [{"_id": f"info-{i}", "type": "info", "doc_id": f"p{i:04d}"}
                                  for i in range(10)])
    # Schema cht: CHT Sync 2 ran (couch2pg over medic, dbt's tables and its dbt_results rows).
    pg.execute(CHT_SYNC_2.format(s="cht"))
    couch2pg(pg, couch, "medic", "127.0.0.1/medic", schema="cht")
    pg.execute(DBT_TABLES.format(s="cht"))
    pg.execute("INSERT INTO cht.dbt_results (unique_id, name, status, execution_time)"
               " VALUES ('model.cht_pipeline_base.contact', 'contact', 'success', 1.5)")

    base = dict(os.environ, COUCHDB_URL=couchdb_server.url, COUCHDB_USER=couchdb_server.auth[0],
                COUCHDB_PASSWORD=couchdb_server.auth[1], COUCHDB_DBS="medic medic-sentinel",
                POSTGRES_HOST=PG_HOST, POSTGRES_PORT=str(PG_PORT), POSTGRES_USER=PG_USER,
                POSTGRES_DB=dbname, CHTSYNC_CONFIG=os.devnull, CHTSYNC_INTERVAL="1")
    envs = {"v1": base, "cht": dict(base, POSTGRES_SCHEMA="cht")}

    def chtsync(schema: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "chtsync", *args], env=envs[schema], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    done = chtsync("cht", "migrate", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "left alone: dbt_results (dbt run results" in done.stdout
    assert "kept as dbt_results_cht_sync; chtsync's dbt_results view takes its name" in done.stdout
    done = chtsync("cht", "migrate")
    assert done.returncode == 0, done.stderr
    done = chtsync("cht", "migrate", "--dry-run")  # after: the view is chtsync's, not reported
    assert done.returncode == 0 and "dbt_results" not in done.stdout, done.stdout
    assert chtsync("cht", "models", "apply").returncode == 2  # dbt's tables: needs --adopt
    done = chtsync("cht", "models", "apply", "--adopt")
    assert done.returncode == 0, done.stderr
    # dbt's table is kept, rows and all; the name now belongs to chtsync's view.
    assert pg.execute("SELECT relkind::text FROM pg_class WHERE oid = 'cht.dbt_results'::regclass"
                      ).fetchone() == ("v",)
    assert pg.execute("SELECT name, execution_time FROM cht.dbt_results_cht_sync").fetchall() == [("contact", 1.5)]

    procs = {}
    for schema in envs:
        log = open(tmp_path / f"run-{schema}.log", "w")  # noqa: SIM115 (closed with the process)
        procs[schema] = (subprocess.Popen([sys.executable, "-m", "chtsync", "run"], env=envs[schema],
                                          cwd=tmp_path, stdout=log, stderr=log), log)
    try:
        def settled(schema: str) -> bool:
            try:
                states = pg.execute(f"SELECT source, state FROM {schema}.chtsync_sources").fetchall()
                models = pg.execute(f"SELECT count(*) FILTER (WHERE last_status NOT IN ('ok', 'created')),"
                                    f" count(*) FROM {schema}.chtsync_models").fetchone()
            except psycopg.errors.UndefinedTable:
                return False
            return sorted(states) == [(s, "following") for s in SOURCES] and models[0] == 0 and models[1] > 0

        for schema, (proc, _) in procs.items():
            wait_until(lambda s=schema, p=proc: settled(s) or p.poll() is not None, timeout=180,
                       what=f"{schema}: every source following, every model built")
            assert proc.poll() is None, (tmp_path / f"run-{schema}.log").read_text()[-3000:]

        quiet_from = pg.execute("SELECT now()").fetchone()[0]
        before = {schema: quiet_state(pg, schema) for schema in envs}
        started = time.monotonic()
        samples = 0
        # Time passing is what is tested here: Watchdog samples liveness all along the window.
        while time.monotonic() - started < QUIET_SECONDS:
            for schema in envs:
                progress = watchdog(pg, schema)["progress"]
                assert [(r[4], r[3], r[2]) for r in progress] == [
                    (*s.split("/"), 1) for s in SOURCES], (schema, progress)
            samples += 1
            time.sleep(SAMPLE_SECONDS)
        assert samples >= QUIET_SECONDS // SAMPLE_SECONDS

        for schema, (proc, _) in procs.items():
            assert proc.poll() is None, (tmp_path / f"run-{schema}.log").read_text()[-3000:]
            # No data was written: the same raw rows, transaction ids and checkpoints.
            assert quiet_state(pg, schema) == before[schema]
            # ...yet couchdb_progress said "alive" all along: refreshed without a page.
            fresh = pg.execute(f"SELECT source FROM {schema}.couchdb_progress WHERE updated_at > %s"
                               " + interval '60 seconds' AND pending = 0 ORDER BY 1", (quiet_from,)).fetchall()
            assert [r[0] for r in fresh] == SOURCES

            found = watchdog(pg, schema)
            for sequence, pending, liveness, _db, _instance in found["progress"]:
                assert sequence.isdigit() and int(sequence) > 0 and pending == 0 and liveness == 1
            assert isinstance(float(found["latency"]), float) and found["latency"] is not None
            models = sorted(r[0] for r in pg.execute(f"SELECT name FROM {schema}.chtsync_models"))
            assert sorted(r[2] for r in found["stats"]) == models  # one row per model
            assert {r[0] for r in found["stats"]} == {"success"}
            assert all(isinstance(r[1], float) and r[1] >= 0 for r in found["stats"])
            # The models the refresh loop ran have measured durations (seconds, not ms).
            timed = pg.execute(f"SELECT count(*) FROM {schema}.dbt_results WHERE execution_time > 0"
                               ).fetchone()[0]
            assert timed > 0
    finally:
        for proc, log in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            log.close()


def test_progress_heartbeat_while_caught_up(
    pg: psycopg.Connection, couch: CouchAdmin, cfg_factory: Any, monkeypatch: Any,
) -> None:
    """The heartbeat alone, quickly: while caught up, updated_at moves and pending returns to 0
    with no raw write; a change still arrives at once."""
    monkeypatch.setattr(follower, "PROGRESS_HEARTBEAT_SECONDS", 0.2)
    couch.create_db("medic")
    couch.bulk("medic", cht_docs(1, 10))
    with BackgroundSync(cfg_factory()) as bg:
        wait_until(lambda: [s.state for s in bg.stats()] == ["following"], timeout=60, what="caught up")
        raw = quiet_state(pg, "v1")
        (first,) = pg.execute("SELECT updated_at FROM couchdb_progress").fetchone()
        wait_until(lambda: pg.execute("SELECT updated_at > %s FROM couchdb_progress", (first,)).fetchone()[0],
                   timeout=30, what="a heartbeat")
        pg.execute("UPDATE couchdb_progress SET pending = 7")  # as a stale page would have left it
        wait_until(lambda: pg.execute("SELECT pending FROM couchdb_progress").fetchone() == (0,),
                   timeout=30, what="pending back to 0")
        assert quiet_state(pg, "v1") == raw  # no document written, the checkpoint where it was
        couch.put("medic", {"_id": "late", "type": "person"})
        wait_until(lambda: pg.execute("SELECT count(*) FROM couchdb WHERE _id = 'late'").fetchone() == (1,),
                   timeout=30, what="a change during the heartbeats")
