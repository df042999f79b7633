"""The real run: N generated CHT documents in the real CouchDB 3.4, `chtsync run` from an empty
Postgres, no hand-run VACUUM or ANALYZE (autovacuum as the server has it).

Records: the server's own `_changes?include_docs=true` rate (pages of 1000, same run), initial
sync time and rate, peak RSS of `chtsync run`, time until every model has data, idle CPU, CouchDB
write to `data_record` latency (p50/p95), the refresh round `run` logs after 100 reports edited
at once; then, with `run` stopped, through the product's own functions in a new process: one
refresh cycle of all models after 100 changed documents, the idle check, and a
first build of every model from scratch at this size (each model's snapshot cleared, so
`refresh_once` rebuilds it the way it builds a new model: in batches).

Usage: python bench/real_run_bench.py --docs 200000 [--latency-seconds 30] [--idle 30] [--no-write]
       [--couchdb-url http://admin:pass@127.0.0.1:5984] [--run-only]  (a CouchDB loaded by an earlier
       run; --run-only: the run's measures only, to compare runs before and after a change)
       [--baseline-docs N] (the server's own rate over the stream's first N documents, not all)
       [--no-feed] (leave out the feed-alone sync: at 10M it is half an hour more)
       [--no-rebuilds] (leave out the second first build of every model: the run's own first
       builds, from its log, are reported either way)
       [--chunk-buffer BYTES] (set the server's `[httpd] chunked_response_buffer` first: the
       baseline and the run read with it; its own section in docs/benchmarks.md)
(10M: `--docs 10000000 --baseline-docs 2000000 --no-feed --no-rebuilds`; CouchDB needs ~2.5 KB
of disk per document, Postgres about as much.)
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine, write_section  # noqa: E402
from bench.run_bench import cpu_seconds, pct, rss_mb  # noqa: E402
from chtsync import config, db, pipeline  # noqa: E402
from chtsync.couch import page_trailer  # noqa: E402
from tests.servers import ADMIN, CouchDBServer, ExternalCouchDB  # noqa: E402

ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
DB = "chtsync_bench_real"
DBS = "medic,medic-users-meta"
CHANGED = 100
AUTH = ADMIN  # the CouchDB admin: the test bed's, or the one in --couchdb-url


def fresh_db() -> str:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB}")
    return f"host=127.0.0.1 port=5432 user=postgres dbname={DB}"


def env(couch_url: str) -> dict[str, str]:
    return dict(os.environ, COUCHDB_URL=couch_url, COUCHDB_USER=AUTH[0], COUCHDB_PASSWORD=AUTH[1],
                COUCHDB_DBS=DBS, POSTGRES_HOST="127.0.0.1", POSTGRES_USER="postgres", POSTGRES_DB=DB,
                CHTSYNC_CONFIG=os.devnull, LOG_LEVEL="INFO")


BUILT = re.compile(r"model refreshed name=(\S+) kind=\S+ rows=(\d+) changed=None ms=(\d+)")


def run_builds(log_path: Path) -> dict[str, tuple[int, float]]:
    """Each model's first build in the run, from its log: (rows, seconds) of its first refresh
    from scratch (`changed=None`)."""
    out: dict[str, tuple[int, float]] = {}
    for m in BUILT.finditer(log_path.read_text(errors="replace")):
        out.setdefault(m.group(1), (int(m.group(2)), int(m.group(3)) / 1000))
    return out


def changes_rate(url: str, database: str, limit: int | None = None) -> tuple[int, float]:
    """The server's own single-stream rate: _changes with bodies, pages of 1000, to the end (or
    the first `limit` documents). The reader does no more than any reader must: it finds last_seq
    and pending in each page's trailer (no JSON parsing of the documents)."""
    docs, since, started, read = None, "0", time.monotonic(), 0
    with httpx.Client(auth=AUTH, timeout=120) as client:
        while True:
            body = client.get(f"{url}/{database}/_changes",
                              params={"include_docs": "true", "limit": 1000, "since": since}).content
            trailer = page_trailer(body)
            assert trailer is not None and trailer[1] is not None, body[-300:]
            since, pending = trailer
            page = min(1000, body.count(b'"seq":'))
            read += page
            if docs is None:
                docs = pending + page
            if pending == 0 or (limit and read >= limit):
                return docs, read / (time.monotonic() - started)


class Sampler(threading.Thread):
    """Peak RSS of a process, sampled every 100 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except OSError:
                return
            time.sleep(0.1)


def poll(conn: psycopg.Connection, query: str, timeout: float) -> float:
    """Seconds until the query returns true (checked every 100 ms)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if conn.execute(query).fetchone()[0]:
                return time.monotonic() - started
        except psycopg.Error:
            pass
        time.sleep(0.1)
    raise TimeoutError(query)


CAUGHT_UP = ("SELECT count(*) = 2 AND bool_and(pending = 0) FROM v1.couchdb_progress")
# Every model caught up: built, no aggregate group waiting, and a round has seen every document
# (document_metadata reads them all; a model whose inputs did not change in that round was skipped,
# so its own snapshot may be older).
ALL_MODELS = ("SELECT count(*) > 0 AND bool_and(last_status = 'ok' AND last_rows > 0 AND build_docs IS NULL)"
              " AND NOT EXISTS (SELECT 1 FROM v1.chtsync_model_pending)"
              " AND NOT EXISTS (SELECT 1 FROM v1.chtsync_model_deltas)"
              " AND NOT bool_or(name = 'document_metadata'"
              " AND v1.chtsync_raw_changed_v1('v1.couchdb', snapshot))"
              " FROM v1.chtsync_models WHERE kind <> 'view'")


def latency(admin: httpx.Client, couch_url: str, conn: psycopg.Connection,
            seconds: float) -> tuple[list[float], list[float]]:
    """One report every 0.25 s; seconds from CouchDB's answer to the row in the raw table, and to
    the row in data_record. Polled by id (the hash index), so a poll costs ~1 ms, not a scan."""
    written: dict[str, float] = {}
    raw: dict[str, float] = {}
    seen: dict[str, float] = {}
    end = time.monotonic() + seconds
    while time.monotonic() < end or (len(seen) < len(written) and time.monotonic() < end + 30):
        if time.monotonic() < end and (not written or time.monotonic() - max(written.values()) >= 0.25):
            doc_id = f"latency{time.time_ns()}"
            admin.put(f"{couch_url}/medic/{doc_id}", json={
                "type": "data_record", "form": "pnc_visit", "reported_date": int(time.time() * 1000)})
            written[doc_id] = time.monotonic()
        waiting = [k for k in written if k not in seen]
        for (doc_id,) in conn.execute("SELECT _id FROM v1.couchdb WHERE _id = ANY(%s)",
                                      ([k for k in waiting if k not in raw],)):
            raw.setdefault(doc_id, time.monotonic())
        for (doc_id,) in conn.execute("SELECT uuid FROM v1.data_record WHERE uuid = ANY(%s)", (waiting,)):
            seen.setdefault(doc_id, time.monotonic())
        time.sleep(0.005)
    return [raw[k] - t for k, t in written.items() if k in raw], [seen[k] - t for k, t in written.items() if k in seen]


ROUND = re.compile(r"refresh round refreshed=\d+ ms=(\d+)")


def round_in_run(admin: httpx.Client, couch_url: str, conn: psycopg.Connection, log_path: Path) -> list[int]:
    """CHANGED reports edited in one _bulk_docs while `run` runs: the milliseconds of the refresh
    rounds that `run` logs for them (usually one), read from its log once they are all in the
    raw table and the rounds have had time to end."""
    docs = admin.post(f"{couch_url}/medic/_find", json={
        "selector": {"type": "data_record", "form": {"$exists": True}}, "limit": CHANGED, "skip": CHANGED,
    }).json()["docs"]
    for doc in docs:
        doc["fields"] = {**doc.get("fields", {}), "bench_round": True}
    offset = log_path.stat().st_size
    admin.post(f"{couch_url}/medic/_bulk_docs", json={"docs": docs}).raise_for_status()
    ids, deadline = [d["_id"] for d in docs], time.monotonic() + 60
    while conn.execute("SELECT count(*) FROM v1.couchdb WHERE _id = ANY(%s) AND doc -> 'fields' ? 'bench_round'",
                       (ids,)).fetchone()[0] < len(ids):
        if time.monotonic() > deadline:
            raise TimeoutError("the edited reports did not reach the raw table in 60 s")
        time.sleep(0.1)
    time.sleep(5)
    with open(log_path, errors="replace") as log:
        log.seek(offset)
        return [int(m.group(1)) for m in ROUND.finditer(log.read())]


def loaded(url: str) -> int:
    """Documents already in medic (0 when it does not exist)."""
    r = httpx.get(f"{url}/medic", auth=AUTH, timeout=30)
    return r.json().get("doc_count", 0) if r.status_code == 200 else 0


def chunk_buffer(url: str, size: int | None) -> str:
    """The server's `[httpd] chunked_response_buffer` (set to `size` first, when given): how many
    bytes of rows CouchDB gathers into one HTTP chunk of a streamed answer (1490 by default)."""
    path = f"{url}/_node/_local/_config/httpd/chunked_response_buffer"
    with httpx.Client(auth=AUTH, timeout=30) as client:
        if size is not None:
            client.put(path, json=str(size)).raise_for_status()
        answer = client.get(path)
    return answer.json() if answer.status_code == 200 else "1490 (the default)"


def bench(docs: int, latency_seconds: float, idle_seconds: float, couch_url: str | None = None,
          run_only: bool = False, baseline_docs: int | None = None, feed: bool = True,
          rebuilds: bool = True, buffer: int | None = None) -> dict[str, object]:
    global AUTH
    out: dict[str, object] = {"docs": docs, "load": os.getloadavg()[0]}
    server: CouchDBServer | ExternalCouchDB = (
        ExternalCouchDB(couch_url).start() if couch_url else CouchDBServer().start())
    AUTH = server.auth
    url = server.url
    proc = None
    try:
        if loaded(url) < docs * 0.9:  # a server from an earlier run keeps its documents
            load = subprocess.run([sys.executable, "-m", "chtsync", "sample", "--docs", str(docs), "--no-bad",
                                   "--couchdb-url", url], env=env(url), cwd=ROOT,
                                  capture_output=True, text=True, check=True)
            print(load.stdout.strip() or load.stderr.strip().splitlines()[-1], flush=True)
        out["chunk_buffer"] = chunk_buffer(url, buffer)
        out["changes_docs"], out["changes_rate"] = changes_rate(url, "medic", baseline_docs)
        out["baseline_docs"] = baseline_docs
        if feed and not run_only:  # the same sync from the feed alone (one _changes stream)
            fresh_db()
            started = time.monotonic()
            subprocess.run([sys.executable, "-m", "chtsync", "sync", "--once"], cwd=ROOT, check=True,
                           env={**env(url), "FIRST_SYNC_READERS": "1", "COUCHDB_DBS": "medic"},
                           capture_output=True)
            out["feed_s"] = time.monotonic() - started
            out["feed_rate"] = out["changes_docs"] / out["feed_s"]
        dsn = fresh_db()
        log_path = Path(tempfile.gettempdir()) / "chtsync-real-run.log"
        with open(log_path, "w") as log:
            started = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-m", "chtsync", "run"], env=env(url), cwd=ROOT,
                                    stdout=log, stderr=log)
        sampler = Sampler(proc.pid)
        sampler.start()
        with psycopg.connect(dsn, autocommit=True) as conn:
            poll(conn, CAUGHT_UP, 24 * 3600)
            out["sync_s"] = time.monotonic() - started
            raw = conn.execute("SELECT count(*) FROM v1.couchdb").fetchone()[0]
            out["raw_rows"], out["sync_rate"] = raw, raw / out["sync_s"]
            poll(conn, ALL_MODELS, 24 * 3600)
            out["models_s"] = time.monotonic() - started
            print({k: v for k, v in out.items()}, flush=True)
            time.sleep(5)  # let the last refresh finish
            before = cpu_seconds(proc.pid)
            time.sleep(idle_seconds)
            out["idle_cpu_pct"] = 100 * (cpu_seconds(proc.pid) - before) / idle_seconds
            with httpx.Client(auth=AUTH, timeout=60) as admin:
                to_raw, lat = latency(admin, url, conn, latency_seconds)
            if not lat or not to_raw:  # nothing arrived in time: a measure, not a crash
                raise SystemExit(f"no report reached data_record within {latency_seconds + 30:.0f} s"
                                 f" (raw table: {len(to_raw)}); see {log_path}")
            out["latency_p50"], out["latency_p95"], out["latency_n"] = pct(lat, 0.5), pct(lat, 0.95), len(lat)
            out["raw_p50"], out["raw_p95"] = pct(to_raw, 0.5), pct(to_raw, 0.95)
            with httpx.Client(auth=AUTH, timeout=60) as admin:
                out["run_rounds_ms"] = round_in_run(admin, url, conn, log_path)
        sampler.done.set()
        out["peak_rss_mb"] = sampler.peak
        out["run_builds"] = run_builds(log_path)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        proc = None
        if not run_only:
            out.update(cycle_and_builds(url, rebuilds))
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(30)
        if server is not None:
            server.close()
    return out


def cycle_and_builds(couch_url: str, rebuilds: bool = True) -> dict[str, object]:
    """With `run` stopped: 100 changed reports synced, then one refresh cycle; the idle check; a
    first build of every model (snapshots cleared), all through chtsync's own functions."""
    cfg = config.load(env={k: v for k, v in env(couch_url).items() if k.startswith(("COUCHDB", "POSTGRES"))},
                      search=False)
    out: dict[str, object] = {}
    with httpx.Client(auth=AUTH, timeout=60) as client:
        rows = client.post(f"{couch_url}/medic/_find", json={
            "selector": {"type": "data_record", "form": {"$exists": True}}, "limit": CHANGED}).json()["docs"]
        for doc in rows:
            doc["fields"] = {**doc.get("fields", {}), "bench_edit": True}
        client.post(f"{couch_url}/medic/_bulk_docs", json={"docs": rows}).raise_for_status()
    subprocess.run([sys.executable, "-m", "chtsync", "sync", "--once"], env=env(couch_url), cwd=ROOT,
                   check=True, capture_output=True)
    with db.connect(cfg, autocommit=True) as conn:
        started = time.monotonic()
        results = pipeline.refresh_once(cfg, conn)
        out["cycle_ms"] = (time.monotonic() - started) * 1000
        out["cycle_models"] = {r.name: (r.status, round(r.duration_ms, 1), r.changed) for r in results}
        idle = []
        for _ in range(15):
            started = time.monotonic()
            pipeline.refresh_once(cfg, conn)
            idle.append((time.monotonic() - started) * 1000)
        out["idle_ms"] = statistics.median(idle)
        if not rebuilds:
            return out
        conn.execute("UPDATE chtsync_models SET snapshot = NULL WHERE kind <> 'view'")
        started = time.monotonic()
        results = pipeline.refresh_once(cfg, conn)
        out["builds_s"] = time.monotonic() - started
        out["builds"] = {r.name: (r.status, r.rows, round(r.duration_ms / 1000, 1)) for r in results}
    return out


def report(r: dict[str, object], command: str) -> str:
    lines = [
        f"`{command}` on {machine(ADMIN_DSN)}, real Apache CouchDB 3.4.3 from ../shared/couchdb,"
        f" documents from `chtsync sample`, 2 cores; 1-minute load average when the run began:"
        f" {r['load']:.1f} (other work on the machine slows every row alike).", "",
        "| measure | value |", "|---|---:|",
        f"| CouchDB's `[httpd] chunked_response_buffer` (bytes of rows per HTTP chunk) | {r['chunk_buffer']} |",
        f"| CouchDB's own `_changes?include_docs=true`, pages of 1000 (medic"
        f"{f', first {b:,} documents' if (b := r.get('baseline_docs')) else ''}) | {r['changes_rate']:,.0f} docs/s |",
        *([f"| the feed alone: `chtsync sync --once` of medic with `FIRST_SYNC_READERS=1` (process start and"
           f" migrations included) | {r['feed_s']:.0f} s = {r['feed_rate']:,.0f} docs/s"
           f" ({r['feed_rate'] / r['changes_rate']:.2f}x) |"] if "feed_s" in r else []),
        f"| initial sync by `chtsync run`, medic and medic-users-meta (first sync in key ranges, rows in the raw"
        f" table) | {r['raw_rows']:,} in {r['sync_s']:.0f} s = {r['sync_rate']:,.0f} docs/s"
        f" ({r['sync_rate'] / r['changes_rate']:.2f}x) |",
        f"| time until every model has data (from start) | {r['models_s']:.0f} s |",
        f"| peak RSS of `chtsync run` | {r['peak_rss_mb']:.0f} MB |",
        f"| idle CPU of `chtsync run` | {r['idle_cpu_pct']:.2f} % of a core |",
        f"| CouchDB write to `data_record`, p50 / p95 ({r['latency_n']} reports) |"
        f" {r['latency_p50']:.3f} s / {r['latency_p95']:.3f} s |",
        f"| of which CouchDB write to the raw table, p50 / p95 | {r['raw_p50']:.3f} s / {r['raw_p95']:.3f} s |",
        f"| one refresh round of `chtsync run` after {CHANGED} reports edited in one `_bulk_docs`"
        f" ({len(r['run_rounds_ms'])} round{'s' if len(r['run_rounds_ms']) != 1 else ''}, from its log) |"
        f" {' + '.join(map(str, r['run_rounds_ms'])) or '-'} ms |",
        *([f"| the same in a new process, `run` stopped (its first round: models file parsed, catalog caches"
           f" cold) | {r['cycle_ms']:.0f} ms |"] if "cycle_ms" in r else []),
        f"| idle check (`refresh_once`, nothing changed, median of 15) | {r['idle_ms']:.1f} ms |",
        f"| first builds in the run: from the end of the initial sync to every model built |"
        f" {r['models_s'] - r['sync_s']:.0f} s |",
        *([f"| first build of every model from scratch again, `run` stopped (batched) | {r['builds_s']:.0f} s |"]
          if "builds_s" in r else []),
        "", "Per model, refresh after the 100 changes (status, ms, documents or groups), first build in"
        " the run (rows, s)" + (" and again from scratch (status, rows, s)" if "builds" in r else "")
        + "; the models built together by one shared read each show the group's time:", "",
        "| model | after 100 changes | first build in the run |" + (" again from scratch |" if "builds" in r else ""),
        "|---|---|---|" + ("---|" if "builds" in r else ""),
    ]
    for name, cyc in r["cycle_models"].items():
        again = f" {r['builds'].get(name)} |" if "builds" in r else ""
        lines.append(f"| {name} | {cyc} | {r['run_builds'].get(name)} |{again}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--latency-seconds", type=float, default=30)
    parser.add_argument("--idle", type=float, default=30)
    parser.add_argument("--couchdb-url", help="a running CouchDB with an admin in the URL (loaded by an"
                        " earlier run, or loaded now); default: a new one from ../shared/couchdb")
    parser.add_argument("--baseline-docs", type=int, metavar="N",
                        help="measure the server's own rate over the first N documents of the stream only")
    parser.add_argument("--no-feed", action="store_true", help="leave out the feed-alone sync --once")
    parser.add_argument("--no-rebuilds", action="store_true",
                        help="leave out the second first build of every model (run stopped)")
    parser.add_argument("--chunk-buffer", type=int, metavar="BYTES",
                        help="set the server's [httpd] chunked_response_buffer before the baseline and the run")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--run-only", action="store_true",
                        help="stop after the run's measures (sync, models, idle CPU, latency); implies --no-write")
    args = parser.parse_args()
    result = bench(args.docs, args.latency_seconds, args.idle, args.couchdb_url, args.run_only,
                   args.baseline_docs, not args.no_feed, not args.no_rebuilds, args.chunk_buffer)
    print(result, flush=True)
    if args.run_only:
        return 0
    flags = (f" --baseline-docs {args.baseline_docs}" if args.baseline_docs else "") + (
        " --no-feed" if args.no_feed else "") + (" --no-rebuilds" if args.no_rebuilds else "") + (
        f" --chunk-buffer {args.chunk_buffer}" if args.chunk_buffer else "")
    text = report(result, f"python bench/real_run_bench.py --docs {args.docs}{flags}")
    print(text)
    if not args.no_write:
        buffered = f", chunked_response_buffer {args.chunk_buffer}" if args.chunk_buffer else ""
        write_section(f"The real run ({args.docs:,} documents{buffered})", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
