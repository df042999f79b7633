"""Helpers for sync tests: run followers in a background thread, compare Postgres to CouchDB."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import psycopg

from chtsync import migrate, service
from chtsync.config import Config
from chtsync.follower import SourceStats
from tests.servers import CouchAdmin


def sync_once(cfg: Config) -> list[SourceStats]:
    """`chtsync sync --once` in-process."""
    migrate.apply(cfg)
    return asyncio.run(service.follow_all(cfg, asyncio.Event(), once=True))


class BackgroundSync:
    """Followers running continuously in a thread, as `chtsync sync` does."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.result: list[SourceStats] | None = None
        self.runtime = service.Runtime(cfg)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.result = self.loop.run_until_complete(
                service.follow_all(self.cfg, self.stop, runtime=self.runtime))
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def __enter__(self) -> BackgroundSync:
        migrate.apply(self.cfg)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_now()

    def stats(self) -> list[SourceStats]:
        return self.runtime.sources

    def stop_now(self, timeout: float = 15) -> list[SourceStats]:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop.set)
            self.thread.join(timeout)
        assert not self.thread.is_alive(), "followers did not stop"
        if self.error:
            raise self.error
        return self.result or []


def pg_state(pg: psycopg.Connection, source: str, table: str = "v1.couchdb") -> dict[str, tuple[str, bool]]:
    rows = pg.execute(
        f"SELECT _id, _rev, _deleted FROM {table} WHERE source = %s", (source,)
    ).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def wait_until(predicate: Callable[[], bool], timeout: float = 30, what: str = "condition") -> float:
    """Poll until predicate() is true; return the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def assert_equal(pg: psycopg.Connection, couch: CouchAdmin, db: str, source: str,
                 vanished_ok: bool = False) -> int:
    """Postgres holds exactly CouchDB's documents: ids, winning revisions, tombstones.

    vanished_ok: after a purge or a recreated database, Postgres keeps tombstones for ids
    CouchDB no longer knows at all (that is how verify --repair makes models drop them).
    """
    want = couch.state(db)
    got = pg_state(pg, source)
    missing = set(want) - set(got)
    extra = {k for k in set(got) - set(want) if not (vanished_ok and got[k][1])}
    stale = {k for k in set(want) & set(got) if want[k] != got[k]}
    assert not (missing or extra or stale), (
        f"{source}: missing {sorted(missing)[:5]} ({len(missing)}), extra {sorted(extra)[:5]}"
        f" ({len(extra)}), stale {sorted(stale)[:5]} ({len(stale)})"
    )
    return len(want)
