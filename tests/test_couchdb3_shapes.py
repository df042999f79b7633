"""CouchDB 3 behaviour that pouchdb-server does not have, on recorded CouchDB-shaped responses:
opaque string seqs, `pending`, `seq_interval` (null seqs inside a page), HTTP 400 on a malformed
`since`, longpoll returning an empty page on timeout. The Postgres side is real."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import httpx
import psycopg

from chtsync import migrate
from chtsync.couch import CouchClient
from chtsync.follower import Follower
from tests.conftest import make_config

# Seqs as CouchDB 3.3 sends them (a 3-node cluster, q=2): opaque strings, never compared.
SEQ_A = "3-g1AAAACReJzLYWBgYMpgTmHgzcvPy09JdcjLz8gvLskBCeexAEmGBiD1HwiyEhlwqEtkSKqHKMgCAIT2GV4"
SEQ_B = "5-g1AAAACReJzLYWBgYMpgTmHgzcvPy09JdcjLz8gvLskBCeexAEmGBiD1HwiyEhlwqEtkSKqHKMgCAIaUGXk"
SEQ_C = "6-g1AAAACReJzLYWBgYMpgTmHgzcvPy09JdcjLz8gvLskBCeexAEmGBiD1HwiyEhlwqEtkSKqHKMgCAIbpGXo"


def change(seq: str | None, doc_id: str, rev: str, deleted: bool = False, **fields: object) -> dict:
    doc = {"_id": doc_id, "_rev": rev, "_deleted": True} if deleted else {"_id": doc_id, "_rev": rev, **fields}
    row = {"seq": seq, "id": doc_id, "changes": [{"rev": rev}], "doc": doc}
    if deleted:
        row["deleted"] = True
    return row


# Recorded pages, keyed by the `since` they answer (limit=3, seq_interval=3: only every third
# row carries a real seq, the others null).
PAGES = {
    "0": {"results": [
        change(None, "a", "1-aa", type="person"),
        change(None, "b", "1-bb", type="person"),
        change(SEQ_A, "c", "1-cc", type="clinic"),
    ], "last_seq": SEQ_A, "pending": 2},
    SEQ_A: {"results": [
        change(None, "a", "2-a2", type="person", name="edited"),
        change(SEQ_B, "b", "2-b2", deleted=True),
    ], "last_seq": SEQ_B, "pending": 0},
}


@dataclass
class FakeCouch:
    """Answers like CouchDB 3.3 from the recorded pages; records every `since` it was asked."""

    pages: dict[str, dict]
    update_seq: str = SEQ_B
    asked: list[tuple[str, bool]] = field(default_factory=list)
    longpoll_page: dict | None = None

    def docs(self) -> dict[str, dict]:
        """Each document's last state over the recorded pages."""
        return {c["id"]: c["doc"] for page in self.pages.values() for c in page["results"]}

    def all_docs(self, request: httpx.Request) -> httpx.Response:
        """_all_docs as CouchDB answers it: live documents by id, or the given keys."""
        docs = self.docs()
        body = json.loads(request.content) if request.method == "POST" else {}
        if "keys" in body:
            with_docs = request.url.params.get("include_docs") == "true"
            rows = []
            for k in body["keys"]:
                if k not in docs:
                    rows.append({"key": k, "error": "not_found"})
                    continue
                gone = bool(docs[k].get("_deleted"))
                row = {"id": k, "key": k, "value": {"rev": docs[k]["_rev"], **({"deleted": True} if gone else {})}}
                if with_docs:
                    row["doc"] = None if gone else docs[k]
                rows.append(row)
        else:  # a page of the listing (its start key in the POST body, as CouchDB takes it)
            start, limit = body.get("start_key", ""), int(request.url.params.get("limit", 10**9))
            rows = [{"id": k, "key": k, "value": {"rev": d["_rev"]}}
                    for k, d in sorted(docs.items()) if not d.get("_deleted") and k >= start][:limit]
        return httpx.Response(200, json={"total_rows": len(rows), "offset": 0, "rows": rows})

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/medic":
            return httpx.Response(200, json={"db_name": "medic", "update_seq": self.update_seq,
                                             "doc_count": 2, "doc_del_count": 1})
        if request.url.path == "/medic/_all_docs":  # the verify a foreign seq makes owed
            return self.all_docs(request)
        assert request.url.path == "/medic/_changes"
        params = request.url.params
        assert params["include_docs"] == "true" and params["seq_interval"] == params["limit"]
        since, longpoll = params["since"], params.get("feed") == "longpoll"
        self.asked.append((since, longpoll))
        if longpoll:
            # CouchDB ends a longpoll with an empty page on timeout; here: one new change.
            page, self.longpoll_page = self.longpoll_page or {"results": [], "last_seq": since, "pending": 0}, None
            return httpx.Response(200, content=json.dumps(page).encode())
        if since not in self.pages:
            return httpx.Response(400, json={"error": "bad_request",
                                             "reason": "Malformed sequence supplied in 'since' parameter."})
        return httpx.Response(200, content=json.dumps(self.pages[since]).encode())


def run_follower(cfg, fake: FakeCouch, *, once: bool, until=None) -> Follower:
    async def main() -> Follower:
        stop = asyncio.Event()
        client = CouchClient(cfg.sources[0], transport=httpx.MockTransport(fake.handler))
        follower = Follower(cfg, cfg.sources[0], "medic", client, stop, once=once)
        task = asyncio.create_task(follower.run())
        if until is not None:
            while not until():
                await asyncio.sleep(0.02)
            stop.set()
        await asyncio.wait_for(task, 20)
        await client.aclose()
        return follower

    return asyncio.run(main())


def progress(pg: psycopg.Connection) -> tuple[str, int]:
    return pg.execute("SELECT seq, pending FROM couchdb_progress WHERE source = 'cht.example/medic'").fetchone()


def test_opaque_seqs_pending_and_seq_interval(dbname: str, pg: psycopg.Connection) -> None:
    cfg = make_config(dbname, "http://cht.example:5984", BATCH_SIZE="3")
    migrate.apply(cfg)
    fake = FakeCouch(PAGES)
    follower = run_follower(cfg, fake, once=True)
    # The follower sent back exactly the opaque last_seq it was given, and never longpolled.
    assert fake.asked == [("0", False), (SEQ_A, False)]
    assert follower.stats.state == "caught up" and follower.stats.docs_written == 5
    assert progress(pg) == (SEQ_B, 0)
    rows = {r[0]: (r[1], r[2]) for r in pg.execute("SELECT _id, _rev, _deleted FROM couchdb")}
    assert rows == {"a": ("2-a2", False), "b": ("2-b2", True), "c": ("1-cc", False)}


def test_malformed_since_restarts_from_zero(dbname: str, pg: psycopg.Connection) -> None:
    cfg = make_config(dbname, "http://cht.example:5984", BATCH_SIZE="3")
    migrate.apply(cfg)
    pg.execute("INSERT INTO couchdb_progress (seq, pending, updated_at, source)"
               " VALUES ('3-g1AAAAfromAnotherCluster', 0, now(), 'cht.example/medic')")
    fake = FakeCouch(PAGES, update_seq=SEQ_B)
    run_follower(cfg, fake, once=True)
    assert fake.asked[0] == ("3-g1AAAAfromAnotherCluster", False)
    assert fake.asked[1:] == [("0", False), (SEQ_A, False)]
    assert progress(pg) == (SEQ_B, 0)
    reasons = [r[0] for r in pg.execute("SELECT reason FROM chtsync_errors")]
    assert any("refused the stored seq" in r for r in reasons)
    # The checkpoint came from another database: once caught up, the follower verified.
    assert pg.execute("SELECT equal, verify_due FROM chtsync_verify JOIN chtsync_sources USING (source)"
                      ).fetchone() == (True, None)


def test_longpoll_when_caught_up_and_empty_timeout_pages(dbname: str, pg: psycopg.Connection) -> None:
    cfg = make_config(dbname, "http://cht.example:5984", BATCH_SIZE="3")
    migrate.apply(cfg)
    fake = FakeCouch(PAGES)
    fake.longpoll_page = {"results": [change(SEQ_C, "d", "1-dd", type="person")], "last_seq": SEQ_C, "pending": 0}
    run_follower(cfg, fake, once=False, until=lambda: sum(1 for _, lp in fake.asked if lp) >= 3)
    longpolls = [since for since, lp in fake.asked if lp]
    # First longpoll from SEQ_B brings "d"; the next ones wait from SEQ_C, and an empty
    # timeout page leaves the checkpoint where it was.
    assert longpolls[:3] == [SEQ_B, SEQ_C, SEQ_C]
    assert progress(pg)[0] == SEQ_C
    assert pg.execute("SELECT count(*) FROM couchdb WHERE _id = 'd'").fetchone()[0] == 1
