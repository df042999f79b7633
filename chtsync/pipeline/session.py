"""Connection handling shared by apply and refresh."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import pq, sql

from chtsync.errors import first_line
from chtsync.queries import q

__all__ = ["autocommit", "first_line", "q", "value"]


@contextmanager
def autocommit(conn: psycopg.Connection) -> Iterator[psycopg.Connection]:
    """Run with autocommit on, so that every `conn.transaction()` is a real BEGIN/COMMIT
    (not a savepoint inside a transaction the caller left open) and locks end when we say."""
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        raise RuntimeError("the pipeline needs a connection with no transaction in progress")
    previous = conn.autocommit
    conn.autocommit = True
    try:
        yield conn
    finally:
        if not conn.closed and conn.info.transaction_status == pq.TransactionStatus.IDLE:
            conn.autocommit = previous


def value(conn: psycopg.Connection, name: str, params: Any = None, *, prepare: bool | None = None,
          **identifiers: sql.Composable) -> Any:
    row = conn.execute(q(name, **identifiers), params, prepare=prepare).fetchone()
    return None if row is None else row[0]

