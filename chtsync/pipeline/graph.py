"""The model graph: references found with pglast, order by graphlib, definition hashes.

Model SQL names the raw table `couchdb` and other models by bare name; anything qualified with a
schema is an external relation the engine neither orders nor checks.
"""

from __future__ import annotations

import dataclasses
import graphlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pglast
from pglast import ast
from pglast.enums import JoinType, SetOperation
from pglast.stream import RawStream

from chtsync import queries
from chtsync.config import Config
from chtsync.errors import ModelsFileError
from chtsync.pipeline.kinds import of
from chtsync.pipeline.models import RAW, ModelSpec, load_file

DELTA = "chtsync_delta"  # the temp table an aggregate's SQL reads in place of its upstream
SHARED_SOURCE = "chtsync_build_source"  # the CTE of a shared build's range (query build_shared)


@dataclass(frozen=True)
class Model:
    """A model ready to build: dependencies resolved, SQL rewritten for the raw table's name."""

    spec: ModelSpec
    sql: str  # deparsed, with `couchdb` mapped to the configured raw table
    deps: tuple[str, ...]  # other models, in declaration order
    raw: bool  # reads the raw table
    external: bool  # reads a schema-qualified relation chtsync knows nothing about
    hash: str = ""
    delta_sql: str = ""  # aggregate: its SQL over the upstream's changed rows (DELTA)
    # aggregate made of its group columns and count(...) calls only, one of them count(*): the
    # count columns, count(*)'s first; its changes are added, not recounted (empty: recounted)
    counts: tuple[str, ...] = ()
    # incremental: its SQL reading only a block range of one relation (empty when that would
    # not be exact, see _block_sql), that relation (the raw table, or an incremental model it
    # reads, as contact_hierarchy reads contact), and the functions it calls (an aggregate among
    # them: not by range)
    block_sql: str = ""
    block_from: str = ""
    block_calls: tuple[str, ...] = ()
    # block_sql reading the raw table's range from SHARED_SOURCE instead (a first build sharing
    # one read of each range with other models); empty when it reads a model, or uses that name
    shared_sql: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind


@dataclass(frozen=True)
class Pipeline:
    models: dict[str, Model] = field(default_factory=dict)  # in dependency order


def _walk(node: object, ctes: frozenset[str]) -> Iterator[tuple[ast.RangeVar, frozenset[str]]]:
    """Every RangeVar with the CTE names visible where it appears."""
    if isinstance(node, (list, tuple)):
        for item in node:
            yield from _walk(item, ctes)
        return
    if not isinstance(node, ast.Node):
        return
    if isinstance(node, ast.SelectStmt) and node.withClause is not None:
        # Over-approximates scope (a CTE is visible in its siblings too); harmless for a SELECT.
        ctes = ctes | {cte.ctename for cte in node.withClause.ctes or ()}
    if isinstance(node, ast.RangeVar):
        yield node, ctes
        return
    for attr in node.__slots__:
        yield from _walk(getattr(node, attr), ctes)


def parse_select(where: str, text: str) -> ast.SelectStmt:
    try:
        stmts = pglast.parse_sql(text)
    except pglast.parser.ParseError as exc:
        raise ModelsFileError(f"{where}: 'sql' is not valid SQL: {exc}") from None
    if len(stmts) != 1 or not isinstance(stmts[0].stmt, ast.SelectStmt):
        raise ModelsFileError(f"{where}: 'sql' must hold exactly one SELECT statement")
    select = stmts[0].stmt
    _read_only(where, select)
    return select


# Statements and clauses that write or lock; refused anywhere in a model, CTEs and subqueries too.
WRITES = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)
# Built-ins that change state outside the model (by name, any schema): refused where they appear.
SIDE_EFFECT_FUNCTIONS = frozenset({
    "nextval", "setval", "set_config", "pg_notify", "pg_terminate_backend", "pg_cancel_backend",
    "pg_reload_conf", "pg_rotate_logfile", "pg_switch_wal", "pg_create_restore_point",
    "pg_advisory_lock", "pg_advisory_xact_lock", "pg_advisory_lock_shared", "pg_advisory_xact_lock_shared",
    "pg_try_advisory_lock", "pg_try_advisory_xact_lock", "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock_shared", "pg_advisory_unlock", "pg_advisory_unlock_all", "pg_sleep",
    "lo_import", "lo_export", "lo_unlink", "lo_create", "lo_from_bytea", "lo_put", "lo_truncate",
    "dblink", "dblink_exec", "dblink_send_query", "pg_file_write", "pg_file_unlink", "pg_file_rename",
})


def _read_only(where: str, node: object) -> None:
    """A model is one read-only SELECT: no data-modifying statement (a CTE's included), no SELECT
    INTO, no row locks, no call of a built-in with side effects. Postgres checks the functions
    the query resolves to when the model is built (apply.check_read_only)."""
    if isinstance(node, (list, tuple)):
        for item in node:
            _read_only(where, item)
        return
    if not isinstance(node, ast.Node):
        return
    if isinstance(node, WRITES):
        verb = type(node).__name__.removesuffix("Stmt").upper()
        raise ModelsFileError(f"{where}: 'sql' must only read, but it holds {verb} (in a WITH clause?):"
                              " a model is one read-only SELECT")
    if isinstance(node, ast.SelectStmt):
        if node.intoClause is not None:
            raise ModelsFileError(f"{where}: 'sql' must be a plain SELECT, not SELECT ... INTO")
        if node.lockingClause:
            raise ModelsFileError(f"{where}: 'sql' must not lock rows (FOR UPDATE / FOR SHARE):"
                                  " a model only reads")
    if isinstance(node, ast.FuncCall) and node.funcname[-1].sval.lower() in SIDE_EFFECT_FUNCTIONS:
        raise ModelsFileError(f"{where}: 'sql' calls {node.funcname[-1].sval}(), which changes state"
                              " outside the model: a model only reads")
    for attr in node.__slots__:
        _read_only(where, getattr(node, attr))


def _unknown(where: str, what: str, name: str, disabled: set[str]) -> ModelsFileError:
    if name in disabled:
        return ModelsFileError(f"{where}: {what} '{name}', which is disabled (enabled: false)")
    return ModelsFileError(
        f"{where}: {what} '{name}', which is neither a model nor the raw table '{RAW}'"
        f" (qualify an external relation with its schema, e.g. public.{name})"
    )


def _resolve(spec: ModelSpec, names: set[str], disabled: set[str], table: str, incremental: set[str]) -> Model:
    where = f"model '{spec.name}'"
    select = parse_select(where, spec.sql)
    deps: list[str] = []
    raw = external = False
    for rv, ctes in _walk(select, frozenset()):
        if rv.catalogname or rv.schemaname:
            external = True
        elif rv.relname in ctes:
            continue
        elif rv.relname == RAW:
            raw = True
            if table != RAW:
                # Keep `couchdb.col` references working under the new name.
                rv.alias = rv.alias or ast.Alias(aliasname=RAW)
                rv.relname = table
        elif rv.relname in names:
            if rv.relname == spec.name:
                raise ModelsFileError(f"{where}: the SQL reads the model itself")
            if rv.relname not in deps:
                deps.append(rv.relname)
        else:
            raise _unknown(where, "the SQL reads", rv.relname, disabled)
    for dep in spec.depends_on or ():
        if dep == RAW:
            raw = True
        elif dep not in names:
            raise _unknown(where, "'depends_on' names", dep, disabled)
        elif dep not in deps:
            deps.append(dep)
    for test in spec.tests:
        if test.kind == "relationships" and test.to not in names | {RAW, table}:
            raise _unknown(f"{where} test '{test.name}'", "'to' names", test.to or "", disabled)
    text = RawStream()(select)
    by_group = of(spec.kind).by_group
    counts = _counts(select, spec.unique_key) if by_group else ()
    delta = _delta_sql(where, select, deps, raw or external) if by_group else ""
    # A unique index could refuse a row read twice in the ranges (an update moved it) before the
    # catch-up replaces it: such a model is built by ids, which deletes before it inserts.
    by_range = of(spec.kind).by_document and not any(ix.unique for ix in spec.indexes)
    block, source, calls, shared = (_block_sql(select, table, incremental & set(deps)) if by_range
                                    else ("", "", (), ""))
    return Model(spec, text, tuple(deps), raw, external, delta_sql=delta, counts=counts, block_sql=block,
                 block_from=source, block_calls=calls, shared_sql=shared)


def _calls(node: object) -> Iterator[ast.FuncCall]:
    if isinstance(node, (list, tuple)):
        for item in node:
            yield from _calls(item)
    elif isinstance(node, ast.Node):
        if isinstance(node, ast.FuncCall):
            yield node
        for attr in node.__slots__:
            yield from _calls(getattr(node, attr))


def _block_sql(select: ast.SelectStmt, table: str,
               upstream: set[str]) -> tuple[str, str, tuple[str, ...], str]:
    """The model's SQL with one relation reading only the blocks of the range the settings
    chtsync.build_from / build_to name (a TID range scan), that relation, the names of the
    functions it calls, and for the raw table the same SQL reading SHARED_SOURCE in its place;
    ("", "", (), "") when a build by block ranges would not be exact.

    Exact when every output row comes from exactly one tuple of that reference, so that the
    rows of the ranges add up to the rows of the whole table: one plain SELECT (no GROUP BY,
    DISTINCT, window, LIMIT or set operation) with the relation as the leftmost item of its FROM
    (or of such a SELECT in FROM there, as `telemetry` has), joined to the rest only by inner or
    left joins (on the preserved side). The relation is the raw table, read nowhere else, or an
    incremental model in `upstream` (its rows change only with raw documents written since the
    build began, which the catch-up derives again: contact_hierarchy reads contact). Aggregate
    calls without GROUP BY are ruled out when the build starts (their names are kept: only
    Postgres knows which functions are aggregates)."""
    refs = [(rv, ctes) for rv, ctes in _walk(select, frozenset()) if not rv.schemaname]
    # the shared source's name must reach the CTE: no relation or CTE of the model may bear it
    shareable = all(rv.relname != SHARED_SOURCE and SHARED_SOURCE not in ctes for rv, ctes in refs)
    raws = [rv for rv, ctes in refs if rv.relname == table and rv.relname not in ctes]
    # Down the leftmost FROM items (through inner and left joins, and into a subquery in FROM
    # that is itself one row per row) to the raw table; where to put the range's subquery.
    query, parent, attr = select, None, ""
    while True:
        if not _row_per_row(query):
            return "", "", (), ""
        parent, attr, node = query, "fromClause", query.fromClause[0]
        while isinstance(node, ast.JoinExpr):
            if node.jointype not in (JoinType.JOIN_INNER, JoinType.JOIN_LEFT):
                return "", "", (), ""
            parent, attr, node = node, "larg", node.larg
        if not (isinstance(node, ast.RangeSubselect) and not node.lateral
                and isinstance(node.subquery, ast.SelectStmt)):
            break
        query = node.subquery
    calls = list(_calls([select.targetList, select.whereClause, select.fromClause]))
    if any(c.over is not None or c.agg_star for c in calls):
        return "", "", (), ""
    is_raw = bool(raws) and node is raws[0] and len(raws) == 1
    if is_raw:
        source = pglast.parse_sql(queries.get("build_block_source"))[0].stmt
    elif any(rv is node and rv.relname in upstream and rv.relname not in ctes for rv, ctes in refs):
        source = pglast.parse_sql(queries.get("build_block_model_source"))[0].stmt
    else:
        return "", "", (), ""
    source.fromClause[0].relname = node.relname
    alias = node.alias or ast.Alias(aliasname=node.relname)

    def reading(item: ast.Node) -> str:  # the model's SQL with `item` in the relation's place
        if isinstance(parent, ast.SelectStmt):
            parent.fromClause = (item, *parent.fromClause[1:])
        else:
            setattr(parent, attr, item)
        return RawStream()(select)

    text = reading(ast.RangeSubselect(lateral=False, subquery=source, alias=alias))
    shared = reading(ast.RangeVar(relname=SHARED_SOURCE, inh=True, relpersistence="p", alias=alias)) \
        if is_raw and shareable else ""
    return text, node.relname, tuple(sorted({c.funcname[-1].sval for c in calls})), shared


def _counts(select: ast.SelectStmt, unique_key: tuple[str, ...]) -> tuple[str, ...]:
    """The count columns of an aggregate that can be kept by adding changes, count(*)'s first;
    () when it must be recounted.

    Addable when every output is either a `count(*)` / `count(expr)` (FILTER allowed; no
    DISTINCT, ORDER BY or OVER) or one of the GROUP BY expressions (written again, or by
    position) named in unique_key, each GROUP BY item is one of those (no grouping sets), and a
    count(*) without FILTER is among the counts (a group whose count(*) reaches 0 is gone): then
    each input row adds 1 or 0 to each count of exactly one group."""
    if select.distinctClause or select.windowClause or not select.groupClause:
        return ()
    counts: list[str] = []
    keys: dict[int, str] = {}  # target position -> key column
    star = ""
    for i, target in enumerate(select.targetList):
        val = target.val
        if isinstance(val, ast.FuncCall) and _is_count(val):
            counts.append(target.name or "count")
            if val.agg_star and val.agg_filter is None and not star:
                star = counts[-1]
        elif isinstance(val, ast.ColumnRef) and isinstance(val.fields[-1], ast.String):
            keys[i] = target.name or val.fields[-1].sval
        elif target.name:
            keys[i] = target.name
        else:
            return ()
    grouped: set[int] = set()
    for item in select.groupClause:
        if isinstance(item, ast.A_Const) and isinstance(item.val, ast.Integer):
            position = item.val.ival - 1
        else:
            position = next((i for i in keys if select.targetList[i].val == item), -1)
        if position not in keys or position in grouped:
            return ()
        grouped.add(position)
    names = [keys[i] for i in sorted(keys)]
    if (grouped != set(keys) or sorted(names) != sorted(unique_key) or not star
            or len(set(counts)) != len(counts) or set(counts) & set(names)):
        return ()
    return (star, *(c for c in counts if c != star))


def _is_count(call: ast.FuncCall) -> bool:
    names = [n.sval for n in call.funcname]
    return (names in (["count"], ["pg_catalog", "count"]) and not call.agg_distinct and not call.agg_order
            and call.over is None and not call.agg_within_group and (call.agg_star or len(call.args or ()) == 1))


def _row_per_row(select: ast.SelectStmt) -> bool:
    """One plain SELECT with a FROM: no GROUP BY, DISTINCT, HAVING, window, LIMIT, OFFSET,
    VALUES or set operation, so that each of its rows comes from one row of its FROM."""
    return not (select.op != SetOperation.SETOP_NONE or select.groupClause or select.distinctClause
                or select.havingClause is not None or select.windowClause or select.limitCount is not None
                or select.limitOffset is not None or select.valuesLists or not select.fromClause)


def _delta_sql(where: str, select: ast.SelectStmt, deps: list[str], other: bool) -> str:
    """An aggregate's SQL with its one upstream model read from DELTA: the groups that rows of
    the changed documents fall in."""
    if len(deps) != 1 or other:
        raise ModelsFileError(f"{where}: an aggregate model reads exactly one other model (an incremental one)"
                          " and nothing else")
    if select.havingClause is not None or select.limitCount is not None or select.op != SetOperation.SETOP_NONE:
        raise ModelsFileError(f"{where}: an aggregate model is one SELECT ... GROUP BY without HAVING, LIMIT"
                          " or UNION: its groups must follow from each row alone")
    for rv, ctes in _walk(select, frozenset()):
        if rv.relname == deps[0] and rv.relname not in ctes and not rv.schemaname:
            rv.alias = rv.alias or ast.Alias(aliasname=rv.relname)
            rv.relname = DELTA
    return RawStream()(select)


def _hash(model: Model, upstream: list[str]) -> str:
    spec = model.spec
    definition = {
        "kind": spec.kind,
        "sql": model.sql,
        "unique_key": list(spec.unique_key),
        # only when set, so that adding the key did not change every existing model's hash
        **({"reference_keys": list(spec.reference_keys)} if spec.reference_keys else {}),
        "indexes": [[list(ix.columns), ix.method, ix.unique, *([ix.expression] if ix.expression else [])]
                    for ix in spec.indexes],
        "upstream": upstream,
    }
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()


def build(specs: list[ModelSpec], table: str = RAW) -> Pipeline:
    """Resolve, order and hash the enabled models; raise ModelsFileError on any inconsistency."""
    enabled = [s for s in specs if s.enabled]
    disabled = {s.name for s in specs if not s.enabled}
    names = {s.name for s in enabled}
    if table != RAW and table in names:
        raise ModelsFileError(f"model '{table}': 'name' is the raw table's name (POSTGRES_TABLE)")
    incremental = {s.name for s in enabled if of(s.kind).by_document}
    resolved: dict[str, Model] = {}
    for spec in enabled:
        resolved[spec.name] = _resolve(spec, names, disabled, table, incremental)
    sorter = graphlib.TopologicalSorter({m.name: m.deps for m in resolved.values()})
    try:
        order = list(sorter.static_order())
    except graphlib.CycleError as exc:
        cycle = exc.args[1]
        raise ModelsFileError(f"models form a cycle: {' -> '.join(cycle)}") from None
    models: dict[str, Model] = {}
    for name in order:
        model = resolved[name]
        upstream = [models[d].hash for d in sorted(model.deps)]
        if of(model.kind).by_group and not of(models[model.deps[0]].kind).by_document:
            raise ModelsFileError(f"model '{name}': an aggregate model must read an incremental model,"
                              f" and '{model.deps[0]}' is {models[model.deps[0]].kind}")
        models[name] = dataclasses.replace(model, hash=_hash(model, upstream))
    return Pipeline(models)


def _texts(paths: list[Path]) -> tuple[str, ...] | None:
    try:
        return tuple(p.read_text(encoding="utf-8") for p in paths)
    except (OSError, UnicodeDecodeError):
        return None  # load_file reports it


# (models file, raw table) -> (texts the pipeline was built from, pipeline): the refresh loop
# loads the models every few seconds, and parsing them costs far more than an idle refresh.
_cache: dict[tuple[Path, str], tuple[tuple[str, ...], Pipeline]] = {}


def load(cfg: Config, path: Path | None = None) -> Pipeline:
    """The enabled models of the configured models file (or `path`), ready to apply; parsed
    again only when the file or one of its .sql files changed."""
    path = path or cfg.models
    key = (path, cfg.table)
    cached = _cache.get(key)
    if cached is not None:
        files = [path, *(m.spec.sql_path for m in cached[1].models.values() if m.spec.sql_path)]
        if _texts(files) == cached[0]:
            return cached[1]
    before = _texts([path])  # read before parsing: a change in between only causes a reload
    pipeline = build(load_file(path), cfg.table)
    if before is not None:
        _cache[key] = (before + tuple(m.spec.sql for m in pipeline.models.values() if m.spec.sql_path),
                       pipeline)
    return pipeline
