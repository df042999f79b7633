"""The first sync of a big database: its documents read in parallel key ranges.

One _changes stream goes as fast as CouchDB answers one request at a time (about one core of
it). The first sync of a database with at least `sync.first_sync_min_docs` documents reads
`_all_docs?include_docs=true` instead, in RANGES (a fixed partition of the id space into 257 key
ranges), `sync.first_sync_readers` ranges at a time, while the follower's own session writes the
pages one after another. One writer: the lease and the rule "the checkpoint moves only with the
rows it covers" stay as they are (docs/design.md, "The first sync").

Why Postgres ends equal to CouchDB:
- The database's update_seq S is taken before the first range is read, and the feed resumes at
  S once every range is written: every change after S is written after the ranges, in feed
  order, with the winner as of its reading, like any feed page.
- A document not changed after S lies in exactly one range (the ranges partition the key space
  whatever ids exist), and that range's read returns its winner, unchanged since S.
- A range's next page starts at the last id of the page before, inclusive (a `skip` would step
  over a document if that id were deleted meanwhile); the id read twice is an identical replay
  and writes nothing.
What differs from the feed read from 0: a document deleted before S gets no tombstone row
(`_all_docs` does not list it). Models ignore tombstones; a deletion after S comes by the feed.

Resumable: first_sync_after (chtsync_sources) moves in the transaction of the page that
completes a range, once every range before it is complete; after a crash the ranges from there
are read again (identical replays, nothing written twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import psycopg

from chtsync.config import Config
from chtsync.couch import CouchClient, PageTooLarge
from chtsync.errors import CouchError, Stopped
from chtsync.store import RangePage, Store, UnreadablePage

log = logging.getLogger("chtsync.first_sync")

# 256 two-hex-digit split points. CHT ids are UUIDs, so the ranges hold similar numbers of
# documents; other ids (org.couchdb.user:..., form:..., telemetry-...) fall in the ranges around
# them. Whatever the ids, the ranges cover the whole key space. Fixed, so a restart finds the
# ranges it left.
SPLITS = tuple(f"{i:02x}" for i in range(256))
RANGES: tuple[tuple[str | None, str | None], ...] = tuple(zip((None, *SPLITS), (*SPLITS, None), strict=True))
MIN_LIMIT = 2  # a page starts at the last id of the one before: at least one row must be new


def start_index(after: str | None) -> int:
    """The first range not known to be written, from first_sync_after."""
    if after is None or after not in SPLITS:
        return 0  # none yet (or ranges of another release): all of them
    return SPLITS.index(after) + 1


@dataclass
class _Page:
    index: int  # its range
    body: bytes
    limit: int  # rows asked for: fewer means the range is complete
    stored: asyncio.Future[RangePage]


@dataclass
class Progress:
    ranges_done: int
    ranges: int
    rows: int  # rows read so far (this run)
    written: int
    refused: int


class FirstSync:
    def __init__(
        self, cfg: Config, client: CouchClient, db: str, source: str, store: Store,
        conn: psycopg.AsyncConnection, stop: asyncio.Event, *,
        on_page: Callable[[Progress, RangePage], Awaitable[None]],
        on_unreadable: Callable[[str, UnreadablePage], Awaitable[None]],
    ) -> None:
        self.cfg, self.client, self.db, self.source = cfg, client, db, source
        self.store, self.conn, self.stop = store, conn, stop
        self.on_page, self.on_unreadable = on_page, on_unreadable
        self.readers = cfg.first_sync_readers
        # All pages in memory at once stay under page_bytes, as with the feed.
        self.max_bytes = max(1, cfg.page_bytes // self.readers)

    async def run(self, seq: str, after: str | None, expected: int | None) -> None:
        """Write every range from first_sync_after on, then hand the feed the seq S."""
        first = start_index(after)
        todo = iter(range(first, len(RANGES)))
        queue: asyncio.Queue[_Page] = asyncio.Queue()
        readers = [asyncio.ensure_future(self._reader(todo, queue)) for _ in range(self.readers)]
        done: set[int] = set()
        frontier = first
        progress = Progress(first, len(RANGES), 0, 0, 0)
        try:
            while frontier < len(RANGES):
                page = await self._next(queue, readers)
                try:
                    async with self.conn.transaction():
                        stored = await self.store.first_sync_page(self.conn, self.source, page.body)
                        page.body = b""  # freed before its reader asks for the next page
                        if stored.rows >= page.limit and stored.last_id is None:
                            raise UnreadablePage("page without a last id", "", "")
                        if stored.rows < page.limit:
                            done.add(page.index)
                            moved = frontier
                            while frontier in done:
                                frontier += 1
                            pending = None if expected is None else max(0, expected - progress.rows - stored.rows)
                            if frontier == len(RANGES):
                                await self.store.first_sync_finish(self.conn, self.source, seq)
                            elif frontier != moved:
                                await self.store.first_sync_progress(
                                    self.conn, self.source, RANGES[frontier][0], pending)
                except UnreadablePage as exc:
                    start = RANGES[page.index][0] or ""
                    await self.on_unreadable(f"first sync, key range from {start!r}", exc)
                    raise CouchError(f"CouchDB sent an unreadable _all_docs page for {self.source}"
                                     f" (key range from {start!r}): {exc.kind}") from None
                progress.ranges_done = first + len(done)
                progress.rows += stored.rows
                progress.written += stored.written
                progress.refused += stored.refused
                await self.on_page(progress, stored)
                page.stored.set_result(stored)
            log.info("first sync source=%s: every key range written; the feed continues", self.source)
        finally:
            for reader in readers:
                reader.cancel()
            for reader in readers:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader

    async def _next(self, queue: asyncio.Queue[_Page], readers: list[asyncio.Future[None]]) -> _Page:
        """The next page read; a reader's failure or the service stopping, raised."""
        get = asyncio.ensure_future(queue.get())
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            while True:
                # A reader may have failed while the page before was written: its error, not a
                # "readers ended" once the others have read every other range.
                for reader in readers:
                    if reader.done() and not reader.cancelled() and reader.exception() is not None:
                        raise reader.exception()  # type: ignore[misc]
                waiting = {get, stopping, *(r for r in readers if not r.done())}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    return get.result()
                if stopping in done:
                    raise Stopped
                if all(r.done() for r in readers) and queue.empty():
                    raise CouchError(f"first sync of {self.source}: readers ended before every range")
        finally:
            get.cancel()
            stopping.cancel()

    async def _reader(self, todo: Iterator[int], queue: asyncio.Queue[_Page]) -> None:
        """Read ranges (the next one not taken yet) page by page; each page waits to be written
        before the next is asked for, so at most one page per reader is in memory."""
        loop = asyncio.get_running_loop()
        limit = max(MIN_LIMIT, self.cfg.batch_size)
        for index in todo:
            key, end = RANGES[index]
            while True:
                try:
                    body = await self.client.all_docs_range(
                        self.db, key, end, limit, max_bytes=self.max_bytes if limit > MIN_LIMIT else None)
                except PageTooLarge as exc:
                    limit = max(MIN_LIMIT, exc.limit // 2)
                    continue
                page = _Page(index, body, limit, loop.create_future())
                size = len(body)
                del body
                await queue.put(page)
                stored = await page.stored
                if stored.rows < page.limit:
                    break
                key = stored.last_id
                limit = self._fit(limit, size, stored.rows)

    def _fit(self, limit: int, size: int, rows: int) -> int:
        """Rows per page such that a page stays under max_bytes at the size just seen: down at
        once, back up by doubling, never above batch_size."""
        fit = max(MIN_LIMIT, min(self.cfg.batch_size, int(self.max_bytes * rows / max(size, 1))))
        return fit if fit < limit else min(fit, limit * 2)
