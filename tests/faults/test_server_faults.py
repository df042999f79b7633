"""Postgres restarted, sessions terminated mid-write, a read-only Postgres, a dying replica,
kill -9 during a steady trickle, and documents at the edges of what CouchDB accepts."""

from __future__ import annotations

import json
import random
import signal
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from chtsync.localservers import EmbeddedPostgres
from tests.conftest import make_config
from tests.faults.test_sync_faults import chtsync_env, count, load
from tests.servers import CouchAdmin
from tests.syncutil import BackgroundSync, assert_equal, pg_state, sync_once, wait_until

SOURCE = "127.0.0.1/medic"


def terminate_followers(pg: psycopg.Connection, dbname: str) -> int:
    return len(pg.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = %s AND application_name = 'chtsync' AND pid <> pg_backend_pid()", (dbname,)
    ).fetchall())


def test_postgres_restarted_mid_sync(couch: CouchAdmin, couch_server, tmp_path: Path, fault_report) -> None:
    load(couch, "medic", 6000)
    server = EmbeddedPostgres(tmp_path / "pgdata").start()
    try:
        server.create_database("faults")
        info = server.conninfo("faults")
        cfg = make_config("faults", couch_server.url, POSTGRES_HOST=info["host"], POSTGRES_PORT=str(info["port"]),
                          BATCH_SIZE="200")
        with BackgroundSync(cfg):
            with psycopg.connect(**info, autocommit=True) as pg:
                pg.execute("SET search_path = v1")
                wait_until(lambda: count(pg) >= 1000, timeout=60, what="first pages")
            server.stop()
            time.sleep(1.0)  # pacing: Postgres stays down a while, the followers retry meanwhile
            server.start()
            started = time.monotonic()
            with psycopg.connect(**info, autocommit=True) as pg:
                pg.execute("SET search_path = v1")
                wait_until(lambda: count(pg) == 6000, timeout=90, what="recovery after restart")
                recovered = time.monotonic() - started
                assert assert_equal(pg, couch, "medic", SOURCE) == 6000
                result = fault_report("Postgres restarted mid-sync (embedded PG 18)", pg, couch, "medic", SOURCE,
                                      recovered)
        assert (result.lost, result.duplicated) == (0, 0)
    finally:
        server.stop()


def test_sessions_terminated_mid_write(couch: CouchAdmin, cfg_factory, dbname: str, pg: psycopg.Connection,
                                       fault_report) -> None:
    load(couch, "medic", 6000)
    with BackgroundSync(cfg_factory("medic", BATCH_SIZE="100")) as bg:
        killed = 0
        started = time.monotonic()
        while count(pg) < 6000 and killed < 6 and time.monotonic() - started < 60:
            time.sleep(0.25)  # pacing: one round of kills per quarter second while it syncs
            killed += terminate_followers(pg, dbname)
        t = time.monotonic()
        wait_until(lambda: count(pg) == 6000, timeout=90, what="recovery after pg_terminate_backend")
        assert killed >= 3
        assert bg.stats()[0].errors.get("postgres", 0) >= 1
    result = fault_report("Postgres sessions terminated mid-write (x3-6)", pg, couch, "medic", SOURCE,
                          time.monotonic() - t)
    assert (result.lost, result.duplicated) == (0, 0)


def test_read_only_postgres_is_reported_retried_and_loses_nothing(
    couch: CouchAdmin, cfg_factory, dbname: str, pg: psycopg.Connection, fault_report
) -> None:
    load(couch, "medic", 500)
    with BackgroundSync(cfg_factory("medic", BATCH_SIZE="100")) as bg:
        wait_until(lambda: count(pg) == 500, timeout=60, what="initial sync")
        # Like a full disk or a failover to a replica: the server refuses writes.
        pg.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')
        terminate_followers(pg, dbname)
        couch.bulk("medic", [{"_id": f"late{i}", "type": "person"} for i in range(50)])
        wait_until(lambda: "read-only" in (bg.stats()[0].reason or ""), timeout=30, what="read-only reported")
        assert bg.stats()[0].state == "retrying"
        assert count(pg) == 500
        pg.execute(f'ALTER DATABASE "{dbname}" RESET default_transaction_read_only')
        t = time.monotonic()
        wait_until(lambda: count(pg) == 550, timeout=60, what="recovery after read-only")
    result = fault_report("Postgres read-only (writes refused), then writable", pg, couch, "medic", SOURCE,
                          time.monotonic() - t)
    assert (result.lost, result.duplicated) == (0, 0)


@pytest.mark.both_servers
def test_big_deep_and_refused_documents_in_one_page(couch: CouchAdmin, couch_impl: str, cfg_factory,
                                                    pg: psycopg.Connection, fault_report) -> None:
    couch.create_db("medic")
    deep = 3000
    big = 7 * 1024 * 1024  # CouchDB 3 refuses documents over max_document_size (8 MB by default)
    long_id = "".join(random.Random(5).choices(string.ascii_letters, k=9000))
    docs = [
        '{"_id":"big","blob":"' + "y" * big + '"}',
        '{"_id":"deep","v":' + "[" * deep + "1" + "]" * deep + "}",
        json.dumps({"_id": long_id, "note": "too big for the primary key index: Postgres refuses it"}),
        '{"_id":"fine","type":"person"}',
    ]
    body = '{"docs":[' + ",".join(docs) + "]}"
    assert couch.http.post("/medic/_bulk_docs", content=body).status_code == 201
    t = time.monotonic()
    (stats,) = sync_once(cfg_factory("medic"))
    assert stats.state == "caught up" and stats.refused == 1
    got = pg_state(pg, SOURCE)
    assert set(got) == {"big", "deep", "fine"}
    assert pg.execute("SELECT length(doc->>'blob') FROM couchdb WHERE _id = 'big'").fetchone()[0] == big
    depth = pg.execute("SELECT jsonb_path_query_first(doc, ('strict $.v' || repeat('[0]', 2999))::jsonpath)::text"
                       " FROM couchdb WHERE _id = 'deep'").fetchone()[0]
    assert depth == "[1]"
    assert [r[0] for r in pg.execute("SELECT _id FROM chtsync_errors")] == [long_id]
    want = couch.state("medic")
    assert all(got[k] == want[k] for k in got)
    result = fault_report("7 MB + 3000-deep + refused document in one page", pg, couch, "medic", SOURCE,
                          time.monotonic() - t)
    assert (result.lost, result.duplicated, result.refused) == (0, 0, 1)


def lease_owner(pg: psycopg.Connection) -> str | None:
    row = pg.execute("SELECT owner FROM chtsync_sources WHERE source = %s", (SOURCE,)).fetchone()
    return row[0] if row else None


def test_two_replicas_active_killed_survivor_takes_over(
    couch: CouchAdmin, couch_server, dbname: str, pg: psycopg.Connection, fault_report, tmp_path: Path
) -> None:
    load(couch, "medic", 4000)
    env = chtsync_env(couch_server.url, dbname, BATCH_SIZE="100", LOG_LEVEL="INFO")
    logs = [(tmp_path / f"replica{i}.log").open("w") for i in range(2)]  # closed in finally
    a = subprocess.Popen([sys.executable, "-m", "chtsync", "sync"], env=env, stdout=logs[0], stderr=logs[0])
    b = None
    try:
        wait_until(lambda: (lease_owner(pg) or "").endswith(f":{a.pid}"), timeout=60, what="replica A leads")
        b = subprocess.Popen([sys.executable, "-m", "chtsync", "sync"], env=env, stdout=logs[1], stderr=logs[1])
        wait_until(lambda: "standby" in (tmp_path / "replica1.log").read_text(), timeout=30, what="B on standby")
        assert lease_owner(pg).endswith(f":{a.pid}")
        wait_until(lambda: count(pg) >= 1000, timeout=60, what="A writing")
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        killed = time.monotonic()
        wait_until(lambda: (lease_owner(pg) or "").endswith(f":{b.pid}"), timeout=30, what="B takes over")
        takeover = time.monotonic() - killed
        assert takeover < 10
        # Writes continue under the new leader; an older revision never overwrites a newer one.
        doc = couch.get("medic", "doc000001")
        doc["edited"] = 1
        couch.put("medic", doc)
        wait_until(lambda: count(pg) == 4000 and pg_state(pg, SOURCE)["doc000001"][0] == couch.get(
            "medic", "doc000001")["_rev"], timeout=90, what="B finishes")
        result = fault_report("two replicas, active one killed, standby takes over", pg, couch, "medic", SOURCE,
                              time.monotonic() - killed)
        assert (result.lost, result.duplicated) == (0, 0)
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
        for f in logs:
            f.close()


@pytest.mark.both_servers
@pytest.mark.parametrize("rounds", [3])
def test_kill_9_during_steady_trickle(couch: CouchAdmin, couch_server, dbname: str, pg: psycopg.Connection,
                                      fault_report, rounds: int) -> None:
    load(couch, "medic", 2000)
    env = chtsync_env(couch_server.url, dbname, BATCH_SIZE="50")
    stop = threading.Event()
    rng = random.Random(42)

    def trickle() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            action = rng.random()
            target = f"doc{rng.randrange(2000):06d}"
            try:
                if action < 0.5:
                    couch.put("medic", {"_id": f"trickle{i}", "type": "data_record"})
                elif action < 0.8:
                    doc = couch.get("medic", target)
                    if "_rev" in doc:
                        doc["n"] = i
                        couch.put("medic", doc)
                else:
                    couch.delete("medic", target)
            except (AssertionError, KeyError):
                # a conflict, or an already deleted document (its GET has no _rev): CouchDB said
                # no, nothing to sync; the writer goes on
                pass
            time.sleep(0.02)  # pacing: a trickle writer, not a flood

    writer = threading.Thread(target=trickle, daemon=True)
    writer.start()
    try:
        for _ in range(rounds):
            proc = subprocess.Popen([sys.executable, "-m", "chtsync", "sync"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(1.0, 3.0))  # pacing: killed at a random moment of its work
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    finally:
        stop.set()
        writer.join(10)
    t = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "chtsync", "sync", "--once"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert_equal(pg, couch, "medic", SOURCE)
    r = fault_report(f"kill -9 during a steady trickle (x{rounds})", pg, couch, "medic", SOURCE, time.monotonic() - t)
    assert (r.lost, r.duplicated) == (0, 0)
