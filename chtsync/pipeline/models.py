"""Reading models.yaml: every model checked strictly, every problem one ConfigError naming it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from chtsync.config import IDENT, ConfigError
from chtsync.pipeline import forms
from chtsync.pipeline.datatests import DataTest, parse_tests

KINDS = ("view", "materialized_view", "table", "incremental")
INDEX_METHODS = ("btree", "hash", "gin", "gist", "brin")
MODEL_KEYS = {
    "name", "sql", "kind", "unique_key", "indexes", "depends_on", "interval", "tags", "enabled",
    "description", "form", "forms", "contact_type", "fields", "tests",
}
INDEX_KEYS = {"columns", "method", "unique"}
RAW = "couchdb"  # how model SQL names the raw table, whatever POSTGRES_TABLE is
# Names of chtsync's own tables: a model of that name would replace them.
RESERVED = {RAW, "couchdb_progress", "chtsync_errors", "chtsync_sources", "chtsync_models",
            "chtsync_model_tests"}


@dataclass(frozen=True)
class Index:
    columns: tuple[str, ...]
    method: str = "btree"
    unique: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """One entry of models.yaml, as written (dependencies not yet resolved)."""

    name: str
    kind: str
    sql_path: Path | None  # None: generated from form / contact_type (forms.py)
    sql: str
    unique_key: tuple[str, ...] = ()
    indexes: tuple[Index, ...] = ()
    depends_on: tuple[str, ...] | None = None  # None: infer from the SQL
    interval: float | None = None
    tags: tuple[str, ...] = ()
    enabled: bool = True
    description: str = ""
    tests: tuple[DataTest, ...] = ()


def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}")


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
    if "columns" not in raw:
        raise _fail(at, "'columns' is required")
    method = raw.get("method", "btree")
    if method not in INDEX_METHODS:
        raise _fail(at, f"'method' must be one of {', '.join(INDEX_METHODS)}, got {method!r}")
    unique = raw.get("unique", False)
    if not isinstance(unique, bool):
        raise _fail(at, f"'unique' must be true or false, got {unique!r}")
    if unique and method != "btree":
        raise _fail(at, "only a btree index can be unique")
    return Index(_names(at, "columns", raw["columns"]), method, unique)


def _model(base: Path, i: int, raw: Any) -> ModelSpec:
    if not isinstance(raw, Mapping):
        raise _fail(f"models[{i}]", "expected a mapping with name, sql, kind, ...")
    name = raw.get("name")
    if not isinstance(name, str) or not IDENT.match(name):
        raise _fail(f"models[{i}]", f"'name' must be a plain SQL name, got {name!r}")
    where = f"model '{name}'"
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
            text = sql_path.read_text()
        except OSError as exc:
            raise _fail(where, f"'sql': cannot read {sql_path}: {exc.strerror}") from None
    unique_key = (_names(where, "unique_key", raw["unique_key"]) if "unique_key" in raw
                  else ("uuid",) if shorthand else ())
    if kind == "incremental" and not unique_key:
        raise _fail(where, "'unique_key' is required for an incremental model (first column = document _id)")
    indexes = raw.get("indexes", forms.DEFAULT_INDEXES[shorthand.of] if shorthand and kind != "view" else [])
    if not isinstance(indexes, list):
        raise _fail(where, "'indexes' must be a list")
    if indexes and kind == "view":
        raise _fail(where, "'indexes': a view cannot have indexes (use materialized_view)")
    interval = raw.get("interval")
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, (int, float))
                                 or interval <= 0):
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
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"models file {path} not found: check CHTSYNC_MODELS / pipeline.models") from None
    except OSError as exc:
        raise ConfigError(f"models file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"models file {path}{where}: not valid YAML") from None
    if not isinstance(data, Mapping) or set(data) != {"models"} or not isinstance(data["models"], list):
        raise ConfigError(f"models file {path}: expected one top-level key 'models' holding a list")
    specs = [_model(path.parent, i, raw) for i, raw in enumerate(data["models"])]
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(f"model '{spec.name}': 'name' is used by two models in {path}")
        seen.add(spec.name)
    return specs
