"""Data tests declared per model in the models file: unique, not_null, accepted_values,
relationships, row_count, freshness and casts.

They run after a refresh that changed the model (refresh.py) and on `chtsync models test`;
each result replaces the previous one in chtsync_model_tests (migrations/0014), which status,
/metrics and the dbt_results records read. A failing test warns; with `severity: error` it
fails, and the model's dependants are not refreshed until it passes (docs/pipeline.md).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from chtsync import queries
from chtsync.config import IDENT, ConfigError
from chtsync.pipeline.indexes import index_name

if TYPE_CHECKING:
    from chtsync.pipeline.graph import Model, Pipeline

log = logging.getLogger("chtsync.pipeline")

KINDS = ("unique", "not_null", "accepted_values", "relationships", "row_count", "freshness", "casts")
NEEDS_COLUMN = {"unique", "not_null", "accepted_values", "relationships", "freshness"}
TEST_KEYS = {"test", "column", "name", "severity", "values", "to", "field", "min", "max", "max_age"}
DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*$")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class DataTest:
    kind: str
    name: str
    column: str | None = None
    severity: str = "warn"  # warn | error
    values: tuple[str, ...] = ()  # accepted_values
    to: str | None = None  # relationships: the other model ...
    field: str | None = None  # ... and its key column
    min: int | None = None  # row_count
    max: int | None = None  # row_count; casts (default 0)
    max_age: float | None = None  # freshness, seconds


@dataclass(frozen=True)
class TestResult:
    model: str
    name: str
    kind: str
    status: str  # pass | warn | fail | error
    failures: int | None
    message: str
    seconds: float

    @property
    def unique_id(self) -> str:
        return f"test.{self.model}.{self.name}"


def _count(at: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{at}: '{key}' must be a whole number >= 0, got {value!r}")
    return value


def _duration(at: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    m = DURATION.match(value) if isinstance(value, str) else None
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"{at}: 'max_age' must be seconds or a duration like 90m, 6h, 2d; got {value!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def _test(where: str, i: int, raw: Any) -> DataTest:
    at = f"{where} tests[{i}]"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{at}: expected a mapping like {{test: not_null, column: uuid}}")
    unknown = set(raw) - TEST_KEYS
    if unknown:
        raise ConfigError(f"{at}: unknown key '{sorted(unknown)[0]}' (allowed: {', '.join(sorted(TEST_KEYS))})")
    kind = raw.get("test")
    if kind not in KINDS:
        raise ConfigError(f"{at}: 'test' must be one of {', '.join(KINDS)}, got {kind!r}")
    column = raw.get("column")
    if column is not None and (not isinstance(column, str) or not IDENT.match(column)):
        raise ConfigError(f"{at}: 'column' must be a plain SQL name, got {column!r}")
    if kind in NEEDS_COLUMN and column is None:
        raise ConfigError(f"{at}: a {kind} test needs 'column'")
    if kind == "row_count" and column is not None:
        raise ConfigError(f"{at}: a row_count test has no 'column'")
    name = raw.get("name", f"{kind}_{column}" if column else kind)
    if not isinstance(name, str) or not IDENT.match(name):
        raise ConfigError(f"{at}: 'name' must be a plain SQL name, got {name!r}")
    severity = raw.get("severity", "warn")
    if severity not in ("warn", "error"):
        raise ConfigError(f"{at}: 'severity' must be warn or error, got {severity!r}")
    test = DataTest(kind, name, column, severity)
    allowed = {"accepted_values": {"values"}, "relationships": {"to", "field"}, "row_count": {"min", "max"},
               "freshness": {"max_age"}, "casts": {"max"}}.get(kind, set())
    extra = set(raw) & (TEST_KEYS - {"test", "column", "name", "severity"}) - allowed
    if extra:
        raise ConfigError(f"{at}: '{sorted(extra)[0]}' does not apply to a {kind} test")
    if kind == "accepted_values":
        values = raw.get("values")
        if (not isinstance(values, list) or not values
                or not all(isinstance(v, (str, int, float, bool)) for v in values)):
            raise ConfigError(f"{at}: 'values' must be a non-empty list of values")
        # As the column's text: YAML's true is the boolean column's 'true'.
        text = tuple(str(v).lower() if isinstance(v, bool) else str(v) for v in values)
        return DataTest(kind, name, column, severity, values=text)
    if kind == "relationships":
        to, field = raw.get("to"), raw.get("field")
        for key, v in (("to", to), ("field", field)):
            if not isinstance(v, str) or not IDENT.match(v):
                raise ConfigError(f"{at}: 'to' (the other model) and 'field' (its column) are required;"
                                  f" '{key}' got {v!r}")
        return DataTest(kind, name, column, severity, to=to, field=field)
    if kind == "row_count":
        if "min" not in raw and "max" not in raw:
            raise ConfigError(f"{at}: a row_count test needs 'min' and/or 'max'")
        lo = _count(at, "min", raw["min"]) if "min" in raw else None
        hi = _count(at, "max", raw["max"]) if "max" in raw else None
        if lo is not None and hi is not None and lo > hi:
            raise ConfigError(f"{at}: 'min' is above 'max'")
        return DataTest(kind, name, column, severity, min=lo, max=hi)
    if kind == "freshness":
        if "max_age" not in raw:
            raise ConfigError(f"{at}: a freshness test needs 'max_age' (seconds, or 90m, 6h, 2d)")
        return DataTest(kind, name, column, severity, max_age=_duration(at, raw["max_age"]))
    if kind == "casts":
        return DataTest(kind, name, column, severity, max=_count(at, "max", raw.get("max", 0)))
    return test


def parse_tests(where: str, raw: Any) -> tuple[DataTest, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: 'tests' must be a list of {{test: ..., column: ...}}")
    tests = tuple(_test(where, i, t) for i, t in enumerate(raw))
    names = [t.name for t in tests]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{where}: two tests are named '{name}'; give one a 'name'")
    return tests


def _failing(test: DataTest) -> tuple[sql.Composable, sql.Composable] | None:
    """(condition of a failing row, column to index) of a test that counts failing rows; None for
    the others."""
    if test.kind == "casts":  # its column is a field's name, in the array _cast_failures
        failing = (queries.compose("failing_casts_column", field=sql.Literal(test.column)) if test.column
                   else queries.compose("failing_casts"))
        return failing, sql.Identifier("_cast_failures")
    column = sql.Identifier(test.column or "")
    if test.kind == "not_null":
        return queries.compose("failing_not_null", column=column), column
    if test.kind == "accepted_values":
        values = sql.Literal(list(test.values))
        return queries.compose("failing_accepted_values", column=column, values=values), column
    return None


def _failing_indexes(conn: psycopg.Connection, model: Model) -> None:
    """Give each of the model's tests that count failing rows a partial index of those rows (and
    drop the ones of tests no longer declared), so that the test reads its failures, not the
    table: a model of 10M rows is tested in a millisecond. Created once (one scan of the table);
    Postgres keeps it. A condition Postgres cannot index (a cast to text that is not immutable)
    is counted by a scan instead."""
    row = conn.execute(queries.get("indexable"), (model.name,)).fetchone()
    if not row or not row[0]:  # a view, or not there
        return
    prefix = index_name(model.name, "t")
    wanted: dict[str, tuple[sql.Composable, sql.Composable]] = {}
    for test in model.spec.tests:
        failing = _failing(test)
        if failing is not None:
            digest = hashlib.sha1(failing[0].as_string(conn).encode()).hexdigest()[:5]
            wanted[f"{prefix}{digest}"] = failing
    have = {r[0] for r in conn.execute(queries.get("failing_indexes"), {"model": model.name, "prefix": prefix})}
    for name in sorted(have - set(wanted)):
        conn.execute(queries.compose("drop_failing_index", index=sql.Identifier(name)))
    for name in sorted(set(wanted) - have):
        failing, column = wanted[name]
        try:
            with conn.transaction():
                conn.execute(queries.compose("failing_index", index=sql.Identifier(name),
                                             model=sql.Identifier(model.name), column=column, failing=failing))
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                raise
            log.debug("data test index not created model=%s index=%s: %s", model.name, name, exc)


def _measure(conn: psycopg.Connection, model: Model, test: DataTest) -> tuple[int, str]:
    """(failures, message) of one test."""
    ident = {"model": sql.Identifier(model.name)}
    if test.column:
        ident["column"] = sql.Identifier(test.column)
    failing = _failing(test)
    if test.kind == "casts" and failing is not None:
        if "_cast_failures" not in _columns(conn, model.name):
            raise ConfigError("a casts test needs a form or contact-type model (its _cast_failures column)")
        name = "test_failing" if test.column else "test_failing_casts"
        failures = conn.execute(queries.compose(name, model=ident["model"], failing=failing[0])).fetchone()[0]
        allowed = test.max or 0
        what = f"field {test.column}" if test.column else "all fields"
        return (failures if failures > allowed else 0,
                f"{failures} value(s) did not cast ({what}; at most {allowed} allowed)")
    if test.kind == "row_count":
        rows = conn.execute(queries.compose("test_row_count", **ident)).fetchone()[0]
        bad = (test.min is not None and rows < test.min) or (test.max is not None and rows > test.max)
        bounds = f"[{'' if test.min is None else test.min}, {'' if test.max is None else test.max}]"
        return int(bad), f"{rows} row(s), expected within {bounds}"
    if test.kind == "freshness":
        age = conn.execute(queries.compose("test_freshness", **ident)).fetchone()[0]
        if age is None:
            return 1, f"no value in {test.column}"
        return int(age > (test.max_age or 0)), f"newest {test.column} is {age:.0f} s old (at most {test.max_age:.0f} s)"
    if test.kind == "relationships":
        ident |= {"to": sql.Identifier(test.to or ""), "field": sql.Identifier(test.field or "")}
        failures = conn.execute(queries.compose("test_relationships", **ident)).fetchone()[0]
        return failures, f"{failures} row(s) whose {test.column} is not a {test.to}.{test.field}"
    if failing is not None:
        failures = conn.execute(queries.compose("test_failing", model=ident["model"], failing=failing[0])).fetchone()[0]
    else:
        failures = conn.execute(queries.compose(f"test_{test.kind}", **ident)).fetchone()[0]
    what = {"unique": "value(s) held by more than one row", "not_null": "row(s) with a NULL",
            "accepted_values": "row(s) with another value"}[test.kind]
    return failures, f"{failures} {what} in {test.column}"


def _columns(conn: psycopg.Connection, relation: str) -> set[str]:
    return {r[0] for r in conn.execute(queries.get("model_columns"), (relation,))}


def run(conn: psycopg.Connection, pipeline: Pipeline, names: Iterable[str]) -> list[TestResult]:
    """Run the tests of these models (autocommit connection), record and return the results.
    A test that cannot run (a column that does not exist...) has status error, never raises."""
    if not conn.execute(queries.get("has_tests_table")).fetchone()[0]:
        return []
    models = [pipeline.models[n] for n in names if n in pipeline.models]
    results: list[TestResult] = []
    for model in models:
        _failing_indexes(conn, model)
        for test in model.spec.tests:
            started = time.monotonic()
            try:
                with conn.transaction():
                    failures, message = _measure(conn, model, test)
                status = "pass" if failures == 0 else "fail" if test.severity == "error" else "warn"
            except (psycopg.Error, ConfigError) as exc:
                if conn.broken or conn.closed:
                    raise
                failures, status = None, "error"
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            result = TestResult(model.name, test.name, test.kind, status, failures, message,
                                time.monotonic() - started)
            conn.execute(queries.get("record_test"), {
                "unique_id": result.unique_id, "model": model.name, "name": test.name, "test": test.kind,
                "column": test.column, "severity": test.severity, "status": status, "failures": failures,
                "message": message, "execution_time": result.seconds})
            if status != "pass":
                log.warning("data test %s model=%s test=%s %s", status, model.name, test.name, message)
            results.append(result)
    conn.execute(queries.get("forget_tests"), {
        "models": [m.name for m in models], "keep": [f"test.{m.name}.{t.name}" for m in models for t in m.spec.tests],
        "all_models": list(pipeline.models)})
    return results


def pending(conn: psycopg.Connection, pipeline: Pipeline) -> tuple[dict[str, str], set[str]]:
    """(model -> why it holds its dependants back: a declared test of severity error that failed
    at its last run; the models with a declared test that has no result yet)."""
    if not conn.execute(queries.get("has_tests_table")).fetchone()[0]:
        return {}, set()
    status = dict(conn.execute(queries.get("test_statuses")).fetchall())
    held: dict[str, str] = {}
    untested: set[str] = set()
    for model in pipeline.models.values():
        for test in model.spec.tests:
            got = status.get(f"test.{model.name}.{test.name}")
            if got is None:
                untested.add(model.name)
            elif got == "fail" and test.severity == "error" and model.name not in held:
                held[model.name] = f"failed data test {test.name}"
    return held, untested


def recorded(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Every recorded result, for status and /metrics."""
    if not conn.execute(queries.get("has_tests_table")).fetchone()[0]:
        return []
    cur = conn.execute(queries.get("model_tests"))
    cols = [d.name for d in cur.description or ()]
    return [dict(zip(cols, row, strict=True)) for row in cur]
