"""The sync engine against the real Postgres and the real CouchDB 3.4; the equality tests run on
pouchdb-server too (`both_servers`)."""

from __future__ import annotations

import json
import random
import string

import psycopg
import pytest

from tests.servers import CouchAdmin
from tests.syncutil import BackgroundSync, assert_equal, pg_state, sync_once, wait_until


def people(n: int, prefix: str = "p", **extra: object) -> list[dict]:
    return [{"_id": f"{prefix}{i:05d}", "type": "person", "name": f"Person {i}", **extra} for i in range(n)]


@pytest.mark.both_servers
def test_initial_sync_of_several_databases(couch: CouchAdmin, cfg_factory, pg: psycopg.Connection) -> None:
    for db in ("medic", "medic-sentinel", "medic-users-meta"):
        couch.create_db(db)
    couch.bulk("medic", people(1500))
    couch.bulk("medic-sentinel", [{"_id": f"s{i}", "type": "info"} for i in range(300)])
    couch.bulk("medic-users-meta", [{"_id": f"f{i}", "type": "feedback"} for i in range(20)])
    cfg = cfg_factory("medic,medic-sentinel,medic-users-meta", BATCH_SIZE="200")
    stats = sync_once(cfg)
    assert {s.source: s.state for s in stats} == {
        "127.0.0.1/medic": "caught up",
        "127.0.0.1/medic-sentinel": "caught up",
        "127.0.0.1/medic-users-meta": "caught up",
    }
    assert assert_equal(pg, couch, "medic", "127.0.0.1/medic") == 1500
    assert assert_equal(pg, couch, "medic-sentinel", "127.0.0.1/medic-sentinel") == 300
    assert assert_equal(pg, couch, "medic-users-meta", "127.0.0.1/medic-users-meta") == 20
    progress = dict(pg.execute("SELECT source, pending FROM couchdb_progress").fetchall())
    assert progress == {s.source: 0 for s in stats}
    # The document body is CouchDB's, untouched.
    doc = pg.execute("SELECT doc FROM couchdb WHERE _id = 'p00042'").fetchone()[0]
    assert doc == couch.get("medic", "p00042")
    # A second run finds nothing new and writes nothing.
    again = sync_once(cfg)
    assert sum(s.docs_written for s in again) == 0


@pytest.mark.both_servers
def test_edits_deletes_and_recreates_propagate_live(couch: CouchAdmin, cfg_factory, pg: psycopg.Connection) -> None:
    couch.create_db("medic")
    couch.bulk("medic", people(50))
    with BackgroundSync(cfg_factory("medic")):
        wait_until(lambda: len(pg_state(pg, "127.0.0.1/medic")) == 50, what="initial sync")
        doc = couch.get("medic", "p00001")
        doc["name"] = "Edited"
        new_rev = couch.put("medic", doc)
        wait_until(lambda: pg_state(pg, "127.0.0.1/medic")["p00001"] == (new_rev, False), what="edit")
        assert pg.execute("SELECT doc->>'name' FROM couchdb WHERE _id = 'p00001'").fetchone()[0] == "Edited"

        del_rev = couch.delete("medic", "p00002")
        wait_until(lambda: pg_state(pg, "127.0.0.1/medic")["p00002"] == (del_rev, True), what="delete")
        tomb = pg.execute("SELECT doc FROM couchdb WHERE _id = 'p00002'").fetchone()[0]
        assert tomb == {"_id": "p00002", "_rev": del_rev, "_deleted": True}

        again_rev = couch.put("medic", {"_id": "p00002", "type": "person", "name": "Back"})
        wait_until(lambda: pg_state(pg, "127.0.0.1/medic")["p00002"] == (again_rev, False), what="re-create")
        assert_equal(pg, couch, "medic", "127.0.0.1/medic")


@pytest.mark.both_servers
def test_same_id_in_two_databases_kept_apart(couch: CouchAdmin, cfg_factory, pg: psycopg.Connection) -> None:
    couch.create_db("medic")
    couch.create_db("medic-users-meta")
    couch.put("medic", {"_id": "shared", "where": "medic"})
    couch.put("medic-users-meta", {"_id": "shared", "where": "meta"})
    sync_once(cfg_factory("medic,medic-users-meta"))
    rows = dict(pg.execute("SELECT source, doc->>'where' FROM couchdb WHERE _id = 'shared'").fetchall())
    assert rows == {"127.0.0.1/medic": "medic", "127.0.0.1/medic-users-meta": "meta"}


@pytest.mark.both_servers
def test_user_credentials_never_reach_postgres(couch: CouchAdmin, cfg_factory, pg: psycopg.Connection) -> None:
    couch.create_db("_users")
    couch.create_db("medic")
    # Both servers hash the password into derived_key/salt/iterations.
    couch.put("_users", {"_id": "org.couchdb.user:chw1", "name": "chw1", "type": "user",
                         "roles": ["chw"], "password": "hunter2-secret"})
    stored = couch.get("_users", "org.couchdb.user:chw1")
    assert "derived_key" in stored and "salt" in stored
    couch.put("medic", {"_id": "org.couchdb.user:chw1", "name": "chw1", "type": "user-settings",
                        "facility_id": "hc1"})
    sync_once(cfg_factory("_users,medic"))
    docs = dict(pg.execute(
        "SELECT source, doc FROM couchdb WHERE _id = 'org.couchdb.user:chw1'").fetchall())
    user = docs["127.0.0.1/_users"]
    assert user["name"] == "chw1" and user["roles"] == ["chw"]
    for secret in ("derived_key", "salt", "iterations", "password_scheme", "pbkdf2_prf", "password"):
        assert secret not in user
    assert docs["127.0.0.1/medic"]["facility_id"] == "hc1"
    dump = pg.execute("SELECT string_agg(doc::text, '') FROM couchdb").fetchone()[0]
    assert stored["derived_key"] not in dump and "hunter2-secret" not in dump


def test_nul_and_refused_documents_do_not_stop_the_feed(couch: CouchAdmin, cfg_factory, pg: psycopg.Connection) -> None:
    """On the real CouchDB. (A lone surrogate, which CouchDB refuses with 400, and invalid UTF-8
    come from a crafted server in test_hostile.py.)"""
    couch.create_db("medic")
    docs = people(30)
    docs[3]["note"] = "bad\u0000byte"            # NUL: dropped, document kept
    docs[4]["note"] = "literal \\u0000 text"      # a backslash then u0000: kept as text
    docs[5]["_id"] = "x\u0000y"                  # NUL in an id: refused, the id escaped
    long_id = "".join(random.Random(5).choices(string.ascii_letters, k=9000))
    docs[6]["_id"] = long_id                       # too big for the primary key index: refused
    raw = json.dumps({"docs": docs})
    r = couch.http.post("/medic/_bulk_docs", content=raw)
    assert r.status_code == 201
    cfg = cfg_factory("medic", BATCH_SIZE="1000")
    stats = sync_once(cfg)
    assert stats[0].state == "caught up" and stats[0].refused == 2
    got = pg_state(pg, "127.0.0.1/medic")
    assert len(got) == 28
    notes = dict(pg.execute("SELECT _id, doc->>'note' FROM couchdb WHERE doc ? 'note'").fetchall())
    assert notes == {"p00003": "badbyte", "p00004": "literal \\u0000 text"}
    errors = pg.execute("SELECT _id, reason, raw FROM chtsync_errors ORDER BY _id").fetchall()
    assert sorted(e[0] for e in errors) == sorted(["x\\u0000y", long_id])
    errors.sort(key=lambda e: e[0] != "x\\u0000y")
    assert "NUL" in errors[0][1]
    assert "index row size" in errors[1][1] or "54000" in errors[1][1]
    assert json.loads(errors[0][2])["id"] == "x\u0000y"
    # The checkpoint moved past the refused documents: new changes still arrive.
    couch.put("medic", {"_id": "after", "type": "person"})
    sync_once(cfg)
    assert "after" in pg_state(pg, "127.0.0.1/medic")


@pytest.mark.both_servers
def test_wrong_credentials_and_missing_database_are_reported(
    couch: CouchAdmin, cfg_factory, pg: psycopg.Connection
) -> None:
    couch.create_db("medic")
    couch.bulk("medic", people(5))
    cfg = cfg_factory("medic,nosuchdb")
    stats = {s.source: s for s in sync_once(cfg)}
    assert stats["127.0.0.1/medic"].state == "caught up"
    assert stats["127.0.0.1/nosuchdb"].state == "error"
    assert "does not exist" in stats["127.0.0.1/nosuchdb"].reason
    state = dict(pg.execute("SELECT source, state FROM chtsync_sources").fetchall())
    assert state["127.0.0.1/nosuchdb"] == "error"
    assert len(pg_state(pg, "127.0.0.1/medic")) == 5

    bad = cfg_factory("medic", COUCHDB_PASSWORD="wrong-password")
    (only,) = sync_once(bad)
    assert only.state == "error" and "refused the credentials" in only.reason
    assert "wrong-password" not in only.reason


def test_recreated_database_resyncs_from_zero_without_deleting(
    couch: CouchAdmin, cfg_factory, pg: psycopg.Connection
) -> None:
    couch.create_db("medic")
    couch.bulk("medic", people(40))
    cfg = cfg_factory("medic")
    sync_once(cfg)
    couch.delete_db("medic")
    couch.create_db("medic")
    couch.bulk("medic", people(3, prefix="new"))
    sync_once(cfg)
    got = pg_state(pg, "127.0.0.1/medic")
    assert {"new00000", "new00001", "new00002"} <= set(got)
    assert len(got) == 43  # old rows are kept (verify --repair marks vanished ones deleted)
    reasons = [r[0] for r in pg.execute("SELECT reason FROM chtsync_errors")]
    assert any("resync from 0" in r for r in reasons)
