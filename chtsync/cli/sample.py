"""`chtsync sample`: generate a CHT-shaped sample, write it as JSON lines or load it into CouchDB."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import time

import httpx

from chtsync.demo import (
    DEFAULT_END_MS,
    MEDIC,
    MIN_DOCS,
    Sample,
    SampleCounts,
    SampleError,
    TrickleResult,
    couch_client,
    couch_target,
    db_names,
    load,
    trickle,
    write_jsonl,
)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "sample",
        parents=[common],
        help="generate realistic CHT documents into a JSON-lines file or a CouchDB server",
        description="Generate n realistic CHT documents (deterministic for a seed) and write them "
        "to a file or, with _bulk_docs, to CouchDB; optionally keep writing new reports.",
    )
    p.add_argument("--docs", type=int, default=20_000, metavar="N", help="documents (default 20000)")
    p.add_argument("--seed", type=int, default=1, metavar="S", help="random seed (default 1)")
    p.add_argument(
        "--end",
        type=dt.date.fromisoformat,
        metavar="YYYY-MM-DD",
        help="dates spread over the two years before this day (default 2026-01-01)",
    )
    p.add_argument(
        "--no-bad",
        action="store_true",
        help="leave out the deliberately bad documents (NUL, lone surrogate)",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", metavar="FILE", help="write JSON lines {db, doc} ('-' for stdout)")
    target.add_argument(
        "--couchdb-url",
        metavar="URL",
        help="CouchDB to load, admin credentials in the URL or COUCHDB_USER/PASSWORD",
    )
    p.add_argument(
        "--db",
        default=MEDIC,
        metavar="NAME",
        help="main database (default medic; others go to NAME-users-meta, NAME-users)",
    )
    p.add_argument(
        "--trickle",
        type=float,
        metavar="RATE",
        help="after loading, write new reports, edits and deletes at RATE per second",
    )
    p.add_argument("--seconds", type=float, default=30.0, metavar="N", help="trickle duration (default 30)")
    p.set_defaults(func=cmd_sample)


def _end_ms(day: dt.date | None) -> int:
    if day is None:
        return DEFAULT_END_MS
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() * 1000)


def describe(counts: SampleCounts, size: int, seconds: float) -> str:
    per_db = ", ".join(f"{db} {n}" for db, n in counts.by_db.items())
    rate = counts.docs / seconds if seconds > 0 else 0.0
    return (
        f"{counts.docs} documents ({per_db}), {size / max(counts.docs, 1):.0f} bytes/doc on "
        f"average, {seconds:.1f} s ({rate:,.0f} docs/s); {counts.nul} with a NUL character "
        f"(stored with it stripped), {counts.refused} that Postgres refuses (lone surrogate)"
    )


def cmd_sample(args: argparse.Namespace) -> int:
    if args.docs < MIN_DOCS:
        print(f"chtsync sample: --docs must be at least {MIN_DOCS}", file=sys.stderr)
        return 2
    if args.trickle is not None and not args.couchdb_url:
        print("chtsync sample: --trickle needs --couchdb-url", file=sys.stderr)
        return 2
    sample = Sample(args.docs, args.seed, end_ms=_end_ms(args.end), bad=not args.no_bad)
    started = time.monotonic()
    if args.out:
        if args.out == "-":
            _, size = write_jsonl(sample.texts(), sys.stdout)
        else:
            with open(args.out, "w", encoding="ascii") as out:
                _, size = write_jsonl(sample.texts(), out)
        print(describe(sample.counts, size, time.monotonic() - started), file=sys.stderr)
        return 0
    base, auth = couch_target(args.couchdb_url)
    names = db_names(args.db)
    try:
        with couch_client(base, auth) as client:
            loaded = load(client, sample.texts(), dbs=names)
        print(describe(sample.counts, loaded.bytes, loaded.seconds), file=sys.stderr)
        print(
            f"loaded into {base}: " + ", ".join(f"{db} {n}" for db, n in loaded.written.items()),
            file=sys.stderr,
        )
        for failure in loaded.first_failures:
            print(f"  refused by CouchDB: {failure}", file=sys.stderr)
        if args.trickle:
            result = asyncio.run(_trickle(base, auth, sample, args.trickle, args.seconds, names[MEDIC]))
            print(
                f"trickle: {len(result.created)} new reports, {len(result.edited)} edits, "
                f"{len(result.deleted)} deletes in {result.seconds:.1f} s"
                f" ({result.writes / max(result.seconds, 1e-9):.1f} writes/s),"
                f" {result.errors} errors",
                file=sys.stderr,
            )
    except (SampleError, httpx.HTTPError) as exc:
        print(f"chtsync sample: {exc}", file=sys.stderr)
        return 1
    return 1 if loaded.failed else 0


async def _trickle(
    base: str, auth: tuple[str, str] | None, sample: Sample, rate: float, seconds: float, db: str
) -> TrickleResult:
    async with httpx.AsyncClient(
        base_url=base, auth=auth, timeout=30, headers={"Content-Type": "application/json"}
    ) as client:
        return await trickle(client, sample, rate=rate, seconds=seconds, db=db)
