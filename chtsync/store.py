"""Postgres writes of the sync engine: one _changes page = one transaction = one function call.

The page travels as the bytes CouchDB sent; chtsync_ingest_v2 (migrations/0008) unpacks it,
upserts and moves the checkpoint. Only when Postgres refuses a page, or the page holds what
Postgres cannot take at all (invalid UTF-8, a NUL in an id), does Python look inside it: it
parses the page, splits it down to the refused documents and records them in chtsync_errors
(a trigger redacts every credential field there, migrations/0007), then checkpoints.
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
from psycopg import postgres
from psycopg.adapt import Dumper

from chtsync import queries
from chtsync.config import Config
from chtsync.couch import tolerant_count, tolerant_trailer
from chtsync.errors import first_line

log = logging.getLogger("chtsync.store")

# `\u0000` escapes (Postgres jsonb refuses NUL) not preceded by an odd run of backslashes:
# `\\u0000` is the literal text "\u0000" and is kept.
NUL_ESCAPE = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")
NUL_ESCAPE_TEXT = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")
RAW_LIMIT = 1_000_000  # characters of a refused document kept in chtsync_errors
PAGE_RAW_LIMIT = 65_536  # characters of an unreadable page kept: enough to see what it was

# SQLSTATE classes that say "this data", not "this connection": data exception, integrity
# violation, program limit exceeded (oversized or too deeply nested values).
DATA_ERROR_CLASSES = ("22", "23", "54")


def is_data_error(exc: BaseException) -> bool:
    if isinstance(exc, UnicodeError):
        return True
    return isinstance(exc, psycopg.Error) and (exc.sqlstate or "")[:2] in DATA_ERROR_CLASSES


class Utf8Text:
    """Bytes sent to Postgres as a text parameter without being decoded in Python (no copy):
    Postgres checks the UTF-8 itself, and its refusal (22021) sends the page to the split path."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class _Utf8TextDumper(Dumper):
    oid = postgres.types["text"].oid

    def dump(self, obj: Utf8Text) -> bytes:
        return obj.data


psycopg.adapters.register_dumper(Utf8Text, _Utf8TextDumper)


@dataclass
class PageResult:
    last_seq: str | None
    pending: int | None
    changes: int
    written: int
    refused: int = 0


@dataclass
class SourceMarks:
    """What a source's checkpoint belongs to, beside the seq (chtsync_sources, migrations/0008)."""

    instance: str | None = None  # CouchDB 3 database creation time
    purge_seq: str | None = None  # purges applied up to here
    verify_due: str | None = None  # why a verify --repair is owed, if one is
    first_sync_seq: str | None = None  # a first sync in key ranges is under way from this seq
    first_sync_after: str | None = None  # ... and every range before this key is written


@dataclass
class RangePage:
    """One _all_docs page of a first sync, written."""

    rows: int
    written: int
    refused: int
    last_id: str | None  # where the range's next page starts (inclusive)


class UnreadablePage(Exception):
    """Not a _changes page at all (garbage, cut short, no `results` list, no `last_seq`):
    nothing can be stored or checkpointed. `kind` names the problem without its details, so
    that the same problem again is recognised; `raw` is the start of the body."""

    def __init__(self, kind: str, detail: str, raw: str) -> None:
        super().__init__(f"unreadable _changes page: {kind}: {detail}" if detail else
                         f"unreadable _changes page: {kind}")
        self.kind = kind
        self.raw = raw


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


def _strip_nul_text(text: str) -> str:
    return NUL_ESCAPE_TEXT.sub(r"\1", text) if "\\u0000" in text else text


def storable_text(value: Any) -> str | None:
    """An id or seq as text Postgres takes: NUL as `\\u0000`, a lone surrogate (from invalid
    UTF-8) as `\\udcXX`, so an error row still names the document."""
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("\x00", "\\u0000").encode("utf-8", "backslashreplace").decode("utf-8")


def _unstorable_id(change: Any) -> str | None:
    """Why this change's id cannot be a Postgres text key, or None if it can."""
    if not isinstance(change, dict) or not isinstance(change.get("id"), str):
        return None  # the ingest function records changes without an id
    if "\x00" in change["id"]:
        return "document id holds a NUL character, which Postgres text cannot store"
    return None


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
        return (row[0], SourceMarks(*row[1:6])) if row else (None, SourceMarks())

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
        """Store one page and move the checkpoint past it, in one transaction. Raises
        UnreadablePage when the body is no _changes page (nothing written)."""
        body = tolerant_trailer(body)
        if b"\\u0000" in body or b"\x00" in body:
            # A NUL in a value is dropped (jsonb refuses it); a NUL in an id cannot be dropped
            # without storing the document under another id: that needs a look inside.
            return await self._ingest_parsed(conn, source, body, limit)
        try:
            async with conn.transaction():
                cur = await conn.execute(
                    self.q_ingest, (self.table, source, Utf8Text(body), limit, True))
                row = await cur.fetchone()
            assert row is not None
            return PageResult(row[0], row[1], row[2], row[3])
        except psycopg.Error as exc:
            if not is_data_error(exc):
                raise
            log.warning("page refused source=%s reason=%s; splitting", source, _reason(exc))
            return await self._ingest_parsed(conn, source, body, limit)

    # -- the first sync in key ranges (chtsync/first_sync.py) -------------------------------

    async def first_sync_begin(
        self, conn: psycopg.AsyncConnection, source: str, seq: str, pending: int | None,
    ) -> None:
        await conn.execute(queries.get("first_sync_begin"),
                           {"source": source, "seq": seq, "pending": pending})

    async def first_sync_page(self, conn: psycopg.AsyncConnection, source: str, body: bytes) -> RangePage:
        """Store one `_all_docs?include_docs` page; no checkpoint moves. Runs inside the
        caller's transaction (which may also move the first sync's progress). Raises
        UnreadablePage when the body is no `_all_docs` page (nothing written)."""
        if b"\\u0000" not in body and b"\x00" not in body:
            try:
                async with conn.transaction():  # a savepoint: a refusal leaves the caller's open
                    cur = await conn.execute(queries.get("first_sync_page"), {
                        "table": self.table, "source": source, "page": Utf8Text(body)})
                    row = await cur.fetchone()
                assert row is not None
                return RangePage(row[0], row[1], 0, row[2])
            except psycopg.Error as exc:
                if not is_data_error(exc):
                    raise
                log.warning("first sync page refused source=%s reason=%s; splitting", source, _reason(exc))
        # What Postgres refuses (or cannot take at all: a NUL) is split down to the documents.
        rows = _parse_rows(body)
        totals = PageResult(None, None, len(rows), 0)
        await self._store_split(conn, source, rows, totals)
        last = rows[-1].get("id") if rows and isinstance(rows[-1], dict) else None
        return RangePage(len(rows), totals.written, totals.refused, last if isinstance(last, str) else None)

    async def first_sync_progress(
        self, conn: psycopg.AsyncConnection, source: str, after: str | None, pending: int | None,
    ) -> None:
        await conn.execute(queries.get("first_sync_progress"),
                           {"source": source, "after": after, "pending": pending})

    async def first_sync_finish(self, conn: psycopg.AsyncConnection, source: str, seq: str) -> None:
        await conn.execute(queries.get("first_sync_finish"), {"source": source, "seq": seq})

    async def record_unreadable(
        self, conn: psycopg.AsyncConnection, source: str, since: str, problem: UnreadablePage,
    ) -> None:
        await conn.execute(self.q_error, (source, None, storable_text(since), str(problem), problem.raw))

    async def _ingest_parsed(
        self, conn: psycopg.AsyncConnection, source: str, body: bytes, limit: int,
    ) -> PageResult:
        """Store what Postgres accepts, record what it refuses, checkpoint: one transaction."""
        page = _parse_page(body)
        results, last_seq = page["results"], page["last_seq"]
        totals = PageResult(None, None, len(results), 0)
        async with conn.transaction():
            await self._store_split(conn, source, results, totals)
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

    async def _store_split(
        self, conn: psycopg.AsyncConnection, source: str, items: list[Any], totals: PageResult,
    ) -> None:
        """Changes (or _all_docs rows) whose id Postgres cannot key are refused at once; the
        rest is stored by _store_parts."""
        storable = []
        for item in items:
            why = _unstorable_id(item)
            if why is None:
                storable.append(item)
                continue
            await self._refuse(conn, source, item, why)
            totals.refused += 1
        await self._store_parts(conn, source, storable, totals)

    async def _store_parts(
        self, conn: psycopg.AsyncConnection, source: str, results: list[Any],
        totals: PageResult,
    ) -> None:
        """Everything in one savepoint if Postgres takes it; else halves, down to the refused
        documents, which are recorded alone."""
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
                        self.q_ingest,
                        (self.table, source, _encodable(_strip_nul_text(text)), None, False),
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
                await self._refuse(conn, source, part[0], _reason(exc))
                totals.refused += 1

    async def _refuse(self, conn: psycopg.AsyncConnection, source: str, change: Any, reason: str) -> None:
        doc_id = change.get("id") if isinstance(change, dict) else None
        seq = change.get("seq") if isinstance(change, dict) else None
        with _deep_json():
            raw = json.dumps(change, ensure_ascii=True)[:RAW_LIMIT]
        await conn.execute(self.q_error, (source, storable_text(doc_id), storable_text(seq), reason, raw))
        log.warning("document refused source=%s id=%s reason=%s", source, storable_text(doc_id), reason)


def _parse_json(body: bytes) -> tuple[Any, str]:
    """(the body as Python objects, its start as text for an error row). Invalid UTF-8 bytes
    become lone surrogates inside their strings (surrogateescape), so only the documents
    holding them are refused later."""
    text = body.decode("utf-8", "surrogateescape")
    raw = text[:PAGE_RAW_LIMIT].encode("utf-8", "replace").decode("utf-8")
    try:
        with _deep_json():
            return json.loads(text, strict=False), raw  # a raw control character is no reason
    except (ValueError, RecursionError) as exc:
        raise UnreadablePage("not JSON (cut short or garbled)", str(exc), raw) from None


def _parse_page(body: bytes) -> dict[str, Any]:
    """A _changes page as Python objects."""
    page, raw = _parse_json(body)
    if not isinstance(page, dict) or not isinstance(page.get("results"), list):
        raise UnreadablePage('no "results" list', "", raw)
    if page.get("last_seq") is None:
        raise UnreadablePage('no "last_seq"', "", raw)
    return page


def _parse_rows(body: bytes) -> list[Any]:
    """The rows of an `_all_docs` page as Python objects."""
    page, raw = _parse_json(body)
    if not isinstance(page, dict) or not isinstance(page.get("rows"), list):
        raise UnreadablePage('no "rows" list', "", raw)
    return page["rows"]


def _pending(page: dict[str, Any], count: int, limit: int) -> dict[str, Any]:
    pending = tolerant_count(page.get("pending"))
    if pending is not None:
        return {"pending": pending}
    return {"pending": 0} if count < limit else {}


def _encodable(text: str) -> str:
    """Lone surrogates cannot go over the wire as UTF-8: escape them so Postgres judges them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        raise UnicodeError("document holds invalid UTF-8 or a lone UTF-16 surrogate") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, psycopg.Error) and exc.diag.message_primary:
        code = f" [{exc.sqlstate}]" if exc.sqlstate else ""
        return f"{exc.diag.message_primary}{code}"
    return first_line(exc)
