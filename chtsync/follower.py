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
from dataclasses import dataclass, field
from typing import TypeVar

import psycopg

from chtsync import db, queries
from chtsync.config import Config, CouchSource
from chtsync.couch import (
    CouchAuthError,
    CouchBadSince,
    CouchClient,
    CouchError,
    CouchNotFound,
    page_trailer,
    seq_number,
)
from chtsync.store import Store

log = logging.getLogger("chtsync.follower")
T = TypeVar("T")

OWNER = f"{socket.gethostname()}:{os.getpid()}"
IDLE_CHECK_SECONDS = 60.0  # while caught up, re-check the database this often (rewind, liveness)
PERMANENT_RETRY_SECONDS = 30.0  # wrong credentials / missing database: try again this often
# While caught up, couchdb_progress.updated_at is refreshed this often without a page: CHT
# Watchdog reads a source as down when it is more than a minute old.
PROGRESS_HEARTBEAT_SECONDS = 15.0
ONCE_MAX_RETRIES = 6  # `sync --once`: consecutive CouchDB failures (~30 s of backoff) before giving up


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

    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2**self.attempt)
        self.attempt = min(self.attempt + 1, 16)
        return delay * (0.5 + random.random() / 2)

    def reset(self) -> None:
        self.attempt = 0


class Stopped(Exception):
    """The service is shutting down."""


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
        self.resync = False  # resyncing a recreated database: write without the revision guard
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
        stored, self.resync = await self.store.checkpoint(conn, self.name)
        since = await self._check_rewind(conn, stored or "0")
        self.stats.seq = since
        await self._set_state("catching up", None)
        caught_up = False
        limit = self.cfg.batch_size
        ahead: asyncio.Task[bytes] | None = None  # the next page, fetched during this ingest
        try:
            while not self.done.is_set():
                since, caught_up, ahead = await self._step(conn, backoff, since, caught_up, limit, ahead)
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
                body = await self._until_stopped(ahead, None)
                ahead = None
            else:
                body = await self._fetch(since, limit, longpoll)
        except CouchBadSince as exc:
            return await self._restart(conn, f"CouchDB refused the stored seq ({exc})"), False, None
        if body is None:  # idle check interval passed while caught up
            return await self._check_rewind(conn, since), caught_up, None
        trailer = None if longpoll else page_trailer(body)
        if trailer is not None and trailer[1] != 0:
            # More is pending (or the server does not say): CouchDB sends the next page while
            # Postgres ingests this one. Used only if this page ends at the seq the trailer said.
            ahead = asyncio.ensure_future(self.client.changes(
                self.db, trailer[0], limit, heartbeat_ms=self.cfg.heartbeat_ms))
            # If it is dropped unread, its error (if any) must not be reported as unretrieved.
            ahead.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            result = await self.store.ingest(conn, self.name, body, limit, force=self.resync)
        except BaseException:
            if ahead is not None:
                ahead.cancel()
            raise
        if ahead is not None and (trailer is None or result.last_seq != trailer[0]):
            ahead.cancel()
            ahead = None
        backoff.reset()
        if result.last_seq is None:
            if ahead is not None:
                ahead.cancel()
            raise CouchError(f"CouchDB sent an unreadable _changes page for {self.name}")
        self._account(result.written, result.refused, result.pending, result.last_seq)
        log.debug(
            "page source=%s changes=%d written=%d pending=%s seq=%s",
            self.name, result.changes, result.written, result.pending, _short(result.last_seq),
        )
        since = result.last_seq
        now_caught_up = result.pending == 0 if result.pending is not None else result.changes < limit
        if now_caught_up and not caught_up and not longpoll:
            # Some servers echo an old seq back for a recreated database: compare.
            checked = await self._check_rewind(conn, since)
            if checked != since:  # restarting from 0: not caught up after all
                if ahead is not None:
                    ahead.cancel()
                return checked, False, None
        if now_caught_up != caught_up:
            caught_up = now_caught_up
            if caught_up:
                self.stats.caught_up_at = time.monotonic()
                if self.resync:
                    await self.store.end_resync(conn, self.name)
                    self.resync = False
                    log.info("resync done source=%s", self.name)
            await self._set_state("following" if caught_up else "catching up", None)
        if caught_up and self.once:
            self.done.set()
        return since, caught_up, ahead

    # -- pieces -----------------------------------------------------------------------------

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

    async def _fetch(self, since: str, limit: int, longpoll: bool) -> bytes | None:
        fetch = self.client.changes(
            self.db, since, limit, longpoll=longpoll, heartbeat_ms=self.cfg.heartbeat_ms
        )
        if longpoll:
            fetch = self._with_progress_heartbeat(fetch, since)
        return await self._until_stopped(fetch, IDLE_CHECK_SECONDS if longpoll else None)

    async def _with_progress_heartbeat(self, fetch: Awaitable[bytes], since: str) -> bytes:
        """Await a longpoll; meanwhile mark the checkpoint fresh (pending 0) every
        PROGRESS_HEARTBEAT_SECONDS. Nothing else uses the session while the follower waits here."""
        task = asyncio.ensure_future(fetch)
        try:
            while True:
                wait = self._progress_touched + PROGRESS_HEARTBEAT_SECONDS - time.monotonic()
                done, _ = await asyncio.wait({task}, timeout=max(wait, 0.0))
                if done:
                    return task.result()
                if self._conn is not None:
                    await self._conn.execute(queries.get("touch_progress"), {"source": self.name, "seq": since})
                self._progress_touched = time.monotonic()
        finally:
            task.cancel()

    async def _check_rewind(self, conn: psycopg.AsyncConnection, since: str) -> str:
        info = await self._until_stopped(self.client.db_info(self.db), None)
        if info is None:
            raise Stopped
        ours, theirs = seq_number(since), seq_number(info.update_seq)
        if ours is not None and theirs is not None and theirs < ours:
            return await self._restart(
                conn,
                f"database {self.db} is behind the stored checkpoint (update_seq {theirs} < {ours}):"
                " it was probably deleted and recreated",
            )
        return since

    async def _restart(self, conn: psycopg.AsyncConnection, reason: str) -> str:
        log.warning("resync source=%s from 0: %s; existing rows are kept", self.name, reason)
        self._count_error("rewind")
        await self.store.reset_checkpoint(conn, self.name, f"resync from 0: {reason}")
        self.resync = True
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
                log.info("source=%s state=%s seq=%s", self.name, state, _short(self.stats.seq))
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


def _short(seq: str | None) -> str:
    if seq is None:
        return "-"
    return seq if len(seq) <= 16 else seq[:12] + "…"
