"""`chtsync verify [--repair]` against the real Postgres and pouchdb-server."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from dataclasses import replace

import psycopg
import pytest

from chtsync import cli, db, verify
from chtsync.config import Config
from tests.servers import CouchAdmin
from tests.syncutil import BackgroundSync, assert_equal, pg_state, sync_once, wait_until

SOURCE = "127.0.0.1/medic"


def people(n: int, prefix: str = "p") -> list[dict]:
    return [{"_id": f"{prefix}{i:05d}", "type": "person", "name": f"Person {i}"} for i in range(n)]


def run(cfg: Config, **kw: object) -> verify.SourceReport:
    kw.setdefault("settle", 0.3)
    (report,) = asyncio.run(verify.verify(cfg, **kw))  # type: ignore[arg-type]
    return report


def kinds(report: verify.SourceReport, which: str = "found") -> dict[str, list[str]]:
    return {k: report.ids(k, which) for k in verify.KINDS}


def assert_equal_but_vanished(pg: psycopg.Connection, couch: CouchAdmin, db_name: str,
                              vanished: set[str]) -> None:
    """assert_equal, except that rows of documents CouchDB no longer knows stay as tombstones
    (that is what lets incremental models drop them)."""
    rows = pg_state(pg, SOURCE)
    for doc_id in vanished:
        assert rows[doc_id][1] is True, f"{doc_id} should be a tombstone"
    pg.execute("CREATE TEMP TABLE keep AS SELECT * FROM couchdb WHERE _id = ANY(%s)", (list(vanished),))
    pg.execute("DELETE FROM couchdb WHERE _id = ANY(%s)", (list(vanished),))
    try:
        assert_equal(pg, couch, db_name, SOURCE)
    finally:
        pg.execute("INSERT INTO couchdb SELECT * FROM keep")
        pg.execute("DROP TABLE keep")


def test_equal_databases_verify_clean(couch: CouchAdmin, cfg_factory, pg: psycopg.Connection) -> None:
    couch.create_db("medic")
    couch.bulk("medic", people(250))
    couch.delete("medic", "p00007")
    cfg = cfg_factory("medic")
    sync_once(cfg)
    # Rows adopted from CHT Sync have no _rev column: the revision inside doc counts.
    pg.execute("UPDATE couchdb SET _rev = NULL WHERE _id = 'p00003'")
    report = run(cfg, page_size=40)  # several pages, start_key overlap handled
    assert report.equal and report.result() == "equal"
    assert report.checked == 249
    assert (report.couch_docs, report.pg_docs, report.pg_deleted) == (249, 249, 1)
    assert verify.exit_code([report]) == 0
    row = pg.execute("SELECT equal, missing, stale, vanished, error FROM chtsync_verify").fetchone()
    assert row == (True, 0, 0, 0, None)


def test_finds_and_repairs_missing_stale_and_vanished(
    couch: CouchAdmin, cfg_factory, pg: psycopg.Connection
) -> None:
    couch.create_db("medic")
    couch.bulk("medic", people(300))
    couch.delete("medic", "p00040")  # a tombstone in both: fine
    cfg = cfg_factory("medic")
    sync_once(cfg)

    # Missing: rows lost from Postgres.
    pg.execute("DELETE FROM couchdb WHERE _id IN ('p00010', 'p00011')")
    # Stale: Postgres put back to an older revision of the document.
    old = pg.execute("SELECT doc, _rev FROM couchdb WHERE _id = 'p00020'").fetchone()
    doc = couch.get("medic", "p00020")
    couch.put("medic", {**doc, "name": "Edited"})
    sync_once(cfg)
    pg.execute("UPDATE couchdb SET doc = %s, _rev = %s WHERE _id = 'p00020'", (json.dumps(old[0]), old[1]))
    # Stale: edited and deleted in CouchDB while no sync runs.
    doc = couch.get("medic", "p00030")
    couch.put("medic", {**doc, "name": "Edited too"})
    couch.delete("medic", "p00031")
    # Vanished: a row for a document CouchDB never had.
    pg.execute(
        "INSERT INTO couchdb (_id, source, doc, _rev) VALUES ('ghost', %s, %s, '3-abc')",
        (SOURCE, json.dumps({"_id": "ghost", "_rev": "3-abc", "type": "person"})),
    )

    report = run(cfg, page_size=100)
    assert kinds(report) == {
        "missing": ["p00010", "p00011"],
        "stale": ["p00020", "p00030", "p00031"],
        "vanished": ["ghost"],
    }
    assert verify.exit_code([report]) == 1
    assert report.repaired is None

    before = pg.execute("SELECT max(_xid::text::bigint) FROM couchdb").fetchone()[0]
    fixed = run(cfg, repair=True)
    assert kinds(fixed) == kinds(report)
    assert fixed.remaining == {} and fixed.repaired == 6 and fixed.result() == "repaired"
    assert verify.exit_code([fixed]) == 0

    ghost = pg.execute("SELECT _deleted, doc, _rev, _xid::text::bigint FROM couchdb WHERE _id = 'ghost'").fetchone()
    assert ghost[:3] == (True, {"_id": "ghost", "_rev": "3-abc", "_deleted": True}, "3-abc")
    assert ghost[3] > before  # a new _xid: incremental models see the deletion
    assert pg.execute("SELECT doc->>'name' FROM couchdb WHERE _id = 'p00020'").fetchone()[0] == "Edited"
    assert pg_state(pg, SOURCE)["p00031"][1] is True

    again = run(cfg)
    assert again.equal and again.found == {}
    assert_equal_but_vanished(pg, couch, "medic", {"ghost"})


@pytest.mark.both_servers
def test_recreated_database_purged_documents_vanish(
    couch: CouchAdmin, cfg_factory, pg: psycopg.Connection
) -> None:
    """A database deleted and recreated with other documents loses documents without any
    _changes entry, as a purge does: verify finds them, --repair turns them into tombstones."""
    couch.create_db("medic")
    couch.bulk("medic", people(120))
    cfg = cfg_factory("medic")
    sync_once(cfg)
    couch.delete_db("medic")
    couch.create_db("medic")
    couch.bulk("medic", people(30, prefix="new"))

    report = run(cfg, page_size=1000)
    found = kinds(report)
    assert found["missing"] == [f"new{i:05d}" for i in range(30)]
    assert found["vanished"] == [f"p{i:05d}" for i in range(120)]
    assert found["stale"] == []
    assert (report.couch_docs, report.pg_docs) == (30, 120)

    fixed = run(cfg, repair=True)
    assert fixed.repaired == 150 and fixed.equal
    assert (fixed.couch_docs, fixed.pg_docs, fixed.pg_deleted) == (30, 30, 120)
    assert run(cfg).equal
    assert_equal_but_vanished(pg, couch, "medic", {f"p{i:05d}" for i in range(120)})
    # The follower, started afterwards, finds the feed rewound and agrees.
    sync_once(cfg)
    assert run(cfg).equal


def test_refused_document_is_reported_not_hidden(couch: CouchAdmin, cfg_factory, pg: psycopg.Connection) -> None:
    couch.create_db("medic")
    docs = people(10)
    # Too long (and too random to compress) for the primary key index: Postgres refuses it.
    refused = "p00004" + "".join(random.Random(4).choices("abcdefghijklmnopqrstuvwxyz", k=9000))
    docs[4]["_id"] = refused
    r = couch.http.post("/medic/_bulk_docs", content=json.dumps({"docs": docs}))
    assert r.status_code == 201
    cfg = cfg_factory("medic")
    sync_once(cfg)
    pg.execute("DELETE FROM couchdb WHERE _id = 'p00006'")
    fixed = run(cfg, repair=True)
    assert kinds(fixed) == {"missing": [refused, "p00006"], "stale": [], "vanished": []}
    assert fixed.repaired == 1 and fixed.refused == 1
    assert kinds(fixed, "remaining")["missing"] == [refused]
    assert verify.exit_code([fixed]) == 1
    reasons = [r[0] for r in pg.execute("SELECT reason FROM chtsync_errors WHERE _id = %s", (refused,))]
    assert any(reason.startswith("verify --repair: refused") for reason in reasons)


def test_no_false_alarms_while_the_sync_writes(couch: CouchAdmin, cfg_factory, pg: psycopg.Connection) -> None:
    couch.create_db("medic")
    couch.bulk("medic", people(400))
    cfg = cfg_factory("medic", BATCH_SIZE="50")
    done = threading.Event()
    written = [0]
    thread_ok: list[bool] = []

    def writer() -> None:
        rng = random.Random(11)
        n = 0
        while not done.is_set():
            action = rng.random()
            doc_id = f"p{rng.randrange(400):05d}"
            current = couch.get("medic", doc_id)
            if action < 0.15 and "_rev" in current:
                couch.delete("medic", doc_id)
            elif action < 0.5:
                couch.put("medic", {"_id": f"live{n:05d}", "type": "person"})
                n += 1
            else:
                body = {"_id": doc_id, "type": "person", "name": f"edit {n}"}
                if "_rev" in current:
                    body["_rev"] = current["_rev"]
                couch.put("medic", body)
            written[0] += 1
            time.sleep(0.005)  # pacing: a trickle writer
        thread_ok.append(True)

    with BackgroundSync(cfg):
        wait_until(lambda: len(pg_state(pg, SOURCE)) >= 400, what="initial sync")
        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        reports = []
        started = time.monotonic()
        try:
            while time.monotonic() - started < 6 or len(reports) < 3:
                reports.append(run(cfg, page_size=60, settle=0.5))
        finally:
            done.set()
            thread.join(10)
        # The scans really ran beside a stream of writes, and saw changes in flight.
        assert written[0] > 30 and thread_ok
        assert sum(r.candidates for r in reports) > 0
        for report in reports:
            assert report.found == {}, kinds(report)
            assert report.checked >= 300
        wait_until(lambda: run(cfg).equal, what="final verify")
    assert_equal(pg, couch, "medic", SOURCE)


def test_cli_table_json_and_exit_codes(
    couch: CouchAdmin, cfg_factory, pg: psycopg.Connection, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], tmp_path,
) -> None:
    couch.create_db("medic")
    couch.bulk("medic", people(20))
    cfg = cfg_factory("medic")
    sync_once(cfg)
    for key, value in {
        "COUCHDB_URL": cfg.sources[0].url, "COUCHDB_USER": cfg.sources[0].user,
        "COUCHDB_PASSWORD": cfg.sources[0].password, "COUCHDB_DBS": "medic",
        "POSTGRES_HOST": cfg.postgres.host, "POSTGRES_PORT": str(cfg.postgres.port),
        "POSTGRES_USER": cfg.postgres.user, "POSTGRES_DB": cfg.postgres.dbname,
    }.items():
        monkeypatch.setenv(key, value or "")
    monkeypatch.chdir(tmp_path)  # no ./config.yaml

    assert cli.main(["verify"]) == 0
    out = capsys.readouterr().out
    assert "missing" in out.splitlines()[0] and "equal" in out

    pg.execute("DELETE FROM couchdb WHERE _id = 'p00003'")
    assert cli.main(["verify", "--json", "--settle", "0.2"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["equal"] is False
    (src,) = data["sources"]
    assert src["found"]["missing"] == {"count": 1, "ids": ["p00003"]}
    assert src["couch"] == {"docs": 20, "deleted": 0} and src["postgres"]["docs"] == 19

    assert cli.main(["verify", "--repair", "--settle", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "repaired" in out and couch.state("medic").keys() == pg_state(pg, SOURCE).keys()
    assert cli.main(["verify", "--source", "nope"]) == 2
    assert "not a configured database" in capsys.readouterr().err


def test_scheduled_verify_takes_the_lock_and_repairs(
    couch: CouchAdmin, cfg_factory, pg: psycopg.Connection
) -> None:
    couch.create_db("medic")
    couch.bulk("medic", people(30))
    cfg = cfg_factory("medic")
    sync_once(cfg)
    pg.execute("DELETE FROM couchdb WHERE _id = 'p00005'")
    fast = replace(cfg, verify_interval=0.2)  # the config loader allows 60 s at least

    # Another replica holds the lock: this one does not verify.
    key = (db.LOCK_CLASS, db.lock_key(cfg, "verify"))
    with psycopg.connect(pg.info.dsn, autocommit=True) as other:
        assert other.execute("SELECT pg_try_advisory_lock(%s, %s)", key).fetchone()[0]
        assert asyncio.run(verify.verify_locked(fast)) is None
    assert "p00005" not in pg_state(pg, SOURCE)

    async def scenario() -> None:
        stop = asyncio.Event()
        loop = asyncio.create_task(verify.verify_loop(fast, stop))
        deadline = time.monotonic() + 30
        while not (await asyncio.to_thread(pg.execute, "SELECT 1 FROM chtsync_verify")).fetchone():
            assert time.monotonic() < deadline and not loop.done()
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(loop, 10)

    asyncio.run(scenario())
    assert "p00005" in pg_state(pg, SOURCE)
    row = pg.execute("SELECT equal, missing, repaired FROM chtsync_verify").fetchone()
    assert row == (True, 1, 1)
    # Off by default: returns at once.
    asyncio.run(asyncio.wait_for(verify.verify_loop(cfg, asyncio.Event()), 1))
