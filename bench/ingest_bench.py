"""Postgres's share of a sync: what one page of 1000 documents costs the server, by path.

Generated CHT documents (`chtsync sample`), in canned pages as CouchDB sends them, written by the
product's own calls into an empty raw table (primary key + 4 indexes), one transaction per page:
- a `_changes?include_docs=true` page through `Store.ingest` (the feed, checkpoint included);
- an `_all_docs?include_docs=true` page through `Store.first_sync_page` (the first sync's ranges).
Baseline in the same run: COPY of the same documents into an unindexed jsonb table (the floor:
Postgres parsing jsonb). Reported: wall seconds and the Postgres backend's CPU per document
(from /proc, so it needs Postgres on this machine).

Usage: python bench/ingest_bench.py [--docs 20000] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import machine, write_section
from bench.run_bench import cpu_seconds
from bench.sync_bench import ADMIN_DSN, BENCH_DB, docs, fresh_db, make_cfg, pages
from chtsync import db, migrate
from chtsync.store import Store

PAGE = 1000


def all_docs_pages(texts: list[str]) -> list[bytes]:
    """The same documents as `_all_docs?include_docs=true` pages (rows sorted by id)."""
    ordered = sorted(texts, key=lambda t: json.loads(t)["_id"])
    out = []
    for start in range(0, len(ordered), PAGE):
        rows = []
        for text in ordered[start:start + PAGE]:
            doc = json.loads(text)
            rows.append(f'{{"id":{json.dumps(doc["_id"])},"key":{json.dumps(doc["_id"])},'
                        f'"value":{{"rev":"{doc.get("_rev", "1-a")}"}},"doc":{text}}}')
        head = f'{{"total_rows":{len(ordered)},"offset":{start},"rows":[\r\n'
        out.append((head + ",\r\n".join(rows) + "\r\n]}\n").encode())
    return out


def measure(write: Callable[[psycopg.AsyncConnection, Store], Awaitable[None]]) -> tuple[float, float]:
    """(wall seconds, backend CPU seconds) of `write` on a fresh, migrated database."""
    fresh_db()
    cfg = make_cfg(batch=PAGE)
    migrate.apply(cfg)

    async def run() -> tuple[float, float]:
        conn = await db.connect_async(cfg, autocommit=True)
        pid = conn.info.backend_pid
        cpu, started = cpu_seconds(pid), time.perf_counter()
        await write(conn, Store(cfg))
        result = time.perf_counter() - started, cpu_seconds(pid) - cpu
        await conn.close()
        return result

    return asyncio.run(run())


def copy_floor(texts: list[str]) -> tuple[float, float]:
    with psycopg.connect(fresh_db()) as conn:
        conn.execute("CREATE TABLE plain (doc jsonb)")
        conn.commit()
        pid = conn.info.backend_pid
        cpu, started = cpu_seconds(pid), time.perf_counter()
        with conn.cursor() as cur, cur.copy("COPY plain (doc) FROM STDIN") as copy:
            for text in texts:
                copy.write_row((text,))
        conn.commit()
        return time.perf_counter() - started, cpu_seconds(pid) - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    texts = docs(args.docs)
    feed, ranges = pages(texts, PAGE), all_docs_pages(texts)

    async def by_feed(conn: psycopg.AsyncConnection, store: Store) -> None:
        for body in feed:
            await store.ingest(conn, "bench/medic", body, PAGE)

    async def by_ranges(conn: psycopg.AsyncConnection, store: Store) -> None:
        for body in ranges:
            async with conn.transaction():
                await store.first_sync_page(conn, "bench/medic", body)

    rows = [("COPY into an unindexed jsonb table (baseline)", copy_floor(texts)),
            ("`_changes` pages through `Store.ingest` (the feed)", measure(by_feed)),
            ("`_all_docs` pages through `Store.first_sync_page` (the first sync)", measure(by_ranges))]
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
    n = len(texts)
    size = sum(map(len, texts)) // n
    where = f"{machine(ADMIN_DSN)}, {time.strftime('%Y-%m-%d')}"
    lines = [f"`python bench/ingest_bench.py --docs {args.docs}` on {where}. {n:,} documents of"
             f" {size:,} bytes on average, pages of {PAGE}, one transaction per page, into an empty"
             " database; Postgres's CPU is its backend's, from /proc.", "",
             "| path | seconds | docs/s | Postgres CPU per document |", "|---|---:|---:|---:|"]
    lines += [f"| {label} | {wall:.2f} | {n / wall:,.0f} | {cpu * 1e6 / n:.0f} µs |" for label, (wall, cpu) in rows]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("Postgres's share of a sync (the write paths alone)", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
