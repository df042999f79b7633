"""The read model of the chtsync_* tables: what every source and model is doing, read from Postgres
(not the process), so status, metrics and the demo see the same thing beside a running service,
on another machine, or after a crash."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import psycopg
from psycopg.rows import dict_row

from chtsync import db, queries
from chtsync.config import Config
from chtsync.pipeline import datatests
from chtsync.pipeline.refresh import initial_sync


def lease_keys(cfg: Config) -> dict[str, int]:
    """Unsigned advisory-lock keys of every configured source, as pg_locks shows them."""
    names = [s.source_name(d) for s in cfg.sources for d in s.dbs]
    return {name: db.lock_key(cfg, "source:" + name) & 0xFFFFFFFF for name in names}


def _seconds(now: dt.datetime, then: dt.datetime | None) -> float | None:
    return None if then is None else max(0.0, (now - then).total_seconds())


def gather(cfg: Config, conn: psycopg.Connection, *, counts: bool = True) -> dict[str, Any]:
    """The status document (what --json prints)."""
    cur = conn.cursor(row_factory=dict_row)
    now = conn.execute("SELECT now()").fetchone()[0]
    keys = lease_keys(cfg)
    rows = {r["source"]: r for r in cur.execute(
        queries.get("source_status"), {"lock_class": db.LOCK_CLASS, "keys": json.dumps(keys)})}
    verified = {}
    if conn.execute("SELECT to_regclass('chtsync_verify') IS NOT NULL").fetchone()[0]:
        verified = {r["source"]: r for r in cur.execute(queries.get("verify_status"))}
    docs: dict[str, dict[str, int]] = {}
    if counts:
        q = queries.compose("docs_per_source", table=db.table_ident(cfg))
        docs = {r["source"]: r for r in cur.execute(q)}
    sources = []
    for name in sorted(set(keys) | set(rows)):
        r = rows.get(name, {})
        state = r.get("state") or "not started"
        if r and not r.get("leased") and state not in ("error",):
            # The row says what the last follower did; nobody holds the lease now.
            state = "not running"
        lag = 0.0 if state == "following" else _seconds(now, r.get("caught_up_at"))
        sources.append({
            "source": name,
            "configured": name in keys,
            "state": state,
            "reason": r.get("reason"),
            "owner": r.get("owner") if r.get("leased") else None,
            "seq": r.get("seq"),
            "pending": r.get("pending"),
            "docs": docs.get(name, {}).get("docs") if counts else None,
            "deleted": docs.get(name, {}).get("deleted") if counts else None,
            "docs_written": r.get("docs_written", 0),
            "errors": r.get("errors", 0),
            "last_change_at": _iso(r.get("last_change_at")),
            "checkpoint_at": _iso(r.get("checkpoint_at")),
            "lag_seconds": lag,
            "last_verify": _verify_summary(verified.get(name)),
            "purge_seq": r.get("purge_seq"),  # CouchDB's purges applied up to here
            "verify_due": r.get("verify_due"),  # why a verify --repair is owed (runs when caught up)
        })
    models = []
    if _has_models_table(conn):
        tests: dict[str, list[dict[str, Any]]] = {}
        for t in datatests.recorded(conn):  # the data tests' last results (models.yaml `tests`)
            tests.setdefault(t["model"], []).append({
                "unique_id": t["unique_id"], "name": t["name"], "test": t["test"], "column": t["column_name"],
                "severity": t["severity"], "status": t["status"], "failures": t["failures"],
                "message": t["message"], "execution_time": t["execution_time"], "run_at": _iso(t["run_at"])})
        for m in cur.execute(queries.get("model_status")):
            models.append({
                "name": m["name"],
                "kind": m["kind"],
                "rows": m["last_rows"],
                "status": m["last_status"],
                "error": m["last_error"],
                "last_refresh_at": _iso(m["last_refresh_at"]),
                "last_success_at": _iso(m["last_success_at"]),
                "duration_ms": m["last_duration_ms"],
                "staleness_seconds": m["staleness_seconds"],
                "build": _build(m),
                "tests": tests.get(m["name"], []),
            })
    # What the running service's refresh loop does with these sources (refresh.initial_sync).
    waiting = initial_sync(cfg.hold_pending, ((s["source"], s["state"], s["pending"]) for s in sources))
    return {"schema": cfg.schema, "table": cfg.table, "now": _iso(now),
            "sources": sources, "models": models, "models_wait": waiting}


def _build(m: dict[str, Any]) -> dict[str, Any] | None:
    """A build in progress (a first build, or a rebuild into a shadow table while readers keep the
    model): documents done of all, rows written, rate and ETA."""
    if m.get("build_docs") is None:
        return None
    done, total, seconds = m["build_docs"], m["build_total"] or m["build_docs"], m["build_seconds"] or 0.0
    rate = done / seconds if seconds > 0 else None
    return {"docs": done, "total": total, "rows": m["build_rows"], "docs_per_second": rate,
            "shadow": m.get("build_into") not in (None, m["name"]),
            "eta_seconds": max(total - done, 0) / rate if rate else None}


def _verify_summary(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {"at": _iso(row["finished_at"]), "equal": row["equal"], "missing": row["missing"],
            "stale": row["stale"], "vanished": row["vanished"], "repaired": row["repaired"],
            "error": row["error"]}


def _has_models_table(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT to_regclass('chtsync_models') IS NOT NULL").fetchone()[0]


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()
