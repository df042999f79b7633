"""One follower per CouchDB database: _changes pages -> Postgres, forever, exactly once.

A follower holds its own Postgres session, and in it an advisory lock on its source: the lock is
the lease that makes it the only writer (another replica waits as standby and takes over when
the session dies). Every page is written and checkpointed in one transaction, so a crash at any
instant leaves Postgres consistent with a checkpoint and replay is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field, replace
from typing import TypeVar

import psycopg

from chtsync import db, first_sync, queries
from chtsync.config import Config, CouchSource
from chtsync.couch import (
    CouchAuthError,
    CouchBadSince,
    CouchClient,
    CouchError,
    CouchNotFound,
    DbInfo,
    PageTooLarge,
    page_trailer,
    seq_number,
    short_seq,
)
from chtsync.errors import Stopped
from chtsync.store import RangePage, SourceMarks, Store, UnreadablePage

log = logging.getLogger("chtsync.follower")
T = TypeVar("T")

OWNER = f"{socket.gethostname()}:{os.getpid()}"
# While caught up, look at the database (GET /db) this often, beside the open longpoll: a
# recreated database, and purges, which never appear in _changes, are seen within this bound.
DB_CHECK_SECONDS = 2.0
PERMANENT_RETRY_SECONDS = 30.0  # wrong credentials / missing database: try again this often
# While caught up, couchdb_progress.updated_at is refreshed this often without a page: CHT
# Watchdog reads a source as down when it is more than a minute old.
PROGRESS_HEARTBEAT_SECONDS = 15.0
ONCE_MAX_RETRIES = 6  # `sync --once`: consecutive CouchDB failures (~30 s of backoff) before giving up
RETRY_BASE_SECONDS = 0.5  # first retry after a failure; doubled per consecutive failure
RETRY_CAP_SECONDS = 30.0


@dataclass
class SourceStats:
    """What a follower knows about its source, read by metrics and the `sync` summary."""

    source: str
    state: str = "starting"
    reason: str | None = None
    seq: str | None = None
    pending: int | None = None
    docs_written: int = 0
    pages: int = 0
    refused: int = 0
    caught_up_at: float | None = None  # monotonic time when last caught up
    errors: dict[str, int] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)

    @property
    def up(self) -> bool:
        return self.state in ("following", "catching up")

    def lag_seconds(self) -> float:
        if self.state == "following":
            return 0.0
        since = self.caught_up_at if self.caught_up_at is not None else self.started_at
        return time.monotonic() - since


class Backoff:
    """Capped exponential backoff with jitter."""

    def __init__(self, base: float | None = None, cap: float | None = None) -> None:
        self.base = RETRY_BASE_SECONDS if base is None else base
        self.cap = RETRY_CAP_SECONDS if cap is None else cap
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2**self.attempt)
        self.attempt = min(self.attempt + 1, 16)
        return delay * (0.5 + random.random() / 2)

    def reset(self) -> None:
        self.attempt = 0


class Follower:
    def __init__(
        self,
        cfg: Config,
        source: CouchSource,
        dbname: str,
        client: CouchClient,
        stop: asyncio.Event,
        *,
        once: bool = False,
    ) -> None:
        self.cfg = cfg
        self.couch_source = source
        self.db = dbname
        self.client = client
        self.stop = stop
        self.once = once
        self.name = source.source_name(dbname)
        self.store = Store(cfg)
        self.stats = SourceStats(self.name)
        self.done = asyncio.Event()  # set when caught up in --once mode
        self._conn: psycopg.AsyncConnection | None = None
        self.marks = SourceMarks()  # the database the checkpoint belongs to, purges applied
        # Changes asked per page: batch_size, fewer while documents are big (cfg.page_bytes).
        self.limit = cfg.batch_size
        self._ahead_limit = self.limit  # the limit the prefetched page was asked with
        self._problems: set[tuple[str, str]] = set()  # unreadable pages recorded: (since, kind)
        self._progress_touched = 0.0  # monotonic time of the last progress heartbeat

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> SourceStats:
        backoff = Backoff()
        while not self.stop.is_set() and not self.done.is_set():
            try:
                await self._follow(backoff)
            except Stopped:
                break
            except CouchError as exc:
                if not exc.transient:
                    # Wrong credentials, a missing database, an untrusted certificate: a person
                    # must act; keep checking slowly so a fix is picked up without a restart.
                    kind = {CouchAuthError: "couchdb_auth", CouchNotFound: "couchdb_missing"}.get(
                        type(exc), "couchdb_config")
                    self._count_error(kind)
                    await self._set_state("error", str(exc), level=logging.ERROR)
                    if self.once:
                        break
                    await self._sleep(PERMANENT_RETRY_SECONDS)
                    continue
                self._count_error("couchdb")
                await self._set_state("retrying", str(exc))
                if self.once and backoff.attempt >= ONCE_MAX_RETRIES:
                    # A one-shot run reports an unreachable server instead of waiting for ever.
                    await self._set_state("error", f"{exc} (gave up after {backoff.attempt} retries)",
                                          level=logging.ERROR)
                    break
                await self._sleep(backoff.next())
            except psycopg.Error as exc:
                self._count_error("postgres")
                await self._set_state("retrying", db.describe_error(self.cfg, exc), write=False)
                await self._sleep(backoff.next())
            except Exception as exc:
                # A bug or a surprise must not end the follower: report it loudly, retry.
                self._count_error("internal")
                log.exception("source=%s unexpected error", self.name)
                await self._set_state("retrying", f"unexpected error: {exc!r}"[:500], write=False)
                await self._sleep(backoff.next())
            finally:
                await self._close()
        if self.done.is_set():
            self.stats.state = "caught up"
        elif self.stats.state != "error":
            self.stats.state = "stopped"
        return self.stats

    async def _follow(self, backoff: Backoff) -> None:
        conn = await db.connect_async(self.cfg, autocommit=True)
        self._conn = conn
        await conn.execute(queries.get("session_keepalives"))
        await self._acquire_lease(conn)
        stored, self.marks = await self.store.checkpoint(conn, self.name)
        since = await self._check_database(conn, stored or "0", fresh=stored is None)
        if self.marks.first_sync_seq is not None or stored is None:
            since = await self._first_sync(conn, since)
        self.stats.seq = since
        await self._set_state("catching up", None)
        caught_up = False
        ahead: asyncio.Task[bytes] | None = None  # the next page, fetched during this ingest
        try:
            while not self.done.is_set():
                since, caught_up, ahead = await self._step(conn, backoff, since, caught_up, self.limit, ahead)
        finally:
            if ahead is not None:
                ahead.cancel()

    async def _step(
        self, conn: psycopg.AsyncConnection, backoff: Backoff, since: str, caught_up: bool, limit: int,
        ahead: asyncio.Task[bytes] | None,
    ) -> tuple[str, bool, asyncio.Task[bytes] | None]:
        """One page: fetch (or take the prefetched one), ingest, account, move state."""
        if self.stop.is_set():
            raise Stopped
        longpoll = caught_up and not self.once
        try:
            if ahead is not None:
                limit = self._ahead_limit
                body = await self._until_stopped(ahead, None)
                ahead = None
            else:
                body = await self._fetch(since, limit, longpoll)
        except CouchBadSince as exc:
            return await self._restart(conn, f"CouchDB refused the stored seq ({exc})"), False, None
        except PageTooLarge as exc:
            # Big documents: ask again for half as many (one at least), before any is stored.
            self.limit = max(1, exc.limit // 2)
            log.info("source=%s page over %d bytes: %d changes per page", self.name,
                     self.cfg.page_bytes, self.limit)
            return since, caught_up, None
        if body is None:  # while caught up, the database needs a look (recreated? purged?)
            return await self._check_database(conn, since, caught_up=True), caught_up, None
        trailer = None if longpoll else page_trailer(body)
        if trailer is not None and trailer[1] != 0 and len(body) <= self.cfg.page_bytes // 2:
            # More is pending (or the server does not say): CouchDB sends the next page while
            # Postgres ingests this one. Used only if this page ends at the seq the trailer said.
            # Not with big pages: two of them in memory at once would double the bound.
            self._ahead_limit = self.limit
            ahead = asyncio.ensure_future(self.client.changes(
                self.db, trailer[0], self.limit, heartbeat_ms=self.cfg.heartbeat_ms,
                max_bytes=self.cfg.page_bytes))
            # If it is dropped unread, its error (if any) must not be reported as unretrieved.
            ahead.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            result = await self.store.ingest(conn, self.name, body, limit)
        except UnreadablePage as exc:
            # Garbage, cut short, no results or no last_seq: nothing to store or checkpoint.
            # One error row per problem and seq, however often it is retried (with backoff).
            if ahead is not None:
                ahead.cancel()
            key = (since, exc.kind)
            if key not in self._problems:
                self._problems.add(key)
                await self.store.record_unreadable(conn, self.name, since, exc)
            self._count_error("unreadable_page")
            raise CouchError(f"CouchDB sent an unreadable _changes page for {self.name}"
                             f" after seq {short_seq(since)}: {exc.kind}") from None
        except BaseException:
            if ahead is not None:
                ahead.cancel()
            raise
        if ahead is not None and (trailer is None or result.last_seq != trailer[0]):
            ahead.cancel()
            ahead = None
        backoff.reset()  # only a page stored resets it: a bad page again and again backs off
        self._problems.clear()
        self._adapt_limit(len(body), result.changes)
        del body
        self._account(result.written, result.refused, result.pending, result.last_seq)
        log.debug(
            "page source=%s changes=%d written=%d pending=%s seq=%s",
            self.name, result.changes, result.written, result.pending, short_seq(result.last_seq),
        )
        since = result.last_seq
        now_caught_up = result.pending == 0 if result.pending is not None else result.changes < limit
        if now_caught_up and not caught_up and not longpoll:
            # Recreated databases, purges and owed verifies are dealt with once caught up (no
            # page is in flight then, so none read before a purge can be written after it).
            if ahead is not None:
                ahead.cancel()
                ahead = None
            checked = await self._check_database(conn, since, caught_up=True)
            if checked != since:  # restarting from 0: not caught up after all
                return checked, False, None
        if now_caught_up != caught_up:
            caught_up = now_caught_up
            if caught_up:
                self.stats.caught_up_at = time.monotonic()
            await self._set_state("following" if caught_up else "catching up", None)
        if caught_up and self.once:
            self.done.set()
        return since, caught_up, ahead

    # -- pieces -----------------------------------------------------------------------------

    async def _first_sync(self, conn: psycopg.AsyncConnection, since: str) -> str:
        """A big database never synced before (or a first sync left half done): its documents
        in parallel key ranges (chtsync/first_sync.py), then the feed from the seq taken before
        the first range. Returns where the feed starts."""
        seq, after = self.marks.first_sync_seq, self.marks.first_sync_after
        info = await self._db_info()
        if seq is None:
            if self.cfg.first_sync_readers < 2 or info.doc_count < self.cfg.first_sync_min_docs:
                return since
            if not await self._until_stopped(self.client.is_apache_couchdb(), None):
                log.info("first sync source=%s: from the feed (key ranges are read from Apache"
                         " CouchDB only)", self.name)
                return since
            seq = info.update_seq  # before any range is read: every later change is in the feed
            await self.store.first_sync_begin(conn, self.name, seq, info.doc_count)
            log.info("first sync source=%s: %d documents in %d key ranges, %d at a time",
                     self.name, info.doc_count, len(first_sync.RANGES), self.cfg.first_sync_readers)
        else:
            log.info("first sync source=%s: resumed from key %r", self.name, after)
        self.stats.pending = info.doc_count
        await self._set_state("catching up", None)

        async def on_page(progress: first_sync.Progress, page: RangePage) -> None:
            self._problems.clear()
            self._account(page.written, page.refused, max(0, info.doc_count - progress.rows), "0")
            if page.rows < 2 or self.stats.pages % 100 == 0:
                log.debug("first sync source=%s ranges=%d/%d rows=%d written=%d", self.name,
                          progress.ranges_done, progress.ranges, progress.rows, progress.written)

        async def on_unreadable(where: str, exc: UnreadablePage) -> None:
            self._count_error("unreadable_page")
            if (where, exc.kind) not in self._problems:
                self._problems.add((where, exc.kind))
                await self.store.record_unreadable(conn, self.name, where, exc)

        await first_sync.FirstSync(
            self.cfg, self.client, self.db, self.name, self.store, conn, self.stop,
            on_page=on_page, on_unreadable=on_unreadable,
        ).run(seq, after, info.doc_count)
        self.marks = replace(self.marks, first_sync_seq=None, first_sync_after=None)
        self.stats.seq = seq
        return seq

    async def _acquire_lease(self, conn: psycopg.AsyncConnection) -> None:
        key = db.lock_key(self.cfg, "source:" + self.name)
        announced = False
        while True:
            cur = await conn.execute(queries.get("try_source_lock"), (db.LOCK_CLASS, key))
            row = await cur.fetchone()
            if row and row[0]:
                return
            if not announced:
                self.stats.state = "standby"
                log.info("standby source=%s: another chtsync process follows it", self.name)
                announced = True
            await self._sleep(max(0.5, self.cfg.lease_seconds / 4))
            if self.stop.is_set():
                raise Stopped

    def _adapt_limit(self, size: int, changes: int) -> None:
        """Changes per page such that a page stays under cfg.page_bytes at the document size
        just seen: down at once, back up by doubling, never above batch_size."""
        if changes == 0:
            return
        fit = max(1, min(self.cfg.batch_size, int(self.cfg.page_bytes * changes / max(size, 1))))
        new = fit if fit < self.limit else min(fit, self.limit * 2)
        if new != self.limit:
            log.debug("source=%s %d changes per page (%d bytes for %d)", self.name, new, size, changes)
            self.limit = new

    async def _fetch(self, since: str, limit: int, longpoll: bool) -> bytes | None:
        """The next page; None when caught up and the database needs a look first."""
        fetch = asyncio.ensure_future(self.client.changes(
            self.db, since, limit, longpoll=longpoll, heartbeat_ms=self.cfg.heartbeat_ms,
            max_bytes=self.cfg.page_bytes,
        ))
        if not longpoll:
            return await self._until_stopped(fetch, None)
        try:
            # The longpoll stays open; beside it, GET /db every DB_CHECK_SECONDS. A page that
            # arrived is always taken first: it was read before whatever the check found.
            while True:
                body = await self._until_stopped(asyncio.shield(fetch), DB_CHECK_SECONDS)
                if body is not None:
                    return body
                info = await self._db_info()
                await self._progress_heartbeat(since)
                if fetch.done() and not fetch.cancelled() and fetch.exception() is None:
                    return fetch.result()
                if self._needs_look(since, info):
                    return None
        finally:
            if not fetch.done():
                fetch.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await fetch

    async def _progress_heartbeat(self, since: str) -> None:
        """While caught up, mark the checkpoint fresh (pending 0) every PROGRESS_HEARTBEAT_SECONDS:
        CHT Watchdog reads a source as down when updated_at is a minute old. Nothing else uses
        the session while the follower waits on its longpoll."""
        if time.monotonic() - self._progress_touched < PROGRESS_HEARTBEAT_SECONDS or self._conn is None:
            return
        await self._conn.execute(queries.get("touch_progress"), {"source": self.name, "seq": since})
        self._progress_touched = time.monotonic()

    async def _db_info(self) -> DbInfo:
        info = await self._until_stopped(self.client.db_info(self.db), None)
        if info is None:
            raise Stopped
        return info

    def _recreated(self, since: str, info: DbInfo) -> str | None:
        """Why the database is not the one the checkpoint belongs to, if it is not."""
        if self.marks.instance and info.instance and info.instance != self.marks.instance:
            return (f"database {self.db} was deleted and recreated (created at {info.instance},"
                    f" the checkpoint belongs to the one created at {self.marks.instance})")
        # Servers without a creation time (pouchdb-server) echo an old seq back: compare.
        ours, theirs = seq_number(since), seq_number(info.update_seq)
        if ours is not None and theirs is not None and theirs < ours:
            return (f"database {self.db} is behind the stored checkpoint (update_seq {theirs} <"
                    f" {ours}): it was probably deleted and recreated")
        return None

    def _needs_look(self, since: str, info: DbInfo) -> bool:
        return (self._recreated(since, info) is not None
                or (info.purge_seq is not None and info.purge_seq != self.marks.purge_seq)
                or (info.instance is not None and self.marks.instance is None))

    async def _check_database(
        self, conn: psycopg.AsyncConnection, since: str, *, fresh: bool = False,
        caught_up: bool = False,
    ) -> str:
        """Is the database still the one the checkpoint belongs to, are its purges applied, is
        a verify owed? Returns where to read from next ("0" after a recreated database).
        fresh: nothing was ever read from this source (purges before now need nothing)."""
        info = await self._db_info()
        reason = self._recreated(since, info)
        if reason is not None:
            return await self._restart(conn, reason, info)
        marks = self.marks
        if fresh or (marks.instance is None and info.instance is not None):
            # First sight of this database (or of a release that records it).
            marks = replace(marks, instance=info.instance,
                            purge_seq=info.purge_seq if fresh else marks.purge_seq)
            await self.store.set_marks(conn, self.name, marks)
            self.marks = marks
        from chtsync import verify  # verify imports this module

        try:
            if info.purge_seq is not None and info.purge_seq != marks.purge_seq:
                await self._apply_purges(conn, info)
            if caught_up and self.marks.verify_due:
                await self._owed_verify(conn)
        except verify.Stopped:
            raise Stopped from None
        return since

    async def _apply_purges(self, conn: psycopg.AsyncConnection, info: DbInfo) -> None:
        """Purges never appear in _changes: re-read the purged ids' current state (a purged
        conflict leaf leaves the document, maybe with another winner) and write it with
        compare-and-set; documents CouchDB no longer knows become tombstones. When more purges
        happened than CouchDB remembers, a full verify --repair is owed instead."""
        from chtsync.verify import SourceVerifier  # verify imports this module

        done, now = seq_number(self.marks.purge_seq) or 0, seq_number(info.purge_seq) or 0
        limit = await self.client.purged_infos_limit(self.db)
        ids = await self.client.purged_ids(self.db)
        marks = replace(self.marks, purge_seq=info.purge_seq)
        if ids is None or now - done > limit:
            # CouchDB keeps at least the latest `limit` purges per shard: beyond that some may
            # be forgotten, and only a full comparison finds their documents.
            marks.verify_due = (
                "the server cannot list purges (no _purged_infos)" if ids is None else
                f"{now - done} purges since the last check, more than CouchDB remembers"
                f" (_purged_infos_limit {limit})")
            log.warning("source=%s %s: verify owed", self.name, marks.verify_due)
        elif ids:
            verifier = SourceVerifier(self.cfg, conn, self.client, self.db, stop=self.stop)
            diffs = await verifier.current(ids)
            written, refused = await verifier.repair(diffs) if diffs else (0, 0)
            log.info("purges source=%s purged_infos=%d rows_changed=%d refused=%d",
                     self.name, len(ids), written, refused)
        await self.store.set_marks(conn, self.name, marks)
        self.marks = marks

    async def _owed_verify(self, conn: psycopg.AsyncConnection) -> None:
        """The verify --repair a recreated database or lost purges asked for, run now that the
        feed is caught up (the feed waits meanwhile); the debt is cleared only when it ran."""
        from chtsync.verify import repair_source  # verify imports this module

        log.info("verify source=%s: %s", self.name, self.marks.verify_due)
        report = await repair_source(self.cfg, conn, self.client, self.db, self.stop)
        if report.error:
            raise CouchError(f"owed verify of {self.name} failed: {report.error}")
        marks = replace(self.marks, verify_due=None)
        await self.store.set_marks(conn, self.name, marks)
        self.marks = marks

    async def _restart(self, conn: psycopg.AsyncConnection, reason: str, info: DbInfo | None = None) -> str:
        """Read a recreated database from 0; rows it no longer has are found by a verify,
        owed from now on and run once caught up."""
        log.warning("resync source=%s from 0: %s; existing rows are kept", self.name, reason)
        self._count_error("rewind")
        info = info or await self._db_info()
        marks = SourceMarks(instance=info.instance, purge_seq=info.purge_seq,
                            verify_due=f"resync from 0: {reason}")
        await self.store.reset_checkpoint(conn, self.name, f"resync from 0: {reason}", marks)
        self.marks = marks
        return "0"

    async def _until_stopped(self, coro: Awaitable[T], timeout: float | None) -> T | None:
        """Run coro unless the service stops first (then raise Stopped) or timeout passes (None)."""
        task = asyncio.ensure_future(coro)
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            done, _ = await asyncio.wait(
                {task, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopper.cancel()
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if self.stop.is_set():
            raise Stopped
        return None

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)

    def _account(self, written: int, refused: int, pending: int | None, seq: str) -> None:
        s = self.stats
        s.pages += 1
        s.docs_written += written
        s.refused += refused
        s.pending = pending
        s.seq = seq
        if refused:
            self._count_error("refused_document", refused)

    def _count_error(self, kind: str, n: int = 1) -> None:
        self.stats.errors[kind] = self.stats.errors.get(kind, 0) + n

    async def _set_state(
        self, state: str, reason: str | None, *, level: int = logging.WARNING, write: bool = True
    ) -> None:
        """Record a state change; log it once (not on every retry)."""
        changed = (state, reason) != (self.stats.state, self.stats.reason)
        self.stats.state, self.stats.reason = state, reason
        if changed:
            if reason:
                log.log(level, "source=%s state=%s reason=%s", self.name, state, reason)
            else:
                log.info("source=%s state=%s seq=%s", self.name, state, short_seq(self.stats.seq))
        if write and changed and self._conn is not None and not self._conn.closed:
            with contextlib.suppress(psycopg.Error):
                await self._conn.execute(queries.get("set_source_state"), {
                    "source": self.name, "state": state, "reason": reason, "owner": OWNER,
                })

    async def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None
