"""Switching from CHT Sync in place: a database exactly as CHT Sync 2.0 (or 1.x) leaves it is
adopted by `chtsync migrate` without losing or rewriting a row, following resumes at the stored
seq, and `models apply --adopt` swaps the dbt tables while a dashboard view keeps answering."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import threading
import time
from typing import Any

import httpx
import psycopg
import pytest

from chtsync import adopt, cli, db, migrate, pipeline
from chtsync.config import Config
from chtsync.couch import CouchClient
from chtsync.errors import AdoptError
from chtsync.follower import Follower
from tests.conftest import make_config
from tests.servers import CouchAdmin, TcpProxy
from tests.syncutil import sync_once, wait_until

SCHEMA = "cht"  # the `pg` fixture's database already has chtsync's v1: CHT Sync's goes beside it
COUCH3_SEQ = "12-g1AAAAJjeJyV0EEOgjAQBdC9p5i4VyM0BYjgRYxG0lJEEqHaQu\u2026".replace("\u2026", "x" * 40)

# CHT Sync 2.0, couch2pg/src/setup.js (its CREATE INDEX CONCURRENTLY IF NOT EXISTS gives the same
# indexes), and dbt/dbt-run.py's _dataemon after deploy/scripts/upgrade/add-manifest-and-source.sh.
CHT_SYNC_2 = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.couchdb (
  saved_timestamp TIMESTAMP,
  _id VARCHAR PRIMARY KEY,
  _deleted BOOLEAN,
  source varchar,
  doc jsonb
);
CREATE INDEX IF NOT EXISTS _deleted ON {s}.couchdb(_deleted);
CREATE INDEX IF NOT EXISTS saved_timestamp ON {s}.couchdb(saved_timestamp);
CREATE INDEX IF NOT EXISTS source ON {s}.couchdb(source);
CREATE TABLE IF NOT EXISTS {s}.couchdb_progress (
  seq varchar,
  pending integer,
  updated_at timestamptz,
  source varchar PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS {s}._dataemon (
  inserted_on TIMESTAMP DEFAULT NOW(), packages jsonb, manifest jsonb, dbt_selector text
);
CREATE TABLE IF NOT EXISTS {s}.dbt_results (
  result_id varchar, invocation_id varchar, unique_id varchar, database_name varchar,
  schema_name varchar, name varchar, resource_type varchar, status varchar,
  execution_time float, rows_affected int
);
"""

# couch2pg 1.x: the same without source (couch2pg/src/setup.js before 2.0).
CHT_SYNC_1 = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.couchdb (
  saved_timestamp TIMESTAMP,
  _id VARCHAR PRIMARY KEY,
  _deleted BOOLEAN,
  doc jsonb
);
CREATE INDEX IF NOT EXISTS _deleted ON {s}.couchdb(_deleted);
CREATE INDEX IF NOT EXISTS saved_timestamp ON {s}.couchdb(saved_timestamp);
CREATE TABLE IF NOT EXISTS {s}.couchdb_progress (
  seq varchar,
  pending integer,
  updated_at timestamptz,
  source varchar PRIMARY KEY
);
"""

# couch2pg's importer.js, statement for statement (one row per _id, whatever the database).
COUCH2PG_UPSERT = """
INSERT INTO {s}.couchdb (saved_timestamp, _id, _deleted, source, doc) VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (_id) DO UPDATE SET
  saved_timestamp = EXCLUDED.saved_timestamp,
  _deleted = EXCLUDED._deleted,
  source = EXCLUDED.source,
  doc = EXCLUDED.doc
"""

# What CHT Pipeline's dbt left: incremental tables, plus a view standing for a dashboard.
DBT_TABLES = """
CREATE TABLE {s}.document_metadata AS
  SELECT _id AS uuid, _deleted, saved_timestamp, doc->>'type' AS doc_type,
         split_part(source, '/', 1) AS instance, split_part(source, '/', 2) AS dbname
  FROM {s}.couchdb;
CREATE INDEX "5a1b1f0d3c0e4c8a" ON {s}.document_metadata USING hash (uuid);
CREATE TABLE {s}.contact AS
  SELECT _id AS uuid, saved_timestamp, doc->'parent'->>'_id' AS parent_uuid, doc->>'name' AS name,
         COALESCE(doc->>'contact_type', doc->>'type') AS contact_type, doc->>'phone' AS phone
  FROM {s}.couchdb
  WHERE doc->>'type' IN ('contact', 'clinic', 'district_hospital', 'health_center', 'person')
    AND NOT _deleted;
CREATE INDEX "9f0e2b7c11d24e55" ON {s}.contact USING hash (uuid);
CREATE VIEW {s}.chw_dashboard AS
  SELECT contact_type, count(*) AS contacts FROM {s}.contact GROUP BY contact_type;
"""


def cht_docs(n_places: int, n_people: int, prefix: str = "") -> list[dict[str, Any]]:
    places = [{"_id": f"{prefix}hc{i}", "type": "health_center", "name": f"HC {i}",
               "reported_date": 1700000000000 + i} for i in range(n_places)]
    people = [{"_id": f"{prefix}p{i:04d}", "type": "person", "name": f"Person {i}",
               "parent": {"_id": f"{prefix}hc{i % max(n_places, 1)}"}, "reported_date": 1700000000000 + i}
              for i in range(n_people)]
    reports = [{"_id": f"{prefix}r{i:04d}", "type": "data_record", "form": "visit",
                "contact": {"_id": f"{prefix}p{i:04d}"}, "reported_date": 1700000000000 + i}
               for i in range(n_people // 2)]
    return places + people + reports


def couch2pg(pg: psycopg.Connection, couch: CouchAdmin, db_name: str, source: str,
             schema: str = SCHEMA) -> str:
    """Run CHT Sync's couch2pg logic once over the whole feed; return the stored seq."""
    feed = couch.http.get(f"/{db_name}/_changes", params={"include_docs": "true"}).json()
    with pg.transaction():
        for change in feed["results"]:
            doc = change.get("doc") if not change.get("deleted") else {
                "_id": change["id"], "_rev": change["changes"][0]["rev"], "_deleted": True}
            pg.execute(COUCH2PG_UPSERT.format(s=schema), (
                "2024-11-01 10:00:00", change["id"], bool(change.get("deleted")), source, json.dumps(doc)))
        pg.execute(f"INSERT INTO {schema}.couchdb_progress (seq, pending, source, updated_at)"
                   " VALUES (%s, 0, %s, now()) ON CONFLICT (source) DO UPDATE SET seq = excluded.seq",
                   (str(feed["last_seq"]), source))
    return str(feed["last_seq"])


def rows(pg: psycopg.Connection, schema: str = SCHEMA, source: str = "source",
         ) -> dict[tuple[str, str | None], tuple[str, ...]]:
    """Every raw row by (_id, source): where it lies and what it holds."""
    return {(r[0], r[1]): tuple(r[2:]) for r in pg.execute(
        f"SELECT _id, {source}, ctid::text, xmin::text, md5(doc::text), saved_timestamp::text,"
        f" _deleted::text FROM {schema}.couchdb")}


def layout(pg: psycopg.Connection, schema: str = SCHEMA) -> tuple[Any, ...]:
    """Columns, indexes and constraints of the raw and progress tables."""
    return (
        pg.execute("SELECT table_name, column_name, data_type, is_nullable, column_default"
                   " FROM information_schema.columns WHERE table_schema = %s"
                   " AND table_name IN ('couchdb', 'couchdb_progress') ORDER BY 1, 2", (schema,)).fetchall(),
        pg.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s"
                   " AND tablename IN ('couchdb', 'couchdb_progress') ORDER BY 1", (schema,)).fetchall(),
        pg.execute("SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE connamespace ="
                   " %s::regnamespace AND conrelid::regclass::text LIKE '%%couchdb%%' ORDER BY 1",
                   (schema,)).fetchall(),
    )


class RecordingProxy(TcpProxy):
    """A TCP proxy in front of CouchDB that notes the `since` of every _changes request."""

    def __init__(self, host: str, port: int) -> None:
        self.since: list[str] = []
        super().__init__(host, port)

    def _pipe(self, src: Any, dst: Any) -> None:  # type: ignore[override]
        try:
            while data := src.recv(65536):
                for path in re.findall(rb"GET (/[^ ]*_changes\?[^ ]*) HTTP", data):
                    query = httpx.URL(path.decode()).params
                    self.since.append(query["since"])
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(2)


@pytest.fixture
def proxy(couch_server):
    p = RecordingProxy(getattr(couch_server, "host", "127.0.0.1"), couch_server.port)
    yield p
    p.close()


def cfg_for(dbname: str, url: str = "http://127.0.0.1:9", **env: str) -> Config:
    return make_config(dbname, url, POSTGRES_SCHEMA=SCHEMA, **env)


def dashboard(conn: psycopg.Connection) -> dict[str, int]:
    return dict(conn.execute(f"SELECT contact_type, contacts FROM {SCHEMA}.chw_dashboard").fetchall())


def test_cht_sync_2_database_switched_in_place(
    pg: psycopg.Connection, dbname: str, couch: CouchAdmin, couch_server, proxy: RecordingProxy,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Any,
) -> None:
    # CHT Sync 2.0 ran against this CouchDB: raw rows, a progress row, dbt tables, a dashboard.
    couch.create_db("medic")
    couch.bulk("medic", cht_docs(5, 400))
    couch.delete("medic", "p0003")
    pg.execute(CHT_SYNC_2.format(s=SCHEMA))
    stored_seq = couch2pg(pg, couch, "medic", "127.0.0.1/medic")
    # Another CHT instance (CouchDB 3) in the same Postgres, as CHT Sync's Helm chart deploys it.
    pg.execute(f"INSERT INTO {SCHEMA}.couchdb VALUES ('2024-11-01', 'other-1', false,"
               f" 'cht.example.org/medic', '{{\"_id\": \"other-1\", \"_rev\": \"1-a\", \"type\": \"person\"}}')")
    pg.execute(f"INSERT INTO {SCHEMA}.couchdb_progress VALUES (%s, 0, now(), 'cht.example.org/medic')",
               (COUCH3_SEQ,))
    pg.execute(f"INSERT INTO {SCHEMA}._dataemon (packages, manifest) VALUES ('{{}}', '{{}}')")
    pg.execute(DBT_TABLES.format(s=SCHEMA))
    expected_dashboard = dashboard(pg)
    assert expected_dashboard == {"health_center": 5, "person": 399 + 1}
    before, before_layout = rows(pg), layout(pg)
    progress_before = pg.execute(f"SELECT source, seq FROM {SCHEMA}.couchdb_progress").fetchall()
    # After CHT Sync stopped: one edit and new documents, which chtsync must pick up from the seq.
    edited = couch.get("medic", "p0010")
    edited["name"] = "Renamed"
    couch.put("medic", edited)
    couch.bulk("medic", cht_docs(0, 3, prefix="new-"))

    for key, value in {"POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": str(pg.info.port),
                       "POSTGRES_USER": pg.info.user, "POSTGRES_DB": dbname, "POSTGRES_SCHEMA": SCHEMA,
                       "COUCHDB_URL": f"http://127.0.0.1:{proxy.port}", "COUCHDB_USER": couch_server.auth[0],
                       "COUCHDB_PASSWORD": couch_server.auth[1], "COUCHDB_DBS": "medic"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    cfg = cfg_for(dbname, f"http://127.0.0.1:{proxy.port}", BATCH_SIZE="100",
                  COUCHDB_USER=couch_server.auth[0], COUCHDB_PASSWORD=couch_server.auth[1])

    # migrate --dry-run: the steps and the work, and nothing changes.
    assert cli.main(["migrate", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "cht.couchdb: CHT Sync 2.x layout, ~606 rows" in out
    assert "index cht.saved_timestamp -> couchdb_saved_timestamp" in out
    assert "build index cht.couchdb_xid on _xid CONCURRENTLY  [reads ~606 rows" in out
    assert "primary key couchdb_pkey (_id) -> couchdb_pkey (_id, source)" in out
    # A CouchDB 3 seq is long and opaque: the plan shows its first 20 characters.
    assert f"follow 127.0.0.1/medic: resumes from stored seq {stored_seq[:20]}" in out
    assert "couchdb_progress row cht.example.org/medic (seq 12-g1AAAA" in out
    assert "left alone: _dataemon" in out and "left alone: dbt_results" in out
    assert "models apply --adopt` replaces them in one transaction): contact, document_metadata" in out
    assert "pending  0001.raw-tables" in out
    assert rows(pg) == before and layout(pg) == before_layout

    # migrate: in place. Not one row moved or rewritten (same ctid, same xmin, same doc).
    assert cli.main(["migrate"]) == 0
    after = layout(pg)
    assert rows(pg) == before
    assert pg.execute(f"SELECT count(*) FROM {SCHEMA}.couchdb WHERE _xid IS NOT NULL OR _rev IS NOT NULL"
                      ).fetchone() == (0,)
    indexes = dict(after[1])
    assert "PRIMARY KEY (_id, source)" in dict(after[2])["couchdb_pkey"]
    for name in ("couchdb_saved_timestamp", "couchdb_deleted", "couchdb_source", "couchdb_xid"):
        assert name in indexes, name
    assert not {"saved_timestamp", "_deleted", "source", "couchdb_pkey_chtsync"} & set(indexes)
    assert pg.execute("SELECT count(*) FROM pg_index WHERE NOT indisvalid").fetchone() == (0,)
    progress_after = pg.execute(f"SELECT source, seq FROM {SCHEMA}.couchdb_progress").fetchall()
    assert sorted(progress_after) == sorted(progress_before)
    # A second migrate changes nothing.
    assert migrate.apply(cfg) == []
    assert layout(pg) == after and rows(pg) == before
    assert migrate.plan(cfg).adoption.steps == []

    # models apply: refuses dbt's tables, names them; --adopt swaps them in one transaction while
    # the dashboard keeps answering.
    assert cli.main(["models", "apply"]) == 2
    err = capsys.readouterr().err
    assert "not created by chtsync" in err and "--adopt" in err
    assert "contact" in err and "document_metadata" in err
    answers: list[tuple[float, float, dict[str, int]]] = []
    failures: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        with psycopg.connect(db.conninfo(cfg), autocommit=True) as conn:
            while not done.is_set():
                started = time.monotonic()
                try:
                    answer = dashboard(conn)
                    answers.append((started, time.monotonic(), answer))
                except psycopg.Error as exc:
                    failures.append(exc)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    wait_until(lambda: bool(answers or failures), 30, "the dashboard's first answer")
    with db.connect(cfg, autocommit=True) as conn:
        started = time.monotonic()
        result = pipeline.apply(cfg, conn, adopt=True)
        ended = time.monotonic()
        wait_until(lambda: any(a[0] > ended for a in answers) or bool(failures), 30, "an answer after the swap")
        done.set()
        thread.join(10)
        assert not failures, failures[:3]
        assert {"contact", "document_metadata"} <= set(result.conflicts)
        assert any(a[0] < started for a in answers) and any(a[0] > ended for a in answers)
        assert any(a[0] < ended and a[1] > started for a in answers)  # a read overlapping the swap
        assert all(a[2] == expected_dashboard for a in answers)  # the new table: same answer
        assert dashboard(conn) == expected_dashboard
        # Now chtsync owns them: a second apply changes nothing.
        assert not pipeline.apply(cfg, conn).changed
        kinds = dict(conn.execute("SELECT name, kind FROM chtsync_models").fetchall())
        assert kinds["contact"] == "incremental" and kinds["document_metadata"] == "incremental"
    assert rows(pg) == before

    # Following resumes at the stored seq: only the edit and the new documents are written.
    stats = sync_once(cfg)
    assert proxy.since[0] == stored_seq
    assert [s.state for s in stats] == ["caught up"] and stats[0].docs_written == 5
    now = rows(pg)
    changed = {k for k in now if now[k] != before.get(k)}
    assert changed == {(i, "127.0.0.1/medic") for i in ("p0010", "new-p0000", "new-p0001", "new-p0002", "new-r0000")}
    with db.connect(cfg, autocommit=True) as conn:
        pipeline.refresh_once(cfg, conn, force=True)
        assert dashboard(conn) == {"health_center": 5, "person": 400 + 3}
        name = conn.execute("SELECT name FROM contact WHERE uuid = 'p0010'").fetchone()[0]
        assert name == "Renamed"
        meta = dict(conn.execute("SELECT instance, count(*) FROM document_metadata GROUP BY 1").fetchall())
        assert meta == {"127.0.0.1": 5 + 399 + 200 + 3 + 1, "cht.example.org": 1}


def test_couchdb3_seq_is_sent_as_stored(pg: psycopg.Connection, dbname: str) -> None:
    """The stored seq goes back to CouchDB as `since`, byte for byte (CouchDB 3 shape)."""
    pg.execute(CHT_SYNC_2.format(s=SCHEMA))
    pg.execute(f"INSERT INTO {SCHEMA}.couchdb VALUES ('2024-11-01', 'a', false, 'cht.example.org/medic',"
               " '{\"_id\": \"a\", \"_rev\": \"1-a\"}')")
    pg.execute(f"INSERT INTO {SCHEMA}.couchdb_progress VALUES (%s, 0, now(), 'cht.example.org/medic')",
               (COUCH3_SEQ,))
    cfg = cfg_for(dbname, "https://cht.example.org", COUCHDB_DBS="medic")
    assert cfg.sources[0].source_name("medic") == "cht.example.org/medic"
    migrate.apply(cfg)
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/medic":
            return httpx.Response(200, json={"update_seq": "13-g1AAAA", "doc_count": 1, "doc_del_count": 0})
        asked.append(request.url.params["since"])
        return httpx.Response(200, json={"results": [], "last_seq": request.url.params["since"], "pending": 0})

    async def main() -> None:
        client = CouchClient(cfg.sources[0], transport=httpx.MockTransport(handler))
        await Follower(cfg, cfg.sources[0], "medic", client, asyncio.Event(), once=True).run()
        await client.aclose()

    asyncio.run(main())
    assert asked == [COUCH3_SEQ]
    assert pg.execute(f"SELECT seq FROM {SCHEMA}.couchdb_progress WHERE source = 'cht.example.org/medic'"
                      ).fetchone() == (COUCH3_SEQ,)


def test_cht_sync_1x_gets_its_one_source_without_a_rewrite(pg: psycopg.Connection, dbname: str) -> None:
    pg.execute(CHT_SYNC_1.format(s=SCHEMA))
    pg.execute(f"INSERT INTO {SCHEMA}.couchdb SELECT now(), 'd' || g, g % 7 = 0,"
               " jsonb_build_object('_id', 'd' || g, '_rev', '1-x') FROM generate_series(1, 500) g")
    pg.execute(f"INSERT INTO {SCHEMA}.couchdb_progress VALUES ('501', 0, now(), 'cht.example.org/medic')")
    before = {k[0]: v for k, v in rows(pg, source="NULL").items()}
    cfg = cfg_for(dbname, "https://cht.example.org")
    assert "add source = 'cht.example.org/medic' for every existing row" in "\n".join(
        migrate.plan(cfg).adoption.lines())
    migrate.apply(cfg)
    after = rows(pg)
    assert {k[1] for k in after} == {"cht.example.org/medic"}
    assert {k[0]: v for k, v in after.items()} == before  # same ctid and xmin: nothing rewritten
    assert pg.execute(f"SELECT column_default FROM information_schema.columns WHERE table_schema = '{SCHEMA}'"
                      " AND table_name = 'couchdb' AND column_name = 'source'").fetchone() == (None,)
    assert migrate.plan(cfg).adoption.steps == []


def test_rows_without_source_need_a_choice_when_there_are_several_databases(
    pg: psycopg.Connection, dbname: str,
) -> None:
    # CHT Sync 1.x upgraded by add-manifest-and-source.sh: old rows have a NULL source.
    pg.execute(CHT_SYNC_2.format(s=SCHEMA))
    pg.execute(f"INSERT INTO {SCHEMA}.couchdb SELECT now(), 'old' || g, false, NULL,"
               " jsonb_build_object('_id', 'old' || g) FROM generate_series(1, 25000) g")
    pg.execute(f"INSERT INTO {SCHEMA}.couchdb SELECT now(), 'new' || g, false, 'cht.example.org/medic',"
               " jsonb_build_object('_id', 'new' || g) FROM generate_series(1, 100) g")
    pg.execute(f"INSERT INTO {SCHEMA}.couchdb_progress VALUES ('9', 0, now(), 'cht.example.org/medic'),"
               " ('3', 0, now(), 'cht.example.org/medic-sentinel')")
    cfg = cfg_for(dbname, "https://cht.example.org", COUCHDB_DBS="medic,medic-sentinel")
    before, before_layout = rows(pg), layout(pg)
    with pytest.raises(AdoptError, match=r"25,000 rows .* have no source.*--legacy-source"):
        migrate.apply(cfg)
    assert rows(pg) == before and layout(pg) == before_layout  # refused before touching anything
    with pytest.raises(AdoptError, match="choose one of"):
        migrate.apply(cfg, legacy_source="cht.example.org/nosuch")
    migrate.apply(cfg, legacy_source="cht.example.org/medic")
    after = rows(pg)
    assert pg.execute(f"SELECT count(*) FROM {SCHEMA}.couchdb WHERE source = 'cht.example.org/medic'"
                      ).fetchone() == (25100,)
    untouched = {k: v for k, v in before.items() if k[1] is not None}
    assert all(after[k] == v for k, v in untouched.items())
    assert all(after[(k[0], "cht.example.org/medic")][2] == v[2] for k, v in before.items())  # same doc
    assert migrate.plan(cfg).adoption.steps == []


def test_interrupted_adoption_resumes(pg: psycopg.Connection, dbname: str) -> None:
    pg.execute(CHT_SYNC_2.format(s=SCHEMA))
    pg.execute(f"INSERT INTO {SCHEMA}.couchdb SELECT now(), 'd' || g, false, 'h/medic',"
               " jsonb_build_object('_id', 'd' || g) FROM generate_series(1, 1000) g")
    pg.execute(f"INSERT INTO {SCHEMA}.couchdb_progress VALUES ('1000', 0, now(), 'h/medic')")
    cfg = cfg_for(dbname, "http://h:5984")
    # A crash during CREATE INDEX CONCURRENTLY leaves an INVALID index under the name chtsync
    # uses; here the build is made to fail the same way.
    with pytest.raises(psycopg.errors.UniqueViolation):
        pg.execute(f"CREATE UNIQUE INDEX CONCURRENTLY couchdb_pkey_chtsync ON {SCHEMA}.couchdb (source)")
    with pytest.raises(psycopg.errors.UniqueViolation):
        pg.execute(f"CREATE UNIQUE INDEX CONCURRENTLY couchdb_xid ON {SCHEMA}.couchdb (_deleted)")
    # ... and the first steps had already run.
    with psycopg.connect(db.conninfo(cfg), autocommit=True) as conn:
        plan = adopt.inspect(cfg, conn)
        plan.steps[0].action(conn)
    lines = "\n".join(migrate.plan(cfg).adoption.lines())
    assert "drop INVALID index cht.couchdb_pkey_chtsync" in lines and "drop INVALID index cht.couchdb_xid" in lines
    migrate.apply(cfg)
    assert pg.execute("SELECT count(*) FROM pg_index WHERE NOT indisvalid").fetchone() == (0,)
    idx = dict(layout(pg)[1])
    assert idx["couchdb_xid"].endswith("USING btree (_xid)")
    assert idx["couchdb_pkey"].endswith("USING btree (_id, source)")
    assert migrate.plan(cfg).adoption.steps == []


def test_swap_waits_for_readers_and_retries(pg: psycopg.Connection, dbname: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A long dashboard query holds the table: the swap gives up after lock_timeout (readers
    never queue behind it for long), retries, and succeeds once the query is gone."""
    pg.execute(CHT_SYNC_2.format(s=SCHEMA))
    pg.execute(f"INSERT INTO {SCHEMA}.couchdb_progress VALUES ('0', 0, now(), 'h/medic')")
    cfg = cfg_for(dbname, "http://h:5984")
    monkeypatch.setattr(adopt, "LOCK_TIMEOUT", "100ms")
    holder = psycopg.connect(db.conninfo(cfg))
    holder.execute(f"SELECT count(*) FROM {SCHEMA}.couchdb")  # transaction left open

    waited = threading.Event()

    def release() -> None:
        # Let go once the migration has been seen waiting for the table (and giving up: 100 ms).
        with psycopg.connect(db.conninfo(cfg), autocommit=True) as watcher:
            wait_until(lambda: watcher.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_locks AS l JOIN pg_database AS d ON d.oid = l.database"
                " WHERE NOT l.granted AND d.datname = current_database() AND l.pid <> %s)",
                (holder.info.backend_pid,)).fetchone()[0], 60, "the migration waiting for the lock")
        waited.set()
        holder.rollback()

    threading.Thread(target=release, daemon=True).start()
    migrate.apply(cfg)
    assert waited.is_set()
    holder.close()
    assert "PRIMARY KEY (_id, source)" in dict(layout(pg)[2])["couchdb_pkey"]


def test_layouts_that_cannot_be_adopted_are_refused(pg: psycopg.Connection, dbname: str) -> None:
    # Before 1.0 (logstash): one row per revision.
    pg.execute(f"CREATE SCHEMA {SCHEMA}; CREATE TABLE {SCHEMA}.couchdb (\"@version\" TEXT,"
               ' "@timestamp" TIMESTAMP, "_id" TEXT, "_rev" TEXT, doc jsonb, doc_as_upsert BOOLEAN,'
               ' UNIQUE ("_id", "_rev"))')
    with pytest.raises(AdoptError, match="one row per revision"):
        migrate.apply(cfg_for(dbname))
    pg.execute(f"DROP SCHEMA {SCHEMA} CASCADE")
    # The stored seqs belong to other source names: adopting would store every document twice.
    pg.execute(CHT_SYNC_2.format(s=SCHEMA))
    pg.execute(f"INSERT INTO {SCHEMA}.couchdb VALUES (now(), 'a', false, 'CHT.example.org/medic', '{{}}')")
    pg.execute(f"INSERT INTO {SCHEMA}.couchdb_progress VALUES ('5', 0, now(), 'cht.example.org/medic')")
    with pytest.raises(AdoptError, match="would not be used"):
        migrate.apply(cfg_for(dbname, "http://10.0.0.5:5984"))
    assert "_rev" not in {r[1] for r in layout(pg)[0]}


# How couch2pg builds the URL (couch2pg/src/db.js) and the source (importer.js).
NODE_SOURCE = """
const [secure, host, port, db] = process.argv.slice(1);
const url = `${secure === 'true' ? 'https' : 'http'}://u:p@${host}:${port}/${db}`;
const u = new URL(url);
console.log(`${u.hostname}${u.pathname}`);
"""


@pytest.mark.parametrize("secure,host,port,db_name", [
    ("false", "127.0.0.1", "5984", "medic"),
    ("true", "cht.example.org", "443", "medic-users-meta"),
    ("true", "cht.example.org", "8443", "_users"),
    ("false", "couchdb", "5984", "medic-sentinel"),
    ("true", "CHT.Example.org", "443", "medic"),
])
def test_source_strings_are_cht_syncs(secure: str, host: str, port: str, db_name: str) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed")
    theirs = subprocess.run([node, "-e", NODE_SOURCE, secure, host, port, db_name],
                            capture_output=True, text=True, check=True).stdout.strip()
    cfg = make_config("x", COUCHDB_URL="", COUCHDB_HOST=host, COUCHDB_PORT=port, COUCHDB_SECURE=secure,
                      COUCHDB_DBS=db_name)
    assert cfg.sources[0].source_name(db_name) == theirs
