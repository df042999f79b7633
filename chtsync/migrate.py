"""chtsync's own tables, created and upgraded only by the yoyo migrations in migrations/.

Migrations run with search_path set to the configured schema and the raw table's name in the
setting `chtsync.table`, under a Postgres advisory lock so two processes never race.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from psycopg import sql
from yoyo import read_migrations
from yoyo.backends.core.postgresql import PostgresqlPsycopgBackend
from yoyo.connections import DatabaseURI
from yoyo.migrations import MigrationList

from chtsync import adopt, db, paths, preflight, queries
from chtsync.config import Config
from chtsync.errors import ConfigError

log = logging.getLogger("chtsync.migrate")


@dataclass
class MigrationPlan:
    applied: list[str]
    pending: list[str]
    # Taking over tables CHT Sync left (chtsync/adopt.py); runs before the migrations.
    adoption: adopt.Adoption | None = field(default=None)


class _Backend(PostgresqlPsycopgBackend):
    """yoyo's psycopg 3 backend, connecting with chtsync's conninfo (schema, table setting)."""

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        uri = DatabaseURI("postgresql+psycopg", None, None, None, None, None, {})
        super().__init__(uri, "_yoyo_migration")

    def connect(self, dburi: DatabaseURI):  # type: ignore[override]
        import psycopg

        self.schema = self._cfg.schema
        return psycopg.connect(db.conninfo(self._cfg), autocommit=True)

    def copy(self):  # type: ignore[override]
        return type(self)(self._cfg)

    @contextlib.contextmanager
    def lock(self, timeout: int = 10) -> Iterator[None]:
        # apply() serialises migrations with a session advisory lock, which ends with its
        # process. yoyo's lock is a row that a killed process leaves behind, failing every later
        # start with LockTimeout: not taken.
        yield


def _backend(cfg: Config) -> _Backend:
    backend = _Backend(cfg)
    backend.init_database()
    return backend


def _ensure_schema(cfg: Config) -> None:
    with db.connect(cfg, autocommit=True) as conn:
        preflight.require_create(cfg, conn)
        exists = conn.execute(
            "SELECT 1 FROM pg_namespace WHERE nspname = %s", (cfg.schema,)
        ).fetchone()
        if not exists:
            conn.execute(queries.compose("create_schema", schema=sql.Identifier(cfg.schema)))


def _migrations() -> MigrationList:
    """The migrations chtsync ships; none found means a broken install, never "up to date"."""
    folder = paths.migrations_dir()
    found = read_migrations(str(folder)) if folder.is_dir() else []
    if not found:
        raise ConfigError(f"no migrations found in {folder}: reinstall chtsync"
                          " (pip install --force-reinstall chtsync) or unset/fix CHTSYNC_HOME")
    return found


def plan(cfg: Config, legacy_source: str | None = None) -> MigrationPlan:
    """What `apply` would do. Read-only: creates neither the schema nor yoyo's own tables."""
    ids = [m.id for m in _migrations()]
    with db.connect(cfg, autocommit=True) as conn:
        adoption = adopt.inspect(cfg, conn, legacy_source)
        done: set[str] = set()
        if conn.execute(queries.get("yoyo_table_exists")).fetchone()[0]:
            done = {row[0] for row in conn.execute(queries.get("applied_migrations"))}
    return MigrationPlan(applied=[i for i in ids if i in done], pending=[i for i in ids if i not in done],
                         adoption=adoption)


def apply(cfg: Config, legacy_source: str | None = None) -> list[str]:
    """Adopt CHT Sync's tables if there are any, apply pending migrations; return their ids.
    Safe to call from several processes."""
    migrations = _migrations()
    _ensure_schema(cfg)
    with db.connect(cfg, autocommit=True) as lock_conn:
        # Session-level lock: a second process waits here, then finds nothing left to do.
        lock_conn.execute("SELECT pg_advisory_lock(%s, %s)", (db.LOCK_CLASS, db.lock_key(cfg, "migrate")))
        adopt.run(cfg, lock_conn, legacy_source)
        backend = _backend(cfg)
        try:
            pending = backend.to_apply(migrations)
            if pending:
                backend.apply_migrations(pending)
                for m in pending:
                    log.info("migration applied id=%s schema=%s", m.id, cfg.schema)
            return [m.id for m in pending]
        finally:
            backend.connection.close()
