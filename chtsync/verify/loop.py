"""The verify scheduled inside `chtsync run`: every VERIFY_INTERVAL, one replica at a time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import psycopg

from chtsync import db, queries
from chtsync.config import Config
from chtsync.errors import Stopped
from chtsync.verify.diff import SourceReport
from chtsync.verify.verifier import verify

log = logging.getLogger("chtsync.verify")

RETRY_SKIPPED_SECONDS = 600.0  # scheduled verify: retry a source that was catching up


async def verify_loop(cfg: Config, stop: asyncio.Event) -> None:
    """Verify and repair every cfg.verify_interval seconds (off when unset). The interval counts
    from the last verify any replica finished (chtsync_verify), so restarts do not postpone it;
    an advisory lock makes sure only one replica verifies at a time."""
    if not cfg.verify_interval:
        return
    interval = cfg.verify_interval
    last_attempt = time.time()
    retry_at: float | None = None
    while not stop.is_set():
        try:
            delay = await _next_delay(cfg, interval, last_attempt, retry_at)
        except psycopg.Error as exc:
            log.warning("verify schedule: %s", db.describe_error(cfg, exc))
            delay = 60.0
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=max(delay, 0.0))
        if stop.is_set():
            return
        last_attempt, retry_at = time.time(), None
        try:
            reports = await verify_locked(cfg, stop)
        except Stopped:
            return
        except (psycopg.Error, OSError) as exc:
            log.warning("scheduled verify failed: %s", db.describe_error(cfg, exc))
            continue
        if reports is None:
            retry_at = time.time() + min(interval, 60.0)  # another replica is verifying
        elif any(r.skipped for r in reports):
            retry_at = time.time() + min(interval, RETRY_SKIPPED_SECONDS)


async def _next_delay(cfg: Config, interval: float, last_attempt: float, retry_at: float | None) -> float:
    if retry_at is not None:
        return retry_at - time.time()
    async with await db.connect_async(cfg, autocommit=True) as conn:
        cur = await conn.execute(queries.get("verify_last_finished"))
        row = await cur.fetchone()
    finished = row[0].timestamp() if row and row[0] else 0.0
    return max(finished, last_attempt) + interval - time.time()


async def verify_locked(cfg: Config, stop: asyncio.Event | None = None) -> list[SourceReport] | None:
    """Verify and repair under the advisory lock; None when another process holds it."""
    key = (db.LOCK_CLASS, db.lock_key(cfg, "verify"))
    async with await db.connect_async(cfg, autocommit=True) as lock_conn:
        cur = await lock_conn.execute(queries.get("verify_try_lock"), key)
        row = await cur.fetchone()
        if not (row and row[0]):
            log.info("verify skipped: another chtsync process is verifying")
            return None
        try:
            return await verify(cfg, repair=True, stop=stop, skip_catching_up=True)
        finally:
            with contextlib.suppress(psycopg.Error):
                await lock_conn.execute(queries.get("verify_unlock"), key)
