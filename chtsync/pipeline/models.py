"""Reading models.yaml: every model checked strictly, every problem one ModelsFileError naming it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pglast
from pglast import ast
from pglast.stream import RawStream

from chtsync.config import IDENT, yaml_file
from chtsync.errors import ModelsFileError
from chtsync.pipeline import forms
from chtsync.pipeline.datatests import DataTest, parse_tests
from chtsync.pipeline.kinds import KINDS, of

INDEX_METHODS = ("btree", "hash", "gin", "gist", "brin")
MODEL_KEYS = {
    "name", "sql", "kind", "unique_key", "reference_keys", "indexes", "depends_on", "interval", "tags", "enabled",
    "description", "form", "forms", "contact_type", "fields", "tests",
}
INDEX_KEYS = {"columns", "expression", "method", "unique"}
RAW = "couchdb"  # how model SQL names the raw table, whatever POSTGRES_TABLE is
# Names of chtsync's own tables: a model of that name would replace them.
RESERVED = {RAW, "couchdb_progress", "chtsync_errors", "chtsync_sources", "chtsync_models",
            "chtsync_model_tests"}


@dataclass(frozen=True)
class Index:
    columns: tuple[str, ...]  # empty when the index is on an expression
    method: str = "btree"
    unique: bool = False
    expression: str | None = None  # normalized (deparsed) SQL expression over the model's columns


@dataclass(frozen=True)
class ModelSpec:
    """One entry of models.yaml, as written (dependencies not yet resolved)."""

    name: str
    kind: str
    sql_path: Path | None  # None: generated from form / contact_type (forms.py)
    sql: str
    unique_key: tuple[str, ...] = ()
    reference_keys: tuple[str, ...] = ()  # incremental: columns holding other documents' ids
    indexes: tuple[Index, ...] = ()
    depends_on: tuple[str, ...] | None = None  # None: infer from the SQL
    interval: float | None = None
    tags: tuple[str, ...] = ()
    enabled: bool = True
    description: str = ""
    tests: tuple[DataTest, ...] = ()


def _fail(where: str, message: str) -> ModelsFileError:
    return ModelsFileError(f"{where}: {message}")


def _names(where: str, key: str, value: Any, allow_empty: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(where, f"'{key}' must be a list of names, got {value!r}")
    if not value and not allow_empty:
        raise _fail(where, f"'{key}' must not be empty")
    for v in value:
        if not IDENT.match(v):
            raise _fail(where, f"'{key}': {v!r} is not a plain SQL name")
    if len(set(value)) != len(value):
        raise _fail(where, f"'{key}' lists a name twice")
    return tuple(value)


def _index(where: str, i: int, raw: Any) -> Index:
    at = f"{where} indexes[{i}]"
    if not isinstance(raw, Mapping):
        raise _fail(at, "expected a mapping like {columns: [a], method: btree, unique: false}")
    unknown = set(raw) - INDEX_KEYS
    if unknown:
        raise _fail(at, f"unknown key '{sorted(unknown)[0]}' (allowed: {', '.join(sorted(INDEX_KEYS))})")
    if ("columns" in raw) == ("expression" in raw):
        raise _fail(at, "give either 'columns' or 'expression'")
    method = raw.get("method", "btree")
    if method not in INDEX_METHODS:
        raise _fail(at, f"'method' must be one of {', '.join(INDEX_METHODS)}, got {method!r}")
    unique = raw.get("unique", False)
    if not isinstance(unique, bool):
        raise _fail(at, f"'unique' must be true or false, got {unique!r}")
    if unique and method != "btree":
        raise _fail(at, "only a btree index can be unique")
    if "expression" in raw:
        return Index((), method, unique, _expression(at, raw["expression"]))
    return Index(_names(at, "columns", raw["columns"]), method, unique)


def _expression(at: str, text: Any) -> str:
    """One SQL expression (an index on it serves queries that filter on the same expression,
    e.g. an aggregate model's group computed from a column), checked and normalized by pglast."""
    if not isinstance(text, str) or not text.strip():
        raise _fail(at, "'expression' must be an SQL expression, e.g. \"(reported AT TIME ZONE 'UTC')::date\"")
    try:
        stmts = pglast.parse_sql(f"SELECT {text}")
    except pglast.parser.ParseError as exc:
        raise _fail(at, f"'expression' is not valid SQL: {exc}") from None
    select = stmts[0].stmt if len(stmts) == 1 else None
    if (not isinstance(select, ast.SelectStmt) or select.fromClause or select.whereClause
            or len(select.targetList or ()) != 1 or select.targetList[0].name):
        raise _fail(at, "'expression' must be one SQL expression")
    return RawStream()(select.targetList[0].val)


def _model(base: Path, i: int, raw: Any) -> ModelSpec:
    if not isinstance(raw, Mapping):
        raise _fail(f"models[{i}]", "expected a mapping with name, sql, kind, ...")
    name = raw.get("name")
    if not isinstance(name, str) or not IDENT.match(name):
        raise _fail(f"models[{i}]", f"'name' must be a plain SQL name, got {name!r}")
    where = f"model '{name}'"
    if name != name.lower():
        # Postgres folds unquoted names: `SELECT * FROM Bee` reads bee, never the model.
        raise _fail(where, f"'name' has capital letters, which SQL needs quoted everywhere: use {name.lower()!r}")
    unknown = set(raw) - MODEL_KEYS
    if unknown:
        raise _fail(where, f"unknown key '{sorted(unknown)[0]}' (allowed: {', '.join(sorted(MODEL_KEYS))})")
    if name in RESERVED or name.startswith(("chtsync_", "_yoyo")):
        raise _fail(where, "'name' is reserved for chtsync's own tables; choose another name")
    shorthand = forms.parse(where, raw)
    # A form / contact-type model is keyed by its report's or contact's document: incremental.
    kind = raw.get("kind", "incremental" if shorthand else None)
    if kind not in KINDS:
        raise _fail(where, f"'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    sql_path: Path | None = None
    if shorthand:
        text = forms.render(shorthand)
    else:
        sql_name = raw.get("sql")
        if not isinstance(sql_name, str) or not sql_name:
            raise _fail(where, "'sql' must name the model's .sql file (relative to models.yaml),"
                        " or give 'form' / 'contact_type' and 'fields'")
        sql_path = (base / sql_name).resolve()
        try:
            text = sql_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise _fail(where, f"'sql': cannot read {sql_path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise _fail(where, f"'sql': {sql_path} is not UTF-8 text: save it as UTF-8") from None
    unique_key = (_names(where, "unique_key", raw["unique_key"]) if "unique_key" in raw
                  else ("uuid",) if shorthand else ())
    strategy = of(kind)
    if strategy.keyed and not unique_key:
        raise _fail(where, f"'unique_key' is required for an {kind} model ({strategy.key_meaning})")
    reference_keys = (_names(where, "reference_keys", raw["reference_keys"])
                      if "reference_keys" in raw else ())
    if reference_keys and not strategy.by_document:
        raise _fail(where, "'reference_keys' applies to incremental models only")
    indexes = raw.get("indexes", forms.DEFAULT_INDEXES[shorthand.of] if shorthand and strategy.has_rows else [])
    if not isinstance(indexes, list):
        raise _fail(where, "'indexes' must be a list")
    if indexes and not strategy.has_rows:
        raise _fail(where, "'indexes': a view cannot have indexes (use materialized_view)")
    interval = raw.get("interval")
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, (int, float))
                                 or not 0 < interval < math.inf):  # also NaN
        raise _fail(where, f"'interval' must be a positive number of seconds, got {interval!r}")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise _fail(where, f"'enabled' must be true or false, got {enabled!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise _fail(where, "'description' must be text")
    return ModelSpec(
        name=name,
        kind=kind,
        sql_path=sql_path,
        sql=text,
        unique_key=unique_key,
        reference_keys=reference_keys,
        indexes=tuple(_index(where, j, ix) for j, ix in enumerate(indexes)),
        depends_on=None if raw.get("depends_on") is None
        else _names(where, "depends_on", raw["depends_on"], allow_empty=True),
        interval=None if interval is None else float(interval),
        tags=_names(where, "tags", raw["tags"], allow_empty=True) if "tags" in raw else (),
        enabled=enabled,
        description=description,
        tests=parse_tests(where, raw.get("tests", [])),
    )


def load_file(path: Path) -> list[ModelSpec]:
    """Every model of a models file, enabled or not, in file order."""
    data = yaml_file(path, "models file", "CHTSYNC_MODELS / pipeline.models", ModelsFileError)
    if not isinstance(data, Mapping) or set(data) != {"models"} or not isinstance(data["models"], list):
        raise ModelsFileError(f"models file {path}: expected one top-level key 'models' holding a list")
    specs = [_model(path.parent, i, raw) for i, raw in enumerate(data["models"])]
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ModelsFileError(f"model '{spec.name}': 'name' is used by two models in {path}")
        seen.add(spec.name)
    return specs
