"""Postgres crashes before a refresh round's commits reach the disk.

A round commits with synchronous_commit = off (models are derived data): a crash may lose its
last commits. Each model commits its rows with the snapshot they were derived from, so what a
crash takes away is whole refreshes, and the next round derives them again."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psycopg
from psycopg import sql

from chtsync import db, migrate, pipeline
from chtsync.localservers import EmbeddedPostgres
from chtsync.pipeline import graph
from tests.conftest import make_config
from tests.pipeline_helpers import Docs, ModelsFile
from tests.syncutil import wait_until
from tests.test_pipeline import by_name, diff_with_rebuild

PEOPLE = [{"_id": f"p{i}", "type": "person", "name": ["Ann", "Bob", "Cy"][i % 3]} for i in range(30)]


def contents(conn: psycopg.Connection, names: list[str]) -> dict[str, list[tuple]]:
    query = sql.SQL("SELECT * FROM v1.{} ORDER BY 1, 2")
    return {n: conn.execute(query.format(sql.Identifier(n))).fetchall() for n in names}


def reachable(info: dict) -> bool:
    try:
        with psycopg.connect(**info, connect_timeout=2) as conn:
            return conn.execute("SELECT NOT pg_is_in_recovery()").fetchone()[0]
    except psycopg.OperationalError:
        return False


def test_a_crash_before_a_rounds_commits_reach_the_disk_loses_whole_refreshes_only(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pgdata").start()
    try:
        server.create_database("crash")
        info = server.conninfo("crash")
        models = ModelsFile(tmp_path)
        models.set("person", "SELECT _id AS uuid, doc ->> 'name' AS name FROM couchdb"
                   " WHERE NOT _deleted AND doc ->> 'type' = 'person'", kind="incremental", unique_key=["uuid"])
        models.set("names", "SELECT name, count(*) AS n FROM person GROUP BY name", kind="aggregate",
                   unique_key=["name"])
        models.set("first_of_name", "SELECT name, min(uuid) AS first FROM person GROUP BY name", kind="aggregate",
                   unique_key=["name"])
        models.set("by_type", "SELECT doc ->> 'type' AS type, count(*) AS n FROM couchdb WHERE NOT _deleted"
                   " GROUP BY 1", kind="materialized_view", indexes=[{"columns": ["type"], "unique": True}])
        cfg = make_config("crash", POSTGRES_HOST=info["host"], POSTGRES_PORT=str(info["port"]),
                          CHTSYNC_MODELS=str(models.path))
        migrate.apply(cfg)
        names = ["person", "names", "first_of_name", "by_type"]
        with psycopg.connect(**info, autocommit=True) as writer:  # the sync's writes: synchronous commits
            writer.execute("SET search_path = v1, public")
            docs = Docs(writer)
            docs.put(*PEOPLE)
            pipeline.apply(cfg, writer)
            with db.connect(cfg, autocommit=True) as conn:
                pipeline.refresh_once(cfg, conn)
            before = contents(writer, names)
            docs.put(*[dict(p, name="Dee") for p in PEOPLE[:7]], {"_id": "x1", "type": "clinic"})
            docs.delete("p8", "p9")
            # The WAL writer stopped: the round's commits stay in Postgres's memory, as in the
            # instant before a crash.
            walwriter = writer.execute(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'").fetchone()[0]
            os.kill(walwriter, signal.SIGSTOP)
            try:
                with db.connect(cfg, autocommit=True) as conn:
                    results = by_name(pipeline.refresh_once(cfg, conn))
                assert {n: results[n].status for n in names} == dict.fromkeys(names, "ok")
                refreshed = contents(writer, names)
                assert refreshed != before and ("Dee", 7) in refreshed["names"]
            finally:
                # The crash: Postgres ends every process and replays its WAL from the disk.
                os.kill(walwriter, signal.SIGKILL)
        wait_until(lambda: reachable(info), timeout=60, what="Postgres back after the crash")
        with psycopg.connect(**info, autocommit=True) as conn:
            conn.execute("SET search_path = v1, public")
            # The round is gone, rows and snapshots together; the sync's writes are not.
            assert contents(conn, names) == before
            assert conn.execute("SELECT count(*) FROM couchdb WHERE doc ->> 'name' = 'Dee'").fetchone() == (7,)
            results = by_name(pipeline.refresh_once(cfg, conn))
            assert {n: results[n].status for n in names} == dict.fromkeys(names, "ok")
            assert contents(conn, names) == refreshed
            built = graph.load(cfg)
            assert [diff_with_rebuild(conn, built.models[n]) for n in names] == [0, 0, 0, 0]
    finally:
        server.stop()
