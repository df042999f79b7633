"""First build and rebuild of the shipped models, batched, at one size (CI-free, by hand).

Generates N raw documents in SQL (as bench/refresh_bench.py: 60 % reports, 40 % persons), then
with the one-statement threshold at 0 (every build batched) times, per model, the first build by
the refresh and `rebuild` of the models named with --rebuild (into a shadow table, then the swap).
The raw table and nothing else is analyzed before the build, as `run` would after a catch-up.

Usage: python bench/build_bench.py [--docs 200000] [--rebuild data_record,contact_hierarchy]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.refresh_bench import ADMIN_DSN, GENERATE
from chtsync import config, db, migrate, pipeline
from chtsync.pipeline import refresh

ROOT = Path(__file__).resolve().parent.parent
BENCH_DB = "chtsync_bench_build"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--rebuild", default="data_record,contact_hierarchy")
    args = parser.parse_args()
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {BENCH_DB}")
    cfg = config.load(env={"COUCHDB_URL": "http://127.0.0.1:9", "POSTGRES_HOST": "127.0.0.1",
                           "POSTGRES_USER": "postgres", "POSTGRES_DB": BENCH_DB,
                           "CHTSYNC_MODELS": str(ROOT / "sql" / "models.yaml")}, search=False)
    migrate.apply(cfg)
    refresh.ONE_STATEMENT_BUILD = 0  # every build batched, whatever the size
    with db.connect(cfg, autocommit=True) as conn:
        conn.execute(GENERATE, (1, args.docs))
        conn.execute("ANALYZE couchdb")
        pipeline.apply(cfg, conn)
        started = time.monotonic()
        results = pipeline.refresh_once(cfg, conn)
        total = time.monotonic() - started
        for r in results:
            print(f"first build {r.name:24} {r.kind:12} {r.status:8} rows={r.rows!s:>8} {r.duration_ms / 1000:7.2f} s")
        print(f"first build, every model: {total:.1f} s for {args.docs:,} documents")
        for name in filter(None, args.rebuild.split(",")):
            r = pipeline.rebuild(cfg, conn, name)
            print(f"rebuild     {name:24} rows={r.rows} {r.duration_ms / 1000:.2f} s")


if __name__ == "__main__":
    main()
