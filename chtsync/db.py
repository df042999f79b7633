"""Postgres connections: every chtsync session runs with search_path = the configured schema."""

from __future__ import annotations

import zlib
from typing import Any

import psycopg
from psycopg import sql

from chtsync.config import Config
from chtsync.errors import PostgresUnavailable, first_line

# libpq's words for connection failures that waiting will not cure (it gives them no SQLSTATE).
PERMANENT_CONNECT_ERRORS = ("authentication failed", "does not exist", "no pg_hba.conf entry",
                            "password is required", "no password supplied")

# First key of every advisory lock chtsync takes (two-int form): 'chts' in ASCII.
LOCK_CLASS = 0x63687473


def conninfo(cfg: Config, **extra: Any) -> str:
    kw = cfg.postgres.conninfo_kwargs()
    options = [kw.pop("options", "")] if kw.get("options") else []
    options.append(f"-c search_path={cfg.schema},public")
    options.append(f"-c chtsync.table={cfg.table}")
    kw["options"] = " ".join(options)
    kw.setdefault("connect_timeout", 10)
    # A Postgres that vanished without closing the connection (a host or network gone) is noticed
    # in about a minute instead of Linux's two hours; a long statement still answers the probes.
    for key, value in (("keepalives_idle", 30), ("keepalives_interval", 10), ("keepalives_count", 3)):
        kw.setdefault(key, value)
    kw.update(extra)
    return psycopg.conninfo.make_conninfo(**kw)


def lock_key(cfg: Config, name: str) -> int:
    """A stable 32-bit key for an advisory lock on `name` within this schema."""
    return zlib.crc32(f"{cfg.schema}:{name}".encode()) - 2**31


def table_ident(cfg: Config) -> sql.Identifier:
    return sql.Identifier(cfg.schema, cfg.table)


def describe_error(cfg: Config, exc: BaseException) -> str:
    """One line for a Postgres failure, naming the server but never the password."""
    text = first_line(exc)
    for secret in cfg.secrets():
        text = text.replace(secret, "***")
    if isinstance(exc, psycopg.OperationalError) and not getattr(exc, "sqlstate", None):
        return f"cannot connect to Postgres at {cfg.postgres.describe()}: {text}"
    return f"Postgres at {cfg.postgres.describe()}: {text}"


def connect(cfg: Config, **kw: Any) -> psycopg.Connection:
    try:
        return psycopg.connect(conninfo(cfg), **kw)
    except psycopg.OperationalError as exc:
        message = describe_error(cfg, exc)
        permanent = any(words in message for words in PERMANENT_CONNECT_ERRORS)
        raise PostgresUnavailable(message, permanent=permanent) from None


async def connect_async(cfg: Config, **kw: Any) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(conninfo(cfg), **kw)
