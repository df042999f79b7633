"""CouchDB's winner, whatever its revision: conflicts, a winning leaf deleted, a live branch under
a tombstone, a recreated database, and verify --repair (compare-and-set) on the real CouchDB."""

from __future__ import annotations

import asyncio
import json
import threading

import psycopg
import pytest

from chtsync import verify
from chtsync.couch import CouchClient
from tests.servers import CouchAdmin
from tests.syncutil import BackgroundSync, assert_equal, pg_state, sync_once, wait_until

SOURCE = "127.0.0.1/medic"


def branches(couch: CouchAdmin, db: str, doc_id: str, *leaves: tuple[str, dict]) -> None:
    """Add leaves to a document as replication would (`new_edits: false`): each leaf is
    (rev "N-hash", body); a leaf at generation N gets a made-up history of its own."""
    docs = []
    for rev, body in leaves:
        gen, rev_hash = rev.split("-", 1)
        history = [rev_hash] + [f"{rev_hash}{g}" for g in range(int(gen) - 1, 0, -1)]
        docs.append({"_id": doc_id, "_rev": rev, "_revisions": {"start": int(gen), "ids": history},
                     **body})
    r = couch.http.post(f"/{db}/_bulk_docs", content=json.dumps({"docs": docs, "new_edits": False}))
    assert r.status_code == 201, r.text


def winner(couch: CouchAdmin, db: str, doc_id: str) -> tuple[str, bool]:
    return couch.state(db)[doc_id]


def body(pg: psycopg.Connection, doc_id: str) -> dict:
    return pg.execute("SELECT doc FROM couchdb WHERE _id = %s", (doc_id,)).fetchone()[0]


def delete_rev(couch: CouchAdmin, db: str, doc_id: str, rev: str) -> None:
    r = couch.http.delete(f"/{db}/{doc_id}", params={"rev": rev})
    assert r.status_code == 200, r.text


def test_winning_leaf_deleted_moves_the_winner_to_a_lower_revision(
    couch: CouchAdmin, cfg_factory, pg: psycopg.Connection
) -> None:
    couch.create_db("medic")
    couch.put("medic", {"_id": "plain", "type": "person"})
    branches(couch, "medic", "two", ("1-aaaa", {"v": "low"}), ("3-ffff", {"v": "high"}))
    cfg = cfg_factory("medic")
    sync_once(cfg)
    assert pg_state(pg, SOURCE)["two"] == ("3-ffff", False)

    delete_rev(couch, "medic", "two", "3-ffff")  # CouchDB's winner is now the 1-aaaa branch
    assert winner(couch, "medic", "two") == ("1-aaaa", False)
    sync_once(cfg)
    assert_equal(pg, couch, "medic", SOURCE)
    assert body(pg, "two")["v"] == "low"


def test_three_way_conflict_resolved_leaf_by_leaf(couch: CouchAdmin, cfg_factory, pg: psycopg.Connection) -> None:
    """Three roots at generation 1: each deletion of the winner hands it to a lower hash."""
    couch.create_db("medic")
    branches(couch, "medic", "tri", ("1-aaaa", {"v": "a"}), ("1-bbbb", {"v": "b"}), ("1-cccc", {"v": "c"}))
    cfg = cfg_factory("medic")
    with BackgroundSync(cfg):
        for expect, gone in (("1-cccc", None), ("1-bbbb", "1-cccc"), ("1-aaaa", "1-bbbb")):
            if gone:
                delete_rev(couch, "medic", "tri", gone)
            assert winner(couch, "medic", "tri") == (expect, False)
            wait_until(lambda e=expect: pg_state(pg, SOURCE).get("tri") == (e, False), 20,
                       f"winner {expect} in Postgres")
            assert body(pg, "tri")["v"] == expect[-1]
        # The last leaf deleted: the document is deleted, its winner a tombstone.
        delete_rev(couch, "medic", "tri", "1-aaaa")
        want = winner(couch, "medic", "tri")
        assert want[1] is True
        wait_until(lambda: pg_state(pg, SOURCE).get("tri") == want, 20, "tombstone in Postgres")
    assert_equal(pg, couch, "medic", SOURCE)


def test_live_branch_under_a_tombstone_resurrects_the_document(
    couch: CouchAdmin, cfg_factory, pg: psycopg.Connection
) -> None:
    couch.create_db("medic")
    couch.put("medic", {"_id": "lazarus", "v": "first"})
    couch.put("medic", {"_id": "lazarus", "_rev": couch.get("medic", "lazarus")["_rev"], "v": "second"})
    couch.delete("medic", "lazarus")  # 3-... deleted
    cfg = cfg_factory("medic")
    sync_once(cfg)
    assert pg_state(pg, SOURCE)["lazarus"][1] is True

    branches(couch, "medic", "lazarus", ("1-0000", {"v": "branch"}))  # live beats deleted
    assert winner(couch, "medic", "lazarus") == ("1-0000", False)
    sync_once(cfg)
    assert_equal(pg, couch, "medic", SOURCE)
    assert body(pg, "lazarus")["v"] == "branch"


def test_identical_replay_writes_nothing(couch: CouchAdmin, cfg_factory, pg: psycopg.Connection) -> None:
    """Without a revision guard, a replayed page (crash before the checkpoint, a rewind) must
    still leave rows and their _xid alone, or incremental models would redo work."""
    couch.create_db("medic")
    couch.bulk("medic", [{"_id": f"d{i}", "v": i} for i in range(20)])
    couch.delete("medic", "d3")
    cfg = cfg_factory("medic")
    sync_once(cfg)
    before = pg.execute("SELECT _id, _xid::text FROM couchdb ORDER BY _id").fetchall()
    pg.execute("UPDATE couchdb_progress SET seq = '0'")
    (stats,) = sync_once(cfg)
    assert stats.docs_written == 0
    assert pg.execute("SELECT _id, _xid::text FROM couchdb ORDER BY _id").fetchall() == before
    assert_equal(pg, couch, "medic", SOURCE)


def test_recreated_database_grown_past_the_checkpoint(couch: CouchAdmin, cfg_factory, pg: psycopg.Connection) -> None:
    """Recreated and refilled beyond the old update_seq, with the same ids at lower revisions:
    the database's creation time tells, the follower reads it from 0, and the verify it then
    owes turns the rows of documents the new database lacks into tombstones."""
    couch.create_db("medic")
    couch.bulk("medic", [{"_id": f"p{i:03d}", "v": "old"} for i in range(30)])
    for i in range(10):  # p000..p009 at generation 3
        for _ in range(2):
            doc = couch.get("medic", f"p{i:03d}")
            couch.put("medic", {**doc, "v": "old edited"})
    cfg = cfg_factory("medic")
    sync_once(cfg)
    old_instance = couch.http.get("/medic").json()["instance_start_time"]
    old_seq = pg.execute("SELECT seq FROM couchdb_progress").fetchone()[0]

    def recreated() -> bool:  # creation time has a resolution of one second
        couch.delete_db("medic")
        couch.create_db("medic")
        # a loaded node may answer not_found a moment after creating it: try again
        return couch.http.get("/medic").json().get("instance_start_time", old_instance) != old_instance

    wait_until(recreated, 10, "a database with another creation time")
    couch.bulk("medic", [{"_id": f"p{i:03d}", "v": "new"} for i in range(20)]
               + [{"_id": f"q{i:03d}"} for i in range(60)])
    new_seq = couch.http.get("/medic").json()["update_seq"]
    assert int(new_seq.split("-")[0]) > int(old_seq.split("-")[0])  # grown past the checkpoint

    (stats,) = sync_once(cfg)
    assert stats.state == "caught up" and stats.errors.get("rewind") == 1
    assert_equal(pg, couch, "medic", SOURCE, vanished_ok=True)
    rows = pg_state(pg, SOURCE)
    assert all(rows[f"p{i:03d}"][0].startswith("1-") for i in range(20))
    assert {k for k, v in rows.items() if v[1]} == {f"p{i:03d}" for i in range(20, 30)}
    assert {r[0] for r in pg.execute("SELECT doc->>'v' FROM couchdb WHERE NOT _deleted AND _id LIKE 'p%'")} == {"new"}
    marks = pg.execute("SELECT couch_instance, verify_due FROM chtsync_sources").fetchone()
    assert marks == (couch.http.get("/medic").json()["instance_start_time"], None)
    assert pg.execute("SELECT equal, vanished FROM chtsync_verify").fetchone() == (True, 10)  # repaired
    # A second run finds nothing to do.
    (again,) = sync_once(cfg)
    assert again.docs_written == 0 and "rewind" not in again.errors


def run_verify(cfg, **kw: object) -> verify.SourceReport:
    kw.setdefault("settle", 0.3)
    (report,) = asyncio.run(verify.verify(cfg, **kw))  # type: ignore[arg-type]
    return report


def test_repair_fixes_a_stale_row_whose_revision_sorts_higher(
    couch: CouchAdmin, cfg_factory, pg: psycopg.Connection
) -> None:
    couch.create_db("medic")
    couch.bulk("medic", [{"_id": f"p{i}", "v": i} for i in range(5)])
    cfg = cfg_factory("medic")
    sync_once(cfg)
    pg.execute("UPDATE couchdb SET _rev = '9-zzz', doc = doc || '{\"_rev\": \"9-zzz\", \"v\": 99}'"
               " WHERE _id = 'p2'")
    pg.execute("UPDATE couchdb SET _deleted = true WHERE _id = 'p3'")
    fixed = run_verify(cfg, repair=True)
    assert fixed.ids("stale") == ["p2", "p3"]
    assert fixed.remaining == {} and fixed.repaired == 2 and verify.exit_code([fixed]) == 0
    assert_equal(pg, couch, "medic", SOURCE)
    assert body(pg, "p2")["v"] == 2


def test_repair_never_overwrites_what_the_follower_wrote_meanwhile(
    couch: CouchAdmin, cfg_factory, pg: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Repair fetches p1 at revision A; before its write lands, CouchDB moves to B and the
    follower writes B. Repair's write of A must not land (compare-and-set on the row's _xid),
    because the feed will never bring B again."""
    couch.create_db("medic")
    couch.bulk("medic", [{"_id": f"p{i}", "v": "start"} for i in range(3)])
    cfg = cfg_factory("medic")
    sync_once(cfg)
    pg.execute("UPDATE couchdb SET _rev = '7-old', doc = doc || '{\"_rev\": \"7-old\"}' WHERE _id IN ('p1', 'p2')")
    fetch = CouchClient.fetch_docs

    async def fetch_then_follower_writes(self: CouchClient, db: str, ids: list[str]) -> bytes:
        got = await fetch(self, db, ids)
        doc = couch.get("medic", "p1")
        couch.put("medic", {**doc, "v": "written by the follower"})
        worker = threading.Thread(target=sync_once, args=(cfg,))
        worker.start()
        worker.join(60)
        return got

    monkeypatch.setattr(CouchClient, "fetch_docs", fetch_then_follower_writes)
    report = run_verify(cfg, repair=True)
    assert report.ids("stale") == ["p1", "p2"]
    assert report.repaired == 1  # p2; p1 was the follower's
    assert body(pg, "p1")["v"] == "written by the follower"
    assert report.remaining == {}
    assert_equal(pg, couch, "medic", SOURCE)
