"""Model SQL checks and plan computation, without a server."""

from __future__ import annotations

from pathlib import Path

import pytest

from chtsync.config import load
from chtsync.errors import ModelsFileError
from chtsync.pipeline import graph
from chtsync.pipeline.apply import RELKIND, compute_plan
from chtsync.pipeline.graph import parse_select


@pytest.mark.parametrize(("body", "message"), [
    ("WITH d AS (DELETE FROM couchdb RETURNING _id) SELECT _id AS x FROM d", "holds DELETE"),
    ("WITH i AS (INSERT INTO t VALUES (1) RETURNING 1) SELECT 1 AS x", "holds INSERT"),
    ("SELECT * FROM (WITH u AS (UPDATE t SET a = 1 RETURNING a) SELECT a FROM u) AS s", "holds UPDATE"),
    ("SELECT EXISTS (WITH m AS (MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE) SELECT 1) AS x",
     "holds MERGE"),
    ("SELECT _id FROM couchdb FOR UPDATE", "must not lock rows"),
    ("SELECT _id FROM couchdb FOR KEY SHARE SKIP LOCKED", "must not lock rows"),
    ("SELECT * INTO t FROM couchdb", "not SELECT ... INTO"),
    ("SELECT setval('s', 1) AS x", "calls setval()"),
    ("SELECT pg_catalog.nextval('s') AS x", "calls nextval()"),
    ("SELECT dblink_exec('x', 'DROP TABLE t') AS x", "calls dblink_exec()"),
    ("DELETE FROM couchdb", "exactly one SELECT"),
    ("SELECT 1; SELECT 2", "exactly one SELECT"),
    ("SELEC 1", "not valid SQL"),
])
def test_model_sql_that_writes_is_refused(body: str, message: str) -> None:
    with pytest.raises(ModelsFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_select("model 'm'", body)


def test_read_only_sql_passes() -> None:
    parse_select("model 'm'", "WITH p AS (SELECT doc FROM couchdb) SELECT doc->>'name' AS name,"
                               " now() AS at, random() AS r FROM p ORDER BY 1 LIMIT 10")


def pipeline(tmp_path: Path, **bodies: str) -> graph.Pipeline:
    lines = ["models:"]
    for name, body in bodies.items():
        (tmp_path / f"{name}.sql").write_text(body)
        lines.append(f"  - {{name: {name}, kind: materialized_view, sql: {name}.sql}}")
    (tmp_path / "models.yaml").write_text("\n".join(lines) + "\n")
    return graph.load(load(env={"COUCHDB_HOST": "h", "CHTSYNC_MODELS": str(tmp_path / "models.yaml")},
                           search=False))


def recorded(p: graph.Pipeline) -> dict[str, tuple[str, str]]:
    return {m.name: (m.kind, m.hash) for m in p.models.values()}


def actions(plan) -> dict[str, tuple[str, str]]:
    return {s.name: (s.action, s.reason) for s in plan.steps}


def test_plan_from_records_and_relations(tmp_path: Path) -> None:
    p = pipeline(tmp_path, a="SELECT _id FROM couchdb", b="SELECT _id FROM a")
    rel = {name: RELKIND["materialized_view"] for name in p.models}
    assert actions(compute_plan(p, {}, {})) == {"a": ("create", "new"), "b": ("create", "new")}
    assert not compute_plan(p, recorded(p), rel).changed
    # a's SQL changes: a is replaced, and b, which reads it, is rebuilt.
    changed = pipeline(tmp_path, a="SELECT _id, doc FROM couchdb", b="SELECT _id FROM a")
    assert actions(compute_plan(changed, recorded(p), rel)) == {
        "a": ("replace", "definition changed"), "b": ("replace", "upstream a changed")}
    # Recorded but gone from the database: created again; dependents rebuilt.
    assert actions(compute_plan(p, recorded(p), {"b": "m"}))["a"] == (
        "create", "recorded but missing from the database")
    # An object chtsync did not create is a conflict, never silently replaced.
    plan = compute_plan(p, {}, {"a": "r"})
    assert plan.conflicts == ["a"] and plan.steps[0].drops
    # A model removed from the file is dropped only if the object is still chtsync's.
    only_a = pipeline(tmp_path, a="SELECT _id FROM couchdb")
    assert actions(compute_plan(only_a, recorded(p), rel))["b"] == ("drop", "removed from models")
    assert actions(compute_plan(only_a, recorded(p), {"a": "m", "b": "v"}))["b"][1].endswith(
        "only the record is dropped")
