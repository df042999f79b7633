"""Purges never appear in CouchDB's _changes: the follower follows purge_seq and _purged_infos
(real CouchDB 3.4), and models drop purged documents within seconds."""

from __future__ import annotations

import json

import psycopg
import pytest

from chtsync import pipeline, state
from chtsync.pipeline import graph
from tests.conftest import make_config
from tests.pipeline_helpers import ModelsFile
from tests.servers import CouchAdmin
from tests.syncutil import BackgroundSync, assert_equal, pg_state, sync_once, wait_until
from tests.test_conflicts import branches, winner
from tests.test_pipeline import diff_with_rebuild

SOURCE = "127.0.0.1/medic"


def purge(couch: CouchAdmin, db: str, revs: dict[str, list[str]]) -> None:
    r = couch.http.post(f"/{db}/_purge", content=json.dumps(revs))
    assert r.status_code in (201, 202), r.text


def people(n: int) -> list[dict]:
    return [{"_id": f"p{i:03d}", "type": "person", "name": f"Person {i}"} for i in range(n)]


def marks(pg: psycopg.Connection) -> tuple[str | None, str | None]:
    return pg.execute("SELECT purge_seq, verify_due FROM chtsync_sources WHERE source = %s",
                      (SOURCE,)).fetchone()


def test_purged_documents_leave_postgres_and_models_within_seconds(
    couch: CouchAdmin, couch_server, dbname: str, pg: psycopg.Connection, tmp_path
) -> None:
    couch.create_db("medic")
    couch.bulk("medic", people(40))
    models = ModelsFile(tmp_path)
    models.set("person", "SELECT _id AS uuid, doc ->> 'name' AS name FROM couchdb"
               " WHERE NOT _deleted AND doc ->> 'type' = 'person'", kind="incremental",
               unique_key=["uuid"])
    cfg = make_config(dbname, couch_server.url, COUCHDB_DBS="medic", CHTSYNC_MODELS=str(models.path),
                      COUCHDB_USER=couch_server.auth[0], COUCHDB_PASSWORD=couch_server.auth[1])
    with BackgroundSync(cfg):
        wait_until(lambda: len(pg_state(pg, SOURCE)) == 40, 30, "initial sync")
        pipeline.apply(cfg, pg)
        pipeline.refresh_once(cfg, pg)  # a new incremental model is built by the refresh
        assert pg.execute("SELECT count(*) FROM person").fetchone()[0] == 40
        gone = {f"p{i:03d}" for i in (3, 17, 29)}
        purge(couch, "medic", {i: [couch.get("medic", i)["_rev"]] for i in gone})
        couch.put("medic", {"_id": "after", "type": "person", "name": "After"})

        def models_dropped() -> bool:
            pipeline.refresh_once(cfg, pg)
            names = {r[0] for r in pg.execute("SELECT uuid FROM person")}
            return not (names & gone) and "after" in names

        wait_until(models_dropped, 15, "the purged documents to leave the model")
        rows = pg_state(pg, SOURCE)
        assert all(rows[i][1] for i in gone)  # tombstones: that is how incremental models see it
        assert_equal(pg, couch, "medic", SOURCE, vanished_ok=True)
        assert diff_with_rebuild(pg, graph.load(cfg).models["person"]) == 0
        info = couch.http.get("/medic").json()
        wait_until(lambda: marks(pg) == (info["purge_seq"], None), 10, "the purge checkpoint")


def test_purge_of_a_conflict_leaf(couch: CouchAdmin, cfg_factory, pg: psycopg.Connection) -> None:
    """A purge of one leaf leaves the document: Postgres must hold its new winner (or keep the
    old one when the purged leaf was not the winner), never a tombstone."""
    couch.create_db("medic")
    branches(couch, "medic", "c1", ("1-aaaa", {"v": "low"}), ("2-ffff", {"v": "high"}))
    branches(couch, "medic", "c2", ("1-aaaa", {"v": "low"}), ("2-ffff", {"v": "high"}))
    cfg = cfg_factory("medic")
    sync_once(cfg)
    purge(couch, "medic", {"c1": ["2-ffff"], "c2": ["1-aaaa"]})  # c1 loses its winner, c2 a loser
    assert winner(couch, "medic", "c1") == ("1-aaaa", False)
    assert winner(couch, "medic", "c2") == ("2-ffff", False)
    sync_once(cfg)
    assert_equal(pg, couch, "medic", SOURCE)
    assert pg.execute("SELECT doc->>'v' FROM couchdb WHERE _id = 'c1'").fetchone()[0] == "low"


def test_purges_while_stopped_are_applied_at_start(couch: CouchAdmin, cfg_factory, pg: psycopg.Connection) -> None:
    couch.create_db("medic")
    couch.bulk("medic", people(10))
    cfg = cfg_factory("medic")
    sync_once(cfg)
    purge(couch, "medic", {"p001": [couch.get("medic", "p001")["_rev"]]})
    (stats,) = sync_once(cfg)
    assert stats.state == "caught up"
    assert pg_state(pg, SOURCE)["p001"][1] is True
    assert_equal(pg, couch, "medic", SOURCE, vanished_ok=True)
    assert marks(pg) == (couch.http.get("/medic").json()["purge_seq"], None)


def test_more_purges_than_couchdb_keeps_trigger_a_verify(
    couch: CouchAdmin, cfg_factory, pg: psycopg.Connection
) -> None:
    couch.create_db("medic")
    r = couch.http.put("/medic/_purged_infos_limit", content="2")
    assert r.status_code == 200, r.text
    couch.bulk("medic", people(30))
    cfg = cfg_factory("medic")
    sync_once(cfg)
    gone = [f"p{i:03d}" for i in range(0, 30, 3)]
    for doc_id in gone:  # one purge request each: purge_seq moves 10 times
        purge(couch, "medic", {doc_id: [couch.get("medic", doc_id)["_rev"]]})
    r = couch.http.post("/medic/_compact")
    assert r.status_code == 202
    wait_until(lambda: not couch.http.get("/medic").json()["compact_running"], 30, "compaction")
    # CouchDB has forgotten some of them: _purged_infos alone cannot tell what to remove.
    listed = {i["id"] for i in couch.http.get("/medic/_purged_infos").json()["purged_infos"]}
    assert set(gone) - listed

    (stats,) = sync_once(cfg)
    assert stats.state == "caught up"
    rows = pg_state(pg, SOURCE)
    assert {k for k, v in rows.items() if v[1]} == set(gone)
    assert_equal(pg, couch, "medic", SOURCE, vanished_ok=True)
    assert marks(pg) == (couch.http.get("/medic").json()["purge_seq"], None)
    verified = pg.execute("SELECT vanished, repaired, error FROM chtsync_verify WHERE source = %s",
                          (SOURCE,)).fetchone()
    assert verified == (10, 10, None)
    # status shows where purges stand, and an owed verify while one is owed
    (src,) = state.gather(cfg, pg, counts=False)["sources"]
    assert (src["purge_seq"], src["verify_due"]) == (couch.http.get("/medic").json()["purge_seq"], None)
    pg.execute("UPDATE chtsync_sources SET verify_due = 'purges lost' WHERE source = %s", (SOURCE,))
    assert state.gather(cfg, pg, counts=False)["sources"][0]["verify_due"] == "purges lost"


@pytest.mark.parametrize("couch_impl", ["pouchdb"])
def test_servers_without_purge_are_followed_as_before(couch: CouchAdmin, cfg_factory, pg: psycopg.Connection) -> None:
    couch.create_db("medic")
    couch.bulk("medic", people(5))
    cfg = cfg_factory("medic")
    (stats,) = sync_once(cfg)
    assert stats.state == "caught up" and not stats.errors
    assert_equal(pg, couch, "medic", SOURCE)
    assert marks(pg) == (None, None)


def test_purges_followed_with_a_database_members_credentials(
    couch: CouchAdmin, cfg_factory, pg: psycopg.Connection
) -> None:
    """A member may read _purged_infos but not _purged_infos_limit (server admins only): the
    follower goes on with CouchDB's default limit instead of stopping."""
    couch.create_db("medic")
    r = couch.http.put("/_users/org.couchdb.user:reader", content=json.dumps(
        {"name": "reader", "password": "reader-pw", "roles": [], "type": "user"}))
    assert r.status_code in (201, 409), r.text
    r = couch.http.put("/medic/_security", content=json.dumps({"members": {"names": ["reader"]}}))
    assert r.status_code == 200, r.text
    couch.bulk("medic", people(5))
    cfg = cfg_factory("medic", COUCHDB_USER="reader", COUCHDB_PASSWORD="reader-pw")
    sync_once(cfg)
    purge(couch, "medic", {"p002": [couch.get("medic", "p002")["_rev"]]})
    (stats,) = sync_once(cfg)
    assert stats.state == "caught up" and not stats.errors
    assert pg_state(pg, SOURCE)["p002"][1] is True
    assert_equal(pg, couch, "medic", SOURCE, vanished_ok=True)
    assert marks(pg) == (couch.http.get("/medic").json()["purge_seq"], None)
