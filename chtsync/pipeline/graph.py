"""The model graph: references found with pglast, order by graphlib, definition hashes.

Model SQL names the raw table `couchdb` and other models by bare name; anything qualified with a
schema is an external relation the engine neither orders nor checks.
"""

from __future__ import annotations

import graphlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pglast
from pglast import ast
from pglast.stream import RawStream

from chtsync.config import Config, ConfigError
from chtsync.pipeline.models import RAW, ModelSpec, load_file


@dataclass(frozen=True)
class Model:
    """A model ready to build: dependencies resolved, SQL rewritten for the raw table's name."""

    spec: ModelSpec
    sql: str  # deparsed, with `couchdb` mapped to the configured raw table
    deps: tuple[str, ...]  # other models, in declaration order
    raw: bool  # reads the raw table
    external: bool  # reads a schema-qualified relation chtsync knows nothing about
    hash: str = ""

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
        raise ConfigError(f"{where}: 'sql' is not valid SQL: {exc}") from None
    if len(stmts) != 1 or not isinstance(stmts[0].stmt, ast.SelectStmt):
        raise ConfigError(f"{where}: 'sql' must hold exactly one SELECT statement")
    select = stmts[0].stmt
    if select.intoClause is not None:
        raise ConfigError(f"{where}: 'sql' must be a plain SELECT, not SELECT ... INTO")
    return select


def _unknown(where: str, what: str, name: str, disabled: set[str]) -> ConfigError:
    if name in disabled:
        return ConfigError(f"{where}: {what} '{name}', which is disabled (enabled: false)")
    return ConfigError(
        f"{where}: {what} '{name}', which is neither a model nor the raw table '{RAW}'"
        f" (qualify an external relation with its schema, e.g. public.{name})"
    )


def _resolve(spec: ModelSpec, names: set[str], disabled: set[str], table: str) -> Model:
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
                raise ConfigError(f"{where}: the SQL reads the model itself")
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
    return Model(spec, RawStream()(select), tuple(deps), raw, external)


def _hash(model: Model, upstream: list[str]) -> str:
    spec = model.spec
    definition = {
        "kind": spec.kind,
        "sql": model.sql,
        "unique_key": list(spec.unique_key),
        "indexes": [[list(ix.columns), ix.method, ix.unique] for ix in spec.indexes],
        "upstream": upstream,
    }
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()


def build(specs: list[ModelSpec], table: str = RAW) -> Pipeline:
    """Resolve, order and hash the enabled models; raise ConfigError on any inconsistency."""
    enabled = [s for s in specs if s.enabled]
    disabled = {s.name for s in specs if not s.enabled}
    names = {s.name for s in enabled}
    if table != RAW and table in names:
        raise ConfigError(f"model '{table}': 'name' is the raw table's name (POSTGRES_TABLE)")
    resolved: dict[str, Model] = {}
    for spec in enabled:
        resolved[spec.name] = _resolve(spec, names, disabled, table)
    sorter = graphlib.TopologicalSorter({m.name: m.deps for m in resolved.values()})
    try:
        order = list(sorter.static_order())
    except graphlib.CycleError as exc:
        cycle = exc.args[1]
        raise ConfigError(f"models form a cycle: {' -> '.join(cycle)}") from None
    models: dict[str, Model] = {}
    for name in order:
        model = resolved[name]
        upstream = [models[d].hash for d in sorted(model.deps)]
        models[name] = Model(model.spec, model.sql, model.deps, model.raw, model.external,
                             _hash(model, upstream))
    return Pipeline(models)


def _texts(paths: list[Path]) -> tuple[str, ...] | None:
    try:
        return tuple(p.read_text() for p in paths)
    except OSError:
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
