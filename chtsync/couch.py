"""CouchDB client (httpx, async): the few calls chtsync makes, with errors sorted by what to do.

Bodies of _changes pages are returned as bytes: Python never decodes documents, Postgres does.
Credentials travel in the Authorization header only; no URL or message here ever holds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from chtsync.config import CouchSource
from chtsync.errors import CouchAuthError, CouchBadSince, CouchError, CouchNotFound, first_line


class PageTooLarge(CouchError):
    """A page grew past the byte budget: ask again for fewer rows."""

    def __init__(self, limit: int, size: int) -> None:
        super().__init__(f"page of {limit} rows passed {size} bytes")
        self.limit = limit


T = TypeVar("T")
DEFAULT_PURGED_INFOS_LIMIT = 1000  # CouchDB's default _purged_infos_limit


@dataclass(frozen=True)
class DbInfo:
    doc_count: int
    doc_del_count: int
    update_seq: str
    # CouchDB 3: the database's creation time ("1796003678"); another value = recreated.
    # None where the server has no such thing (CouchDB 2 says "0"; pouchdb-server).
    instance: str | None = None
    # Opaque, moves with every purge; None where the server has no _purge (pouchdb-server).
    purge_seq: str | None = None


def _instance(data: dict[str, Any]) -> str | None:
    value = data.get("instance_start_time")
    # Only CouchDB 3's creation time (seconds since the epoch, equal to the shard suffix) says
    # which database this is; "0" (CouchDB 2) or anything else says nothing.
    return value if isinstance(value, str) and value.isdigit() and value != "0" else None


# The end of a _changes body: `"last_seq":<seq>[,"pending":<value>]}`. Read to fetch the next
# page while Postgres ingests this one; only the trailer is looked at, never the documents.
_TRAILER = re.compile(
    rb'"last_seq"\s*:\s*("(?:[^"\\]|\\.)*"|-?[0-9]+)\s*'
    rb'(?:,\s*"pending"\s*:\s*("(?:[^"\\]|\\.)*"|[-+.0-9eE]+|null|true|false)\s*)?\}\s*$'
)
MAX_COUNT = 2**31 - 1  # couchdb_progress.pending is an integer column (CHT Sync's layout)


def tolerant_count(value: Any) -> int | None:
    """A count CouchDB sent (`pending`, `doc_count`): None (unknown) unless it is a plain
    non-negative integer that fits. `1e30` must not stall a feed, nor `-1` spin one."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        return None
    return value


def _count_token(token: bytes | None) -> int | None:
    if token is None or not token.isdigit():
        return None
    return tolerant_count(int(token))


def page_trailer(body: bytes) -> tuple[str, int | None] | None:
    """(last_seq as Postgres will return it, pending or None), or None when not recognisable."""
    match = _TRAILER.search(body[-2048:])
    if match is None:
        return None
    token = match.group(1)
    try:
        seq = json.loads(token) if token.startswith(b'"') else token.decode()
    except ValueError:
        return None
    return str(seq), _count_token(match.group(2))


def tolerant_trailer(body: bytes) -> bytes:
    """The body with a `pending` that is no usable count replaced by null (unknown), so that
    the ingest never reads 1e30 into a bigint nor takes -1 for "more to come"."""
    tail = len(body) - min(len(body), 2048)
    match = _TRAILER.search(body, tail)
    token = match.group(2) if match else None
    if token is None or token == b"null" or _count_token(token) is not None:
        return body
    start, end = match.span(2)
    return body[:start] + b"null" + body[end:]


def _in_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """fn(*args) in a daemon thread of its own: a request left running when the caller is
    cancelled (it ends by its own timeout) never holds the process back at exit, as a pool's
    worker would."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return  # cancelled: nobody waits for it
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        result, error = None, None
        try:
            result = fn(*args)
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="chtsync-couch-read", daemon=True).start()
    return future


def _grow(body: bytearray, chunk: bytes, limit: int, max_bytes: int | None) -> None:
    """Append a chunk of a page, unless that takes it past max_bytes while more than one row
    was asked for: then free it and raise PageTooLarge."""
    body += chunk
    if max_bytes is not None and limit > 1 and len(body) > max_bytes:
        size = len(body)
        body.clear()  # freed now: the exception's traceback keeps the caller's frame alive
        raise PageTooLarge(limit, size)


def _request(params: dict[str, Any], content: bytes | None) -> tuple[str, dict[str, Any]]:
    """stream()'s method and keyword arguments: GET, or POST with a JSON body."""
    if content is None:
        return "GET", {"params": params}
    return "POST", {"params": params, "content": content, "headers": {"Content-Type": "application/json"}}


def short_seq(seq: str | None, width: int = 16) -> str:
    """A seq for people to read: opaque and long on CouchDB 3, so cut to `width` characters."""
    if not seq:
        return "-"
    return seq if len(seq) <= width else seq[:width - 2] + "…"


def seq_number(seq: str | None) -> int | None:
    """The numeric prefix of a seq ("12-g1AAA" -> 12, "12" -> 12): a hint, never an order."""
    if seq is None:
        return None
    head = str(seq).split("-", 1)[0].strip('"')
    return int(head) if head.isdigit() else None


class CouchClient:
    def __init__(
        self, source: CouchSource, *, read_timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.source = source
        verify: bool | ssl.SSLContext = source.verify_tls
        if source.ca_file:
            verify = ssl.create_default_context(cafile=source.ca_file)
        auth = httpx.BasicAuth(source.user, source.password or "") if source.user else None
        settings: dict[str, Any] = {
            "base_url": source.url, "auth": auth, "verify": verify,
            "timeout": httpx.Timeout(connect=10.0, read=read_timeout, write=30.0, pool=10.0),
            "headers": {"Accept": "application/json", "User-Agent": "chtsync"},
        }
        self.http = httpx.AsyncClient(**settings, transport=transport)
        # Bulk reads (the first sync's key ranges) go through a blocking client in threads: CouchDB
        # streams a row per HTTP chunk, and the async stack costs twice the CPU per chunk (about
        # 63 ms against 32 ms per 1000 documents here), CPU the 2 cores need for CouchDB and
        # Postgres. A test's transport means the async client only.
        self._bulk = httpx.Client(**settings) if transport is None else None
        self._apache: bool | None = None  # is_apache_couchdb(), once asked

    async def aclose(self) -> None:
        await self.http.aclose()
        if self._bulk is not None:
            self._bulk.close()

    def _where(self, db: str | None = None) -> str:
        return f"{self.source.url}/{db}" if db else self.source.url

    async def _get(self, path: str, db: str | None, **kw: Any) -> httpx.Response:
        with self._transport_errors(db):
            response = await self.http.get(path, **kw)
        self._check_status(response, db)
        return response

    @contextlib.contextmanager
    def _transport_errors(self, db: str | None) -> Iterator[None]:
        try:
            yield
        except httpx.TimeoutException:
            raise CouchError(f"CouchDB at {self._where(db)} timed out") from None
        except httpx.TransportError as exc:
            reason = type(exc).__name__
            text = first_line(exc) if str(exc) else ""
            if "CERTIFICATE_VERIFY_FAILED" in text:
                raise CouchError(
                    f"CouchDB at {self._where(db)}: its TLS certificate is not trusted ({text}):"
                    " set COUCHDB_CA_FILE to your CA, or COUCHDB_VERIFY_TLS=false", transient=False,
                ) from None
            raise CouchError(f"CouchDB at {self._where(db)} unreachable: {reason} {text}".strip()) from None

    def _check_status(self, response: httpx.Response, db: str | None) -> None:
        status = response.status_code
        if status == 200:
            return
        if status in (401, 403):
            raise CouchAuthError(
                f"CouchDB at {self._where(db)} refused the credentials (HTTP {status}):"
                " check COUCHDB_USER / COUCHDB_PASSWORD",
                status,
            )
        if status == 404:
            raise CouchNotFound(
                f"CouchDB database {self._where(db)} does not exist: check COUCHDB_DBS"
            )
        if status == 400 and response.request.url.path.endswith("/_changes"):
            raise CouchBadSince(f"CouchDB at {self._where(db)} answered 400: {response.text[:200]}")
        if status == 400:  # a request this server does not take (an _all_docs key it refuses...)
            raise CouchError(f"CouchDB at {self._where(db)} refused the request (HTTP 400): {response.text[:200]}",
                             status=400, transient=False)
        raise CouchError(f"CouchDB at {self._where(db)} answered HTTP {status}", status=status)

    def _json(self, response: httpx.Response, db: str | None) -> dict[str, Any]:
        """A JSON object body, or a CouchError saying the server sent something else."""
        try:
            data = response.json()
        except ValueError as exc:
            raise CouchError(f"CouchDB at {self._where(db)} sent an unreadable response: {exc}") from None
        if not isinstance(data, dict):
            raise CouchError(f"CouchDB at {self._where(db)} sent an unreadable response: not an object")
        return data

    @staticmethod
    def _db_path(db: str) -> str:
        return "/" + urllib.parse.quote(db, safe="")

    async def db_info(self, db: str) -> DbInfo:
        data = self._json(await self._get(self._db_path(db), db), db)
        return DbInfo(
            doc_count=tolerant_count(data.get("doc_count")) or 0,
            doc_del_count=tolerant_count(data.get("doc_del_count")) or 0,
            update_seq=str(data.get("update_seq")),
            instance=_instance(data),
            purge_seq=None if data.get("purge_seq") is None else str(data["purge_seq"]),
        )

    async def is_apache_couchdb(self) -> bool:
        """Is the server Apache CouchDB 2 or later? The first sync reads key ranges of
        _all_docs only there: pouchdb-server's _all_docs leaves out documents whose id holds a
        character beyond U+FFFF, which its _changes does list."""
        if self._apache is None:
            data = self._json(await self._get("/", None), None)
            vendor = data.get("vendor") if isinstance(data.get("vendor"), dict) else {}
            major = str(data.get("version", "")).split(".")[0]
            self._apache = (data.get("couchdb") == "Welcome" and vendor.get("name") == "The Apache Software Foundation"
                            and major.isdigit() and int(major) >= 2)
        return self._apache

    async def purged_ids(self, db: str) -> list[str] | None:
        """Ids of the purges CouchDB still remembers (`_purged_infos`, the latest
        `_purged_infos_limit` per shard at least), without duplicates; None when the server
        cannot list them (CouchDB before 2.3)."""
        try:
            data = (await self._get(self._db_path(db) + "/_purged_infos", db)).json()
        except CouchError as exc:
            if exc.status in (400, 404):  # no such endpoint: taken for a document id
                return None
            raise
        infos = data.get("purged_infos") if isinstance(data, dict) else None
        ids = [i["id"] for i in infos or [] if isinstance(i, dict) and isinstance(i.get("id"), str)]
        return list(dict.fromkeys(ids))

    async def purged_infos_limit(self, db: str) -> int:
        """How many purges per shard CouchDB remembers. Reading it takes a server admin; a
        database member gets CouchDB's default, which CHT leaves as it is."""
        try:
            value = (await self._get(self._db_path(db) + "/_purged_infos_limit", db)).json()
        except CouchAuthError:
            return DEFAULT_PURGED_INFOS_LIMIT
        return value if isinstance(value, int) and value > 0 else DEFAULT_PURGED_INFOS_LIMIT

    async def changes(
        self, db: str, since: str, limit: int, *, longpoll: bool = False, heartbeat_ms: int = 10000,
        max_bytes: int | None = None,
    ) -> bytes:
        """One page of _changes with documents, as the raw response body (bounded: _page)."""
        params: dict[str, Any] = {
            "since": since,
            "limit": limit,
            "include_docs": "true",
            # A real seq only every `limit` rows (CouchDB 2+): last_seq is always exact.
            "seq_interval": limit,
        }
        if longpoll:
            # Waits for the next change; heartbeat newlines keep a live connection provably live.
            params.update(feed="longpoll", heartbeat=heartbeat_ms)
        return await self._page(db, "/_changes", params, limit, max_bytes, bulk=not longpoll)

    async def all_docs_range(
        self, db: str, start: str | None, end: str | None, limit: int, *, max_bytes: int | None = None,
    ) -> bytes:
        """Up to `limit` documents with ids from `start` (inclusive) to `end` (exclusive), with
        their bodies, as the raw `_all_docs?include_docs=true` response body (first sync).
        The keys go in a POST body: a page may end at an id of any length, and CouchDB refuses
        a request line of some 16 KB (httpx a query of 64 KiB) where the next page starts."""
        params: dict[str, Any] = {"include_docs": "true", "limit": limit}
        keys: dict[str, Any] = {}
        if start is not None:
            keys["start_key"] = start
        if end is not None:
            keys.update(end_key=end, inclusive_end=False)
        return await self._page(db, "/_all_docs", params, limit, max_bytes, bulk=True,
                                content=json.dumps(keys).encode())

    async def _page(
        self, db: str, endpoint: str, params: dict[str, Any], limit: int, max_bytes: int | None,
        *, bulk: bool = False, content: bytes | None = None,
    ) -> bytes:
        """A response body as bytes (GET, or POST of a JSON `content`). One growing past
        max_bytes while more than one row was asked for is abandoned (PageTooLarge): the caller
        asks again for fewer."""
        path = self._db_path(db) + endpoint
        if bulk and self._bulk is not None:
            return await _in_thread(self._page_blocking, db, path, params, limit, max_bytes, content)
        method, kw = _request(params, content)
        with self._transport_errors(db):
            async with self.http.stream(method, path, **kw) as response:
                if response.status_code != 200:
                    await response.aread()
                    self._check_status(response, db)
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    _grow(body, chunk, limit, max_bytes)
        return body  # a bytearray: no copy of a page that may be page_bytes long

    def _page_blocking(
        self, db: str, path: str, params: dict[str, Any], limit: int, max_bytes: int | None,
        content: bytes | None = None,
    ) -> bytes:
        assert self._bulk is not None
        method, kw = _request(params, content)
        with self._transport_errors(db), self._bulk.stream(method, path, **kw) as response:
            if response.status_code != 200:
                response.read()
                self._check_status(response, db)
            body = bytearray()
            for chunk in response.iter_bytes():
                _grow(body, chunk, limit, max_bytes)
        return body

    async def all_docs_page(
        self, db: str, start_key: str | None, limit: int
    ) -> list[tuple[str, str]]:
        """(id, winning rev) of up to `limit` documents from start_key on; no bodies. The key
        goes in a POST body: an id may be too long for a URL (see all_docs_range)."""
        keys = {} if start_key is None else {"start_key": start_key}
        with self._transport_errors(db):
            response = await self.http.post(
                self._db_path(db) + "/_all_docs", params={"limit": limit}, content=json.dumps(keys),
                headers={"Content-Type": "application/json"})
        self._check_status(response, db)
        data = self._json(response, db)
        try:
            return [(str(row["id"]), str(row["value"]["rev"])) for row in data.get("rows", [])]
        except (KeyError, TypeError, AttributeError):
            raise CouchError(f"CouchDB at {self._where(db)} sent an unreadable _all_docs page") from None

    async def fetch_docs(self, db: str, ids: list[str]) -> bytes:
        """Current winning revisions of `ids` as a _changes-shaped page body (for repair)."""
        try:
            response = await self.http.post(
                self._db_path(db) + "/_all_docs",
                params={"include_docs": "true"},
                content=json.dumps({"keys": ids}),
                headers={"Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise CouchError(f"CouchDB at {self._where(db)} unreachable: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise CouchError(f"CouchDB at {self._where(db)} answered HTTP {response.status_code}")
        return response.content

    async def revs_of(self, db: str, ids: list[str]) -> dict[str, tuple[str, bool] | None]:
        """{id: (winning rev, deleted)} now, or None for ids CouchDB does not know (purged,
        never created): POST _all_docs with keys, no bodies. Used by verify's recheck."""
        try:
            response = await self.http.post(
                self._db_path(db) + "/_all_docs",
                content=json.dumps({"keys": ids}),
                headers={"Content-Type": "application/json"},
            )
        except httpx.TimeoutException:
            raise CouchError(f"CouchDB at {self._where(db)} timed out") from None
        except httpx.TransportError as exc:
            raise CouchError(f"CouchDB at {self._where(db)} unreachable: {type(exc).__name__}") from None
        if response.status_code in (401, 403):
            raise CouchAuthError(
                f"CouchDB at {self._where(db)} refused the credentials (HTTP {response.status_code})",
                response.status_code,
            )
        if response.status_code == 404:
            raise CouchNotFound(f"CouchDB database {self._where(db)} does not exist")
        if response.status_code != 200:
            raise CouchError(f"CouchDB at {self._where(db)} answered HTTP {response.status_code}",
                             status=response.status_code)
        found: dict[str, tuple[str, bool] | None] = dict.fromkeys(ids)
        rows = self._json(response, db).get("rows", [])
        for row in rows if isinstance(rows, list) else []:
            value = row.get("value")
            if isinstance(value, dict) and isinstance(row.get("id"), str) and "rev" in value:
                found[row["id"]] = (str(value["rev"]), bool(value.get("deleted")))
        return found
