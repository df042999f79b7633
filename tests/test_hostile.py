"""Hostile pages never stall, never leak, never lose (issue 12).

What a real CouchDB 3.4 can be made to hold (a NUL in an id, `_users` documents with real
password hashes, 1 MB documents) is tested on it; bodies it never sends (invalid UTF-8, a lone
surrogate, garbage, a page cut short, odd `pending` values) come from tests/crafted.py."""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import string
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from chtsync import cli, follower, verify
from tests.crafted import CraftedCouch, body, change
from tests.servers import CouchAdmin
from tests.syncutil import pg_state, sync_once
from tests.test_verify import run as run_verify

SOURCE = "127.0.0.1/medic"


def errors(pg: psycopg.Connection) -> list[tuple[str | None, str, str | None]]:
    return pg.execute("SELECT _id, reason, raw FROM chtsync_errors ORDER BY id").fetchall()


def progress(pg: psycopg.Connection) -> tuple[str, int | None] | None:
    return pg.execute("SELECT seq, pending FROM couchdb_progress WHERE source = %s", (SOURCE,)).fetchone()


def every_table_text(pg: psycopg.Connection) -> str:
    """The text of every row of every table of the test database (all schemas but the catalogs)."""
    tables = pg.execute(
        "SELECT format('%I.%I', table_schema, table_name) FROM information_schema.tables"
        " WHERE table_schema NOT IN ('pg_catalog', 'information_schema') AND table_type = 'BASE TABLE'"
    ).fetchall()
    return "\n".join(
        pg.execute(f"SELECT coalesce(string_agg(t::text, E'\\n'), '') FROM {name} AS t").fetchone()[0]
        for (name,) in tables
    )


# -- one document Postgres cannot take: refused alone, the rest written ----------------------

def test_invalid_utf8_and_lone_surrogate_refused_alone(dbname: str, pg: psycopg.Connection, cfg_factory) -> None:
    docs = [change(None, f"p{i}", type="person", name=f"n{i}") for i in range(6)]
    page = body(docs, "6-g1AAAA", 0)
    # Invalid UTF-8 inside one document's value and inside another one's id; a lone
    # surrogate (valid JSON escape, refused by jsonb) in a third.
    page = page.replace(b'"name": "n1"', b'"name": "bad \xff\xfe bytes"', 1)
    page = page.replace(b'"p3"', b'"p\xc3"', 2)
    page = page.replace(b'"name": "n4"', b'"name": "\\ud800 lone"', 1)
    with CraftedCouch(lambda since, limit: page if since == "0" else body([], since, 0),
                      update_seq="6-g1AAAA") as fake:
        (stats,) = sync_once(cfg_factory(url=fake.url))
    assert stats.state == "caught up" and stats.refused == 3 and stats.docs_written == 3
    assert set(pg_state(pg, SOURCE)) == {"p0", "p2", "p5"}
    refused = {e[0]: e[1] for e in errors(pg)}
    assert set(refused) == {"p1", "p\\udcc3", "p4"}  # the id escaped where it is not UTF-8
    assert all("UTF-8" in r or "Unicode" in r for r in refused.values()), refused
    assert progress(pg) == ("6-g1AAAA", 0)  # the checkpoint moved past the page


def test_nul_in_an_id_is_refused_visibly_and_verify_keeps_working(
    couch: CouchAdmin, cfg_factory, pg: psycopg.Connection
) -> None:
    couch.create_db("medic")
    couch.bulk("medic", [{"_id": f"p{i}", "type": "person"} for i in range(5)]
               + [{"_id": "x\u0000y", "type": "person"}, {"_id": "v", "note": "nul\u0000inside"}])
    cfg = cfg_factory("medic")
    (stats,) = sync_once(cfg)
    assert stats.state == "caught up" and stats.refused == 1
    want = {k: v for k, v in couch.state("medic").items() if "\x00" not in k}
    assert pg_state(pg, SOURCE) == want and len(want) == 6
    assert pg.execute("SELECT doc->>'note' FROM couchdb WHERE _id = 'v'").fetchone() == ("nulinside",)
    ((doc_id, reason, raw),) = errors(pg)
    assert doc_id == "x\\u0000y" and "NUL" in reason and json.loads(raw)["id"] == "x\u0000y"
    report = run_verify(cfg)
    assert report.error is None and report.equal and verify.exit_code([report]) == 0
    fixed = run_verify(cfg, repair=True)
    assert fixed.error is None and fixed.equal


# -- credentials: never stored anywhere, error rows included ---------------------------------

def test_users_credentials_reach_no_table(couch: CouchAdmin, cfg_factory, pg: psycopg.Connection) -> None:
    couch.create_db("_users")
    # Too long (and too random to compress) for the primary key index: the document is refused.
    long_name = "".join(random.Random(7).choices(string.ascii_letters, k=4000))
    names = ["chw1", long_name, "nul\u0000name"]
    for name in names:
        r = couch.http.post("/_users", content=json.dumps({
            "_id": f"org.couchdb.user:{name}", "name": name, "type": "user", "roles": [],
            "password": "hunter2-secret"}))
        assert r.status_code == 201, r.text
    secrets = set()
    for row in couch.http.get("/_users/_all_docs", params={"include_docs": "true"}).json()["rows"]:
        doc = row["doc"]
        if doc["_id"].startswith("org.couchdb.user:"):
            secrets |= {doc["salt"], doc["derived_key"]}
    assert len(secrets) == 6
    (stats,) = sync_once(cfg_factory("_users"))
    assert stats.state == "caught up" and stats.refused == 2
    assert set(pg_state(pg, "127.0.0.1/_users")) >= {"org.couchdb.user:chw1"}
    assert len(errors(pg)) == 2 and all("removed" in e[2] for e in errors(pg))
    dump = every_table_text(pg)
    for secret in secrets | {"hunter2-secret"}:
        assert secret not in dump


def test_refused_and_truncated_users_pages_store_no_credential(
    dbname: str, pg: psycopg.Connection, cfg_factory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(follower, "RETRY_BASE_SECONDS", 0.01)
    salt, key = "5a1f0e9d8c7b6a5f4e3d2c1b0a998877", "c0ffee0123456789abcdef0123456789abcdef01"
    user = change(None, "org.couchdb.user:chw1", name="chw1", type="user", roles=[], salt=salt,
                  derived_key=key, iterations=10, password_scheme="pbkdf2", pbkdf2_prf="sha256")
    refused = change(None, "org.couchdb.user:chw2", name="\\ud800", type="user", salt=salt,
                     derived_key=key, iterations=10, password_scheme="pbkdf2")
    full = body([user, refused], "2-g1AAAA", 0).replace(b'"\\\\ud800"', b'"\\ud800"')
    cut = full[: full.index(key.encode()) + 10]  # the connection died inside derived_key
    pages = {"0": cut}
    with CraftedCouch(lambda since, limit: pages.get(since, body([], since, 0)),
                      update_seq="2-g1AAAA") as fake:
        cfg = cfg_factory("_users", url=fake.url)
        (stats,) = sync_once(cfg)  # the cut page: recorded once, given up on
        assert stats.state == "error"
        pages["0"] = full
        (stats,) = sync_once(cfg)
    assert stats.state == "caught up" and stats.refused == 1
    rows = errors(pg)
    assert [r[0] for r in rows] == [None, "org.couchdb.user:chw2"]
    assert "unreadable _changes page" in rows[0][1]
    dump = every_table_text(pg)
    assert key[:10] not in dump and salt not in dump and '"pbkdf2"' not in dump and "sha256" not in dump


# -- persistently bad pages: growing backoff, one error row, --once gives up -----------------

BAD_PAGES = {
    "garbage": b"<html>502 Bad Gateway</html>",
    "results not a list": b'{"results": {"a": 1}, "last_seq": "1-x", "pending": 0}',
    "last_seq null": b'{"results": [], "last_seq": null, "pending": 0}',
    "truncated": body([change(None, "a")], "1-x", 0)[:40],
}


@pytest.mark.parametrize("kind", sorted(BAD_PAGES))
def test_persistently_bad_page_backs_off_and_once_gives_up(
    kind: str, dbname: str, pg: psycopg.Connection, cfg_factory, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(follower, "RETRY_BASE_SECONDS", 0.05)  # the growth, not the wait, is tested
    with CraftedCouch(lambda since, limit: BAD_PAGES[kind]) as fake:
        cfg = cfg_factory(url=fake.url)
        monkeypatch.chdir(tmp_path)  # no ./config.yaml: the environment below is the config
        for key, value in {"COUCHDB_URL": fake.url, "COUCHDB_DBS": "medic", "COUCHDB_USER": "admin",
                           "COUCHDB_PASSWORD": "x", "POSTGRES_HOST": cfg.postgres.host,
                           "POSTGRES_PORT": str(cfg.postgres.port), "POSTGRES_USER": cfg.postgres.user,
                           "POSTGRES_DB": dbname}.items():
            monkeypatch.setenv(key, value)
        handlers = logging.getLogger().handlers[:]
        try:
            code = cli.main(["sync", "--once"])
        finally:  # cli.main logs to this test's stderr: put pytest's handlers back
            logging.getLogger().handlers[:] = handlers
    assert code == 1
    assert "gave up after" in capsys.readouterr().err
    asked = [a.at for a in fake.asked]
    assert len(asked) == follower.ONCE_MAX_RETRIES + 1
    gaps = [b - a for a, b in itertools.pairwise(asked)]
    # Retry k waits at least half of base * 2**k (jitter), so the waits must grow: a backoff reset
    # on every bad page would retry every ~base seconds. (A lower bound: a sleep is never short.)
    for k, gap in enumerate(gaps):
        assert gap >= 0.95 * 0.05 * 2**k / 2, gaps
    ((doc_id, reason, _raw),) = errors(pg)  # one row for the problem, not one per retry
    assert doc_id is None and reason.startswith("unreadable _changes page")
    assert progress(pg) is None


@pytest.mark.parametrize("all_docs", [b"<html>502</html>", b'{"rows": 5}', b'{"rows": [{"id": 1}]}', b"[]"])
def test_verify_gives_up_on_an_unreadable_all_docs_page(
    all_docs: bytes, dbname: str, pg: psycopg.Connection, cfg_factory,
) -> None:
    with CraftedCouch(lambda since, limit: body([], "0", 0), all_docs=all_docs) as fake:
        report = run_verify(cfg_factory(url=fake.url))
    assert report.error is not None and "unreadable" in report.error
    assert verify.exit_code([report]) == 2  # could not verify (docs/verify.md)


# -- odd numbers: unknown, never a stall or a tight loop ------------------------------------

@pytest.mark.parametrize("pending", ["1e30", "-1", '"abc"', "1.5", "99999999999"])
def test_pending_out_of_range_or_negative_is_unknown(
    pending: str, dbname: str, pg: psycopg.Connection, cfg_factory,
) -> None:
    docs = [change(None, f"p{i}") for i in range(3)]
    pages = {"0": body(docs, "3-g1AAAA", raw_pending=pending)}
    with CraftedCouch(lambda since, limit: pages.get(since, body([], since, raw_pending=pending)),
                      update_seq="3-g1AAAA") as fake:
        (stats,) = sync_once(cfg_factory(url=fake.url, BATCH_SIZE="3"))
    assert stats.state == "caught up" and stats.docs_written == 3
    # A full page with pending unknown asks once more (prefetched); the empty page says caught up.
    assert [a.since for a in fake.asked][:2] == ["0", "3-g1AAAA"] and len(fake.asked) <= 3
    assert progress(pg) == ("3-g1AAAA", 0)
    assert errors(pg) == []


# -- pages bounded in bytes ----------------------------------------------------------------

def test_pages_shrink_to_the_byte_budget_and_grow_back(dbname: str, pg: psycopg.Connection, cfg_factory) -> None:
    big = "x" * 100_000
    docs = [change(str(i + 1), f"d{i:03d}", body=big if i < 40 else "small") for i in range(200)]

    def pages(since: str, limit: int) -> bytes:
        start = int(since)
        end = min(len(docs), start + limit)
        return body(docs[start:end], str(end), len(docs) - end)

    with CraftedCouch(pages, update_seq="200") as fake:
        (stats,) = sync_once(cfg_factory(url=fake.url, BATCH_SIZE="100", PAGE_BYTES="1048576"))
    assert stats.state == "caught up" and stats.docs_written == 200
    assert len(pg_state(pg, SOURCE)) == 200
    stored = [a for a, b in itertools.pairwise(fake.asked) if b.since != a.since]
    # While the documents are 100 KB, no page stored asks for more than fit in 1 MiB...
    big_pages = [a.limit for a in stored if int(a.since) < 40]
    assert big_pages and max(big_pages) <= 10, [(a.since, a.limit) for a in fake.asked]
    # ...and with small documents again the limit grows back to BATCH_SIZE.
    assert fake.asked[-1].limit == 100 or stored[-1].limit == 100, [(a.since, a.limit) for a in fake.asked]


# Runs the command and reports its peak RSS. A small wrapper process in between, because a child's
# ru_maxrss also counts the memory of the process it was forked from (pytest, here) at exec.
_PEAK_WRAPPER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
print(f"peak-rss-kib={usage.ru_maxrss}", file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_rss_mb(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[int, float, str]:
    """Run cmd; (exit code, its peak resident memory in MB, its stderr)."""
    done = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, *cmd], env=env, cwd=cwd,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    stderr = done.stderr.decode(errors="replace")
    kib = int(stderr.rsplit("peak-rss-kib=", 1)[1].split()[0])
    return done.returncode, kib / 1024, stderr


def test_hundred_one_mb_documents_in_bounded_memory(
    couch: CouchAdmin, cfg_factory, pg: psycopg.Connection, tmp_path: Path,
) -> None:
    couch.create_db("medic")
    blob = "y" * 1_000_000
    for batch in range(10):
        couch.bulk("medic", [{"_id": f"big{batch * 10 + i:03d}", "type": "blob", "blob": blob}
                             for i in range(10)])
    cfg = cfg_factory("medic")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("COUCHDB_", "POSTGRES_"))},
           "COUCHDB_URL": cfg.sources[0].url, "COUCHDB_USER": cfg.sources[0].user or "",
           "COUCHDB_PASSWORD": cfg.sources[0].password or "", "COUCHDB_DBS": "medic",
           "POSTGRES_HOST": cfg.postgres.host or "", "POSTGRES_PORT": str(cfg.postgres.port),
           "POSTGRES_USER": cfg.postgres.user or "", "POSTGRES_DB": cfg.postgres.dbname or ""}
    code, peak, stderr = peak_rss_mb([sys.executable, "-m", "chtsync", "sync", "--once"], env, tmp_path)
    assert code == 0, stderr[-2000:]
    assert len(pg_state(pg, SOURCE)) == 100
    print(f"\n100 x 1 MB documents, PAGE_BYTES 16 MiB: peak RSS of `chtsync sync --once` {peak:.0f} MB")
    assert peak < 150, f"peak RSS {peak:.0f} MB"  # 470 MB before issue 12 (docs/benchmarks.md)
