"""`chtsync run` as a user runs it: freshness, idle cost, and memory during a large sync.

freshness  one new report every 0.25 s for 60 s while `run` is running: time from the CouchDB
           write (its HTTP response) to the row in v1.couchdb and to the row in v1.data_record;
           on Apache CouchDB 3.4.3 (../shared/couchdb/) and on pouchdb-server, in the same run.
idle       CPU of `chtsync run` and of its Postgres sessions over 60 s with no changes (each server).
rss        peak RSS of `chtsync run` while it syncs N documents from a canned CouchDB-API
           server (a separate process serving generated `_changes` pages, so CouchDB's own
           memory is not counted and 1M documents need no hour-long load).

Usage: python bench/run_bench.py [--seconds 60] [--idle 60] [--rss-docs 1000000]
       [--servers couchdb,pouchdb] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine, write_section  # noqa: E402
from tests.servers import ADMIN, CouchDBServer, PouchServer, free_port  # noqa: E402

SERVERS = {"couchdb": ("Apache CouchDB 3.4.3", CouchDBServer),
           "pouchdb": ("pouchdb-server 4.2 (in memory)", PouchServer)}

ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
DB = f"chtsync_bench_run_{os.getpid()}"  # per process: several runs may share the server
CLK = os.sysconf("SC_CLK_TCK")


def fresh_db() -> str:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB}")
    return f"host=127.0.0.1 port=5432 user=postgres dbname={DB}"


def start_run(couch_url: str, dbs: str, **extra: str) -> subprocess.Popen:
    env = dict(os.environ, COUCHDB_URL=couch_url, COUCHDB_USER=ADMIN[0], COUCHDB_PASSWORD=ADMIN[1],
               COUCHDB_DBS=dbs, POSTGRES_HOST="127.0.0.1", POSTGRES_USER="postgres", POSTGRES_DB=DB,
               CHTSYNC_CONFIG=os.devnull, LOG_LEVEL="WARNING", **extra)
    return subprocess.Popen([sys.executable, "-m", "chtsync", "run"], env=env, cwd=ROOT)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wait_for(conn: psycopg.Connection, sql: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if conn.execute(sql).fetchone()[0]:
                return
        except psycopg.Error:
            conn.rollback()
        time.sleep(0.2)
    raise TimeoutError(sql)


def freshness_and_idle(kind: str, seconds: float, idle: float) -> dict:
    """Latencies (s) to the raw row and to the model row, and idle CPU (% of a core), on one server."""
    server = SERVERS[kind][1]().start()
    admin = server.client()
    admin.create_db("medic")
    admin.bulk("medic", [{"_id": f"seed{i}", "type": "data_record", "form": "delivery",
                          "reported_date": 1735689600000 + i} for i in range(1000)])
    dsn = fresh_db()
    proc = start_run(server.url, "medic")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            wait_for(conn, "SELECT count(*) = 1000 FROM v1.data_record")
            written: dict[str, float] = {}
            raw_at: dict[str, float] = {}
            model_at: dict[str, float] = {}
            done = threading.Event()

            def watch() -> None:
                with psycopg.connect(dsn, autocommit=True) as w:
                    while not done.is_set() or len(model_at) < len(written):
                        now = time.monotonic()
                        for (i,) in w.execute("SELECT _id FROM v1.couchdb WHERE _id LIKE 'fresh%%'"):
                            raw_at.setdefault(i, now)
                        for (i,) in w.execute("SELECT uuid FROM v1.data_record WHERE uuid LIKE 'fresh%%'"):
                            model_at.setdefault(i, now)
                        time.sleep(0.005)
                        if done.is_set() and time.monotonic() - stop_at > 30:
                            return

            stop_at = float("inf")
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            end = time.monotonic() + seconds
            i = 0
            while time.monotonic() < end:
                doc_id = f"fresh{i:05d}"
                admin.put("medic", {"_id": doc_id, "type": "data_record", "form": "pnc_visit",
                                    "reported_date": int(time.time() * 1000)})
                written[doc_id] = time.monotonic()
                i += 1
                time.sleep(max(0.0, 0.25 - (time.monotonic() - written[doc_id])))
            stop_at = time.monotonic()
            done.set()
            watcher.join(60)
            raw = [raw_at[k] - t for k, t in written.items() if k in raw_at]
            model = [model_at[k] - t for k, t in written.items() if k in model_at]

            # Idle: no writes at all for `idle` seconds.
            time.sleep(5)
            pg_pids = [r[0] for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = 'chtsync'", (DB,))]
            before = cpu_seconds(proc.pid), sum(cpu_seconds(p) for p in pg_pids)
            time.sleep(idle)
            after = cpu_seconds(proc.pid), sum(cpu_seconds(p) for p in pg_pids if Path(f"/proc/{p}").exists())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        server.close()
    return {"written": len(written), "raw": raw, "model": model, "pg_sessions": len(pg_pids),
            "cpu_run": (after[0] - before[0]) / idle * 100, "cpu_pg": (after[1] - before[1]) / idle * 100}


def freshness_tables(results: dict[str, dict], seconds: float, idle: float, command: str) -> tuple[str, str]:
    counts = ", ".join(f"{r['written']} into {SERVERS[k][0]}" for k, r in results.items())
    rows = []
    for kind, r in results.items():
        for what, values in (("row in `v1.couchdb`", r["raw"]), ("row in `v1.data_record`", r["model"])):
            rows.append(f"| {SERVERS[kind][0]} | {what} | {statistics.median(values):.3f} s"
                        f" | {pct(values, .95):.3f} s | {max(values):.3f} s | {len(values)}/{r['written']} |")
    fresh = "\n".join([
        f"`{command}`: one new report every 0.25 s for {seconds:.0f} s ({counts});"
        " `chtsync run` with the default 5 s interval, so the model path is the NOTIFY-driven refresh:",
        "",
        "| server | from the CouchDB write to | p50 | p95 | max | seen |",
        "|---|---|---:|---:|---:|---:|",
        *rows,
    ])
    idle_rows = [f"| {SERVERS[k][0]} | {r['cpu_run']:.2f}% of a core | {r['cpu_pg']:.2f}% of a core"
                 f" ({r['pg_sessions']} sessions) |" for k, r in results.items()]
    idle_text = "\n".join([
        f"Over {idle:.0f} s with no changes (caught up, longpoll waiting, refresh loop checking every 5 s):",
        "",
        "| server | `chtsync run` CPU | its Postgres sessions' CPU |",
        "|---|---:|---:|",
        *idle_rows,
    ])
    return fresh, idle_text


def canned_couch(total: int, port: int) -> None:
    """A CouchDB-API server answering _changes from generated CHT documents (run in a child)."""
    from chtsync import demo as sample

    docs = [d for db, d in sample.generate(min(total, 50_000), 11, bad=False) if db == "medic"]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server names it so
            url = urlparse(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path == "/medic":
                body = json.dumps({"db_name": "medic", "update_seq": str(total), "doc_count": total}).encode()
            elif url.path == "/medic/_changes":
                since, limit = int(q.get("since", "0")), int(q.get("limit", "1000"))
                if since >= total:  # caught up: a longpoll waits; answer empty after a while
                    time.sleep(5)
                rows = []
                for n in range(since, min(total, since + limit)):
                    doc_id = f"canned{n:08d}"
                    doc = json.dumps({**docs[n % len(docs)], "_id": doc_id, "_rev": "1-a"})
                    rows.append(f'{{"seq":"{n + 1}","id":"{doc_id}","changes":[{{"rev":"1-a"}}],"doc":{doc}}}')
                last = min(total, since + limit)
                body = (f'{{"results":[{",".join(rows)}],"last_seq":"{last}","pending":{total - last}}}').encode()
            else:
                body = b'{"couchdb":"Welcome"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def peak_rss(total: int) -> str:
    port = free_port()
    child = subprocess.Popen([sys.executable, __file__, "--serve-canned", str(total), str(port)])
    time.sleep(3)
    dsn = fresh_db()
    proc = start_run(f"http://127.0.0.1:{port}", "medic")
    peak = 0.0
    started = time.monotonic()
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while True:
                peak = max(peak, rss_mb(proc.pid))
                try:
                    seq = conn.execute("SELECT seq FROM v1.couchdb_progress").fetchone()
                except psycopg.Error:
                    seq = None
                if seq and int(seq[0]) >= total:
                    break
                time.sleep(0.5)
        elapsed = time.monotonic() - started
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        child.kill()
    return (f"Peak RSS of `chtsync run` while syncing {total:,} CHT-shaped documents from a canned"
            f" `_changes` server (pages of 1000, models refreshing alongside): **{peak:.0f} MB**"
            f" ({elapsed:.0f} s, {total / elapsed:,.0f} docs/s end to end). A page is held in memory"
            " as bytes only while Postgres ingests it, so memory does not grow with the database.")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-canned":
        canned_couch(int(sys.argv[2]), int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--idle", type=float, default=60)
    parser.add_argument("--rss-docs", type=int, default=1_000_000)
    parser.add_argument("--servers", default="couchdb,pouchdb")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    results = {kind: freshness_and_idle(kind, args.seconds, args.idle) for kind in args.servers.split(",")}
    command = "python bench/run_bench.py " + " ".join(sys.argv[1:])
    fresh, idle = freshness_tables(results, args.seconds, args.idle, command.strip())
    rss = peak_rss(args.rss_docs)
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    body = "\n\n".join([f"On {machine(ADMIN_DSN)}, {time.strftime('%Y-%m-%d')}, while other jobs shared the"
                         " 2 cores (repeated runs vary).", fresh, idle, rss])
    print(body)
    if not args.no_write:
        write_section("Freshness, idle cost and memory of `chtsync run`", body)


if __name__ == "__main__":
    main()
