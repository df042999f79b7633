"""Postgres writes of the sync engine: one _changes page = one transaction = one function call.

The page travels as the bytes CouchDB sent; chtsync_ingest_v2 (migrations/0007) unpacks it,
upserts and moves the checkpoint. Only when Postgres refuses a page does Python look inside it,
to split it down to the refused documents and record them in chtsync_errors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg

from chtsync import queries
from chtsync.config import Config
from chtsync.errors import first_line

log = logging.getLogger("chtsync.store")

# `\u0000` escapes (Postgres jsonb refuses NUL) not preceded by an odd run of backslashes:
# `\\u0000` is the literal text "\u0000" and is kept.
NUL_ESCAPE = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")
RAW_LIMIT = 1_000_000  # characters of a refused document kept in chtsync_errors

# SQLSTATE classes that say "this data", not "this connection": data exception, integrity
# violation, program limit exceeded (oversized or too deeply nested values).
DATA_ERROR_CLASSES = ("22", "23", "54")


def is_data_error(exc: BaseException) -> bool:
    if isinstance(exc, UnicodeError):
        return True
    return isinstance(exc, psycopg.Error) and (exc.sqlstate or "")[:2] in DATA_ERROR_CLASSES


@dataclass
class PageResult:
    last_seq: str | None
    pending: int | None
    changes: int
    written: int
    refused: int = 0


@dataclass
class SourceMarks:
    """What a source's checkpoint belongs to, beside the seq (chtsync_sources, migrations/0007)."""

    instance: str | None = None  # CouchDB 3 database creation time
    purge_seq: str | None = None  # purges applied up to here
    verify_due: str | None = None  # why a verify --repair is owed, if one is


@contextlib.contextmanager
def _deep_json() -> Iterator[None]:
    """CouchDB accepts documents nested thousands of levels deep; so must the split path."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def strip_nul(body: bytes) -> bytes:
    if b"\\u0000" in body:
        body = NUL_ESCAPE.sub(rb"\1", body)
    return body.replace(b"\x00", b"") if b"\x00" in body else body


def _text(body: bytes) -> str:
    return body.decode("utf-8")


class Store:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.table = f"{cfg.schema}.{cfg.table}"
        self.q_ingest = queries.get("ingest_page")
        self.q_error = queries.get("record_error")

    async def checkpoint(self, conn: psycopg.AsyncConnection, source: str) -> tuple[str | None, SourceMarks]:
        """(stored seq, what it belongs to)."""
        cur = await conn.execute(queries.get("get_checkpoint"), {"source": source})
        row = await cur.fetchone()
        return (row[0], SourceMarks(row[1], row[2], row[3])) if row else (None, SourceMarks())

    async def set_marks(self, conn: psycopg.AsyncConnection, source: str, marks: SourceMarks) -> None:
        await conn.execute(queries.get("set_source_marks"), {
            "source": source, "instance": marks.instance, "purge_seq": marks.purge_seq,
            "verify_due": marks.verify_due})

    async def reset_checkpoint(
        self, conn: psycopg.AsyncConnection, source: str, reason: str, marks: SourceMarks,
    ) -> None:
        """Start a source over from 0 on another database (rows are kept; replay is harmless),
        with that database's marks, in one transaction."""
        async with conn.transaction():
            await conn.execute(queries.get("reset_checkpoint"), {"source": source})
            await self.set_marks(conn, source, marks)
            await conn.execute(self.q_error, (source, None, None, reason, None))

    async def ingest(
        self, conn: psycopg.AsyncConnection, source: str, body: bytes, limit: int,
    ) -> PageResult:
        body = strip_nul(body)
        try:
            async with conn.transaction():
                cur = await conn.execute(
                    self.q_ingest, (self.table, source, _text(body), limit, True)
                )
                row = await cur.fetchone()
            assert row is not None
            return PageResult(row[0], row[1], row[2], row[3])
        except (psycopg.Error, UnicodeError) as exc:
            if not is_data_error(exc):
                raise
            log.warning("page refused source=%s reason=%s; splitting", source, _reason(exc))
            return await self._ingest_split(conn, source, body, limit)

    async def _ingest_split(
        self, conn: psycopg.AsyncConnection, source: str, body: bytes, limit: int,
    ) -> PageResult:
        """Store what Postgres accepts, record what it refuses, checkpoint: one transaction."""
        try:
            with _deep_json():
                page = json.loads(body)
            results = page["results"]
            if not isinstance(results, list):
                raise TypeError("results is not a list")
            if page.get("last_seq") is None:
                raise ValueError("no last_seq")
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            # Not a _changes page at all (truncated or garbled): nothing to checkpoint on.
            async with conn.transaction():
                await conn.execute(self.q_error, (
                    source, None, None, f"unreadable _changes page: {exc}",
                    body[:RAW_LIMIT].decode("utf-8", "replace"),
                ))
            return PageResult(None, None, 0, 0, refused=1)
        last_seq = page.get("last_seq")
        totals = PageResult(None, None, len(results), 0)
        async with conn.transaction():
            await self._store_parts(conn, source, results, totals)
            # The checkpoint moves with the accepted rows and the error records, together.
            cur = await conn.execute(self.q_ingest, (
                self.table, source,
                json.dumps({"results": [], "last_seq": last_seq, **_pending(page, len(results), limit)}),
                None, True,
            ))
            row = await cur.fetchone()
        assert row is not None
        totals.last_seq, totals.pending = row[0], row[1]
        return totals

    async def _store_parts(
        self, conn: psycopg.AsyncConnection, source: str, results: list[Any],
        totals: PageResult,
    ) -> None:
        stack = [results]
        while stack:
            part = stack.pop()
            if not part:
                continue
            with _deep_json():
                text = json.dumps({"results": part, "last_seq": None}, ensure_ascii=False)
            try:
                async with conn.transaction():  # a savepoint inside the page's transaction
                    cur = await conn.execute(
                        self.q_ingest, (self.table, source, _encodable(text), None, False)
                    )
                    row = await cur.fetchone()
                totals.written += row[3] if row else 0
            except (psycopg.Error, UnicodeError) as exc:
                if not is_data_error(exc):
                    raise
                if len(part) > 1:
                    half = len(part) // 2
                    stack += [part[half:], part[:half]]
                    continue
                change = part[0]
                doc_id = change.get("id") if isinstance(change, dict) else None
                seq = change.get("seq") if isinstance(change, dict) else None
                with _deep_json():
                    raw = json.dumps(change, ensure_ascii=True)[:RAW_LIMIT]
                await conn.execute(self.q_error, (
                    source, None if doc_id is None else str(doc_id),
                    None if seq is None else str(seq), _reason(exc), raw,
                ))
                totals.refused += 1
                log.warning("document refused source=%s id=%s reason=%s", source, doc_id, _reason(exc))


def _pending(page: dict[str, Any], count: int, limit: int) -> dict[str, Any]:
    if "pending" in page:
        return {"pending": page["pending"]}
    return {"pending": 0} if count < limit else {}


def _encodable(text: str) -> str:
    """Lone surrogates cannot go over the wire as UTF-8: escape them so Postgres judges them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        raise UnicodeError("document holds a lone UTF-16 surrogate") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, psycopg.Error) and exc.diag.message_primary:
        code = f" [{exc.sqlstate}]" if exc.sqlstate else ""
        return f"{exc.diag.message_primary}{code}"
    return first_line(exc)
