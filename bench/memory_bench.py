"""Peak memory of `chtsync sync --once` with big documents, on the real CouchDB 3.4.

    python bench/memory_bench.py [--docs 100] [--doc-bytes 1000000] [--page-bytes 16777216 ...]

Loads --docs documents of --doc-bytes each into a fresh CouchDB (the release in
../shared/couchdb/, as the tests start it), then for each --page-bytes runs the real command in a
subprocess against an empty Postgres database and prints its peak resident memory (ru_maxrss
from wait4) and wall time. Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.servers import CouchDBServer
from tests.test_hostile import peak_rss_mb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--doc-bytes", type=int, default=1_000_000)
    parser.add_argument("--page-bytes", type=int, nargs="+", default=[2**31 - 1, 16 * 2**20, 4 * 2**20])
    args = parser.parse_args()
    server = CouchDBServer().start()
    try:
        admin = server.client()
        admin.create_db("medic")
        blob = "y" * args.doc_bytes
        for start in range(0, args.docs, 10):
            admin.bulk("medic", [{"_id": f"big{i:05d}", "type": "blob", "blob": blob}
                                 for i in range(start, min(args.docs, start + 10))])
        print(f"{args.docs} documents of {args.doc_bytes} bytes; CouchDB {server.url}")
        print(f"{'PAGE_BYTES':>12} {'peak RSS MB':>12} {'seconds':>8}")
        for page_bytes in args.page_bytes:
            dbname = f"chtsync_membench_{os.getpid()}"
            with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as pg:
                pg.execute(f"DROP DATABASE IF EXISTS {dbname}")
                pg.execute(f"CREATE DATABASE {dbname}")
            env = {**{k: v for k, v in os.environ.items() if not k.startswith(("COUCHDB_", "POSTGRES_"))},
                   "COUCHDB_URL": server.url, "COUCHDB_USER": server.auth[0],
                   "COUCHDB_PASSWORD": server.auth[1], "COUCHDB_DBS": "medic",
                   "POSTGRES_HOST": "127.0.0.1", "POSTGRES_USER": "postgres", "POSTGRES_DB": dbname,
                   "PAGE_BYTES": str(page_bytes)}
            started = time.monotonic()
            with tempfile.TemporaryDirectory() as cwd:
                code, peak, stderr = peak_rss_mb([sys.executable, "-m", "chtsync", "sync", "--once"],
                                                 env, Path(cwd))
            if code != 0:
                print(stderr[-2000:], file=sys.stderr)
                return 1
            print(f"{page_bytes:>12} {peak:>12.0f} {time.monotonic() - started:>8.1f}")
            with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as pg:
                pg.execute(f"DROP DATABASE {dbname}")
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
