"""Rebuilding a model from scratch while readers keep reading the old version.

The new version is built into a shadow table beside the model (apply.shadow_name); an
incremental model's in batches of raw-table block ranges, one transaction each, resumable
(refresh._build). Then one short transaction catches the shadow up with the documents written
since its build began, swaps it in under the model's name (indexes renamed, grants and comment
carried over, the views over the model recreated on it) and drops the old table.
A materialized view with a unique index is refreshed CONCURRENTLY in place instead.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import psycopg
from psycopg import sql

from chtsync import db
from chtsync.config import Config
from chtsync.errors import ConfigError, ModelBuildError
from chtsync.pipeline import graph
from chtsync.pipeline.apply import (
    DROP,
    _dependents,
    _restore,
    create_model,
    grant,
    rename_shadow,
    shadow_name,
)
from chtsync.pipeline.graph import Model, Pipeline
from chtsync.pipeline.kinds import EXCLUSIVE_LOCK_TIMEOUT, aggregates_by_upstream, of
from chtsync.pipeline.refresh import RefreshResult, _build, _states, analyze
from chtsync.pipeline.session import autocommit, first_line, q, value

log = logging.getLogger("chtsync.pipeline")

# The swap waits at most EXCLUSIVE_LOCK_TIMEOUT for readers of the old table (queued behind a long
# query it would hold every new reader too), then tries again, this many times in all.
SWAP_ATTEMPTS = 15
SWAP_PAUSE = 1.0  # seconds between attempts


def rebuild(cfg: Config, conn: psycopg.Connection, name: str,
            should_stop: Callable[[], bool] = lambda: False) -> RefreshResult:
    """Recompute one model from scratch; readers keep the old version until the swap. Holds the
    pipeline lock throughout (the refresh waits). An incremental model's build stopped by
    `should_stop` or a crash resumes at the next call; status "building" when stopped."""
    pipeline = graph.load(cfg)
    model = pipeline.models.get(name)
    if model is None:
        raise ConfigError(f"model '{name}' is not an enabled model of {cfg.models}")
    key = (db.LOCK_CLASS, db.lock_key(cfg, "pipeline"))
    started = time.monotonic()
    with autocommit(conn):
        conn.execute(q("pipeline_lock"), key)
        try:
            state = _states(conn).get(name)
            if state is None or state.hash != model.hash:
                raise ConfigError(f"model '{name}' differs from the applied one: run `chtsync models apply` first")
            strategy = of(model.kind)
            if not strategy.has_rows:
                return RefreshResult(name, model.kind, "ok")
            if strategy.swaps(model):
                rows = _shadow_rebuild(cfg, conn, pipeline, model, should_stop)
                if rows is None:
                    return RefreshResult(name, model.kind, "building")
            else:
                with conn.transaction():
                    snapshot = value(conn, "current_snapshot")
                    rows = strategy.rebuild(conn, model)
                    _record(conn, pipeline, model, rows, snapshot, started)
        finally:
            with contextlib.suppress(psycopg.OperationalError):  # a lost session has lost the lock
                conn.execute(q("pipeline_unlock"), key)
        analyze(conn, name)
    ms = (time.monotonic() - started) * 1000
    log.info("model rebuilt name=%s kind=%s rows=%s ms=%.0f", name, model.kind, rows, ms)
    return RefreshResult(name, model.kind, "ok", rows, None, ms)


def _record(conn: psycopg.Connection, pipeline: Pipeline, model: Model, rows: int | None, snapshot: str,
            started: float) -> None:
    conn.execute(q("pending_clear"), {"model": model.name})  # an aggregate: every group is counted now
    conn.execute(q("build_done"), (model.name,))
    for m in aggregates_by_upstream(pipeline).get(model.name, []):
        conn.execute(q("pending_all"), (m.name,))
    ms = (time.monotonic() - started) * 1000
    conn.execute(q("record_refresh_ok"), {"name": model.name, "ms": ms, "rows": rows, "snapshot": snapshot,
                                          "touched": True, "seen": 0})


def _shadow_rebuild(cfg: Config, conn: psycopg.Connection, pipeline: Pipeline, model: Model,
                    should_stop: Callable[[], bool]) -> int | None:
    strategy, shadow = of(model.kind), shadow_name(model.name)
    started = time.monotonic()
    build = conn.execute(q("build_state"), (model.name,)).fetchone()
    resuming = (strategy.by_document and build[4] == shadow and build[8] == model.hash
                and value(conn, "relation_exists", (shadow,)))
    if not resuming:
        with conn.transaction():
            snapshot = value(conn, "current_snapshot")
            conn.execute(q("drop_if_exists", kind=sql.SQL(DROP[strategy.relkind]), relation=sql.Identifier(shadow)))
            try:  # an incremental model's shadow is created empty; any other is built here, one statement
                rows = create_model(conn, model, empty=strategy.by_document, relation=shadow)
            except psycopg.Error as exc:
                raise ModelBuildError(f"model '{model.name}': {first_line(exc)}") from None
    if strategy.by_document:
        built = _build(conn, cfg, model, shadow, value(conn, "current_snapshot"), [], should_stop)
        if built is None:
            return None
        rows, snapshot = built.rows, built.snapshot
    for attempt in range(1, SWAP_ATTEMPTS + 1):
        try:
            with conn.transaction():
                return _swap(cfg, conn, pipeline, model, rows, snapshot, started)
        except psycopg.errors.LockNotAvailable:
            log.info("model swap waits for readers name=%s attempt=%d/%d", model.name, attempt, SWAP_ATTEMPTS)
            time.sleep(SWAP_PAUSE)
    raise ModelBuildError(f"model '{model.name}': rebuilt as {shadow}, but readers held the old table through"
                          f" {SWAP_ATTEMPTS} attempts to swap them; run the rebuild again to retry the swap")


def _swap(cfg: Config, conn: psycopg.Connection, pipeline: Pipeline, model: Model, rows: int | None,
          snapshot: str, started: float) -> int | None:
    """In the caller's transaction: catch the shadow up, put it in the model's place, drop the
    old object; return the rows of the new one."""
    strategy, shadow = of(model.kind), shadow_name(model.name)
    name, kind = sql.Identifier(model.name), sql.SQL(DROP[strategy.relkind])
    now = value(conn, "current_snapshot")
    if strategy.by_document:  # what was written since the build began, derived again
        rows = strategy.rederive(conn, cfg, model, snapshot, rows, [], shadow).rows
        snapshot = now
    conn.execute(q("local_lock_timeout"), (EXCLUSIVE_LOCK_TIMEOUT,))
    if strategy.relkind == "r":  # first, so the views found below cannot change (a matview: at its DROP)
        conn.execute(q("lock_exclusive", relation=name))
    # Views bind to the old table's OID: save every view over it (chtsync's and anyone's), drop
    # them and recreate them on the new table, as apply does for views over a replaced model.
    _, views = _dependents(conn, {model.name})
    grants, comment = conn.execute(q("relation_extras"), (model.name,)).fetchone()
    for view in reversed(views):
        conn.execute(q("drop_object", kind=sql.SQL(DROP[view.relkind]), relation=view.ident))
    conn.execute(q("drop_object", kind=kind, relation=name))
    rename_shadow(conn, model)
    grant(conn, name, grants)
    if comment is not None:
        conn.execute(q("comment_on", kind=kind, relation=name, comment=sql.Literal(comment)))
    for view in views:
        try:
            _restore(conn, view)
        except psycopg.Error as exc:
            raise ModelBuildError(f"model '{model.name}': cannot recreate {view.schema}.{view.name}, a view"
                                  f" built on it: {first_line(exc)}") from None
    _record(conn, pipeline, model, rows, snapshot, started)
    return rows
