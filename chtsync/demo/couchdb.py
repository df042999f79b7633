"""Writing the sample: JSON lines, or CouchDB with _bulk_docs (databases created, failures counted)."""

from __future__ import annotations

import os
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from chtsync.demo.generator import DBS, MEDIC, USERS, USERS_META, dumps


class SampleError(Exception):
    """Writing the sample failed in a way the user must fix (credentials, URL, server)."""


def db_names(main: str = MEDIC) -> dict[str, str]:
    """Where each logical database goes. Only `medic` itself sends users to the real `_users`."""
    return {
        MEDIC: main,
        USERS_META: f"{main}-users-meta",
        USERS: USERS if main == MEDIC else f"{main}-users",
    }


def write_jsonl(items: Iterable[tuple[str, str]], out: Any) -> tuple[int, int]:
    """Write `{"db":..,"doc":..}` lines from (db, JSON text) pairs; return (documents, bytes)."""
    count = size = 0
    prefix = {db: f'{{"db":{dumps(db)},"doc":' for db in DBS}
    for db, text in items:
        out.write(f"{prefix[db]}{text}}}\n")
        count += 1
        size += len(text)
    return count, size


def couch_target(url: str, env: Mapping[str, str] | None = None) -> tuple[str, tuple[str, str] | None]:
    """(URL without credentials, admin auth) from the URL, else COUCHDB_USER/COUCHDB_PASSWORD."""
    env = os.environ if env is None else env
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SampleError(f"not a CouchDB URL (expected http(s)://host:port): {parts.hostname or url!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = f"{host}:{parts.port}" if parts.port else host
    base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    user = urllib.parse.unquote(parts.username) if parts.username else env.get("COUCHDB_USER")
    password = urllib.parse.unquote(parts.password) if parts.password else env.get("COUCHDB_PASSWORD")
    return base, (user, password or "") if user else None


def couch_client(base: str, auth: tuple[str, str] | None) -> httpx.Client:
    # pouchdb-server silently stores an empty document when Content-Type is missing.
    return httpx.Client(
        base_url=base,
        auth=auth,
        timeout=httpx.Timeout(120, connect=10),
        headers={"Content-Type": "application/json"},
    )


def _check(r: httpx.Response, what: str) -> None:
    if r.status_code in (401, 403):
        raise SampleError(
            f"{what}: HTTP {r.status_code}: give admin credentials in the URL "
            "(http://user:pass@host:5984) or in COUCHDB_USER/COUCHDB_PASSWORD"
        )
    if r.status_code >= 400:
        raise SampleError(f"{what}: HTTP {r.status_code} {r.text[:200]}")


def ensure_dbs(client: httpx.Client, names: Iterable[str]) -> None:
    for name in names:
        r = client.put(f"/{urllib.parse.quote(name, safe='')}")
        if r.status_code != 412:  # 412: it exists already
            _check(r, f"create database {name}")


@dataclass
class LoadResult:
    written: Counter[str] = field(default_factory=Counter)  # per CouchDB database
    failed: int = 0  # documents _bulk_docs refused (a conflict when loading the same seed twice)
    first_failures: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0


def load(
    client: httpx.Client,
    items: Iterable[tuple[str, str]],
    *,
    dbs: Mapping[str, str] | None = None,
    batch: int = 1000,
    parallel: int = 2,
    progress: Callable[[int], None] | None = None,
) -> LoadResult:
    """Write (db, JSON text) documents with `_bulk_docs`: `batch` per request, `parallel` in flight.

    `dbs` maps the logical databases (medic, medic-users-meta, _users) to real names; they are
    created when missing. `progress(k)` is called as each batch of k documents is stored.
    """
    names = dict(dbs or db_names())
    ensure_dbs(client, names.values())
    result = LoadResult()
    started = time.monotonic()
    buffers: dict[str, list[str]] = {db: [] for db in names}
    inflight: list[tuple[str, int, Future[httpx.Response]]] = []

    def settle(limit: int) -> None:
        while len(inflight) > limit:
            name, count, future = inflight.pop(0)
            r = future.result()
            _check(r, f"_bulk_docs to {name}")
            for row in r.json():
                if "error" in row:
                    result.failed += 1
                    if len(result.first_failures) < 5:
                        result.first_failures.append(f"{name}/{row.get('id')}: {row['error']} {row.get('reason', '')}")
            result.written[name] += count - sum(1 for row in r.json() if "error" in row)
            if progress:
                progress(count)

    def post(db: str) -> None:
        docs, buffers[db] = buffers[db], []
        name = names[db]
        body = f'{{"docs":[{",".join(docs)}]}}'
        inflight.append(
            (
                name,
                len(docs),
                pool.submit(client.post, f"/{urllib.parse.quote(name, safe='')}/_bulk_docs", content=body),
            )
        )
        settle(parallel)

    with ThreadPoolExecutor(parallel, thread_name_prefix="chtsync-load") as pool:
        try:
            for db, text in items:
                result.bytes += len(text)
                buffer = buffers[db]
                buffer.append(text)
                if len(buffer) >= batch:
                    post(db)
            for db in names:
                if buffers[db]:
                    post(db)
            settle(0)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C: drop what has not started
            raise
    result.seconds = time.monotonic() - started
    return result


