"""The engine's named SQL, kept in chtsync/queries/*.sql and loaded once.

A file holds several queries, each introduced by a line `-- name: <query_name>`
(the convention of aiosql and procrastinate's queries.sql).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from psycopg import sql

QUERY_DIR = Path(__file__).parent / "queries"
NAME_LINE = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


@functools.cache
def all_queries() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in sorted(QUERY_DIR.glob("*.sql")):
        text = path.read_text()
        parts = NAME_LINE.split(text)
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in found:
                raise RuntimeError(f"query {name} defined twice ({path.name})")
            found[name] = body.strip().rstrip(";")
    return found


def get(name: str) -> str:
    return all_queries()[name]


def compose(name: str, **identifiers: sql.Composable) -> sql.Composed:
    """A named query with {placeholders} filled by properly quoted identifiers."""
    return sql.SQL(get(name)).format(**identifiers)


def q(name: str, **identifiers: sql.Composable) -> sql.Composable:
    """A named query, identifiers filled in when it has any (a query without any may hold `{`)."""
    return compose(name, **identifiers) if identifiers else sql.SQL(get(name))
