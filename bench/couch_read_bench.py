"""How fast a CouchDB serves a database to a reader that does nothing with it: one `_changes`
stream (pages of 1000, as the feed reads) against the first sync's 257 `_all_docs` key ranges,
N at a time (each range in one request), with CouchDB's CPU time over each read.

The reader only counts bytes (blocking httpx, one thread per open request), so the numbers say
what the server can give, not what chtsync makes of it (bench/real_run_bench.py does that).

Usage: python bench/couch_read_bench.py --couchdb-url http://admin:pass@127.0.0.1:5984 [--db medic]
       [--readers 1,4] [--pid PID of CouchDB's beam.smp, for its CPU]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chtsync.couch import page_trailer
from chtsync.first_sync import RANGES


def cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def feed(client: httpx.Client, db: str) -> int:
    """Bytes of the whole _changes feed with documents, page after page."""
    since, size = "0", 0
    while True:
        body = client.get(f"/{db}/_changes", params={"include_docs": "true", "limit": 1000, "since": since,
                                                     "seq_interval": 1000}).content
        size += len(body)
        trailer = page_trailer(body)
        assert trailer is not None, body[-300:]
        since, pending = trailer
        if pending == 0:
            return size


def key_range(client: httpx.Client, db: str, start: str | None, end: str | None) -> int:
    body: dict[str, object] = {"inclusive_end": False}
    if start is not None:
        body["start_key"] = start
    if end is not None:
        body["end_key"] = end
    return len(client.post(f"/{db}/_all_docs", params={"include_docs": "true"}, content=json.dumps(body),
                           headers={"Content-Type": "application/json"}).content)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--couchdb-url", required=True)
    parser.add_argument("--db", default="medic")
    parser.add_argument("--readers", default="1,4")
    parser.add_argument("--pid", type=int, help="CouchDB's beam.smp, to report its CPU")
    args = parser.parse_args()
    url = httpx.URL(args.couchdb_url)
    auth = (url.username, url.password) if url.username else None
    base = str(url.copy_with(username=None, password=None)).rstrip("/")
    with httpx.Client(base_url=base, auth=auth, timeout=600) as client:
        docs = client.get(f"/{args.db}").json()["doc_count"]
        rows = []
        started, before = time.monotonic(), cpu(args.pid)
        size = feed(client, args.db)
        rows.append(("_changes, one stream, pages of 1000", time.monotonic() - started, cpu(args.pid) - before, size))
        for readers in (int(n) for n in args.readers.split(",")):
            started, before = time.monotonic(), cpu(args.pid)
            with concurrent.futures.ThreadPoolExecutor(readers) as pool:
                size = sum(pool.map(lambda r: key_range(client, args.db, *r), RANGES))
            rows.append((f"_all_docs, 257 key ranges, {readers} at a time", time.monotonic() - started,
                         cpu(args.pid) - before, size))
    print(f"{docs:,} documents in {args.db}; 1-minute load average {os.getloadavg()[0]:.1f}\n")
    print("| read | seconds | docs/s | CouchDB CPU per document |")
    print("|---|---:|---:|---:|")
    for name, seconds, cpu_s, size in rows:
        per_doc = f"{cpu_s / docs * 1e6:.0f} µs" if args.pid else "-"
        print(f"| {name} ({size / 1e6:,.0f} MB) | {seconds:.1f} | {docs / seconds:,.0f} | {per_doc} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
