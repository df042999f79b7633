"""`chtsync status`: what every source and model is doing, read from Postgres (not the process),
so it works beside a running service, on another machine, or after a crash."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import Any

import psycopg
from psycopg.rows import dict_row

from chtsync import db, queries
from chtsync.config import Config
from chtsync.pipeline import datatests


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
                "tests": tests.get(m["name"], []),
            })
    return {"schema": cfg.schema, "table": cfg.table, "now": _iso(now),
            "sources": sources, "models": models}


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


def _short(seq: str | None) -> str:
    if not seq:
        return "-"
    return seq if len(seq) <= 14 else seq[:12] + "…"


def _age(iso: str | None, now: str) -> str:
    if not iso:
        return "-"
    seconds = (dt.datetime.fromisoformat(now) - dt.datetime.fromisoformat(iso)).total_seconds()
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def render(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"Sources → {doc['schema']}.{doc['table']}", title_justify="left")
    for col in ("source", "state", "seq", "pending", "docs", "errors", "last change", "lag", "verified"):
        t.add_column(col, justify="right" if col in ("pending", "docs", "errors", "lag") else "left")
    for s in doc["sources"]:
        state = s["state"] + (f": {s['reason']}" if s["reason"] else "")
        lag = "-" if s["lag_seconds"] is None else f"{s['lag_seconds']:.0f}s"
        v = s["last_verify"]
        verified = "-" if v is None else (
            ("equal" if v["equal"] else f"{v['missing'] + v['stale'] + v['vanished']} differ")
            + f", {_age(v['at'], doc['now'])}")
        t.add_row(s["source"], state, _short(s["seq"]), _num(s["pending"]), _num(s["docs"]),
                  _num(s["errors"]), _age(s["last_change_at"], doc["now"]), lag, verified)
    console.print(t)
    if doc["models"]:
        m = Table(title="Models", title_justify="left")
        for col in ("model", "kind", "rows", "last refresh", "took", "stale", "status", "tests"):
            m.add_column(col, justify="right" if col in ("rows", "took", "stale") else "left")
        for r in doc["models"]:
            status = r["status"] or "-"
            if r["error"]:
                status += f": {r['error']}"
            took = "-" if r["duration_ms"] is None else f"{r['duration_ms']:.0f} ms"
            stale = "-" if r["staleness_seconds"] is None else f"{r['staleness_seconds']:.0f}s"
            m.add_row(r["name"], r["kind"], _num(r["rows"]), _age(r["last_refresh_at"], doc["now"]),
                      took, stale, status, _tests(r["tests"]))
        console.print(m)


def _tests(tests: list[dict[str, Any]]) -> str:
    """'3 pass' or '2 pass, 1 warn: casts (4 value(s) did not cast ...)'."""
    if not tests:
        return "-"
    counts = {s: sum(1 for t in tests if t["status"] == s) for s in ("pass", "warn", "fail", "error")}
    text = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    bad = [t for t in tests if t["status"] != "pass"]
    return text + (f": {bad[0]['name']} ({bad[0]['message']})" if bad else "")


def _num(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("status", parents=[common], help="what each source and model is doing")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    from chtsync.cli import load_config

    cfg = load_config(args)
    with db.connect(cfg, autocommit=True) as conn:
        if not conn.execute("SELECT to_regclass('chtsync_sources') IS NOT NULL").fetchone()[0]:
            print(f"chtsync: schema {cfg.schema} has no chtsync tables yet: run `chtsync migrate`")
            return 1
        doc = gather(cfg, conn)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        render(doc)
    return 0
