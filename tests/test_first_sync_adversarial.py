"""The first sync in key ranges (chtsync/first_sync.py) attacked: CouchDB changed under the
ranges (purges, conflicts whose winner moves, a recreated database), hostile ids, huge
documents, Postgres and CouchDB killed mid-way, SIGTERM, a member-only user, bad settings and
two replicas racing for a fresh database. Each ends with Postgres equal to CouchDB, or the
exact refusal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from chtsync import first_sync
from chtsync.store import Store
from chtsync.verify import verify
from tests.servers import CouchAdmin
from tests.syncutil import BackgroundSync, assert_equal, pg_state, sync_once, wait_until

SOURCE = "127.0.0.1/medic"


def uuids(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(n)]


def fs_cfg(cfg_factory, **env: str):
    return cfg_factory("medic", **{"FIRST_SYNC_MIN_DOCS": "1", "FIRST_SYNC_READERS": "3", **env})


def rev_of(couch: CouchAdmin, doc_id: str) -> str:
    return couch.get("medic", doc_id)["_rev"]


def after_pages(monkeypatch: pytest.MonkeyPatch, n: int, action: Callable[[], None]) -> list[int]:
    """Run `action` (CouchDB changes) once, right after the n-th first-sync page is written:
    some ranges are written by then, others are still to be read."""
    real = Store.first_sync_page
    count = [0]

    async def page(self, conn, source, body):
        result = await real(self, conn, source, body)
        count[0] += 1
        if count[0] == n:
            action()
        return result

    monkeypatch.setattr(Store, "first_sync_page", page)
    return count


def subprocess_env(couch_server, dbname: str, **env: str) -> dict[str, str]:
    return dict(os.environ, COUCHDB_URL=couch_server.url, COUCHDB_USER=couch_server.auth[0],
                COUCHDB_PASSWORD=couch_server.auth[1], COUCHDB_DBS="medic", POSTGRES_HOST="127.0.0.1",
                POSTGRES_USER="postgres", POSTGRES_DB=dbname, CHTSYNC_CONFIG=os.devnull,
                FIRST_SYNC_MIN_DOCS="1", LOG_LEVEL="INFO", **env)


def first_sync_state(pg: psycopg.Connection) -> tuple[str | None, str | None]:
    row = pg.execute("SELECT first_sync_seq, first_sync_after FROM chtsync_sources").fetchone()
    return (None, None) if row is None else row


def purge(couch: CouchAdmin, revs: dict[str, list[str]]) -> None:
    r = couch.http.post("/medic/_purge", content=json.dumps(revs))
    assert r.status_code in (201, 202), r.text


def test_purges_and_moving_winners_during_the_first_sync(
    couch: CouchAdmin, cfg_factory, pg: psycopg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After the seq S is taken and some ranges are written: documents purged on both sides of
    the read frontier, a conflict's winning leaf deleted (the losing branch wins), a
    new_edits=false branch that becomes the winner, a document edited 30 times, a purged
    conflict leaf. Once caught up Postgres equals CouchDB; purged ids are tombstones."""
    couch.create_db("medic")
    ids = sorted(uuids(21, 1200))
    couch.bulk("medic", [{"_id": i, "type": "person"} for i in ids])
    # Conflicts, one early and one late in the key space (either side of the frontier).
    for doc_id in ("00-conflict", "fe-conflict", "fe-purgeleaf"):
        r = couch.http.post("/medic/_bulk_docs", json={"new_edits": False, "docs": [
            {"_id": doc_id, "_rev": "2-aaaa", "v": "a"}, {"_id": doc_id, "_rev": "1-bbbb", "v": "b"}]})
        assert r.status_code == 201
    early, late = ids[:3], ids[-3:]

    def attack() -> None:
        purge(couch, {i: [rev_of(couch, i)] for i in early + late})
        # Delete the winning leaf 2-aaaa: 1-bbbb (lower generation) becomes the winner.
        for doc_id in ("00-conflict", "fe-conflict"):
            r = couch.http.delete(f"/medic/{doc_id}", params={"rev": "2-aaaa"})
            assert r.status_code == 200, r.text
        # A longer branch arriving by replication wins over the current winner.
        r = couch.http.post("/medic/_bulk_docs", json={"new_edits": False, "docs": [
            {"_id": ids[600], "_rev": "9-ffff", "v": "replicated"}]})
        assert r.status_code == 201
        for n in range(30):
            couch.put("medic", {"_id": ids[601], "_rev": rev_of(couch, ids[601]), "n": n})
        purge(couch, {"fe-purgeleaf": ["2-aaaa"]})  # 1-bbbb is left and wins

    pages = after_pages(monkeypatch, 5, attack)
    stats = sync_once(fs_cfg(cfg_factory, BATCH_SIZE="10"))
    assert stats[0].state == "caught up" and pages[0] > 5
    assert couch.get("medic", "00-conflict")["_rev"] == "1-bbbb"
    assert couch.get("medic", "fe-purgeleaf")["_rev"] == "1-bbbb"
    assert assert_equal(pg, couch, "medic", SOURCE, vanished_ok=True) == 1200 - 6 + 3
    got = pg_state(pg, SOURCE)
    assert all(got[i][1] for i in early)  # purged after their range: tombstones (models drop them)
    assert not set(late) & set(got)  # purged before their range was read: never written
    assert got[ids[600]][0] == "9-ffff"
    assert pg.execute("SELECT doc->>'n' FROM couchdb WHERE _id = %s", (ids[601],)).fetchone() == ("29",)
    assert first_sync_state(pg) == (None, None)


def test_database_recreated_during_the_first_sync(
    couch: CouchAdmin, cfg_factory, pg: psycopg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """medic deleted and recreated with other documents while its ranges are read: the ranges
    left are read from the new database, the feed finds the new instance, reads it from 0 and
    the owed verify turns the old database's documents into tombstones."""
    couch.create_db("medic")
    old = uuids(31, 600)
    couch.bulk("medic", [{"_id": i, "type": "person", "db": "old"} for i in old])
    new = uuids(32, 400) + old[:50]

    def recreate() -> None:
        couch.delete_db("medic")
        # CouchDB names a database's instance by its creation second: recreated within the
        # same second it is the same instance to anyone (see the report of this test's branch).
        time.sleep(1.1)
        couch.create_db("medic")
        couch.bulk("medic", [{"_id": i, "type": "person", "db": "new"} for i in new])

    after_pages(monkeypatch, 4, recreate)
    cfg = fs_cfg(cfg_factory, BATCH_SIZE="10")
    sync_once(cfg)
    sync_once(cfg)  # the recreated database is seen at the latest when caught up; then verify
    assert assert_equal(pg, couch, "medic", SOURCE, vanished_ok=True) == 450
    got = pg_state(pg, SOURCE)
    assert all(got[i][1] for i in old[50:] if i in got)
    assert any(i in got for i in old[50:])  # some old ranges were written before the recreation
    assert pg.execute("SELECT count(*) FROM couchdb WHERE NOT _deleted AND doc->>'db' = 'old'"
                      ).fetchone() == (0,)


def test_ids_on_split_points_beyond_the_bmp_and_a_range_of_many_pages(
    couch: CouchAdmin, cfg_factory, pg: psycopg.Connection,
) -> None:
    """Every split point as an id, ids one character past and before them, U+FFFF, ids beyond
    U+FFFF, and 700 ids in the last range (read in pages of 7): all written, once."""
    couch.create_db("medic")
    ids = list(first_sync.SPLITS) + [s + "0" for s in first_sync.SPLITS[::17]]
    ids += [s[0] + chr(ord(s[1]) - 1) + "\uffff" for s in first_sync.SPLITS[1::31]]
    ids += ["\uffff", "\uffff\uffff", "f\uffff", "\U0010fffd", "\U0001f600", "ff\U0001f600", "\ud7ff"]
    ids += [f"zz-{n:04d}" for n in range(700)]
    r = couch.http.post("/medic/_bulk_docs", content=json.dumps({"docs": [{"_id": i, "t": 1} for i in ids]}))
    assert r.status_code == 201 and all("rev" in x for x in r.json()), r.text[:500]
    stats = sync_once(fs_cfg(cfg_factory, BATCH_SIZE="7"))
    assert stats[0].state == "caught up"
    assert assert_equal(pg, couch, "medic", SOURCE) == len(set(ids))
    assert pg.execute("SELECT count(*) FROM chtsync_errors").fetchone() == (0,)


def test_bad_first_sync_settings_exit_2_in_one_line(couch_server, dbname: str, tmp_path: Path) -> None:
    cases = [({"FIRST_SYNC_READERS": "0"}, "FIRST_SYNC_READERS: must be between 1 and 16, got 0"),
             ({"FIRST_SYNC_READERS": "17"}, "FIRST_SYNC_READERS: must be between 1 and 16, got 17"),
             ({"FIRST_SYNC_READERS": "four"}, "FIRST_SYNC_READERS: expected a whole number, got 'four'"),
             ({"FIRST_SYNC_MIN_DOCS": "-1"}, "FIRST_SYNC_MIN_DOCS: must be between 0 and 2147483647, got -1"),
             ({"FIRST_SYNC_MIN_DOCS": "1e6"}, "FIRST_SYNC_MIN_DOCS: expected a whole number, got '1e6'")]
    config = tmp_path / "chtsync.yaml"
    config.write_text("sync:\n  first_sync_readers: 0\n")
    # from the YAML file: named by its key there
    cases.append(({"CHTSYNC_CONFIG": str(config)}, "sync.first_sync_readers: must be between 1 and 16, got 0"))
    for env, message in cases:
        base = subprocess_env(couch_server, dbname)
        base.pop("FIRST_SYNC_MIN_DOCS")
        done = subprocess.run([sys.executable, "-m", "chtsync", "sync", "--once"], env={**base, **env},
                              capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stderr) == (2, f"chtsync: {message}\n"), env


def test_member_only_user_runs_the_first_sync(
    couch: CouchAdmin, cfg_factory, pg: psycopg.Connection, caplog: pytest.LogCaptureFixture,
) -> None:
    """A user with only member rights on medic (no admin): the ranges are read, not the feed."""
    couch.create_db("medic")
    couch.bulk("medic", [{"_id": i, "type": "person"} for i in uuids(41, 300)])
    couch.create_db("_users")
    couch.put("_users", {"_id": "org.couchdb.user:h3reader", "name": "h3reader", "type": "user",
                         "roles": [], "password": "member-pass-1"})
    r = couch.http.put("/medic/_security", json={"admins": {"names": [], "roles": []},
                                                  "members": {"names": ["h3reader"], "roles": []}})
    assert r.status_code == 200, r.text
    cfg = fs_cfg(cfg_factory, COUCHDB_USER="h3reader", COUCHDB_PASSWORD="member-pass-1", BATCH_SIZE="20")
    with caplog.at_level("INFO", logger="chtsync"):
        stats = sync_once(cfg)
    assert stats[0].state == "caught up"
    assert any("in 257 key ranges" in r.getMessage() for r in caplog.records)
    assert assert_equal(pg, couch, "medic", SOURCE) == 300
    assert "member-pass-1" not in caplog.text


# Runs the command as its own child and prints the child's peak RSS: a child forked straight
# from pytest would report pytest's peak (Linux keeps ru_maxrss across fork and exec).
MEASURE = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode;"
           " print('maxrss', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr);"
           " sys.exit(code)")


def run_measured(env: dict[str, str]) -> tuple[int, int, str]:
    """`chtsync sync --once` in a subprocess: (exit code, peak RSS in KiB, stderr)."""
    done = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "chtsync", "sync", "--once"],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    *lines, last = done.stderr.rstrip("\n").split("\n")
    assert last.startswith("maxrss "), done.stderr[-2000:]
    return done.returncode, int(last.split()[1]), "\n".join(lines)


def test_megabyte_documents_keep_memory_bounded(couch: CouchAdmin, couch_server, pg: psycopg.Connection,
                                                dbname: str) -> None:
    """60 documents of 1 MB, PAGE_BYTES 64 KiB, 4 readers: the first sync's peak RSS stays
    within a few documents of the same run over 60 small documents (not the 60 MB)."""
    couch.create_db("medic")
    ids = uuids(51, 60)
    for chunk in range(0, 60, 10):
        couch.bulk("medic", [{"_id": i, "type": "person", "pad": os.urandom(1 << 19).hex()}
                             for i in ids[chunk:chunk + 10]])
    env = subprocess_env(couch_server, dbname, FIRST_SYNC_READERS="4", PAGE_BYTES=str(64 << 10))
    subprocess.run([sys.executable, "-m", "chtsync", "migrate"], env=env, check=True, capture_output=True)
    code, big, err = run_measured(env)
    assert code == 0, err[-2000:]
    assert "in 257 key ranges" in err
    assert assert_equal(pg, couch, "medic", SOURCE) == 60
    couch.delete_db("medic")
    couch.create_db("medic")
    couch.bulk("medic", [{"_id": i, "type": "person"} for i in uuids(52, 60)])
    pg.execute("TRUNCATE couchdb_progress, chtsync_sources, couchdb")
    code, small, err = run_measured(env)
    assert code == 0 and "in 257 key ranges" in err, err[-2000:]
    # 4 readers x 2 rows (the least a range page asks for) x 1 MB, plus copies of one page.
    print(f"peak RSS: {big} KiB with 1 MB documents, {small} KiB with small ones")
    assert big - small < 30 * 1024, (big, small)


def backend_pids(pg: psycopg.Connection) -> list[int]:
    return [r[0] for r in pg.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND backend_type = 'client backend'").fetchall()]


def reader_threads() -> int:
    return sum(t.name == "chtsync-couch-read" for t in threading.enumerate())


def equal_soon(pg: psycopg.Connection, couch: CouchAdmin, timeout: float = 90) -> None:
    last: list[str] = []

    def equal() -> bool:
        try:
            assert_equal(pg, couch, "medic", SOURCE)
            return first_sync_state(pg) == (None, None)
        except AssertionError as exc:
            last[:] = [str(exc)[:1000]]
            return False

    try:
        wait_until(equal, timeout=timeout, what="Postgres equal to CouchDB")
    except AssertionError:
        raise AssertionError(last[0] if last else "first sync not finished") from None


def test_postgres_session_and_couchdb_killed_mid_first_sync(
    couch: CouchAdmin, cfg_factory, pg: psycopg.Connection, couch_server,
) -> None:
    """pg_terminate_backend of the follower's session, then CouchDB killed -9 and restarted,
    both half way through the ranges: the follower resumes from first_sync_after and ends equal;
    no reader thread is left once it stops."""
    if not hasattr(couch_server, "kill"):
        pytest.skip("CouchDB is external: it cannot be killed here")
    couch.create_db("medic")
    ids = uuids(61, 4000)
    for chunk in range(0, 4000, 1000):
        couch.bulk("medic", [{"_id": i, "type": "person", "pad": "y" * 300} for i in ids[chunk:chunk + 1000]])
    cfg = fs_cfg(cfg_factory, BATCH_SIZE="5", FIRST_SYNC_READERS="4")
    with BackgroundSync(cfg) as sync:
        wait_until(lambda: (first_sync_state(pg)[1] or "") >= "30", timeout=120, what="30 ranges written")
        killed = backend_pids(pg)
        assert killed
        for pid in killed:
            pg.execute("SELECT pg_terminate_backend(%s)", (pid,))
        wait_until(lambda: (first_sync_state(pg)[1] or "") >= "60", timeout=120, what="60 ranges written")
        couch_server.kill()
        time.sleep(1.0)
        couch_server.start()
        equal_soon(pg, couch, timeout=150)
        # The tail from S is read after the ranges: "following" once it is caught up.
        wait_until(lambda: sync.stats()[0].state == "following", timeout=60, what="the follower caught up")
    wait_until(lambda: reader_threads() == 0, timeout=70, what="reader threads to end")
    assert pg.execute("SELECT count(*) FROM chtsync_errors").fetchone() == (0,)


def start_sync_of_4000(
    couch: CouchAdmin, couch_server, dbname: str, seed: int,
) -> tuple[dict[str, str], subprocess.Popen]:
    """4000 documents of ~300 bytes into a new medic, then `chtsync sync` (4 readers, pages of 5)."""
    couch.create_db("medic")
    ids = uuids(seed, 4000)
    for chunk in range(0, 4000, 1000):
        couch.bulk("medic", [{"_id": i, "type": "person", "pad": "z" * 300} for i in ids[chunk:chunk + 1000]])
    env = subprocess_env(couch_server, dbname, FIRST_SYNC_READERS="4", BATCH_SIZE="5")
    subprocess.run([sys.executable, "-m", "chtsync", "migrate"], env=env, check=True, capture_output=True)
    return env, subprocess.Popen([sys.executable, "-m", "chtsync", "sync"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sigterm_mid_first_sync_exits_promptly_and_resumes(
    couch: CouchAdmin, couch_server, pg: psycopg.Connection, dbname: str,
) -> None:
    """SIGTERM to `chtsync sync` while 4 readers stream ranges: it exits 0 within seconds (no
    reader thread holds it), and the next run resumes and ends equal."""
    env, proc = start_sync_of_4000(couch, couch_server, dbname, seed=71)
    try:
        wait_until(lambda: (first_sync_state(pg)[1] or "") >= "20", timeout=120, what="20 ranges written")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)  # a hang fails here, whatever the time it would take
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err[-2000:]
    assert "SIGTERM received: stopping" in err and "Traceback" not in err
    seq, after = first_sync_state(pg)
    assert seq is not None and after is not None
    done = subprocess.run([sys.executable, "-m", "chtsync", "sync", "--once"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from key {after!r}" in done.stderr
    assert assert_equal(pg, couch, "medic", SOURCE) == 4000


def test_two_replicas_on_a_fresh_database(
    couch: CouchAdmin, couch_server, pg: psycopg.Connection, dbname: str, tmp_path: Path,
) -> None:
    """Two `chtsync sync` started together on a fresh database: one holds the lease and runs the
    first sync, the other waits as standby; the first killed -9 half way, the standby takes
    over from first_sync_after and ends equal."""
    couch.create_db("medic")
    ids = uuids(81, 4000)
    for chunk in range(0, 4000, 1000):
        couch.bulk("medic", [{"_id": i, "type": "person", "pad": "w" * 300} for i in ids[chunk:chunk + 1000]])
    env = subprocess_env(couch_server, dbname, FIRST_SYNC_READERS="3", BATCH_SIZE="5", LEASE_SECONDS="2")
    subprocess.run([sys.executable, "-m", "chtsync", "migrate"], env=env, check=True, capture_output=True)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    with contextlib.ExitStack() as files:
        procs = [subprocess.Popen([sys.executable, "-m", "chtsync", "sync"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=files.enter_context(log.open("w"))) for log in logs]
    try:
        wait_until(lambda: (first_sync_state(pg)[1] or "") >= "20", timeout=120, what="20 ranges written")
        owner = pg.execute("SELECT owner FROM chtsync_sources").fetchone()[0]
        [leader] = [i for i, p in enumerate(procs) if owner.endswith(f":{p.pid}")]
        standby = 1 - leader
        assert "standby source=127.0.0.1/medic" in logs[standby].read_text()
        assert "key ranges" not in logs[standby].read_text()
        procs[leader].send_signal(signal.SIGKILL)
        procs[leader].wait(10)
        wait_until(lambda: "resumed from key" in logs[standby].read_text(), timeout=60,
                   what="the standby to take over")
        equal_soon(pg, couch, timeout=150)
        assert pg.execute("SELECT owner FROM chtsync_sources").fetchone()[0].endswith(f":{procs[standby].pid}")
        procs[standby].send_signal(signal.SIGTERM)
        assert procs[standby].wait(20) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert "Traceback" not in logs[standby].read_text()


def test_sigterm_while_couchdb_hangs_mid_range(
    couch: CouchAdmin, couch_server, pg: psycopg.Connection, dbname: str,
) -> None:
    """CouchDB frozen (SIGSTOP) while the readers wait for their ranges: SIGTERM still ends
    `chtsync sync` at once with exit 0; the readers' threads, stuck in recv, do not hold it."""
    if not hasattr(couch_server, "kill"):
        pytest.skip("CouchDB is external: it cannot be frozen here")
    env, proc = start_sync_of_4000(couch, couch_server, dbname, seed=91)
    frozen = False
    try:
        wait_until(lambda: (first_sync_state(pg)[1] or "") >= "10", timeout=120, what="10 ranges written")
        os.kill(couch_server.pid, signal.SIGSTOP)
        frozen = True
        time.sleep(1.0)  # every reader is now waiting on the frozen server
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)  # a thread holding the process fails here
        err = proc.stderr.read()
    finally:
        if frozen:
            os.kill(couch_server.pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err[-2000:]
    assert "SIGTERM received: stopping" in err and "Traceback" not in err
    done = subprocess.run([sys.executable, "-m", "chtsync", "sync", "--once"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert assert_equal(pg, couch, "medic", SOURCE) == 4000


def test_ids_too_long_for_a_url_end_a_page(couch: CouchAdmin, cfg_factory, pg: psycopg.Connection) -> None:
    """CouchDB stores ids of any length, but refuses a request line of some 16 KB (HTTP 400)
    and httpx a query over 64 KiB: a page ending at a 20,000-character id (or at 6,000 emoji,
    72 KB once URL-encoded) must not stall its range, where the next page starts."""
    couch.create_db("medic")
    long_ascii = "77-07" + "x" * 20_000
    long_emoji = "88-07" + "\U0001f600" * 6_000
    ids = [f"{p}-{n:02d}" for p in ("77", "88") for n in range(1, 12) if n != 7] + [long_ascii, long_emoji]
    ids += uuids(101, 200)
    r = couch.http.post("/medic/_bulk_docs", content=json.dumps({"docs": [{"_id": i, "t": 1} for i in ids]}))
    assert r.status_code == 201 and all("rev" in x for x in r.json()), r.text[:300]
    # Pages of 7: "77-01".."77-06" then the long id; the next page starts at it.
    cfg = fs_cfg(cfg_factory, BATCH_SIZE="7")
    stats = sync_once(cfg)
    assert stats[0].state == "caught up"
    assert assert_equal(pg, couch, "medic", SOURCE) == len(ids)
    # verify pages _all_docs the same way: the long ids end its pages of 7 too.
    [report] = asyncio.run(verify(cfg, page_size=7, record=False))
    assert (report.error, report.checked, report.equal) == (None, len(ids), True)


def test_a_failed_range_is_reported_as_itself(
    couch: CouchAdmin, cfg_factory, pg: psycopg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One range's reads fail (HTTP 500) while the other readers go on: the follower reports
    that failure, not "readers ended before every range" once the others are done."""
    from chtsync.couch import CouchClient
    from chtsync.errors import CouchError

    couch.create_db("medic")
    couch.bulk("medic", [{"_id": i, "type": "person"} for i in uuids(111, 600)])
    real = CouchClient.all_docs_range

    async def failing(self, db, start, end, limit, **kw):
        if start is not None and start.startswith("80"):
            raise CouchError("CouchDB answered HTTP 500 for range 80", status=500)
        return await real(self, db, start, end, limit, **kw)

    def reason() -> str | None:
        row = pg.execute("SELECT reason FROM chtsync_sources").fetchone()
        return row[0] if row else None

    monkeypatch.setattr(CouchClient, "all_docs_range", failing)
    with BackgroundSync(fs_cfg(cfg_factory, BATCH_SIZE="50")):
        wait_until(lambda: reason() is not None, timeout=60, what="the follower to report the failure")
        reasons = {reason()}
        time.sleep(1.5)  # the other readers finish their ranges meanwhile
        reasons.add(reason())
    assert reasons == {"CouchDB answered HTTP 500 for range 80"}
    after = first_sync_state(pg)[1]
    assert after is None or after <= "80"  # never past the range that fails
