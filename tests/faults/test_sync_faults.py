"""Faults during sync: kill -9 of the process, connections cut mid-stream. Real servers only;
every test ends by asserting Postgres equals CouchDB exactly (ids, revisions, tombstones)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import PG_HOST, PG_PORT
from tests.servers import ADMIN, CouchAdmin, CouchDBServer, TcpProxy, free_port
from tests.syncutil import BackgroundSync, assert_equal, pg_state, sync_once, wait_until


def load(couch: CouchAdmin, db: str, n: int, size: int = 600) -> None:
    couch.create_db(db)
    pad = "x" * size
    for start in range(0, n, 1000):
        couch.bulk(db, [{"_id": f"doc{i:06d}", "type": "data_record", "pad": pad}
                        for i in range(start, min(n, start + 1000))])


def chtsync_env(url: str, dbname: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ, COUCHDB_URL=url, COUCHDB_USER=ADMIN[0], COUCHDB_PASSWORD=ADMIN[1],
               COUCHDB_DBS="medic", POSTGRES_HOST=PG_HOST, POSTGRES_PORT=str(PG_PORT),
               POSTGRES_USER="postgres", POSTGRES_DB=dbname, CHTSYNC_CONFIG=os.devnull)
    env.update(extra)
    return env


def count(pg: psycopg.Connection) -> int:
    return pg.execute("SELECT count(*) FROM couchdb").fetchone()[0]


def compacted(couch: CouchAdmin, db: str) -> bool:
    """Compaction has finished (pouchdb-server compacts at once and reports no `compact_running`)."""
    return not couch.http.get(f"/{db}").json().get("compact_running", False)


@pytest.mark.both_servers
def test_kill_9_mid_sync_then_restart(couch: CouchAdmin, couch_server, dbname: str, pg: psycopg.Connection,
                                      fault_report) -> None:
    n = 8000
    load(couch, "medic", n)
    env = chtsync_env(couch_server.url, dbname, BATCH_SIZE="100")
    for kills in range(1, 4):
        proc = subprocess.Popen([sys.executable, "-m", "chtsync", "sync"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = count(pg)
        try:
            wait_until(lambda b=before, p=proc: count(pg) >= b + 1500 or p.poll() is not None,
                       timeout=60, what="progress")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        if count(pg) >= n:
            break
        # Edits and deletes land between the crashes, as in a live deployment.
        couch.delete(db="medic", doc_id=f"doc{kills:06d}")
    t = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "chtsync", "sync", "--once"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert assert_equal(pg, couch, "medic", "127.0.0.1/medic") == n
    r = fault_report("kill -9 of chtsync during initial sync (up to x3), restart", pg, couch, "medic",
                     "127.0.0.1/medic", time.monotonic() - t)
    assert (r.lost, r.duplicated) == (0, 0)
    assert pg.execute("SELECT count(*) FROM chtsync_errors").fetchone()[0] == 0


@pytest.mark.both_servers
def test_couchdb_and_postgres_connections_cut_mid_stream(
    couch: CouchAdmin, couch_server, cfg_factory, pg: psycopg.Connection, fault_report
) -> None:
    n = 6000
    load(couch, "medic", n)
    couch_proxy = TcpProxy(getattr(couch_server, "host", "127.0.0.1"), couch_server.port)
    pg_proxy = TcpProxy(PG_HOST, PG_PORT)
    cfg = cfg_factory("medic", url=f"http://127.0.0.1:{couch_proxy.port}",
                      POSTGRES_PORT=str(pg_proxy.port), BATCH_SIZE="200")
    try:
        with BackgroundSync(cfg) as bg:
            cuts = 0
            deadline = time.monotonic() + 90
            while count(pg) < n and time.monotonic() < deadline:
                time.sleep(0.3)  # pacing: one cut every 0.3 s while it syncs
                proxy = couch_proxy if cuts % 2 == 0 else pg_proxy
                cuts += 1 if proxy.cut() else 0
                if cuts >= 6:
                    break
            # Keep writing while the connections come back.
            doc = couch.get("medic", "doc000010")
            doc["edited"] = True
            couch.put("medic", doc)
            t = time.monotonic()
            # Recovered: every document in (the cuts may stop the first sync's key ranges short
            # of the last one while the edit, in the first range, is already there) and the edit.
            wait_until(lambda: count(pg) >= n and pg_state(pg, "127.0.0.1/medic").get("doc000010", ("",))[0]
                       == couch.get("medic", "doc000010")["_rev"], timeout=90, what="recovery after cuts")
            recovered = time.monotonic() - t
            (stats,) = bg.stop_now()
        assert cuts >= 4
        assert stats.errors.get("couchdb", 0) + stats.errors.get("postgres", 0) >= 1
        assert assert_equal(pg, couch, "medic", "127.0.0.1/medic") == n
        fault_report("CouchDB and Postgres connections reset mid-stream (x4-6)", pg, couch, "medic",
                     "127.0.0.1/medic", recovered)
    finally:
        couch_proxy.close()
        pg_proxy.close()


def test_resume_after_clean_stop_sends_stored_seq(couch: CouchAdmin, cfg_factory, pg: psycopg.Connection) -> None:
    load(couch, "medic", 500)
    cfg = cfg_factory("medic", BATCH_SIZE="100")
    sync_once(cfg)
    seq = pg.execute("SELECT seq FROM couchdb_progress").fetchone()[0]
    # The stored seq is CouchDB's own (opaque) and covers everything: nothing comes after it.
    after = couch.http.get("/medic/_changes", params={"since": seq}).json()
    assert after["results"] == [] and after["last_seq"] == seq
    couch.put("medic", {"_id": "late", "type": "person"})
    (stats,) = sync_once(cfg)
    assert stats.docs_written == 1 and stats.pages == 1


@pytest.mark.both_servers
def test_database_recreated_with_other_documents_then_verify_repair(
    couch: CouchAdmin, cfg_factory, pg: psycopg.Connection, fault_report
) -> None:
    from chtsync import verify

    load(couch, "medic", 3000)
    cfg = cfg_factory("medic", BATCH_SIZE="500")
    sync_once(cfg)
    # The database is deleted and recreated with partly different documents (a restore, a
    # migration gone wrong): the old ids vanish without ever appearing as deletions.
    couch.delete_db("medic")
    couch.create_db("medic")
    couch.bulk("medic", [{"_id": f"doc{i:06d}", "type": "data_record", "again": True} for i in range(1000)])
    couch.bulk("medic", [{"_id": f"fresh{i}", "type": "person"} for i in range(500)])
    t = time.monotonic()
    sync_once(cfg)  # notices the rewind, resyncs from 0
    reports = asyncio.run(verify.verify(cfg, repair=True, settle=0.2))
    assert verify.exit_code(reports) == 0, reports
    # The 2000 ids that vanished are tombstones now, so every model drops them.
    live = pg.execute("SELECT count(*) FROM couchdb WHERE NOT _deleted").fetchone()[0]
    assert live == 1500
    assert assert_equal(pg, couch, "medic", "127.0.0.1/medic", vanished_ok=True) == 1500
    fault_report("database deleted and recreated, then verify --repair", pg, couch, "medic",
                 "127.0.0.1/medic", time.monotonic() - t)


@pytest.mark.both_servers
def test_couchdb_down_then_back(couch: CouchAdmin, couch_server, cfg_factory, pg: psycopg.Connection,
                                fault_report) -> None:
    """CouchDB stops answering (connections refused) while changes keep happening, then returns.
    The proxy stands for the server here; test_couchdb_killed_mid_sync_and_restarted kills a real one."""
    load(couch, "medic", 2000)
    proxy = TcpProxy(getattr(couch_server, "host", "127.0.0.1"), couch_server.port)
    cfg = cfg_factory("medic", url=f"http://127.0.0.1:{proxy.port}", BATCH_SIZE="200")
    try:
        with BackgroundSync(cfg) as bg:
            wait_until(lambda: count(pg) >= 400, timeout=60, what="first pages")
            proxy.refusing = True
            proxy.cut()
            wait_until(lambda: bg.stats()[0].state == "retrying", timeout=30, what="retrying reported")
            assert "unreachable" in (bg.stats()[0].reason or "")
            couch.bulk("medic", [{"_id": f"while-down{i}", "type": "person"} for i in range(100)])
            proxy.refusing = False
            t = time.monotonic()
            wait_until(lambda: count(pg) == 2100, timeout=90, what="recovery after CouchDB came back")
            recovered = time.monotonic() - t
        assert assert_equal(pg, couch, "medic", "127.0.0.1/medic") == 2100
        r = fault_report("CouchDB down (refusing connections), then back", pg, couch, "medic", "127.0.0.1/medic",
                         recovered)
        assert (r.lost, r.duplicated) == (0, 0)
    finally:
        proxy.close()


@pytest.fixture
def own_couchdb(couchdb_server) -> Iterator[CouchDBServer]:
    """A CouchDB of this test's own, which it may kill: never the session's shared one."""
    if not isinstance(couchdb_server, CouchDBServer):
        pytest.skip("killing CouchDB needs the release tarball (CHTSYNC_TEST_COUCHDB_URL names a server"
                    " this suite must not kill)")
    server = CouchDBServer().start()
    yield server
    server.close()


def test_couchdb_killed_mid_sync_and_restarted(own_couchdb: CouchDBServer, cfg_factory, pg: psycopg.Connection,
                                               fault_report) -> None:
    """kill -9 of the CouchDB server mid-sync, then a start on the same data dir (same port)."""
    couch = own_couchdb.client()
    n = 8000
    load(couch, "medic", n)
    cfg = cfg_factory("medic", url=own_couchdb.url, BATCH_SIZE="200")
    with BackgroundSync(cfg) as bg:
        wait_until(lambda: count(pg) >= 1000, timeout=60, what="first pages")
        own_couchdb.kill()
        wait_until(lambda: bg.stats()[0].state == "retrying", timeout=30, what="retrying reported")
        assert count(pg) < n
        own_couchdb.start()
        t = time.monotonic()
        # Life goes on after the restart: an edit, a delete, new documents.
        doc = couch.get("medic", "doc000010")
        doc["edited"] = True
        couch.put("medic", doc)
        couch.delete("medic", "doc000011")
        couch.bulk("medic", [{"_id": f"after{i}", "type": "person"} for i in range(100)])
        wait_until(lambda: pg_state(pg, "127.0.0.1/medic") == couch.state("medic"), timeout=120,
                   what="Postgres equal to the restarted CouchDB")
        recovered = time.monotonic() - t
        assert bg.stats()[0].errors.get("couchdb", 0) >= 1
    assert assert_equal(pg, couch, "medic", "127.0.0.1/medic") == n + 100
    r = fault_report("CouchDB killed (kill -9) mid-sync, restarted on its data", pg, couch, "medic",
                     "127.0.0.1/medic", recovered)
    assert (r.lost, r.duplicated) == (0, 0)


@pytest.mark.both_servers
def test_database_compacted_during_sync(couch: CouchAdmin, cfg_factory, pg: psycopg.Connection,
                                        fault_report) -> None:
    n = 6000
    load(couch, "medic", n)
    # Old revisions for compaction to drop.
    docs = couch.http.get("/medic/_all_docs", params={"include_docs": "true", "limit": 2000}).json()["rows"]
    couch.bulk("medic", [{**r["doc"], "edited": 1} for r in docs])
    with BackgroundSync(cfg_factory("medic", BATCH_SIZE="200")):
        wait_until(lambda: count(pg) >= 1000, timeout=60, what="first pages")
        assert count(pg) < n
        r = couch.http.post("/medic/_compact")
        assert r.status_code == 202, r.text
        # Writes keep landing while the compaction runs.
        couch.bulk("medic", [{"_id": f"during{i}", "type": "person"} for i in range(200)])
        couch.delete("medic", "doc000001")
        t = time.monotonic()
        wait_until(lambda: compacted(couch, "medic"), timeout=120, what="compaction finished")
        wait_until(lambda: pg_state(pg, "127.0.0.1/medic") == couch.state("medic"), timeout=120,
                   what="Postgres equal to the compacted database")
        recovered = time.monotonic() - t
    assert assert_equal(pg, couch, "medic", "127.0.0.1/medic") == n + 200
    r = fault_report("database compacted (POST /db/_compact) during the sync", pg, couch, "medic",
                     "127.0.0.1/medic", recovered)
    assert (r.lost, r.duplicated) == (0, 0)


def test_sync_once_gives_up_on_an_unreachable_couchdb(cfg_factory, dbname: str) -> None:
    env = chtsync_env(f"http://127.0.0.1:{free_port()}", dbname)
    r = subprocess.run([sys.executable, "-m", "chtsync", "sync", "--once"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("chtsync: 127.0.0.1/medic: CouchDB at http://127.0.0.1:") and "unreachable" in last
