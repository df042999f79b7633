"""Hostile `_changes` pages thrown at the write path (hypothesis): every page is either stored
(each document in Postgres or, alone, in chtsync_errors) or rejected whole as UnreadablePage
with nothing written, and the feed keeps moving."""

from __future__ import annotations

import asyncio
import json

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chtsync import db
from chtsync.store import Store, UnreadablePage, storable_text
from tests.conftest import make_config

SOURCE = "fuzz/medic"

# Text that stresses JSON and Postgres: NULs, escapes, lone surrogates, astral characters.
nasty_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["\x00", "a\x00b", "\\u0000", "\\", '"', "\ud800", "\udfff", "\U0001f600", "\u2028", "é"]),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=10),
)
json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), nasty_text),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(nasty_text, inner, max_size=4)),
    max_leaves=12,
)
doc_id = st.one_of(st.text(min_size=1, max_size=20), st.sampled_from(["a", "b", "org.couchdb.user:x", "x" * 5000]))


@st.composite
def change(draw: st.DrawFn) -> object:
    kind = draw(st.sampled_from(["doc", "doc", "doc", "deleted", "no_doc", "wrong_types", "junk"]))
    i = draw(doc_id)
    rev = f"{draw(st.integers(1, 30))}-{draw(st.text('abcdef0123456789', min_size=1, max_size=8))}"
    if kind == "doc":
        body = draw(st.dictionaries(nasty_text, json_value, max_size=5))
        return {"seq": draw(st.integers(0, 99)), "id": i, "changes": [{"rev": rev}],
                "doc": {**body, "_id": i, "_rev": rev}}
    if kind == "deleted":
        return {"seq": 1, "id": i, "deleted": True, "changes": [{"rev": rev}],
                "doc": {"_id": i, "_rev": rev, "_deleted": True}}
    if kind == "no_doc":
        return {"seq": 1, "id": i, "changes": [{"rev": rev}]}
    if kind == "wrong_types":
        return {"seq": [], "id": draw(st.one_of(st.integers(), st.none(), st.lists(st.integers()))),
                "changes": "x", "doc": draw(json_value)}
    return draw(json_value)


@st.composite
def page(draw: st.DrawFn) -> tuple[bytes, list[object]]:
    results = draw(st.lists(change(), max_size=8))
    text = json.dumps({"results": results, "last_seq": draw(st.integers(1, 10**6)), "pending": 0})
    mangle = draw(st.sampled_from(["none", "none", "none", "truncate", "garbage", "bad_utf8"]))
    if mangle == "truncate" and len(text) > 2:
        text = text[: draw(st.integers(1, len(text) - 1))]
    elif mangle == "garbage":
        text = draw(st.sampled_from(["", "null", "[]", '{"results": 5}', '{"results": [1,2]}',
                                     '{"results": [], "last_seq": null}', "<html>502</html>"]))
    body = text.encode("utf-8", "surrogatepass")
    if mangle == "bad_utf8":
        # Invalid UTF-8 bytes inside the first string value of a document.
        body = body.replace(b'"_rev": "', b'"_rev": "\xff\xfe', 1)
    return body, results


def counts(conn: psycopg.Connection) -> tuple[int, int]:
    return conn.execute("SELECT (SELECT count(*) FROM couchdb), (SELECT count(*) FROM chtsync_errors)").fetchone()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow, HealthCheck.data_too_large])
@given(pages=st.lists(page(), min_size=1, max_size=3))
@example(pages=[(b'{"results": [{"seq": 1, "id": "\\u0000", "deleted": true, "changes": [{"rev": "1-0"}],'
                 b' "doc": {"_id": "\\u0000", "_rev": "1-0", "_deleted": true}}], "last_seq": 1}', [])])
def test_hostile_pages_are_stored_or_recorded(dbname: str, pg: psycopg.Connection,
                                               pages: list[tuple[bytes, list[object]]]) -> None:
    cfg = make_config(dbname)
    store = Store(cfg)

    async def run() -> None:
        conn = await db.connect_async(cfg, autocommit=True)
        try:
            for body, _results in pages:
                before = counts(pg)
                try:
                    parsed = json.loads(body.decode("utf-8", "surrogateescape"), strict=False)
                    readable = (isinstance(parsed, dict) and isinstance(parsed.get("results"), list)
                                and parsed.get("last_seq") is not None)
                except ValueError:
                    readable = False
                if not readable:
                    # Rejected whole: nothing written, the checkpoint did not move (the follower
                    # records the problem once and retries with backoff).
                    with pytest.raises(UnreadablePage):
                        await store.ingest(conn, SOURCE, body, 1000)
                    assert counts(pg) == before
                    continue
                result = await store.ingest(conn, SOURCE, body, 1000)
                assert counts(pg)[0] >= before[0]  # nothing is ever lost
                assert result.last_seq == str(parsed["last_seq"])
                checkpoint = pg.execute("SELECT seq FROM couchdb_progress WHERE source = %s", (SOURCE,)).fetchone()
                assert checkpoint == (str(parsed["last_seq"]),)
                # Every well-formed change with a document is now in Postgres or in the error table.
                ids = {c["id"] for c in parsed["results"] if isinstance(c, dict) and isinstance(c.get("id"), str)
                       and (isinstance(c.get("doc"), dict) or c.get("deleted") is True)}
                for raw_id in ids:
                    i = storable_text(raw_id)  # a NUL in an id: refused, the id escaped
                    stored = pg.execute("SELECT 1 FROM couchdb WHERE _id = %s AND source = %s", (i, SOURCE)).fetchone()
                    refused = pg.execute("SELECT 1 FROM chtsync_errors WHERE _id = %s", (i,)).fetchone()
                    assert stored or refused, f"change for {i!r} neither stored nor recorded"
            # The feed still moves: a plain page afterwards is stored and checkpointed.
            ok = b'{"results":[{"seq":1,"id":"after","changes":[{"rev":"1-a"}],"doc":{"_id":"after","_rev":"1-a"}}],' \
                 b'"last_seq":"final"}'
            result = await store.ingest(conn, SOURCE, ok, 1000)
            assert result.last_seq == "final" and result.written in (0, 1)
        finally:
            await conn.close()
            pg.execute("TRUNCATE couchdb, chtsync_errors, couchdb_progress, chtsync_sources")

    asyncio.run(run())
