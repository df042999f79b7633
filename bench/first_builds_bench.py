"""First builds of the shipped models at N documents, this checkout against another (CI-free).

The raw table is filled once, the way the sync leaves it but without CouchDB (loading 10M
documents into CouchDB takes two hours here): `chtsync sample --docs N --no-bad --out FILE`,
then COPY and one INSERT into a migrated database, which is analyzed and kept as a template. In
a real run chtsync analyzes the raw table itself, prompted by the sync's write counters; a
copied database does not carry those, so the bench's one ANALYZE stands in for it (and gives
an older checkout, which would not analyze a table it has no counters for, the same start).
Each checkout then gets its own copy of it and runs, in a process of its own, what `run` does
once the sync is done: `models apply` and one refresh round, which builds every model (no
hand-run VACUUM; chtsync analyzes what it builds).

Usage: python bench/first_builds_bench.py --docs 10000000 [--compare ../old-checkout] [--no-write]
(--compare: a work tree of another commit, e.g. `git worktree add ../old HEAD~3`. The template
database is kept for the next run with the same N; about 1.7 GB of Postgres per million documents.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine, write_section  # noqa: E402

ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
TEMPLATE = "chtsync_bench_fb_raw"
COPY_DB = "chtsync_bench_fb"
# What each checkout runs: apply, then one round, timed; the results as JSON on the last line.
ROUND = """
import json, os, time
from chtsync import config, db, pipeline
cfg = config.load(env=dict(os.environ), search=False)
with db.connect(cfg, autocommit=True) as conn:
    pipeline.apply(cfg, conn)
    started = time.monotonic()
    results = pipeline.refresh_once(cfg, conn)
    seconds = time.monotonic() - started
print(json.dumps({"seconds": seconds, "models": {r.name: [r.status, r.rows, round(r.duration_ms / 1000, 1)]
                                                 for r in results}}))
"""


def env(dbname: str, models: Path) -> dict[str, str]:
    return dict(os.environ, CHTSYNC_CONFIG=os.devnull, COUCHDB_URL="http://127.0.0.1:9", POSTGRES_HOST="127.0.0.1",
                POSTGRES_USER="postgres", POSTGRES_DB=dbname, CHTSYNC_MODELS=str(models), LOG_LEVEL="WARNING")


def template(docs: int) -> None:
    """The raw table with `docs` sample documents, analyzed, in TEMPLATE (kept between runs)."""
    marker = f"chtsync sample --docs {docs} --no-bad"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        found = admin.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                              (TEMPLATE,)).fetchone()
        if found and found[0] == marker:
            return
        admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {TEMPLATE}")
    subprocess.run([sys.executable, "-m", "chtsync", "migrate"], env=env(TEMPLATE, ROOT / "sql" / "models.yaml"),
                   cwd=ROOT, check=True, capture_output=True)
    with tempfile.TemporaryDirectory() as tmp:
        lines = Path(tmp) / "sample.jsonl"
        subprocess.run([sys.executable, "-m", "chtsync", "sample", "--docs", str(docs), "--no-bad", "--out",
                        str(lines)], env=dict(os.environ, CHTSYNC_CONFIG=os.devnull), cwd=ROOT, check=True)
        # One JSON object per line; the CSV quote and delimiter are bytes JSON never holds.
        subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", TEMPLATE, "-v", "ON_ERROR_STOP=1", "-q",
                        "-c", "CREATE UNLOGGED TABLE v1.stage (line jsonb)",
                        "-c", f"\\copy v1.stage FROM '{lines}' WITH (FORMAT csv, QUOTE e'\\x01', DELIMITER e'\\x02')"],
                       check=True)
    with psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={TEMPLATE}", autocommit=True) as conn:
        # As the sync stores a document: the winning revision beside it, source '<instance>/<db>'.
        conn.execute("INSERT INTO v1.couchdb (_id, source, doc, _rev, _deleted)"
                     " SELECT line -> 'doc' ->> '_id', 'bench/' || (line ->> 'db'),"
                     " (line -> 'doc') || jsonb_build_object('_rev', '1-bench'), '1-bench', false FROM v1.stage")
        conn.execute("DROP TABLE v1.stage")
        conn.execute("ANALYZE v1.couchdb")
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f"COMMENT ON DATABASE {TEMPLATE} IS '{marker}'")


def first_builds(checkout: Path) -> dict[str, object]:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {COPY_DB} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {COPY_DB} TEMPLATE {TEMPLATE} STRATEGY FILE_COPY")
    try:
        out = subprocess.run([sys.executable, "-c", ROUND], cwd=checkout, check=True, capture_output=True, text=True,
                             env=dict(env(COPY_DB, checkout / "sql" / "models.yaml"), PYTHONPATH=str(checkout)))
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {COPY_DB} WITH (FORCE)")
    return json.loads(out.stdout.strip().splitlines()[-1])


def commit(checkout: Path) -> str:
    return subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or str(checkout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--compare", type=Path, help="another checkout, built the same way first")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    started = time.monotonic()
    template(args.docs)
    print(f"template ready in {time.monotonic() - started:.0f} s", flush=True)
    runs = [(p, first_builds(p)) for p in ([args.compare] if args.compare else []) + [ROOT]]
    names = list(runs[-1][1]["models"])
    lines = [
        f"`python bench/first_builds_bench.py --docs {args.docs}{' --compare OTHER' if args.compare else ''}` on"
        f" {machine(ADMIN_DSN)}; 1-minute load average at the end: {os.getloadavg()[0]:.1f}.", "",
        "| checkout | every model built (one round) |", "|---|---:|",
        *(f"| {commit(p)} | {r['seconds']:.0f} s |" for p, r in runs), "",
        "Per model (status, rows, seconds; the models built together by one shared read each show the"
        " group's time):", "",
        "| model | " + " | ".join(commit(p) for p, _ in runs) + " |", "|---|" + "---|" * len(runs),
        *(f"| {n} | " + " | ".join(str(tuple(r["models"].get(n, ()))) for _, r in runs) + " |" for n in names),
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(f"First builds at {args.docs:,} documents", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
