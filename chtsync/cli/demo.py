"""`chtsync demo`: the whole product on a laptop, with nothing configured.

An embedded PostgreSQL and pouchdb-server (or the user's CouchDB), realistic sample data, the
full service (`chtsync run`) in this process, a trickle of live writes, then a summary checked
against the generator's own counts. Ctrl-C at any moment stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import shutil
import signal
import statistics
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from chtsync import config, logs, queries, service
from chtsync import demo as sample
from chtsync.errors import ChtsyncError
from chtsync.localservers import PG_SYSTEM_USER, EmbeddedPostgres, LocalServerError, PouchDBServer

log = logging.getLogger("chtsync.demo")
PG_DB = "chtsync"
# On a user's own CouchDB the demo writes only to databases of its own, never to medic.
OWN_COUCH_MAIN = "chtsync-demo"
FORM_MODEL = "pregnancy_home_visit"  # sql/models.yaml's example form model (with data tests)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo",
        parents=[common],
        help="try chtsync here: embedded PostgreSQL, a CouchDB, sample data, live models",
        description="Start an embedded PostgreSQL and pouchdb-server, load realistic CHT sample "
        "data, run the service while new reports trickle in, and show what landed where.",
    )
    p.add_argument("--docs", type=int, default=20_000, metavar="N", help="sample documents (default 20000)")
    p.add_argument("--seconds", type=float, default=30.0, metavar="N", help="live writes for N s (default 30)")
    p.add_argument("--rate", type=float, default=10.0, metavar="R", help="live writes per second (default 10)")
    p.add_argument("--seed", type=int, default=1, metavar="S", help="sample seed (default 1)")
    p.add_argument("--data-dir", metavar="DIR", help="keep the servers' data here (default: a temporary folder)")
    p.add_argument(
        "--keep", action="store_true", help="keep running after the summary (Ctrl-C stops) and keep the data"
    )
    p.add_argument(
        "--couchdb-url",
        metavar="URL",
        help=f"use this CouchDB (admin credentials in the URL or COUCHDB_USER/PASSWORD); "
        f"the demo writes only to its own databases {OWN_COUCH_MAIN}*",
    )
    p.add_argument("--summary-json", metavar="FILE", help="also write the summary as JSON")
    p.set_defaults(func=cmd_demo)


class DemoError(Exception):
    """The service failed while the demo ran."""


@dataclass
class Summary:
    schema: str = "v1"
    postgres: dict[str, Any] = field(default_factory=dict)  # libpq parameters of the demo database
    sources: list[dict[str, Any]] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> kind, rows, expected
    errors: int = 0
    expected_errors: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    tests: list[dict[str, Any]] = field(default_factory=list)  # data tests: model, name, status, message
    trickle: dict[str, int] = field(default_factory=dict)
    load: dict[str, float] = field(default_factory=dict)
    ok: bool = False


def cmd_demo(args: argparse.Namespace) -> int:
    if args.docs < sample.MIN_DOCS:
        print(f"chtsync demo: --docs must be at least {sample.MIN_DOCS}")
        return 2
    logs.setup("WARNING")  # the summary tells the story; warnings still show
    console = Console(highlight=False)
    own_dir = not args.data_dir
    data_dir = Path(tempfile.mkdtemp(prefix="chtsync-demo-")) if own_dir else Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    # Made before anything starts, so that `finally` can stop whatever got started.
    pg = EmbeddedPostgres(data_dir / "pgdata")
    pouch = None if args.couchdb_url else PouchDBServer(data_dir / "pouchdb")
    couch: tuple[str, tuple[str, str] | None, dict[str, str]] | None = None
    try:
        with _terminate_as_interrupt():
            couch = _start(args, console, data_dir, pg, pouch)
            summary = _run(args, console, pg, couch)
        return 0 if summary.ok else 1
    except KeyboardInterrupt:
        console.print("\nInterrupted: stopping.")
        return 130
    except (LocalServerError, sample.SampleError, ChtsyncError, DemoError, TimeoutError) as exc:
        console.print(f"[red]chtsync demo: {exc}[/red]")
        return 1
    finally:
        # Uninterruptible from here: a second Ctrl-C must not leave a server behind.
        with _ignore_interrupts():
            if pouch is not None:
                pouch.stop()
            if couch is not None and args.couchdb_url and not args.keep:
                _drop_own_couch_dbs(couch)
            pg.stop()
            if args.keep:
                console.print(f"Data kept in {data_dir}")
            elif own_dir:
                shutil.rmtree(data_dir, ignore_errors=True)
            else:
                for part in (pg.pgdata, data_dir / "pouchdb"):
                    shutil.rmtree(part, ignore_errors=True)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP clean up like Ctrl-C (by default they would kill without `finally`)."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _ignore_interrupts() -> Iterator[None]:
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _start(
    args: argparse.Namespace, console: Console, data_dir: Path, pg: EmbeddedPostgres, pouch: PouchDBServer | None
) -> tuple[str, tuple[str, str] | None, dict[str, str]]:
    """Start the servers; return the CouchDB to use: (URL, admin auth, logical -> real db names)."""
    console.print(f"[bold]chtsync demo[/bold]: data in {data_dir}")
    if EmbeddedPostgres.runs_as_system_user():
        console.print(
            "Running as root: the embedded PostgreSQL runs as the system user "
            f"[bold]{PG_SYSTEM_USER}[/bold] (created once with useradd), and every folder above "
            f"{data_dir} is made readable and traversable by others (chmod o+rx)."
        )
    started = time.monotonic()
    pg.start()
    # A fresh database every run: a kept data folder from an earlier run must not mix in.
    with psycopg.connect(**pg.conninfo(), autocommit=True) as conn:
        conn.execute(queries.compose("drop_database", db=sql.Identifier(PG_DB)))
    pg.create_database(PG_DB)
    console.print(f"PostgreSQL 18 (embedded) ready in {time.monotonic() - started:.1f} s, socket in {pg.socket_dir}")
    if pouch is None:
        base, auth = sample.couch_target(args.couchdb_url)
        names = sample.db_names(OWN_COUCH_MAIN)
        _refuse_existing(base, auth, names)
        console.print(f"CouchDB: {base}, databases {', '.join(names.values())}")
        return base, auth, names
    started = time.monotonic()
    pouch.start()
    console.print(f"pouchdb-server (in memory) ready in {time.monotonic() - started:.1f} s at {pouch.url}")
    return pouch.url, pouch.auth, sample.db_names()


def _refuse_existing(base: str, auth: tuple[str, str] | None, names: dict[str, str]) -> None:
    with sample.couch_client(base, auth) as client:
        for name in names.values():
            r = client.get(f"/{urllib.parse.quote(name, safe='')}")
            if r.status_code == 200:
                raise sample.SampleError(
                    f"database {name} already exists on {base} (an earlier demo run with --keep?): "
                    "delete it first, the demo starts from an empty database"
                )


def _drop_own_couch_dbs(couch: tuple[str, tuple[str, str] | None, dict[str, str]]) -> None:
    base, auth, names = couch
    with contextlib.suppress(httpx.HTTPError), sample.couch_client(base, auth) as client:
        for name in names.values():
            client.delete(f"/{urllib.parse.quote(name, safe='')}")


def _run(
    args: argparse.Namespace,
    console: Console,
    pg: EmbeddedPostgres,
    couch: tuple[str, tuple[str, str] | None, dict[str, str]],
) -> Summary:
    base, auth, names = couch
    # Dates spread over the two years before today, so dashboards look current.
    today = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    data = sample.Sample(args.docs, args.seed, end_ms=int(today.timestamp() * 1000))
    summary = Summary()
    with (
        sample.couch_client(base, auth) as client,
        Progress(
            TextColumn("Loading sample data"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("docs"),
            TimeRemainingColumn(),
            console=console,
        ) as progress,
    ):
        task = progress.add_task("load", total=args.docs)
        loaded = sample.load(client, data.texts(), dbs=names, progress=lambda k: progress.advance(task, k))
    counts = data.counts
    console.print(
        f"Loaded {counts.docs:,} documents in {loaded.seconds:.1f} s ({counts.docs / loaded.seconds:,.0f} docs/s,"
        f" {loaded.bytes / counts.docs:,.0f} bytes/doc): {counts.reports:,} reports, {counts.persons:,} persons,"
        f" {counts.places:,} places, {counts.kinds['user-settings']} users, {counts.kinds['feedback']} feedback,"
        f" {counts.kinds['telemetry']} telemetry; {counts.nul} with a NUL (stored stripped),"
        f" {counts.refused} that Postgres must refuse"
    )
    if loaded.failed:
        raise sample.SampleError(f"CouchDB refused {loaded.failed} documents: {loaded.first_failures}")
    summary.load = {
        "docs": counts.docs,
        "seconds": round(loaded.seconds, 2),
        "bytes_per_doc": round(loaded.bytes / counts.docs),
    }
    with sample.couch_client(base, auth) as client:
        design_docs = sum(_design_docs(client, name) for name in names.values())
    cfg = config.load(
        env={
            "COUCHDB_URL": base,
            "COUCHDB_USER": auth[0] if auth else "",
            "COUCHDB_PASSWORD": auth[1] if auth else "",
            "COUCHDB_DBS": ",".join(names.values()),
            "POSTGRES_HOST": str(pg.socket_dir),
            "POSTGRES_PORT": str(pg.port),
            "POSTGRES_USER": pg.user,
            "POSTGRES_DB": PG_DB,
            "LOG_LEVEL": "WARNING",
        },
        search=False,
    )
    summary.schema = cfg.schema
    summary.postgres = pg.conninfo(PG_DB)
    if counts.refused:
        console.print(f"({counts.refused} sample document(s) are bad on purpose: expect a warning about them.)")
    asyncio.run(_live(args, console, cfg, data, summary, design_docs, pg))
    return summary


def _design_docs(client: httpx.Client, db: str) -> int:
    r = client.get(
        f"/{urllib.parse.quote(db, safe='')}/_all_docs",
        params={"startkey": '"_design/"', "endkey": '"_design0"'},
    )
    r.raise_for_status()
    return len(r.json()["rows"])


async def _live(
    args: argparse.Namespace,
    console: Console,
    cfg: config.Config,
    data: sample.Sample,
    summary: Summary,
    design_docs: int,
    pg: EmbeddedPostgres,
) -> None:
    """The service in this process; the trickle once the initial catch-up is done; then check."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    runtime = service.Runtime(cfg)
    serving = asyncio.create_task(service.serve(cfg, stop, runtime=runtime), name="serve")
    counts = data.counts
    expected = dict(counts.models)
    expected["document_metadata"] += design_docs
    expected[FORM_MODEL] = counts.forms[FORM_MODEL]  # the form model of sql/models.yaml
    trickled = sample.TrickleResult()
    try:
        async with await psycopg.AsyncConnection.connect(**cfg.postgres.conninfo_kwargs(), autocommit=True) as conn:
            with console.status("Syncing into PostgreSQL and building the models...") as status:
                started = time.monotonic()
                await _until(stop, serving, lambda: _caught_up(runtime), timeout=120 + counts.docs / 200)
                summary.sources = [
                    {
                        "source": s.source,
                        "docs": s.docs_written,
                        "seconds": round((s.caught_up_at or time.monotonic()) - s.started_at, 2),
                        "docs_per_s": round(s.docs_written / max((s.caught_up_at or 0) - s.started_at, 1e-3)),
                    }
                    for s in runtime.sources
                ]
                # A model that never matches shows as DIFF in the summary; the demo goes on.
                with contextlib.suppress(TimeoutError):
                    await _until(
                        stop, serving, lambda: _all_match(conn, cfg, expected), timeout=120 + counts.docs / 200
                    )
                console.print(f"Synced and modelled in {time.monotonic() - started:.1f} s")
                status.update(f"Writing new reports, edits and deletes for {args.seconds:.0f} s...")
                seen: dict[str, float] = {}
                watcher = asyncio.create_task(_watch(conn, cfg, trickled, seen, stop))
                async with httpx.AsyncClient(
                    base_url=cfg.sources[0].url,
                    auth=(cfg.sources[0].user, cfg.sources[0].password or "") if cfg.sources[0].user else None,
                    headers={"Content-Type": "application/json"},
                    timeout=30,
                ) as client:
                    await sample.trickle(
                        client,
                        data,
                        rate=args.rate,
                        seconds=args.seconds,
                        db=cfg.sources[0].dbs[0],
                        stop=stop,
                        result=trickled,
                    )
                status.update("Waiting for the last writes to reach the models...")
                live = set(trickled.created) - set(trickled.deleted)
                await _until(stop, serving, lambda: _landed(seen, live), timeout=60)
                expected["data_record"] += trickled.net_reports
                expected["document_metadata"] += trickled.net_reports
                expected[FORM_MODEL] += trickled.forms[FORM_MODEL]
                # Models refresh one after another: wait for all, not just data_record.
                with contextlib.suppress(TimeoutError):  # a model still off after that shows as DIFF
                    await _until(stop, serving, lambda: _all_match(conn, cfg, expected), timeout=60)
                watcher.cancel()
            await _fill(conn, cfg, summary, expected, counts.refused)
            summary.trickle = {
                "created": len(trickled.created),
                "edited": len(trickled.edited),
                "deleted": len(trickled.deleted),
                "errors": trickled.errors,
            }
            lat = sorted(seen[i] - trickled.created[i] for i in seen if i in trickled.created)
            if lat:
                summary.latency_ms = {
                    "p50": round(statistics.median(lat) * 1000),
                    "p95": round(lat[min(len(lat) - 1, int(len(lat) * 0.95))] * 1000),
                    "max": round(lat[-1] * 1000),
                    "samples": len(lat),
                }
            if args.summary_json:
                Path(args.summary_json).write_text(json.dumps(summary.__dict__, indent=2))
            _print_summary(console, summary, pg, args)
            if args.keep and not stop.is_set():
                console.print("[bold]Still running[/bold] (the service follows CouchDB): press Ctrl-C to stop.")
                await stop.wait()
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, 20)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    if serving.done() and not serving.cancelled() and serving.exception():
        raise DemoError(f"the service failed: {serving.exception()!r}")


async def _until(stop: asyncio.Event, serving: asyncio.Task[int], check: Any, timeout: float) -> None:
    """Poll `check` (sync or async) until true; fail if the service ends or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if stop.is_set():
            raise KeyboardInterrupt
        if serving.done():
            exc = None if serving.cancelled() else serving.exception()
            raise DemoError(f"the service stopped early: {exc!r}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {getattr(check, '__name__', 'the sync')}")
        await asyncio.sleep(0.2)


def _caught_up(runtime: service.Runtime) -> bool:
    return bool(runtime.followers) and all(s.caught_up_at is not None for s in runtime.sources)


def _landed(seen: dict[str, float], live: set[str]) -> bool:
    return live <= set(seen)


async def _rows(conn: psycopg.AsyncConnection, cfg: config.Config, name: str) -> int | None:
    """Rows in a model, or None while it does not exist or is not populated yet."""
    try:
        cur = await conn.execute(queries.compose("count_rows", model=sql.Identifier(cfg.schema, name)))
    except (psycopg.errors.UndefinedTable, psycopg.errors.ObjectNotInPrerequisiteState):
        return None
    row = await cur.fetchone()
    return row[0] if row else None


async def _all_match(conn: psycopg.AsyncConnection, cfg: config.Config, expected: dict[str, int]) -> bool:
    for name, want in expected.items():
        if await _rows(conn, cfg, name) != want:
            return False
    return True


async def _watch(
    conn: psycopg.AsyncConnection,
    cfg: config.Config,
    trickled: sample.TrickleResult,
    seen: dict[str, float],
    stop: asyncio.Event,
) -> None:
    """Note when each trickled report first shows up in data_record (100 ms resolution)."""
    query = queries.compose("uuids_present", relation=sql.Identifier(cfg.schema, "data_record"))
    while not stop.is_set():
        waiting = [i for i in trickled.created if i not in seen]
        if waiting:
            cur = await conn.execute(query, (waiting,))
            now = time.time()
            for (uuid,) in await cur.fetchall():
                seen[uuid] = now
        await asyncio.sleep(0.1)


async def _fill(
    conn: psycopg.AsyncConnection, cfg: config.Config, summary: Summary, expected: dict[str, int], refused: int
) -> None:
    cur = await conn.execute(
        queries.compose("model_ages", models=sql.Identifier(cfg.schema, "chtsync_models"))
    )
    for name, kind, age in await cur.fetchall():
        summary.models[name] = {
            "kind": kind,
            "rows": await _rows(conn, cfg, name),
            "expected": expected.get(name),
            "refreshed_s_ago": age,
        }
    summary.errors = await _rows(conn, cfg, "chtsync_errors") or 0
    cur = await conn.execute(queries.compose("demo_tests", tests=sql.Identifier(cfg.schema, "chtsync_model_tests")))
    summary.tests = [{"model": m, "name": n, "status": s, "message": msg} for m, n, s, msg in await cur.fetchall()]
    summary.expected_errors = refused
    summary.ok = summary.errors == refused and all(
        m["expected"] is None or m["rows"] == m["expected"] for m in summary.models.values()
    )


def _print_summary(console: Console, summary: Summary, pg: EmbeddedPostgres, args: argparse.Namespace) -> None:
    table = Table(title="Initial sync, per source", title_justify="left")
    for column in ("source", "documents", "seconds", "docs/s"):
        table.add_column(column, justify="left" if column == "source" else "right")
    for s in summary.sources:
        table.add_row(s["source"], f"{s['docs']:,}", f"{s['seconds']:.1f}", f"{s['docs_per_s']:,}")
    console.print(table)

    table = Table(
        title=f"Models in schema {summary.schema}",
        title_justify="left",
        caption="Models with an interval (sql/models.yaml) refresh at most that often, not on every write.",
        caption_justify="left",
    )
    for column in ("model", "kind", "refreshed", "rows", "expected", ""):
        table.add_column(column, justify="left" if column in ("model", "kind") else "right")
    for name, m in summary.models.items():
        rows = "-" if m["rows"] is None else f"{m['rows']:,}"
        # Views are always current; the others as of their last refresh.
        age = "" if m["kind"] == "view" or m["refreshed_s_ago"] is None else f"{m['refreshed_s_ago']} s ago"
        check = ("", "")
        if m["expected"] is not None:
            check = (f"{m['expected']:,}", "[green]ok[/green]" if m["rows"] == m["expected"] else "[red]DIFF[/red]")
        table.add_row(name, m["kind"], age, rows, *check)
    console.print(table)
    for t in summary.tests:
        colour = "green" if t["status"] == "pass" else "yellow" if t["status"] == "warn" else "red"
        console.print(f"Data test {t['model']}.{t['name']}: [{colour}]{t['status']}[/{colour}] ({t['message']})")
    mark = "[green]as expected[/green]" if summary.errors == summary.expected_errors else "[red]unexpected[/red]"
    console.print(
        f"chtsync_errors: {summary.errors} row(s), {mark}: the sample holds {summary.expected_errors} "
        "document(s) PostgreSQL cannot store (a lone UTF-16 surrogate); NUL characters were stripped"
    )
    t = summary.trickle
    console.print(
        f"Live writes: {t.get('created', 0)} new reports, {t.get('edited', 0)} edits, "
        f"{t.get('deleted', 0)} deletes ({t.get('errors', 0)} failed)"
    )
    if summary.latency_ms:
        lat = summary.latency_ms
        console.print(
            f"Latency from a CouchDB write to its row in {summary.schema}.data_record: [bold]p50 {lat['p50']} ms, "
            f"p95 {lat['p95']} ms[/bold] (max {lat['max']} ms, {lat['samples']} reports, polled every 100 ms)"
        )
    psql = f"{pg.bin_dir / 'psql'} -h {pg.socket_dir} -p {pg.port} -U {pg.user} {PG_DB}"
    if args.keep:
        console.print(
            "Look at the tables while it runs:\n"
            f"  {psql} -c 'SELECT form, count(*) FROM {summary.schema}.data_record GROUP BY 1'\n"
            f"  Superset / SQLAlchemy: postgresql://{pg.user}@/{PG_DB}?host={pg.socket_dir}"
        )
    else:
        console.print("Run with --keep to look at the tables with psql (or Superset) while it runs.")
    verdict = "[green]every checked model holds what was written[/green]" if summary.ok else "[red]MISMATCH[/red]"
    console.print(f"Result: {verdict}")
