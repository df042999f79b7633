"""Model kinds: what each kind is built as, and how it is refreshed and rebuilt, in one place.

Every other module asks `of(model.kind)` for a strategy instead of comparing kind names, so a
new kind is one class here (plus its checks in models.py's messages).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import psycopg
from psycopg import sql

from chtsync.pipeline.session import q, value

if TYPE_CHECKING:
    from chtsync.config import Config
    from chtsync.pipeline.graph import Model, Pipeline
    from chtsync.pipeline.refresh import _State

# A refresh that needs an exclusive lock (plain REFRESH, TRUNCATE) waits at most this long for
# readers; queued behind a long query it would block every new reader too. Retried next run.
EXCLUSIVE_LOCK_TIMEOUT = "2s"
# More distinct values than this in one group column: recount everything instead.
MAX_GROUP_VALUES = 10_000


class Kind(StrEnum):
    """What a model is built as and how it is refreshed (docs/pipeline.md)."""

    VIEW = "view"
    MATERIALIZED_VIEW = "materialized_view"
    TABLE = "table"
    INCREMENTAL = "incremental"  # rows keyed by document id; changed documents re-derived
    AGGREGATE = "aggregate"  # GROUP BY over one incremental model; touched groups recounted


def since(cfg: Config, snapshot: str) -> dict[str, object]:
    """Parameters of the change probes (migrations/0010.change-probes.sql)."""
    return {"schema": cfg.schema, "table": cfg.table, "snapshot": snapshot}


class Refreshed(NamedTuple):
    rows: int | None
    changed: int | None  # documents or groups re-derived; None: built from scratch
    # False when not a row was deleted or inserted: the models reading this one need not run
    # (most writes touch few models: a new report changes no contact).
    touched: bool = True


class Strategy:
    """A kind's create / refresh / rebuild. The defaults are a plain table built from scratch."""

    kind: ClassVar[Kind]
    relkind: ClassVar[str] = "r"  # pg_class.relkind of the object it creates
    ddl: ClassVar[str] = "TABLE"  # CREATE <ddl> name AS ...
    has_rows: ClassVar[bool] = True  # False: a view, reading live data; never refreshed or indexed
    keyed: ClassVar[bool] = False  # needs a unique_key
    key_meaning: ClassVar[str] = ""  # what the unique_key is, for the error when it is missing
    by_document: ClassVar[bool] = False  # rows keyed by document id, re-derived per changed document
    by_group: ClassVar[bool] = False  # groups over one by_document model, recounted per touched group
    analyze_after_build: ClassVar[bool] = True  # ANALYZE once built from scratch by a refresh

    def create_suffix(self, empty: bool) -> str:
        """What follows CREATE ... AS <select>; empty: a model the refresh fills in batches."""
        return ""

    def swaps(self, model: Model) -> bool:
        """Whether a rebuild builds a new object beside the old one and swaps them (readers keep
        the old one meanwhile) rather than recomputing it in place."""
        return self.has_rows

    def rebuild(self, conn: psycopg.Connection, model: Model) -> int | None:
        """Recompute the model from scratch inside the caller's transaction; return its rows."""
        name = sql.Identifier(model.name)
        conn.execute(q("truncate", model=name))
        return conn.execute(q("full_insert", model=name, body=sql.SQL(model.sql))).rowcount

    def refresh(self, conn: psycopg.Connection, cfg: Config, model: Model, state: _State,
                aggregates: list[Model]) -> Refreshed:
        """Bring the model up to date inside the caller's transaction; return (rows, changed)."""
        conn.execute(q("local_lock_timeout"), (EXCLUSIVE_LOCK_TIMEOUT,))
        return Refreshed(self.rebuild(conn, model), None)


class View(Strategy):
    kind = Kind.VIEW
    relkind, ddl, has_rows = "v", "VIEW", False

    def rebuild(self, conn: psycopg.Connection, model: Model) -> int | None:
        return None  # a view reads live data: nothing to recompute

    def refresh(self, conn: psycopg.Connection, cfg: Config, model: Model, state: _State,
                aggregates: list[Model]) -> Refreshed:
        raise AssertionError("a view is never refreshed")


class MaterializedView(Strategy):
    kind = Kind.MATERIALIZED_VIEW
    relkind, ddl = "m", "MATERIALIZED VIEW"
    # A concurrent refresh changes only what differs: its statistics are left to analyze_due.
    analyze_after_build = False

    def create_suffix(self, empty: bool) -> str:
        return " WITH DATA"

    def rebuild(self, conn: psycopg.Connection, model: Model) -> int | None:
        name = sql.Identifier(model.name)
        if not self.swaps(model):
            conn.execute(q("refresh_matview_concurrently", model=name))  # readers never wait
            return value(conn, "count_rows", model=name)
        conn.execute(q("refresh_matview", model=name))
        return value(conn, "count_rows", model=name)

    def swaps(self, model: Model) -> bool:
        # With a unique index a concurrent refresh already keeps readers on the old rows.
        return not any(ix.unique for ix in model.spec.indexes)

    def refresh(self, conn: psycopg.Connection, cfg: Config, model: Model, state: _State,
                aggregates: list[Model]) -> Refreshed:
        if any(ix.unique for ix in model.spec.indexes):
            name = sql.Identifier(model.name)
            conn.execute(q("refresh_matview_concurrently", model=name))  # readers never wait
            return Refreshed(value(conn, "count_rows", model=name), None)
        return super().refresh(conn, cfg, model, state, aggregates)


class Table(Strategy):
    kind = Kind.TABLE


# Up to this many changed documents an incremental run reads the raw table by id (the cost
# follows the change); more (a catch-up) leave the planner free to scan.
ID_DRIVEN_MAX = 20_000


class Incremental(Strategy):
    kind = Kind.INCREMENTAL
    keyed, key_meaning, by_document = True, "first column = document _id", True

    def create_suffix(self, empty: bool) -> str:
        return " WITH NO DATA" if empty else ""

    def refresh(self, conn: psycopg.Connection, cfg: Config, model: Model, state: _State,
                aggregates: list[Model]) -> Refreshed:
        """Delete and re-derive the rows of documents written since the model's snapshot."""
        return self.rederive(conn, cfg, model, state.snapshot, state.rows, aggregates, model.name)

    def rederive(self, conn: psycopg.Connection, cfg: Config, model: Model, snapshot: str | None,
                 rows: int | None, aggregates: list[Model], into: str) -> Refreshed:
        """refresh into table `into` (the model, or a rebuild's shadow catching up) from
        `snapshot`, holding `rows` rows (None: count them)."""
        name, key, body = sql.Identifier(into), sql.Identifier(model.spec.unique_key[0]), sql.SQL(model.sql)
        # Statements without parameters go together, in one round trip (a round makes a dozen
        # per model: each saved counts at every refresh).
        conn.execute(_together("changed_ids_table", "local_jit_off"), prepare=False)
        changed = conn.execute(q("changed_ids_fill"), since(cfg, snapshot), prepare=False).rowcount
        if changed == 0:
            return Refreshed(rows if rows is not None else value(conn, "count_rows", model=name), 0,
                             touched=False)
        if model.spec.reference_keys:
            conn.execute(q("changed_ids_analyze"))
        for column in model.spec.reference_keys:
            changed += conn.execute(q("changed_ids_referencing", model=name, key=key, column=sql.Identifier(column)),
                                    prepare=False).rowcount
        conn.execute(_together("changed_ids_analyze", *(["local_id_driven"] if changed <= ID_DRIVEN_MAX else [])),
                     prepare=False)
        record_groups(conn, aggregates, model, after=False)
        deleted = conn.execute(q("incremental_delete", model=name, key=key), prepare=False).rowcount
        inserted = conn.execute(q("incremental_insert", model=name, key=key, body=body), prepare=False).rowcount
        record_groups(conn, aggregates, model, after=True)
        touched = bool(deleted or inserted)
        if rows is None:
            return Refreshed(value(conn, "count_rows", model=name), changed, touched)
        return Refreshed(rows - deleted + inserted, changed, touched)


def _together(*names: str) -> sql.Composable:
    """Named queries without parameters as one text: run in one round trip (simple protocol)."""
    return sql.SQL(";\n").join(q(n) for n in names)


class Aggregate(Strategy):
    kind = Kind.AGGREGATE
    keyed, key_meaning, by_group = True, "the GROUP BY columns", True

    def refresh(self, conn: psycopg.Connection, cfg: Config, model: Model, state: _State,
                aggregates: list[Model]) -> Refreshed:
        """Add the counts the upstream's refreshes recorded (a model of counts only), and recount
        the groups they recorded as touched (all of them after a full build of the upstream)."""
        name = sql.Identifier(model.name)
        everything = state.snapshot is None
        values: dict[str, set[str | None]] = {c: set() for c in model.spec.unique_key}
        groups = 0
        for whole, column, text in conn.execute(q("pending_take"), (model.name,)):
            everything = everything or whole
            if column in values:
                values[column].add(text)
                groups += 1
        groups //= max(len(values), 1)
        if everything or any(len(v) > MAX_GROUP_VALUES for v in values.values()):
            conn.execute(q("pending_clear"), {"model": model.name})  # counts recorded: in the build
            conn.execute(q("delete_all", model=name))  # not TRUNCATE: readers keep reading meanwhile
            return Refreshed(conn.execute(q("full_insert", model=name, body=sql.SQL(model.sql))).rowcount, None)
        types = dict(conn.execute(q("column_types"), (model.name,)).fetchall())
        rows = state.rows if state.rows is not None else value(conn, "count_rows", model=name)
        deltas, inserted, deleted = self.add_counts(conn, model, types) if model.counts else (0, 0, 0)
        rows += inserted - deleted
        if groups == 0:
            return Refreshed(rows, deltas, touched=deltas > 0)
        conn.execute(q("local_jit_off"))
        condition = sql.SQL(" AND ").join(
            q("group_filter", column=sql.Identifier(c), type=sql.SQL(types[c])) for c in values)
        params: list[object] = []
        for vals in values.values():
            params += [sorted(v for v in vals if v is not None), None in vals]
        deleted = conn.execute(q("aggregate_delete", model=name, condition=condition), params,
                               prepare=False).rowcount
        inserted = conn.execute(q("aggregate_insert", model=name, body=sql.SQL(model.sql), condition=condition),
                                params, prepare=False).rowcount
        return Refreshed(rows - deleted + inserted, deltas + groups, touched=bool(deltas or deleted or inserted))

    @staticmethod
    def add_counts(conn: psycopg.Connection, model: Model, types: dict[str, str]) -> tuple[int, int, int]:
        """Add the recorded counts to their groups: (groups changed, groups new, groups gone).
        Statements of a few rows each, whatever the size of the groups and of the table."""
        keys, star = model.spec.unique_key, model.counts[0]
        conn.execute(q("group_deltas_take", keys=sql.SQL(", ").join(
            q("group_delta_key", column=sql.Identifier(k), label=sql.Literal(k), type=sql.SQL(types[k])) for k in keys),
            sums=_each("group_delta_sum", model.counts), nonzero=_each("group_delta_nonzero", model.counts, " OR ")),
            {"model": model.name}, prepare=False)
        changed = value(conn, "count_rows", model=sql.Identifier("chtsync_group_delta"))
        if changed:
            conn.execute(q("group_deltas_analyze"))
            parts = {"model": sql.Identifier(model.name), "match": _each("group_delta_match", keys, " AND "),
                     "star": sql.Identifier(star)}
            conn.execute(q("group_deltas_update", sets=_each("group_delta_add", model.counts), **parts))
            columns = sql.SQL(", ").join(sql.Identifier(c) for c in (*keys, *model.counts))
            inserted = conn.execute(q("group_deltas_insert", columns=columns, **parts)).rowcount
            deleted = conn.execute(q("group_deltas_delete", **parts)).rowcount
        conn.execute(q("group_deltas_drop"))
        return (changed, inserted, deleted) if changed else (0, 0, 0)


def _each(name: str, columns: Iterable[str], sep: str = ", ", **parts: sql.Composable) -> sql.Composable:
    """Named query `name` once per column ({column}: its identifier, {label}: its name as a
    literal, and `parts`), joined by sep."""
    return sql.SQL(sep).join(q(name, column=sql.Identifier(c), label=sql.Literal(c), **parts) for c in columns)


STRATEGIES: dict[str, Strategy] = {s.kind.value: s() for s in (View, MaterializedView, Table, Incremental, Aggregate)}
KINDS = tuple(STRATEGIES)


def of(kind: str) -> Strategy:
    """The strategy of a kind name (models.py has checked it is one of KINDS)."""
    return STRATEGIES[kind]


def aggregates_by_upstream(pipeline: Pipeline) -> dict[str, list[Model]]:
    """The by_group models, under the name of the model they read."""
    out: dict[str, list[Model]] = {}
    for m in pipeline.models.values():
        if of(m.kind).by_group:
            out.setdefault(m.deps[0], []).append(m)
    return out


def record_groups(conn: psycopg.Connection, aggregates: list[Model], upstream: Model, *,
                  after: bool) -> None:
    """Record, for each aggregate reading this incremental model, what its changed rows do to it:
    called before the delete (old rows) and after the insert (new rows). An aggregate of counts
    gets their counts, signed; any other (and a group with a NULL key) the groups to recount."""
    if not aggregates:
        return
    name, key = sql.Identifier(upstream.name), sql.Identifier(upstream.spec.unique_key[0])
    if after:
        conn.execute(q("delta_clear"))
    conn.execute(q("delta_add" if after else "delta_table", model=name, key=key))
    for agg in aggregates:
        pairs = _each("group_pair", agg.spec.unique_key)
        body = sql.SQL(agg.delta_sql)
        recount = q("every_group")
        if agg.counts:
            keyed = _each("group_key_value", agg.spec.unique_key, " AND ")
            counts = _each("group_count_pair", agg.counts, sign=sql.Literal(1 if after else -1))
            conn.execute(q("group_deltas_record", pairs=pairs, counts=counts, body=body, where=keyed),
                         {"model": agg.name})
            recount = q("group_null_key", keyed=keyed)
        conn.execute(q("pending_groups_record", pairs=pairs, body=body, where=recount), {"model": agg.name})
    if after:
        conn.execute(q("delta_drop"))
