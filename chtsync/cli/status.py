"""`chtsync status`: the state of every source and model (chtsync.state), as a table or JSON."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import Any

from chtsync import db
from chtsync.cli import load_config
from chtsync.couch import short_seq
from chtsync.state import gather


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
        if s.get("verify_due"):
            state += f" (verify owed: {s['verify_due']})"
        lag = "-" if s["lag_seconds"] is None else f"{s['lag_seconds']:.0f}s"
        v = s["last_verify"]
        verified = "-" if v is None else (
            ("equal" if v["equal"] else f"{v['missing'] + v['stale'] + v['vanished']} differ")
            + f", {_age(v['at'], doc['now'])}")
        t.add_row(s["source"], state, short_seq(s["seq"], 14), _num(s["pending"]), _num(s["docs"]),
                  _num(s["errors"]), _age(s["last_change_at"], doc["now"]), lag, verified)
    console.print(t)
    if doc["models"]:
        title = "Models" + (f" ({doc['models_wait']})" if doc.get("models_wait") else "")
        m = Table(title=title, title_justify="left")
        for col in ("model", "kind", "rows", "last refresh", "took", "stale", "status", "tests"):
            m.add_column(col, justify="right" if col in ("rows", "took", "stale") else "left")
        for r in doc["models"]:
            status = r["status"] or "-"
            b = r.get("build")
            if b:
                eta = "" if b["eta_seconds"] is None else f", ~{b['eta_seconds']:.0f}s left"
                verb = "rebuilding" if b.get("shadow") else "building"
                status = f"{verb} {b['docs']:,}/{b['total']:,} docs{eta}"
            if r["error"]:
                status += f": {r['error']}"
            took = "-" if r["duration_ms"] is None else f"{r['duration_ms']:.0f} ms"
            stale = "-" if r["staleness_seconds"] is None else f"{r['staleness_seconds']:.0f}s"
            m.add_row(r["name"], r["kind"], _num(r["rows"]), _age(r["last_refresh_at"], doc["now"]),
                      took, stale, status, _tests(r.get("tests", [])))
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
