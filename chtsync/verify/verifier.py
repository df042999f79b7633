"""`chtsync verify [--repair]`: is Postgres equal to CouchDB? Compared without stopping the sync.

Per source: counts first (GET /db beside count(*)), then ids and winning revisions in pages of
`_all_docs` (no bodies), each page sent to Postgres as one jsonb parameter into a temporary
table, compared with the raw table in one join at the end. `_all_docs` is sorted by ICU
collation, which Postgres cannot reproduce, so no key ranges are compared; live rows no page
listed are the candidates for "vanished" (purged, lost with a recreated database) or "stale"
(the follower missed a deletion).

Every candidate is then rechecked against both sides by id (POST _all_docs with keys), and
rechecked again after the follower had a moment, until the differences stop moving: a change
that was simply in flight while the scan ran is never reported.

`--repair` fetches missing and stale documents (POST _all_docs?include_docs, bodies straight to
Postgres) and writes them through chtsync_ingest_v2 as compare-and-set: a row is written only if
its _xid is still the one verify read, so a change the follower wrote meanwhile is never
overwritten; vanished rows become tombstones with a new _xid, under the same rule. One
transaction per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TypeVar

import psycopg

from chtsync import db, queries
from chtsync.config import Config, CouchSource
from chtsync.couch import CouchClient, CouchError, seq_number
from chtsync.errors import Stopped, first_line
from chtsync.follower import OWNER
from chtsync.store import is_data_error, strip_nul
from chtsync.verify.diff import KINDS, MISSING, STALE, VANISHED, Diff, SourceReport, State, classify

log = logging.getLogger("chtsync.verify")
T = TypeVar("T")

PAGE_SIZE = 10_000  # _all_docs rows per page: ~1 MB of ids and revisions
RECHECK_BATCH = 2_000  # keys per POST _all_docs when rechecking candidates
REPAIR_BATCH = 200  # documents (with bodies) per repair transaction
VANISH_BATCH = 5_000  # tombstones per transaction
MAX_ROUNDS = 6  # rechecks before differences that keep moving are reported anyway


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class SourceVerifier:
    """Verify (and repair) one CouchDB database against its rows in Postgres."""

    def __init__(
        self, cfg: Config, conn: psycopg.AsyncConnection, client: CouchClient, dbname: str,
        *, page_size: int = PAGE_SIZE, settle: float = 1.0, max_wait: float = 30.0,
        stop: asyncio.Event | None = None,
    ) -> None:
        self.cfg = cfg
        self.conn = conn
        self.client = client
        self.db = dbname
        self.name = client.source.source_name(dbname)
        self.regclass = f"{cfg.schema}.{cfg.table}"
        self.page_size = max(2, page_size)  # start_key is inclusive: a page of 1 never moves
        self.settle_s = settle
        self.max_wait = max_wait
        self.stop = stop or asyncio.Event()
        table = db.table_ident(cfg)
        self.q_diff = queries.compose("verify_diff", table=table)
        self.q_rows = queries.compose("verify_rows", table=table)
        self.q_counts = queries.compose("verify_counts", table=table)

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Stopped

    async def counts(self, report: SourceReport) -> None:
        info = await self.client.db_info(self.db)
        report.couch_docs, report.couch_deleted = info.doc_count, info.doc_del_count
        cur = await self.conn.execute(self.q_counts, (self.name,))
        row = await cur.fetchone()
        assert row is not None
        report.pg_docs, report.pg_deleted = row

    async def scan(self, report: SourceReport) -> set[str]:
        """Ids that may differ: all _all_docs pages into a temporary table, then one join."""
        await self.conn.execute(queries.get("verify_seen_create"))
        await self.conn.execute(queries.get("verify_seen_reset"))
        q_page = queries.get("verify_page")
        last: str | None = None
        # The next page is fetched while Postgres stores this one.
        fetch: asyncio.Future[list[tuple[str, str]]] | None = asyncio.ensure_future(
            self._page(None))
        try:
            while fetch is not None:
                started = time.monotonic()
                rows = await fetch
                report.couch_seconds += time.monotonic() - started
                fetch = None
                self._check_stop()
                if len(rows) >= self.page_size:
                    fetch = asyncio.ensure_future(self._page(rows[-1][0]))
                if rows and rows[0][0] == last:
                    rows = rows[1:]  # the previous page's last row, listed again by start_key
                if not rows:
                    continue
                last = rows[-1][0]
                rows = _storable_ids(rows, self.name)
                started = time.monotonic()
                await self.conn.execute(q_page, (json.dumps(rows),))
                report.pg_seconds += time.monotonic() - started
                report.checked += len(rows)
        finally:
            if fetch is not None:
                fetch.cancel()
                with contextlib.suppress(BaseException):
                    await fetch
        started = time.monotonic()
        await self.conn.execute(queries.get("verify_seen_analyze"))
        cur = await self.conn.execute(self.q_diff, (self.name,))
        candidates = {r[0] for r in await cur.fetchall()}
        await self.conn.execute(queries.get("verify_seen_reset"))
        report.pg_seconds += time.monotonic() - started
        return candidates

    async def _page(self, start_key: str | None) -> list[tuple[str, str]]:
        return await self.client.all_docs_page(self.db, start_key, self.page_size)

    async def current(self, ids: Sequence[str]) -> dict[str, Diff]:
        """Differences among `ids` as both sides are now."""
        diffs: dict[str, Diff] = {}
        for batch in chunks(sorted(ids), RECHECK_BATCH):
            self._check_stop()
            couch = await self.client.revs_of(self.db, list(batch))
            cur = await self.conn.execute(self.q_rows, (self.name, list(batch)))
            rows = await cur.fetchall()
            pg: dict[str, State] = {r[0]: (r[1], r[2]) for r in rows}
            xids: dict[str, str | None] = {r[0]: r[3] for r in rows}
            for doc_id in batch:
                diff = classify(doc_id, couch.get(doc_id), pg.get(doc_id))
                if diff is not None:
                    diffs[doc_id] = replace(diff, xid=xids.get(doc_id))
        return diffs

    async def confirm(self, ids: Sequence[str] | set[str], report: SourceReport) -> dict[str, Diff]:
        """Differences that hold still: rechecked until two checks, the follower given time
        in between, agree (or MAX_ROUNDS passed: a document edited that often is reported)."""
        diffs = await self.current(list(ids))
        for _ in range(MAX_ROUNDS):
            if not diffs:
                break
            started = time.monotonic()
            await self.settle()
            report.settle_seconds += time.monotonic() - started
            again = await self.current(list(diffs))
            stable = again == diffs
            diffs = again
            if stable:
                break
        return diffs

    async def settle(self) -> None:
        """Give the follower a moment: wait until its checkpoint reaches CouchDB's update_seq,
        while it keeps moving (a source nobody follows is not waited for beyond `settle`)."""
        target = seq_number((await self.client.db_info(self.db)).update_seq)
        await self._sleep(self.settle_s)
        deadline = time.monotonic() + self.max_wait
        last: str | None = None
        moved_at = time.monotonic()
        while time.monotonic() < deadline:
            cur = await self.conn.execute(queries.get("get_checkpoint"), {"source": self.name})
            row = await cur.fetchone()
            seq = row[0] if row else None
            ours = seq_number(seq)
            if target is None or (ours is not None and ours >= target):
                return
            if seq != last:
                last, moved_at = seq, time.monotonic()
            elif time.monotonic() - moved_at > self.settle_s:
                return
            await self._sleep(0.2)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)
        self._check_stop()

    async def repair(self, diffs: dict[str, Diff]) -> tuple[int, int]:
        """Write CouchDB's current documents for missing/stale ids, tombstone vanished rows.
        Returns (rows written, documents refused)."""
        written = refused = 0
        fetch = sorted(d.id for d in diffs.values() if d.kind in (MISSING, STALE))
        for batch in chunks(fetch, REPAIR_BATCH):
            self._check_stop()
            w, r = await self._repair_docs({i: diffs[i].xid for i in batch})
            written, refused = written + w, refused + r
        gone = sorted([d.id, d.xid] for d in diffs.values() if d.kind == VANISHED and d.pg)
        for batch in chunks(gone, VANISH_BATCH):
            self._check_stop()
            async with self.conn.transaction():
                cur = await self.conn.execute(
                    queries.get("verify_mark_vanished"), (self.regclass, self.name, json.dumps(batch)))
                row = await cur.fetchone()
            written += row[0] if row else 0
        return written, refused

    async def _repair_docs(self, expect: dict[str, str | None]) -> tuple[int, int]:
        """Write CouchDB's current state of these ids over the row versions read ({id: _xid})."""
        ids = list(expect)
        body = strip_nul(await self.client.fetch_docs(self.db, ids))
        try:
            async with self.conn.transaction():
                cur = await self.conn.execute(queries.get("verify_repair_page"), (
                    self.regclass, self.name, body.decode("utf-8"), json.dumps(expect)))
                row = await cur.fetchone()
            return (row[0] if row else 0), 0
        except (psycopg.Error, UnicodeError) as exc:
            if not is_data_error(exc):
                raise
            if len(ids) > 1:
                # Halve down to the document Postgres refuses; the others are written.
                half = len(ids) // 2
                a = await self._repair_docs({i: expect[i] for i in ids[:half]})
                b = await self._repair_docs({i: expect[i] for i in ids[half:]})
                return a[0] + b[0], a[1] + b[1]
            reason = first_line(exc)
            await self.conn.execute(queries.get("record_error"), (
                self.name, ids[0], None, f"verify --repair: refused: {reason}", None))
            log.warning("repair refused source=%s id=%s reason=%s", self.name, ids[0], reason)
            return 0, 1

    async def run(self, report: SourceReport, *, repair: bool) -> None:
        await self.counts(report)
        candidates = await self.scan(report)
        report.candidates = len(candidates)
        report.found = await self.confirm(candidates, report)
        report.remaining = report.found
        if repair:
            report.repaired = 0
            if report.found:
                report.repaired, report.refused = await self.repair(report.found)
                # Re-verify what was repaired; the rest was equal a moment ago.
                report.remaining = await self.confirm(list(report.found), report)
                await self.counts(report)


def _storable_ids(rows: list[tuple[str, str]], source: str) -> list[tuple[str, str]]:
    """Ids holding a NUL cannot be Postgres text: the follower refused them into chtsync_errors
    (id escaped), so they are left out of the comparison rather than failing it."""
    kept = [r for r in rows if "\x00" not in r[0]]
    if len(kept) < len(rows):
        log.warning("verify source=%s: %d document id(s) hold a NUL character, which Postgres"
                    " cannot store; not compared (see chtsync_errors)", source, len(rows) - len(kept))
    return kept


async def verify(
    cfg: Config, *, repair: bool = False, only: Sequence[str] = (), page_size: int = PAGE_SIZE,
    settle: float = 1.0, max_wait: float = 30.0, stop: asyncio.Event | None = None,
    skip_catching_up: bool = False, record: bool = True,
) -> list[SourceReport]:
    """Verify every configured database (or those named in `only`, by source or db name)."""
    reports: list[SourceReport] = []
    async with await db.connect_async(cfg, autocommit=True) as conn:
        for couch_source in cfg.sources:
            dbs = [d for d in couch_source.dbs
                   if not only or d in only or couch_source.source_name(d) in only]
            if not dbs:
                continue
            client = CouchClient(couch_source, read_timeout=300.0)
            try:
                for dbname in dbs:
                    report = await _verify_one(
                        cfg, conn, client, couch_source, dbname, repair=repair, page_size=page_size,
                        settle=settle, max_wait=max_wait, stop=stop, skip_catching_up=skip_catching_up)
                    reports.append(report)
                    if record and report.skipped is None:
                        await _record(conn, report)
            finally:
                await client.aclose()
    return reports


async def _verify_one(
    cfg: Config, conn: psycopg.AsyncConnection, client: CouchClient, couch_source: CouchSource,
    dbname: str, *, repair: bool, page_size: int, settle: float, max_wait: float,
    stop: asyncio.Event | None, skip_catching_up: bool,
) -> SourceReport:
    name = couch_source.source_name(dbname)
    report = SourceReport(name)
    started = time.monotonic()
    try:
        if skip_catching_up:
            cur = await conn.execute(queries.get("verify_pending"), (name,))
            row = await cur.fetchone()
            if row is None or row[0] is None or row[0] > 0:
                report.skipped = "the follower is still catching up"
                return report
        verifier = SourceVerifier(cfg, conn, client, dbname, page_size=page_size, settle=settle,
                                  max_wait=max_wait, stop=stop)
        await verifier.run(report, repair=repair)
    except CouchError as exc:
        report.error = str(exc)
    except psycopg.Error as exc:
        report.error = db.describe_error(cfg, exc)
    finally:
        report.seconds = time.monotonic() - started
    _log(report)
    return report


async def repair_source(
    cfg: Config, conn: psycopg.AsyncConnection, client: CouchClient, dbname: str,
    stop: asyncio.Event | None = None,
) -> SourceReport:
    """verify --repair of one database by its own follower, on the follower's session and
    client, with the feed paused (so there is nothing in flight to wait for); recorded."""
    report = await _verify_one(
        cfg, conn, client, client.source, dbname, repair=True, page_size=PAGE_SIZE, settle=0.2,
        max_wait=0.0, stop=stop, skip_catching_up=False)
    await _record(conn, report)
    return report


def _log(report: SourceReport) -> None:
    counts = " ".join(f"{k}={report.count(k)}" for k in KINDS)
    if report.error:
        log.error("verify source=%s failed: %s", report.source, report.error)
    elif report.skipped:
        log.info("verify source=%s skipped: %s", report.source, report.skipped)
    elif report.remaining:
        left = " ".join(f"{k}={report.count(k, 'remaining')}" for k in KINDS)
        log.warning("verify source=%s DIFFERENT %s repaired=%s left: %s (%.1f s)", report.source,
                    counts, report.repaired, left, report.seconds)
    else:
        log.info("verify source=%s %s checked=%d %s repaired=%s (%.1f s)", report.source,
                 report.result(), report.checked, counts, report.repaired, report.seconds)


async def _record(conn: psycopg.AsyncConnection, report: SourceReport) -> None:
    """Keep the outcome in chtsync_verify (best effort: a verify never fails on its record)."""
    try:
        await conn.execute(queries.get("verify_record"), {
            "source": report.source, "started_at": report.started_at, "equal": report.equal,
            "couch_docs": report.couch_docs, "couch_deleted": report.couch_deleted,
            "pg_docs": report.pg_docs, "pg_deleted": report.pg_deleted,
            "missing": report.count(MISSING), "stale": report.count(STALE),
            "vanished": report.count(VANISHED), "repaired": report.repaired or 0,
            "error": report.error, "owner": OWNER,
        })
    except psycopg.Error as exc:
        log.warning("verify source=%s: result not recorded: %s", report.source, exc)
