"""The first sync of a big database in parallel key ranges (chtsync/first_sync.py), on the real
CouchDB 3.4 and on pouchdb-server: equal to CouchDB whatever the ids, under concurrent writes,
after a kill -9 half way, with hostile documents and credentials."""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid

import psycopg
import pytest

from chtsync import first_sync
from tests.servers import CouchAdmin
from tests.syncutil import BackgroundSync, pg_state, sync_once, wait_until

SOURCE = "127.0.0.1/medic"
# Ids around every kind of range edge: before the first split, on a split point, between two,
# upper case, non-hex letters, past the last split, non-ASCII, a design document.
EDGE_IDS = ["-dash", "0", "00", "000", "0g", "9f", "9fz", "A", "Zulu", "_design/app", "a0", "a0-",
            "ff", "ff\uffff", "fz", "form:pregnancy", "org.couchdb.user:chw1", "telemetry-2026-1-x",
            "~tilde", "\u00e9t\u00e9", "\U0001f600emoji", "x" * 300]


def first_sync_cfg(cfg_factory, **env: str):
    return cfg_factory("medic", FIRST_SYNC_MIN_DOCS="1", FIRST_SYNC_READERS="4", **env)


def live(state: dict[str, tuple[str, bool]]) -> dict[str, str]:
    return {k: rev for k, (rev, deleted) in state.items() if not deleted}


def assert_first_sync_equal(pg: psycopg.Connection, couch: CouchAdmin, deleted_before: set[str]) -> int:
    """Postgres holds CouchDB's live documents at their winning revisions; its tombstones are
    deletions CouchDB has; only documents deleted before the first sync lack one."""
    want, got = couch.state("medic"), pg_state(pg, SOURCE)
    assert live(got) == live(want)
    tombstones = {k for k, (_, deleted) in got.items() if deleted}
    assert all(want[k][1] and want[k][0] == got[k][0] for k in tombstones)
    assert {k for k, (_, d) in want.items() if d} - tombstones <= deleted_before
    return len(live(want))


def test_ranges_partition_the_key_space() -> None:
    ranges = first_sync.RANGES
    assert ranges[0][0] is None and ranges[-1][1] is None and len(ranges) == 257
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert list(first_sync.SPLITS) == sorted(first_sync.SPLITS)
    for i in range(len(ranges)):
        assert first_sync.start_index(ranges[i][0]) == i
    assert first_sync.start_index("not a split") == 0


@pytest.mark.both_servers
def test_first_sync_equals_couchdb_whatever_the_ids(
    couch: CouchAdmin, cfg_factory, pg: psycopg.Connection, caplog: pytest.LogCaptureFixture, couch_impl: str,
) -> None:
    couch.create_db("medic")
    rng = random.Random(7)
    docs = [{"_id": str(uuid.UUID(int=rng.getrandbits(128))), "type": "person", "n": i} for i in range(1500)]
    docs += [{"_id": i, "type": "edge"} for i in EDGE_IDS]
    saved = couch.bulk("medic", docs)
    assert all("rev" in s for s in saved), saved[:3]
    gone = {d["_id"] for d in docs[:40]} | {"a0", "ff"}
    for doc_id in gone:
        couch.delete("medic", doc_id)
    if couch_impl == "couchdb":  # a conflict: the winner is whichever branch CouchDB picks
        r = couch.http.post("/medic/_bulk_docs", json={"new_edits": False, "docs": [
            {"_id": "conflicted", "_rev": "1-aaaa", "v": 1}, {"_id": "conflicted", "_rev": "1-bbbb", "v": 2}]})
        assert r.status_code == 201
    # Pages of 7 rows: ranges hold several pages, each continuing at the last id read.
    cfg = first_sync_cfg(cfg_factory, BATCH_SIZE="7")
    with caplog.at_level(logging.INFO, logger="chtsync"):
        stats = sync_once(cfg)
    assert stats[0].state == "caught up"
    messages = [r.getMessage() for r in caplog.records]
    if couch_impl == "couchdb":
        assert any("in 257 key ranges" in m for m in messages)
        # No tombstone for what was deleted before the first sync.
        assert not set(pg_state(pg, SOURCE)) & gone
    else:
        # pouchdb-server's _all_docs leaves out the id with an emoji: its feed is read instead.
        assert any("key ranges are read from Apache CouchDB only" in m for m in messages)
        assert "\U0001f600emoji" in couch.state("medic")
    assert assert_first_sync_equal(pg, couch, gone) == len(docs) - len(gone) + (couch_impl == "couchdb")
    # The bodies are CouchDB's.
    row = pg.execute("SELECT doc FROM couchdb WHERE _id = %s", ("\U0001f600emoji",)).fetchone()
    assert row[0] == couch.get("medic", "\U0001f600emoji")
    marks = pg.execute("SELECT first_sync_seq, first_sync_after FROM chtsync_sources").fetchone()
    assert marks == (None, None)
    assert pg.execute("SELECT count(*) FROM chtsync_errors").fetchone()[0] == 0
    # Afterwards the feed goes on from the seq taken before the first range.
    again = sync_once(cfg)
    assert again[0].docs_written == 0
    couch.delete("medic", "Zulu")
    couch.put("medic", {"_id": "new-after", "type": "person"})
    sync_once(cfg)
    assert assert_first_sync_equal(pg, couch, gone) == len(docs) - len(gone) + (couch_impl == "couchdb")
    assert pg_state(pg, SOURCE)["Zulu"][1] is True


def test_first_sync_under_concurrent_writes(couch: CouchAdmin, cfg_factory, pg: psycopg.Connection) -> None:
    """Edits, deletions and new documents while the ranges are read: once the writes stop,
    Postgres equals CouchDB (every change after the seq taken first comes by the feed)."""
    couch.create_db("medic")
    rng = random.Random(11)
    ids = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(3000)]
    couch.bulk("medic", [{"_id": i, "type": "person", "v": 0} for i in ids])
    stop = threading.Event()
    deleted: set[str] = set()
    errors: list[BaseException] = []

    def writer() -> None:
        r = random.Random(12)
        try:
            while not stop.is_set():
                batch = r.sample([i for i in ids if i not in deleted], 20)
                current = {row["id"]: row["value"]["rev"] for row in couch.http.post(
                    "/medic/_all_docs", json={"keys": batch}).json()["rows"] if "value" in row}
                edits = []
                for doc_id in batch[:15]:
                    edits.append({"_id": doc_id, "_rev": current[doc_id], "type": "person", "v": r.random()})
                for doc_id in batch[15:]:
                    edits.append({"_id": doc_id, "_rev": current[doc_id], "_deleted": True})
                    deleted.add(doc_id)
                edits.append({"_id": f"new-{uuid.uuid4()}", "type": "person"})
                couch.bulk("medic", edits)
                time.sleep(0.01)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    cfg = first_sync_cfg(cfg_factory, BATCH_SIZE="25")
    thread = threading.Thread(target=writer, daemon=True)
    with BackgroundSync(cfg):
        # Writes start once the seq S is taken, so every deletion must leave a tombstone.
        wait_until(lambda: pg.execute("SELECT count(*) FROM chtsync_sources WHERE first_sync_seq IS NOT NULL")
                   .fetchone()[0] == 1, timeout=60, what="the first sync to begin")
        thread.start()
        wait_until(lambda: pg.execute(
            "SELECT count(*) FROM couchdb_progress WHERE seq <> '0'").fetchone()[0] == 1,
            timeout=120, what="the first sync to finish")
        time.sleep(1.0)  # writes go on into the feed
        stop.set()
        thread.join(30)
        assert not errors, errors

        last: list[str] = []

        def equal() -> bool:
            try:
                assert_first_sync_equal(pg, couch, set())
                return True
            except AssertionError as exc:
                last[:] = [str(exc)[:2000]]
                return False

        try:
            wait_until(equal, timeout=60, what="Postgres equal to CouchDB")
        except AssertionError:
            raise AssertionError(last[0] if last else "not equal") from None
    assert deleted  # the test did delete during the sync


def test_first_sync_resumes_after_kill_9(couch: CouchAdmin, cfg_factory, pg: psycopg.Connection, dbname: str,
                                        couch_server) -> None:
    """`chtsync sync --once` killed with SIGKILL half way through the ranges: the next run
    resumes from the last range completed with its rows, and ends equal to CouchDB."""
    couch.create_db("medic")
    rng = random.Random(3)
    for _ in range(4):
        couch.bulk("medic", [{"_id": str(uuid.UUID(int=rng.getrandbits(128))), "type": "person",
                              "pad": "x" * 200} for _ in range(1500)])
    env = dict(os.environ, COUCHDB_URL=couch_server.url, COUCHDB_USER=couch_server.auth[0],
               COUCHDB_PASSWORD=couch_server.auth[1], COUCHDB_DBS="medic", POSTGRES_HOST="127.0.0.1",
               POSTGRES_USER="postgres", POSTGRES_DB=dbname, CHTSYNC_CONFIG=os.devnull,
               FIRST_SYNC_MIN_DOCS="1", FIRST_SYNC_READERS="2", BATCH_SIZE="20", LOG_LEVEL="INFO")
    subprocess.run([sys.executable, "-m", "chtsync", "migrate"], env=env, check=True, capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "chtsync", "sync", "--once"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Past "10": ranges holding rows are done (the first range, ids below "00", holds none
        # of these uuids, and completing it alone moves the frontier).
        wait_until(lambda: pg.execute(
            "SELECT coalesce(first_sync_after >= '10', false) FROM chtsync_sources").fetchone() == (True,),
            timeout=120, what="some ranges written")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    after, seq = pg.execute("SELECT first_sync_after, first_sync_seq FROM chtsync_sources").fetchone()
    assert after is not None and seq is not None
    assert pg.execute("SELECT seq FROM couchdb_progress").fetchone() == ("0",)
    partial = len(pg_state(pg, SOURCE))
    assert 0 < partial < 6000
    done = subprocess.run([sys.executable, "-m", "chtsync", "sync", "--once"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from key {after!r}" in done.stderr
    assert assert_first_sync_equal(pg, couch, set()) == 6000
    assert pg.execute("SELECT first_sync_seq FROM chtsync_sources").fetchone() == (None,)
    # The feed took over at S (the same point, though CouchDB may spell its seq another way).
    assert pg.execute("SELECT seq FROM couchdb_progress").fetchone()[0].split("-")[0] == seq.split("-")[0]


def test_first_sync_refuses_documents_alone_and_strips_credentials(
    couch: CouchAdmin, cfg_factory, pg: psycopg.Connection,
) -> None:
    """A NUL in an id and an id too big for the index go to chtsync_errors alone; a NUL in a
    value is dropped; the rest of their page is written. _users loses its credential fields."""
    couch.create_db("medic")
    docs = [{"_id": f"{i:04x}-doc", "type": "person", "n": i} for i in range(200)]
    docs[3]["note"] = "bad\u0000byte"
    docs[5]["_id"] = "0005-x\u0000y"
    docs[7]["_id"] = "0007-" + "".join(random.Random(5).choices("abcdefghijklmnop", k=9000))
    assert couch.http.post("/medic/_bulk_docs", content=json.dumps({"docs": docs})).status_code == 201
    couch.create_db("_users")
    couch.put("_users", {"_id": "org.couchdb.user:chw9", "name": "chw9", "type": "user",
                         "roles": ["chw"], "password": "hunter2-secret"})
    stats = sync_once(cfg_factory("medic,_users", FIRST_SYNC_MIN_DOCS="1", FIRST_SYNC_READERS="3",
                                  BATCH_SIZE="50"))
    assert [s.state for s in stats] == ["caught up", "caught up"]
    got = pg_state(pg, SOURCE)
    assert len(got) == 198
    assert pg.execute("SELECT doc->>'note' FROM couchdb WHERE _id = '0003-doc'").fetchone() == ("badbyte",)
    errors = sorted(r[0][:8] for r in pg.execute("SELECT _id FROM chtsync_errors").fetchall())
    assert errors == ["0005-x\\u", "0007-" + docs[7]["_id"][5:8]]
    user = pg.execute("SELECT doc FROM couchdb WHERE _id = 'org.couchdb.user:chw9'"
                      " AND source = '127.0.0.1/_users'").fetchone()[0]
    assert user["name"] == "chw9"
    for secret in ("derived_key", "salt", "iterations", "password_scheme", "pbkdf2_prf", "password"):
        assert secret not in user
    dump = pg.execute("SELECT string_agg(doc::text, '') FROM couchdb").fetchone()[0]
    dump += pg.execute("SELECT string_agg(coalesce(raw, ''), '') FROM chtsync_errors").fetchone()[0]
    assert "hunter2-secret" not in dump and user.get("derived_key") is None
