"""Take over a database CHT Sync (couch2pg + dbt) left behind, in place, before the migrations.

CHT Sync 2.x creates `<schema>.<table>(saved_timestamp, _id PRIMARY KEY, _deleted, source, doc)`
with indexes `_deleted`, `saved_timestamp`, `source`, and `couchdb_progress(seq, pending,
updated_at, source PRIMARY KEY)`; 1.x the same without `source`; builds before 1.0 named the
timestamp "@timestamp" and kept only (seq, source) as progress. chtsync needs `_rev`, `_xid`, a
NOT NULL `source` and the primary key (_id, source), under the names migrations/0001 uses, so
that its IF NOT EXISTS finds them and does nothing.

No step rewrites the jsonb or holds an exclusive lock for longer than a catalog change: columns
are added without volatile defaults, indexes are built CONCURRENTLY, NOT NULL is proved by a
CHECK validated while reads and writes go on, and the primary key is swapped to a unique index
built beforehand in one short transaction with a lock_timeout (retried). Every step looks at the
catalog first, so a second run does nothing and an interrupted run resumes (an INVALID index a
crash left behind is dropped and built again). dbt's `_dataemon` and every other object are left
as they are and reported; `dbt_results` is kept under another name by migrations/0012.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from chtsync import queries
from chtsync.config import Config
from chtsync.couch import short_seq
from chtsync.errors import AdoptError, first_line
from chtsync.queries import q

log = logging.getLogger("chtsync.adopt")

LOCK_TIMEOUT = "3s"  # the longest a swap may make readers wait behind it
LOCK_ATTEMPTS = 8
FILL_BATCH = 10_000
NAMEDATALEN = 63
# (column, suffix of the index name in migrations/0001)
RAW_INDEXES = (("saved_timestamp", "saved_timestamp"), ("_deleted", "deleted"),
               ("source", "source"), ("_xid", "xid"))
TEXT_TYPES = {"text", "character varying"}
DBT_TABLES = {"_dataemon": "dbt's package and manifest store (CHT Sync's dbt runner)",
              "dbt_results": "dbt run results (CHT Pipeline's on-run-end hook)"}


def ident_name(table: str, suffix: str) -> str:
    """An object name as migrations/0001 builds it (`t || '_suffix'`, cut to 63 bytes)."""
    return f"{table}_{suffix}"[:NAMEDATALEN]


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    notnull: bool
    default: str | None


@dataclass(frozen=True)
class Index:
    name: str
    valid: bool
    unique: bool
    primary: bool
    columns: tuple[str | None, ...]
    partial_or_expr: bool
    method: str
    constraint: str | None

    def plain_on(self, column: str) -> bool:
        """A valid, plain btree on exactly this one column: the index 0001 would build."""
        return (self.valid and self.method == "btree" and not self.unique
                and not self.partial_or_expr and self.columns == (column,))


@dataclass(frozen=True)
class Relation:
    name: str
    kind: str
    rows: int
    heap_bytes: int
    total_bytes: int


@dataclass
class Step:
    """One unit of work: what it does, what it costs, and how to do it."""

    what: str
    cost: str
    action: Callable[[psycopg.Connection], None] = field(repr=False)


@dataclass
class Adoption:
    schema: str
    table: str
    layout: str = "none"  # none | chtsync | CHT Sync 2.x | CHT Sync 1.x | CHT Sync before 1.0
    raw: Relation | None = None
    steps: list[Step] = field(default_factory=list)
    progress: list[tuple[str, str | None]] = field(default_factory=list)  # (source, seq) stored
    configured: list[str] = field(default_factory=list)  # sources chtsync will follow
    left_alone: list[str] = field(default_factory=list)  # dbt tables and other objects
    model_conflicts: list[str] = field(default_factory=list)  # need `models apply --adopt`
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.steps)

    def lines(self) -> list[str]:
        """The dry-run report: what was found, the steps with their cost, what stays."""
        out: list[str] = []
        target = f"{self.schema}.{self.table}"
        if self.raw is None:
            out.append(f"{target}: not there yet (the migrations create it)")
        else:
            out.append(f"{target}: {self.layout} layout, ~{self.raw.rows:,} rows, "
                       f"{_size(self.raw.heap_bytes)} table, {_size(self.raw.total_bytes)} with indexes")
        for i, step in enumerate(self.steps, 1):
            out.append(f"  {i}. {step.what}  [{step.cost}]")
        if self.raw is not None and not self.steps:
            out.append("  nothing to adopt: the layout is chtsync's")
        stored = dict(self.progress)
        for source in self.configured:
            seq = stored.get(source)
            out.append(f"  follow {source}: " + (f"resumes from stored seq {short_seq(seq, 24)}" if seq
                                                 else "no stored seq, reads from the start"))
        for source in sorted(set(stored) - set(self.configured)):
            out.append(f"  couchdb_progress row {source} (seq {short_seq(stored[source], 24)}) is not followed"
                       " by this configuration: kept, unused")
        for item in self.left_alone:
            out.append(f"  left alone: {item}")
        if self.model_conflicts:
            out.append("  not created by chtsync, with a model's name (`chtsync models apply --adopt`"
                       f" replaces them in one transaction): {', '.join(self.model_conflicts)}")
        out += [f"  warning: {w}" for w in self.warnings]
        return out


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} TB"


# -- reading the catalog ---------------------------------------------------------------------

def _columns(conn: psycopg.Connection, regclass: str) -> dict[str, Column]:
    return {r[0]: Column(*r) for r in conn.execute(q("adopt_columns"), (regclass,))}


def _indexes(conn: psycopg.Connection, regclass: str) -> list[Index]:
    return [Index(r[0], r[1], r[2], r[3], tuple(r[4]), r[5], r[6], r[7])
            for r in conn.execute(q("adopt_indexes"), (regclass,))]


def _regclass(schema: str, name: str) -> str:
    return sql.Identifier(schema, name).as_string(None)


def inspect(cfg: Config, conn: psycopg.Connection, legacy_source: str | None = None) -> Adoption:
    """What adoption would do to this schema, reading only the catalog (and, for a source column
    with NULLs, an index probe). Raises AdoptError for a layout chtsync cannot take over."""
    schema, table = cfg.schema, cfg.table
    result = Adoption(schema, table, configured=[s.source_name(d) for s in cfg.sources for d in s.dbs])
    rels = {r[0]: Relation(*r) for r in conn.execute(q("adopt_relations"), (schema,))}
    progress_ident = sql.Identifier(schema, "couchdb_progress")
    if "couchdb_progress" in rels:
        pcols = _columns(conn, _regclass(schema, "couchdb_progress"))
        if {"seq", "source"} <= set(pcols):
            result.progress = [(r[0], r[1]) for r in conn.execute(q("adopt_progress_rows", progress=progress_ident))]
        _progress_steps(conn, result, pcols, progress_ident)
    if table in rels:
        raw = rels[table]
        if raw.rows < 0:  # never analyzed: count (autovacuum analyzes any large table)
            count = conn.execute(q("adopt_count_rows", table=sql.Identifier(schema, table))).fetchone()[0]
            raw = Relation(raw.name, raw.kind, count, raw.heap_bytes, raw.total_bytes)
        result.raw = raw
        _raw_steps(cfg, conn, result, legacy_source)
    for name, rel in sorted(rels.items()):
        if name == "dbt_results" and rel.kind == "v":
            continue  # chtsync's own view (migrations/0012)
        if name == "dbt_results":
            # migrations/0012 renames it: CHT Watchdog then reads chtsync's view under this name.
            result.left_alone.append(f"dbt_results ({DBT_TABLES[name]}, ~{max(rel.rows, 0):,} rows): kept as"
                                     " dbt_results_cht_sync; chtsync's dbt_results view takes its name")
        elif name in DBT_TABLES:
            result.left_alone.append(f"{name} ({DBT_TABLES[name]}, ~{max(rel.rows, 0):,} rows): drop it"
                                     " once you no longer need to go back to CHT Sync")
    result.model_conflicts = _model_conflicts(cfg, conn, rels)
    return result


def _progress_steps(conn: psycopg.Connection, result: Adoption, cols: dict[str, Column],
                    ident: sql.Identifier) -> None:
    statements = []
    if "pending" not in cols:
        statements.append(q("adopt_progress_add_pending", progress=ident))
    if "updated_at" not in cols:
        statements.append(q("adopt_progress_add_updated_at", progress=ident))
    # The ingest upserts ON CONFLICT (source): that needs a unique index on it.
    keyed = any(i.valid and i.unique and not i.partial_or_expr and i.columns == ("source",)
                for i in _indexes(conn, _regclass(result.schema, "couchdb_progress")))
    if not keyed:
        statements.append(q("adopt_progress_key", progress=ident))
    if statements:
        missing = [n for n in ("pending", "updated_at") if n not in cols] + ([] if keyed else ["key on source"])
        result.steps.append(Step(f"couchdb_progress: add {', '.join(missing)}", "catalog only, instant",
                                 _short_transaction(statements, "couchdb_progress")))


def _layout(cols: dict[str, Column], pk: Index | None) -> str:
    if pk is not None and pk.columns == ("_id", "source") and {"_rev", "_xid"} <= set(cols):
        return "chtsync"
    if "@timestamp" in cols:
        return "CHT Sync before 1.0"
    return "CHT Sync 2.x" if "source" in cols else "CHT Sync 1.x"


def _raw_steps(cfg: Config, conn: psycopg.Connection, result: Adoption, legacy_source: str | None) -> None:
    schema, table, raw = result.schema, result.table, result.raw
    assert raw is not None
    ident = sql.Identifier(schema, table)
    target = f"{schema}.{table}"
    cols = _columns(conn, _regclass(schema, table))
    indexes = _indexes(conn, _regclass(schema, table))
    by_name = {i.name: i for i in indexes}
    pk = next((i for i in indexes if i.primary), None)
    _refuse_unknown(target, cols, indexes)
    result.layout = _layout(cols, pk)
    wanted = [by_name.get(ident_name(table, suffix)) for _, suffix in RAW_INDEXES]
    if result.layout == "chtsync" and all(i is not None and i.valid for i in wanted):
        return
    work = f"reads ~{raw.rows:,} rows / {_size(raw.heap_bytes)}; reads and writes go on"

    # 1. Columns: catalog changes only.
    statements: list[sql.Composable] = []
    added: list[str] = []
    if "saved_timestamp" not in cols:
        statements.append(q("adopt_rename_timestamp", table=ident))
        added.append('rename "@timestamp" to saved_timestamp')
    if "_rev" not in cols:
        statements.append(q("adopt_add_rev", table=ident))
        added.append("add _rev")
    if "_xid" not in cols:
        statements.append(q("adopt_add_xid", table=ident))
        added.append("add _xid (NULL for existing rows)")
    if "_xid" not in cols or not cols["_xid"].default:
        statements.append(q("adopt_xid_default", table=ident))
        added.append("_xid default pg_current_xact_id()")
    ts, deleted = cols.get("saved_timestamp") or cols.get("@timestamp"), cols["_deleted"]
    if not (ts and ts.default) or not deleted.default:
        statements.append(q("adopt_column_defaults", table=ident))
        added.append("defaults now() / false")
    source_missing = "source" not in cols
    if source_missing:
        value = _legacy_source(cfg, conn, result, ident, legacy_source)
        statements += [q("adopt_add_source", table=ident, value=sql.Literal(value or "")),
                       q("adopt_drop_source_default", table=ident)]
        added.append(f"add source = '{value}' for every existing row" if value else "add source")
    if statements:
        result.steps.append(Step(f"{target}: {'; '.join(added)}", "catalog only, no row rewritten",
                                 _short_transaction(statements, target)))

    # 2. source NOT NULL, proved by a CHECK validated without blocking.
    if not source_missing and not cols["source"].notnull:
        nulls = conn.execute(q("adopt_has_null_source", table=ident)).fetchone()[0]
        if nulls:
            count = conn.execute(q("adopt_count_null_source", table=ident)).fetchone()[0]
            value = _legacy_source(cfg, conn, result, ident, legacy_source, count)
            result.steps.append(Step(
                f"{target}: set source = '{value}' on the {count:,} rows CHT Sync stored without one",
                f"updates {count:,} rows in batches of {FILL_BATCH:,}; doc untouched",
                _fill_source(ident, value or "")))
        check = ident_name(table, "source_not_null")
        checks = dict(conn.execute(q("adopt_check_constraints"), (_regclass(schema, table),)).fetchall())
        if check not in checks:
            result.steps.append(Step(f"{target}: CHECK (source IS NOT NULL) NOT VALID", "catalog only",
                                     _short_transaction([q("adopt_source_check", table=ident,
                                                           check=sql.Identifier(check))], target)))
        if not checks.get(check):
            result.steps.append(Step(f"{target}: validate that check", work,
                                     _autocommit(q("adopt_validate_check", table=ident,
                                                   check=sql.Identifier(check)))))
        result.steps.append(Step(f"{target}: source SET NOT NULL (proved by the check, no scan)",
                                 f"one short transaction, lock_timeout {LOCK_TIMEOUT}",
                                 _short_transaction([q("adopt_source_not_null", table=ident,
                                                       check=sql.Identifier(check))], target)))

    # 3. Indexes under 0001's names: rename CHT Sync's equivalent one, or build concurrently.
    for column, suffix in RAW_INDEXES:
        name = ident_name(table, suffix)
        existing = by_name.get(name)
        if existing is not None and existing.valid:
            if existing.columns[:1] != (column,):
                result.warnings.append(f"index {schema}.{name} exists but is not on ({column}): kept as it is")
            continue
        _check_name_free(conn, schema, table, name, existing)
        if existing is not None:
            result.steps.append(_drop_invalid(schema, name))
        same = next((i for i in indexes if i.plain_on(column) and i.name != name and not i.constraint), None)
        if same is not None:
            rename = q("adopt_rename_index", index=sql.Identifier(schema, same.name), new_name=sql.Identifier(name))
            result.steps.append(Step(f"index {schema}.{same.name} -> {name} (CHT Sync's index on {column})",
                                     "rename, catalog only", _short_transaction([rename], target)))
            indexes.remove(same)
        else:
            result.steps.append(Step(f"build index {schema}.{name} on {column} CONCURRENTLY", work,
                                     _autocommit(q("adopt_build_index", index_name=sql.Identifier(name),
                                                   table=ident, column=sql.Identifier(column)))))

    # 4. Primary key (_id, source): unique index first, then a short swap.
    if pk is None or pk.columns != ("_id", "source"):
        pkey, key = ident_name(table, "pkey"), ident_name(table, "pkey_chtsync")
        existing = by_name.get(key)
        _check_name_free(conn, schema, table, key, existing)
        if existing is not None and not existing.valid:
            result.steps.append(_drop_invalid(schema, key))
        if existing is None or not existing.valid:
            result.steps.append(Step(f"build unique index {schema}.{key} on (_id, source) CONCURRENTLY",
                                     work, _autocommit(q("adopt_build_key", index_name=sql.Identifier(key),
                                                         table=ident))))
        swap = (q("adopt_swap_pkey", table=ident, old=sql.Identifier(pk.constraint or pk.name),
                  pkey=sql.Identifier(pkey), index=sql.Identifier(key)) if pk is not None
                else q("adopt_add_pkey", table=ident, pkey=sql.Identifier(pkey), index=sql.Identifier(key)))
        was = f"{pk.constraint} ({', '.join(c or '?' for c in pk.columns)})" if pk is not None else "none"
        result.steps.append(Step(f"{target}: primary key {was} -> {pkey} (_id, source), using that index",
                                 f"one short transaction, lock_timeout {LOCK_TIMEOUT}, retried",
                                 _short_transaction([swap], target)))
    _check_progress_matches(conn, result, ident)


def _refuse_unknown(target: str, cols: dict[str, Column], indexes: list[Index]) -> None:
    """Layouts whose rows cannot become chtsync's without rewriting them: stop, say why."""
    doc = cols.get("doc")
    if "_id" not in cols or cols["_id"].type not in TEXT_TYPES or doc is None or doc.type != "jsonb":
        raise AdoptError(f"{target} is not a CHT Sync table (no _id text and doc jsonb columns): point"
                         " POSTGRES_SCHEMA / POSTGRES_TABLE at another name, or move it away")
    if "_deleted" not in cols or ("_rev" in cols and cols["_rev"].type not in TEXT_TYPES):
        raise AdoptError(f"{target} keeps one row per revision (CHT Sync before 1.0, logstash): chtsync"
                         " keeps one row per document. Sync into a new schema (POSTGRES_SCHEMA) from zero"
                         " and point the dashboards at it")
    one_per_doc = any(i.valid and i.unique and not i.partial_or_expr and "_id" in i.columns
                      and set(i.columns) <= {"_id", "source"} for i in indexes)
    if not one_per_doc:
        raise AdoptError(f"{target} has no unique key on _id: it may hold several rows per document;"
                         " chtsync cannot take it over in place. Sync into a new schema instead")
    for name, wanted in (("_xid", {"xid8"}), ("source", TEXT_TYPES)):
        if name in cols and cols[name].type not in wanted:
            raise AdoptError(f"{target}.{name} is {cols[name].type}, chtsync needs {'/'.join(sorted(wanted))}:"
                             " rename that column first")


def _check_name_free(conn: psycopg.Connection, schema: str, table: str, name: str, mine: Index | None) -> None:
    if mine is None:
        owner = conn.execute(q("adopt_index_owner"), (schema, name)).fetchone()
        if owner is not None:
            raise AdoptError(f"index name {schema}.{name} is taken by table {owner[0]}: rename that index")
        rel = conn.execute("SELECT 1 FROM pg_class WHERE relnamespace = %s::regnamespace AND relname = %s",
                           (sql.Identifier(schema).as_string(None), name)).fetchone()
        if rel is not None:
            raise AdoptError(f"the name {schema}.{name}, which chtsync needs for an index of {table}, is taken")


def _legacy_source(cfg: Config, conn: psycopg.Connection, result: Adoption, ident: sql.Identifier,
                   legacy_source: str | None, count: int | None = None) -> str | None:
    """The source for rows CHT Sync stored without one. Only certain when there is one database."""
    if count is None and not conn.execute(q("adopt_has_rows", table=ident)).fetchone()[0]:
        return None  # an empty table: no row needs a value
    known = sorted(set(result.configured) | {s for s, _ in result.progress})
    if legacy_source:
        if legacy_source not in known:
            raise AdoptError(f"--legacy-source {legacy_source!r} is neither a followed database nor in"
                             f" couchdb_progress; choose one of: {', '.join(known)}")
        return legacy_source
    stored = [s for s, _ in result.progress]
    if len(stored) == 1:
        return stored[0]
    rows = f"{count:,} rows" if count is not None else "the rows"
    raise AdoptError(
        f"{rows} of {result.schema}.{result.table} have no source: CHT Sync before 2.0 did not record"
        f" which database a row came from, and couchdb_progress lists {len(stored)} databases"
        f" ({', '.join(stored) or 'none'}). Say which database holds them (usually medic):"
        " `chtsync migrate --legacy-source <instance>/medic`, then run `chtsync verify --repair` once"
        " to move the documents of the other databases to their own source")


def _check_progress_matches(conn: psycopg.Connection, result: Adoption, ident: sql.Identifier) -> None:
    """Adopting rows while following under other source names would store every document again."""
    stored = {s for s, _ in result.progress}
    if stored and not stored & set(result.configured) and result.layout != "chtsync" \
            and conn.execute(q("adopt_has_rows", table=ident)).fetchone()[0]:
        raise AdoptError(
            f"couchdb_progress holds {', '.join(sorted(stored))} but chtsync is set to follow"
            f" {', '.join(result.configured)}: the stored seqs would not be used and every document"
            " would be stored a second time. Make the names match: CHT Sync wrote `<COUCHDB_HOST>/<db>`;"
            " set COUCHDB_HOST (or `instance:` in config.yaml) to the host name CHT Sync used")


def _model_conflicts(cfg: Config, conn: psycopg.Connection, rels: dict[str, Relation]) -> list[str]:
    try:
        from chtsync.pipeline import graph

        names = set(graph.load(cfg).models)
    except Exception:  # a broken models file is reported by `models plan`, not here
        return []
    recorded: set[str] = set()
    if "chtsync_models" in rels:
        recorded = {r[0] for r in conn.execute(
            queries.get("recorded_models"))}  # the pipeline's query; search_path is the schema
    return sorted(n for n in names & set(rels) if n not in recorded and n != cfg.table)


# -- doing it ---------------------------------------------------------------------------------

def _short_transaction(statements: list[sql.Composable], what: str) -> Callable[[psycopg.Connection], None]:
    def run(conn: psycopg.Connection) -> None:
        for attempt in range(LOCK_ATTEMPTS):
            try:
                with conn.transaction():
                    conn.execute(q("adopt_lock_timeout"), (LOCK_TIMEOUT,))
                    for statement in statements:
                        conn.execute(statement)
                return
            except psycopg.errors.LockNotAvailable:
                delay = min(30.0, 0.5 * 2**attempt)
                log.warning("adopt: %s is busy (lock_timeout %s), retrying in %.1f s", what, LOCK_TIMEOUT, delay)
                time.sleep(delay)
        raise AdoptError(f"adopt: no moment free of other locks on {what} after {LOCK_ATTEMPTS} tries: a long"
                         " query or open transaction holds it (see pg_stat_activity). Nothing was left"
                         " half done: run `chtsync migrate` again")
    return run


def _autocommit(statement: sql.Composable) -> Callable[[psycopg.Connection], None]:
    def run(conn: psycopg.Connection) -> None:
        conn.execute(statement)
    return run


def _drop_invalid(schema: str, name: str) -> Step:
    return Step(f"drop INVALID index {schema}.{name} left by an interrupted build", "concurrently, instant",
                _autocommit(q("adopt_drop_index", index=sql.Identifier(schema, name))))


def _fill_source(ident: sql.Identifier, value: str) -> Callable[[psycopg.Connection], None]:
    def run(conn: psycopg.Connection) -> None:
        statement = q("adopt_fill_source", table=ident)
        while conn.execute(statement, (value, FILL_BATCH)).rowcount:
            pass
    return run


def run(cfg: Config, conn: psycopg.Connection, legacy_source: str | None = None) -> Adoption:
    """Carry out the adoption on `conn` (autocommit, holding the migrate lock); return the plan
    carried out. Does nothing when the schema is empty or already chtsync's."""
    if not conn.autocommit:
        raise RuntimeError("adoption needs an autocommit connection (CREATE INDEX CONCURRENTLY)")
    adoption = inspect(cfg, conn, legacy_source)
    if adoption.steps:
        log.info("adopt %s.%s: %s layout, %d step(s)", cfg.schema, cfg.table, adoption.layout, len(adoption.steps))
    for step in adoption.steps:
        started = time.monotonic()
        try:
            step.action(conn)
        except psycopg.Error as exc:
            text = first_line(exc)
            raise AdoptError(f"adopt: {step.what}: {text}. Run `chtsync migrate` again to resume") from None
        log.info("adopt step done in %.1f s: %s", time.monotonic() - started, step.what)
    for warning in adoption.warnings:
        log.warning("adopt: %s", warning)
    return adoption
