"""The one process: migrations, model plan, a follower per database, the refresh loop, metrics.

Everything runs on one asyncio loop; the pipeline's synchronous Postgres work runs in a thread.
A stop event (SIGTERM/SIGINT) ends it: followers finish or abandon their page, the loop ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer

import psycopg

from chtsync import db, migrate
from chtsync.config import Config, ConfigError
from chtsync.couch import CouchClient
from chtsync.errors import PostgresUnavailable
from chtsync.follower import Follower, SourceStats

log = logging.getLogger("chtsync.service")


@dataclass
class Runtime:
    """Live state of a running service, shared with metrics and health endpoints."""

    cfg: Config
    followers: list[Follower] = field(default_factory=list)
    models: list[dict] = field(default_factory=list)  # model rows of `status`, for metrics
    model_errors: dict[str, int] = field(default_factory=dict)
    postgres_ok: bool = False
    prepared: bool = False  # migrations and the model plan applied: /healthz answers 200 from then on
    started_at: float = field(default_factory=time.time)

    @property
    def sources(self) -> list[SourceStats]:
        return [f.stats for f in self.followers]


def make_followers(cfg: Config, stop: asyncio.Event, once: bool) -> tuple[list[Follower], list[CouchClient]]:
    followers, clients = [], []
    for source in cfg.sources:
        # A longpoll is kept alive by heartbeats; a busy server may skip a few, so the read
        # timeout (which detects a dead connection) allows several.
        client = CouchClient(source, read_timeout=max(60.0, cfg.heartbeat_ms / 1000 * 6))
        clients.append(client)
        followers += [Follower(cfg, source, name, client, stop, once=once) for name in source.dbs]
    return followers, clients


async def follow_all(cfg: Config, stop: asyncio.Event, *, once: bool = False,
                     runtime: Runtime | None = None) -> list[SourceStats]:
    """Run a follower per database until stop (or, with once, until every one is caught up)."""
    followers, clients = make_followers(cfg, stop, once)
    if runtime is not None:
        runtime.followers = followers
    try:
        return list(await asyncio.gather(*(f.run() for f in followers)))
    finally:
        for client in clients:
            await client.aclose()


async def _listen(cfg: Config, stop: asyncio.Event, wake: asyncio.Event) -> None:
    """Wake the refresh loop when any process commits new rows (NOTIFY from the ingest)."""
    while not stop.is_set():
        try:
            async with await db.connect_async(cfg, autocommit=True) as conn:
                await conn.execute("LISTEN chtsync_ingest")
                gen = conn.notifies()
                async for _ in gen:
                    wake.set()
                    if stop.is_set():
                        break
        except psycopg.Error:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)


async def prepare(cfg: Config, stop: asyncio.Event, *, models: bool = True) -> bool:
    """Apply pending migrations and the model plan (both locked), retrying while Postgres is down.
    False when `stop` was set meanwhile: a SIGTERM while Postgres is down, or while another chtsync
    holds the migration or pipeline lock, ends the process at once."""
    delay = 1.0
    while True:
        try:
            return await _until_stop(stop, _prepare_now, cfg, models)
        except PostgresUnavailable as exc:
            # A server that is not up yet is waited for; a wrong password or database is not.
            if exc.permanent:
                raise
            log.warning("%s; retrying in %.0f s", exc, delay)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return False
            delay = min(delay * 2, 30.0)


def _prepare_now(cfg: Config, models: bool) -> None:
    migrate.apply(cfg)
    if models:
        _apply_models(cfg)


async def _until_stop(stop: asyncio.Event, fn: Callable[..., object], *args: object) -> bool:
    """Run fn(*args) in a daemon thread: True once it returned (its exception raised here), False
    when stop came first. A stop abandons it: it may be waiting for a lock another chtsync holds,
    or on a Postgres that stopped answering. The process then exits without waiting for it, and
    Postgres rolls back its transaction when the connection drops."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(exc: BaseException | None) -> None:
        if done.done():
            return
        if exc is None:
            done.set_result(None)
        else:
            done.set_exception(exc)

    def run() -> None:
        exc: BaseException | None = None
        try:
            fn(*args)
        except BaseException as error:  # handed to the loop, raised by the caller
            exc = error
        with contextlib.suppress(RuntimeError):  # the loop is gone: the process is exiting
            loop.call_soon_threadsafe(settle, exc)

    threading.Thread(target=run, name="prepare", daemon=True).start()
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({done, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not done.done():
        done.cancel()
        return False
    done.result()
    return True


def _apply_models(cfg: Config) -> None:
    from chtsync import pipeline

    with db.connect(cfg) as conn:
        pipeline.apply(cfg, conn)


async def serve(cfg: Config, stop: asyncio.Event, once: bool = False,
                runtime: Runtime | None = None) -> int:
    """`chtsync run`: everything in one process until stop. Returns the exit code."""
    from chtsync import metrics, pipeline, verify

    runtime = runtime or Runtime(cfg)
    # Found before anything is written: a broken models file, a metrics address we cannot bind.
    pipeline.load(cfg)
    server = start_metrics(runtime) if cfg.metrics_port else None
    prepared = False
    try:
        prepared = await prepare(cfg, stop)
    finally:
        if not prepared and server is not None:
            server.shutdown()
    if not prepared:
        log.info("stopped before the migrations and the model plan were applied")
        return 0
    runtime.postgres_ok = runtime.prepared = True
    wake = asyncio.Event()
    tasks = [
        asyncio.create_task(follow_all(cfg, stop, once=once, runtime=runtime), name="followers"),
        asyncio.create_task(pipeline.refresh_loop(cfg, stop, wake, lambda: pipeline.initial_sync(
            cfg.hold_pending, ((s.source, s.state, s.pending) for s in runtime.sources))), name="refresh"),
        asyncio.create_task(verify.verify_loop(cfg, stop), name="verify"),  # returns at once when off
        asyncio.create_task(_listen(cfg, stop, wake), name="listen"),
        asyncio.create_task(metrics.collect_loop(runtime, stop), name="metrics"),
    ]
    try:
        if once:
            await tasks[0]
            stop.set()
        await stop.wait()
        # Listening and metrics hold no data: end them now. Followers end at a page boundary,
        # the refresh finishes its model, verify its batch; give those a bounded time.
        for task in tasks[3:]:
            task.cancel()
        _, pending = await asyncio.wait(tasks[:3], timeout=8.0)
        for task in pending:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                exc = task.exception() if task.done() and not task.cancelled() else None
                if exc is not None and not isinstance(exc, asyncio.CancelledError):
                    log.error("task %s ended with %r", task.get_name(), exc)
    finally:
        if server is not None:
            server.shutdown()
    log.info("stopped")
    return 0


def start_metrics(runtime: Runtime) -> ThreadingHTTPServer:
    """The metrics endpoint, bound now; a taken port or a wrong host is a setting to fix."""
    from chtsync import metrics

    cfg = runtime.cfg
    try:
        return metrics.start(runtime)
    except socket.gaierror:
        raise ConfigError(f"METRICS_HOST: cannot resolve {cfg.metrics_host!r}: give an address of this"
                          " machine, e.g. 0.0.0.0 (all) or 127.0.0.1") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"METRICS_PORT: {cfg.metrics_host}:{cfg.metrics_port} is already in use:"
                              " stop the other process or choose another port") from None
        raise ConfigError(f"METRICS_HOST: cannot listen on {cfg.metrics_host}:{cfg.metrics_port}:"
                          f" {exc.strerror}; give an address of this machine, e.g. 0.0.0.0") from None


def install_signal_handlers(stop: asyncio.Event) -> Callable[[], None]:
    """SIGTERM/SIGINT set the stop event; a second one exits at once."""
    loop = asyncio.get_running_loop()

    def handler(signame: str) -> None:
        if stop.is_set():
            # At once, whatever a thread is waiting for: Postgres rolls back what was in flight.
            log.warning("second %s: exiting now", signame)
            logging.shutdown()
            os._exit(1)
        log.info("%s received: stopping", signame)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handler, sig.name)

    def remove() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    return remove
