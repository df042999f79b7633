"""Form and contact-type models declared in a few lines of YAML, rendered to one SELECT.

The SQL comes from the templates of queries/forms.sql, filled with psycopg.sql identifiers and
literals here and nowhere else; the result is an ordinary model (parsed, hashed, applied and
refreshed like a .sql one). `chtsync models sql NAME` prints it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from chtsync import queries
from chtsync.config import IDENT, ConfigError

# Field type -> the never-failing cast of migrations/0013 (None: text, kept as written).
CASTS: dict[str, str | None] = {
    "text": None,
    "integer": "chtsync_try_integer_v1",
    "numeric": "chtsync_try_numeric_v1",
    "boolean": "chtsync_try_boolean_v1",
    "date": "chtsync_try_date_v1",
    "timestamp": "chtsync_try_timestamp_v1",
    "array": "chtsync_try_array_v1",
}
FIELD_KEYS = {"path", "type"}
# The columns every form / contact-type model starts with; a field may not reuse them.
FORM_COLUMNS = ("uuid", "saved_timestamp", "reported", "form", "from_phone", "patient_id", "place_id",
                "contact_uuid", "parent_uuid", "grandparent_uuid", "source")
CONTACT_COLUMNS = ("uuid", "saved_timestamp", "reported", "parent_uuid", "name", "contact_type",
                   "active", "notes", "muted")
FAILURES_COLUMN = "_cast_failures"
# Indexes of a model that declares none: those CHT Pipeline's cht_form_model / cht_contact_model give.
DEFAULT_INDEXES: dict[str, list[dict[str, Any]]] = {
    "form": [{"columns": ["uuid"], "method": "hash"}, {"columns": ["saved_timestamp"]},
             {"columns": ["contact_uuid"]}, {"columns": ["parent_uuid"]}, {"columns": ["reported"]}],
    "contact_type": [{"columns": ["uuid"], "method": "hash"}, {"columns": ["saved_timestamp"]},
                     {"columns": ["parent_uuid"]}, {"columns": ["reported"]}, {"columns": ["name"]}],
}
SAMPLE_ROWS = 200_000  # `models fields` reads a sample of a raw table larger than this


@dataclass(frozen=True)
class Field:
    column: str
    path: tuple[str, ...]  # keys from the document's root, e.g. ('fields', 'group', 'lmp')
    type: str = "text"


@dataclass(frozen=True)
class Shorthand:
    """What a form or contact-type model declares."""

    of: str  # form | contact_type
    names: tuple[str, ...]  # the forms, or the contact types
    fields: tuple[Field, ...]


def _path(where: str, value: Any) -> tuple[str, ...]:
    parts = value.split(".") if isinstance(value, str) else value
    if not isinstance(parts, list | tuple) or not parts or not all(isinstance(p, str) and p for p in parts):
        raise ConfigError(f"{where}: 'path' must be a dotted path like fields.group.question"
                          f" (or a list of keys), got {value!r}")
    return tuple(parts)


def _field(where: str, column: Any, raw: Any, common: tuple[str, ...]) -> Field:
    if not isinstance(column, str) or not IDENT.match(column):
        raise ConfigError(f"{where}: field {column!r} is not a plain SQL name")
    at = f"{where} field '{column}'"
    if column in common or column == FAILURES_COLUMN:
        raise ConfigError(f"{at}: the model already has a column of that name; choose another")
    if raw is None:
        raw = {}
    elif isinstance(raw, str):  # `name: text` or `name: integer` (path fields.<name>)
        raw = {"type": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{at}: expected a type (text, integer, ...) or {{path: ..., type: ...}}")
    unknown = set(raw) - FIELD_KEYS
    if unknown:
        raise ConfigError(f"{at}: unknown key '{sorted(unknown)[0]}' (allowed: path, type)")
    type_ = raw.get("type", "text")
    if type_ not in CASTS:
        raise ConfigError(f"{at}: 'type' must be one of {', '.join(CASTS)}, got {type_!r}")
    return Field(column, _path(at, raw.get("path", f"fields.{column}")), type_)


def parse(where: str, raw: Mapping[str, Any]) -> Shorthand | None:
    """The form / contact-type part of a model entry, or None for a model with a .sql file."""
    keys = [k for k in ("form", "forms", "contact_type") if k in raw]
    if not keys:
        if "fields" in raw:
            raise ConfigError(f"{where}: 'fields' needs 'form', 'forms' or 'contact_type'")
        return None
    if len(keys) > 1:
        raise ConfigError(f"{where}: give one of 'form', 'forms' or 'contact_type', not {' and '.join(keys)}")
    if "sql" in raw:
        raise ConfigError(f"{where}: a model declared by '{keys[0]}' has no 'sql' file (its SQL is generated;"
                          " `chtsync models sql NAME` prints it)")
    value = raw[keys[0]]
    names = (value,) if isinstance(value, str) else value
    if (not isinstance(names, list | tuple) or not names
            or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names)):
        raise ConfigError(f"{where}: '{keys[0]}' must be a name or a list of distinct names, got {value!r}")
    of = "contact_type" if keys[0] == "contact_type" else "form"
    fields = raw.get("fields", {})
    if not isinstance(fields, Mapping):
        raise ConfigError(f"{where}: 'fields' must map column names to {{path: ..., type: ...}}")
    common = CONTACT_COLUMNS if of == "contact_type" else FORM_COLUMNS
    return Shorthand(of, tuple(names), tuple(_field(where, c, f, common) for c, f in fields.items()))


def _fragment(name: str, **parts: sql.Composable) -> sql.Composed:
    """A template that is part of an expression: its comment lines left out."""
    text = "\n".join(line for line in queries.get(name).splitlines() if not line.lstrip().startswith("--"))
    return sql.SQL(text.strip()).format(**parts)


def _value(field: Field) -> sql.Composable:
    path = sql.Literal(list(field.path))
    if field.type == "text":
        return _fragment("field_value_text", path=path)
    if field.type == "array":
        return _fragment("field_value_array", path=path)
    return _fragment("field_value_cast", cast=sql.Identifier(CASTS[field.type]), path=path)


def render(shorthand: Shorthand) -> str:
    """The model's SELECT, as SQL text (it names the raw table `couchdb`, like any model)."""
    columns = sql.SQL("").join(
        sql.SQL(",\n    ") + _fragment("field_column", value=_value(f), column=sql.Identifier(f.column))
        for f in shorthand.fields)
    failed = sql.SQL(",\n        ").join(
        _fragment("cast_failed", value=_value(f), path=sql.Literal(list(f.path)),
                        field=sql.Literal(f.column))
        for f in shorthand.fields if f.type != "text")
    template = "contact_type_model" if shorthand.of == "contact_type" else "form_model"
    composed = queries.compose(
        template, columns=columns, names=sql.SQL(", ").join(map(sql.Literal, shorthand.names)),
        failures=_fragment("cast_failures", failed=failed))
    return composed.as_string() + "\n"


@dataclass(frozen=True)
class SeenField:
    path: str  # dotted, from the document's root: fields.group.question
    types: str  # JSON types seen, e.g. "string" or "null, string"
    reports: int  # reports holding it


def discover(conn: psycopg.Connection, table: sql.Composable, table_name: str, form: str,
             max_rows: int = SAMPLE_ROWS) -> tuple[list[SeenField], int, float | None]:
    """The paths seen in a form's reports: (fields, reports read, sample percent or None).
    A raw table estimated above max_rows rows is read through TABLESAMPLE SYSTEM."""
    size = conn.execute(queries.get("raw_size"), (table_name,)).fetchone()[0]
    percent = round(100 * max_rows / size, 4) if size > max_rows else None
    sample = (sql.SQL("TABLESAMPLE SYSTEM ({})").format(sql.Literal(percent)) if percent
              else sql.SQL(""))
    rows = conn.execute(queries.compose("form_fields", table=table, sample=sample), {"form": form}).fetchall()
    total = rows[0][3] if rows else 0
    return [SeenField(p, t, n) for p, t, n, _ in rows], total, percent
