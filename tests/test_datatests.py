"""Data tests declared in the models file, on the real Postgres: each kind passes, then fails
after a write; results land in chtsync_model_tests (dbt_results-shaped), `status --json` and
/metrics; a failing test of severity error holds the model's dependants back until it passes;
`chtsync models test`; YAML errors."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from chtsync import cli, metrics, service, state
from chtsync import pipeline as engine
from chtsync.config import Config, ConfigError
from chtsync.pipeline import graph
from chtsync.pipeline.models import load_file
from tests.pipeline_helpers import Docs, ModelsFile

NOW = dt.datetime.now(dt.UTC).isoformat()
OLD = "2020-01-01T00:00:00Z"
R_SQL = ("SELECT _id AS uuid, doc ->> 'kind' AS kind, doc ->> 'ref' AS ref,"
         " (doc ->> 'when')::timestamptz AS at FROM couchdb WHERE NOT _deleted AND doc ->> 'type' = 'r'")
P_SQL = "SELECT _id AS uuid FROM couchdb WHERE NOT _deleted AND doc ->> 'type' = 'p'"


def r(doc_id: str, kind: str | None = "a", ref: str = "p1", when: str = NOW) -> dict[str, Any]:
    doc = {"_id": doc_id, "type": "r", "ref": ref, "when": when}
    return doc if kind is None else {**doc, "kind": kind}


def report(doc_id: str, x: str) -> dict[str, Any]:
    return {"_id": doc_id, "type": "data_record", "form": "f", "fields": {"x": x}}


def base(models: ModelsFile, docs: Docs, tests: dict[str, list[dict[str, Any]]]) -> None:
    models.set("p", P_SQL, kind="incremental", unique_key=["uuid"])
    models.set("r", R_SQL, kind="incremental", unique_key=["uuid"], tests=tests.get("r", []))
    models.models["f"] = {"name": "f", "form": "f", "fields": {"x": "integer"}, "tests": tests.get("f", [])}
    models.write()
    docs.put({"_id": "p1", "type": "p"}, r("r1", "a"), r("r2", "b"), report("f1", "5"))


# kind -> (declaration, the write that makes it fail, failures then)
CASES: dict[str, tuple[dict[str, Any], Callable[[Docs], None], int]] = {
    "unique": ({"test": "unique", "column": "kind"}, lambda d: d.put(r("r3", "a"), r("r4", "a")), 1),
    "not_null": ({"test": "not_null", "column": "kind"}, lambda d: d.put(r("r3", None), r("r4", None)), 2),
    "accepted_values": ({"test": "accepted_values", "column": "kind", "values": ["a", "b"]},
                        lambda d: d.put(r("r3", "c")), 1),
    "relationships": ({"test": "relationships", "column": "ref", "to": "p", "field": "uuid"},
                      lambda d: d.put(r("r3", ref="ghost")), 1),
    "row_count": ({"test": "row_count", "min": 1, "max": 2}, lambda d: d.put(r("r3")), 1),
    "freshness": ({"test": "freshness", "column": "at", "max_age": "1h"},
                  lambda d: d.put(r("r1", when=OLD), r("r2", when=OLD)), 1),
    "casts": ({"test": "casts"}, lambda d: d.put(report("f2", "five"), report("f3", "6.5")), 2),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_each_kind_passes_then_fails(kind: str, pg: psycopg.Connection, cfg: Config, models: ModelsFile,
                                     docs: Docs) -> None:
    declaration, break_it, failures = CASES[kind]
    model = "f" if kind == "casts" else "r"
    base(models, docs, {model: [declaration]})
    name = declaration.get("name") or (f"{kind}_{declaration['column']}" if "column" in declaration else kind)
    with psycopg.connect(pg.info.dsn, autocommit=True) as conn:
        conn.execute("SET search_path = v1")
        engine.apply(cfg, conn)
        engine.refresh_once(cfg, conn)  # nothing changed since apply: the new test runs anyway
        row = conn.execute("SELECT status, failures, test, severity FROM chtsync_model_tests WHERE unique_id = %s",
                           (f"test.{model}.{name}",)).fetchone()
        assert row == ("pass", 0, kind, "warn")
        break_it(docs)
        results = {x.name: x for x in engine.refresh_once(cfg, conn)}
        assert results[model].status == "ok"
        row = conn.execute("SELECT status, failures, message FROM chtsync_model_tests WHERE unique_id = %s",
                           (f"test.{model}.{name}",)).fetchone()
        assert row[:2] == ("warn", failures), row
        assert row[2]
        if kind == "casts":  # the rows are kept, with NULL, and say which field failed
            assert conn.execute("SELECT uuid, x, _cast_failures FROM f ORDER BY uuid").fetchall() == [
                ("f1", 5, None), ("f2", None, ["x"]), ("f3", None, ["x"])]


def test_results_in_status_metrics_and_dbt_shape_and_error_severity_blocks(
        pg: psycopg.Connection, cfg: Config, models: ModelsFile, docs: Docs,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    base(models, docs, {"r": [{"test": "not_null", "column": "kind", "severity": "error"},
                              {"test": "accepted_values", "column": "kind", "values": ["a", "b"]}],
                        "f": [{"test": "casts", "name": "x_casts"}]})
    models.set("downstream", "SELECT count(*) AS n FROM r", kind="table")
    with psycopg.connect(pg.info.dsn, autocommit=True) as conn:
        conn.execute("SET search_path = v1")
        engine.apply(cfg, conn)
        engine.refresh_once(cfg, conn)
        docs.put(r("r3", None), report("f2", "five"))
        results = {x.name: x for x in engine.refresh_once(cfg, conn)}
        assert results["r"].status == "ok", "the model itself is refreshed"
        assert results["downstream"].status == "blocked"
        assert results["downstream"].error == "not refreshed: upstream model r failed data test not_null_kind"
        assert conn.execute("SELECT n FROM downstream").fetchone() == (2,), "kept its previous data"
        # still held back in the next rounds, while r has nothing new
        docs.put({"_id": "unrelated", "type": "other"})
        assert {x.name: x.status for x in engine.refresh_once(cfg, conn)}["downstream"] == "blocked"

        records = conn.execute(
            "SELECT unique_id, name, status, failures, execution_time >= 0, message IS NOT NULL"
            " FROM chtsync_model_tests ORDER BY 1").fetchall()
        assert records == [
            ("test.f.x_casts", "x_casts", "warn", 1, True, True),
            ("test.r.accepted_values_kind", "accepted_values_kind", "pass", 0, True, True),
            ("test.r.not_null_kind", "not_null_kind", "fail", 1, True, True)]
        # dbt's shape: dbt_results (models, as CHT Watchdog reads them) + dbt_test_results (tests).
        assert conn.execute(
            "SELECT unique_id, name, resource_type, status, rows_affected FROM dbt_test_results ORDER BY 1"
        ).fetchall() == [("test.chtsync.f.x_casts", "f.x_casts", "test", "warn", 1),
                         ("test.chtsync.r.accepted_values_kind", "r.accepted_values_kind", "test", "pass", 0),
                         ("test.chtsync.r.not_null_kind", "r.not_null_kind", "test", "fail", 1)]
        assert conn.execute("SELECT count(*) FROM (SELECT * FROM dbt_results UNION ALL"
                            " SELECT * FROM dbt_test_results) AS u").fetchone()[0] > 3

        doc = state.gather(cfg, conn, counts=False)
        tests = {m["name"]: {t["name"]: (t["status"], t["failures"]) for t in m["tests"]} for m in doc["models"]}
        assert tests["r"] == {"not_null_kind": ("fail", 1), "accepted_values_kind": ("pass", 0)}
        assert tests["f"] == {"x_casts": ("warn", 1)}
        statuses = {m["name"]: (m["status"], m["error"]) for m in doc["models"]}
        assert statuses["downstream"] == ("blocked", "not refreshed: upstream model r failed data test not_null_kind")

        runtime = service.Runtime(cfg)
        metrics._read_models(runtime, set())
        registry = CollectorRegistry()
        registry.register(metrics.RuntimeCollector(runtime))
        text = generate_latest(registry).decode()
        assert 'chtsync_model_test_failures{model="r",test="not_null_kind"} 1.0' in text
        assert 'chtsync_model_test_failures{model="r",test="accepted_values_kind"} 0.0' in text
        assert 'chtsync_model_test_failures{model="f",test="x_casts"} 1.0' in text

        # `chtsync status --json` and `chtsync models test`
        for key, value in {"POSTGRES_HOST": cfg.postgres.host, "POSTGRES_PORT": str(cfg.postgres.port),
                           "POSTGRES_USER": cfg.postgres.user, "POSTGRES_DB": cfg.postgres.dbname,
                           "COUCHDB_URL": "http://127.0.0.1:9", "CHTSYNC_MODELS": str(models.path)}.items():
            monkeypatch.setenv(key, value or "")
        assert cli.main(["status", "--json"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert [t["unique_id"] for m in printed["models"] if m["name"] == "r" for t in m["tests"]] == [
            "test.r.accepted_values_kind", "test.r.not_null_kind"]
        monkeypatch.setenv("COLUMNS", "250")  # rich's table width
        assert cli.main(["status"]) == 0
        assert "1 pass, 1 fail: not_null_kind (1 row(s) with a NULL in kind)" in capsys.readouterr().out
        assert cli.main(["models", "test", "r"]) == 1
        out = capsys.readouterr().out
        assert "fail   r" in out and "1 pass, 0 warn, 1 fail, 0 error" in out

        # fixed: the test passes and the dependants catch up
        docs.put(r("r3", "a"))
        results = {x.name: x for x in engine.refresh_once(cfg, conn)}
        assert results["downstream"].status == "ok"
        assert conn.execute("SELECT n FROM downstream").fetchone() == (3,)
        assert cli.main(["models", "test"]) == 0
        assert "2 pass, 1 warn, 0 fail, 0 error" in capsys.readouterr().out

        # a test removed from the file is forgotten; one that cannot run is an error, not a crash
        models.models["r"]["tests"] = [{"test": "not_null", "column": "no_such_column"}]
        models.write()
        results = engine.refresh_once(cfg, conn)
        assert cli.main(["models", "test", "r"]) == 1
        rows = conn.execute("SELECT name, status, message FROM chtsync_model_tests WHERE model = 'r'").fetchall()
        assert [(n, s) for n, s, _m in rows] == [("not_null_no_such_column", "error")]
        assert "no_such_column" in rows[0][2]


@pytest.mark.parametrize(("test", "message"), [
    ({"test": "uniq", "column": "x"}, "'test' must be one of unique, not_null"),
    ({"test": "unique"}, "a unique test needs 'column'"),
    ({"test": "row_count"}, "needs 'min' and/or 'max'"),
    ({"test": "row_count", "min": 3, "max": 1}, "'min' is above 'max'"),
    ({"test": "accepted_values", "column": "x"}, "'values' must be a non-empty list"),
    ({"test": "relationships", "column": "x", "to": "p"}, "'field' got None"),
    ({"test": "freshness", "column": "x", "max_age": "soon"}, "'max_age' must be seconds or a duration"),
    ({"test": "not_null", "column": "x", "severity": "fatal"}, "'severity' must be warn or error"),
    ({"test": "not_null", "column": "x", "values": ["a"]}, "'values' does not apply to a not_null test"),
    ({"test": "not_null", "column": "x", "colour": 1}, "unknown key 'colour'"),
])
def test_data_test_errors(tmp_path: Path, test: dict[str, Any], message: str) -> None:
    (tmp_path / "m.sql").write_text("SELECT 1 AS x")
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "m", "sql": "m.sql", "kind": "table", "tests": [test]}]}))
    with pytest.raises(ConfigError, match=rf"model 'm' tests\[0\]: .*{message}"):
        load_file(path)


def test_two_tests_of_one_name(tmp_path: Path) -> None:
    (tmp_path / "m.sql").write_text("SELECT 1 AS x")
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "m", "sql": "m.sql", "kind": "table", "tests": [
        {"test": "not_null", "column": "x"}, {"test": "not_null", "column": "x", "severity": "error"}]}]}))
    with pytest.raises(ConfigError, match="two tests are named 'not_null_x'; give one a 'name'"):
        load_file(path)


def test_tests_rerun_when_rows_or_what_they_point_to_change(
        pg: psycopg.Connection, cfg: Config, models: ModelsFile, docs: Docs) -> None:
    """A round that changes none of a model's rows leaves its results as they are (testing costs
    a scan); its rows changing, or the model its relationships point to, runs them again."""
    base(models, docs, {"r": [{"test": "relationships", "column": "ref", "to": "p", "field": "uuid"},
                              {"test": "accepted_values", "column": "kind", "values": ["a", "b"]}]})
    with psycopg.connect(pg.info.dsn, autocommit=True) as conn:
        conn.execute("SET search_path = v1")
        engine.apply(cfg, conn)
        engine.refresh_once(cfg, conn)

        def runs() -> dict[str, tuple[Any, str]]:
            return {n: (at, status) for n, at, status in conn.execute(
                "SELECT name, run_at, status FROM chtsync_model_tests WHERE model = 'r'")}

        first = runs()
        assert {n: s for n, (_, s) in first.items()} == {"relationships_ref": "pass",
                                                           "accepted_values_kind": "pass"}
        docs.put({"_id": "unrelated", "type": "other"})  # r and p re-run, no row changes
        assert {x.name: x.status for x in engine.refresh_once(cfg, conn)}["r"] == "ok"
        assert runs() == first
        docs.delete("p1")  # p loses the row r points to: r's rows are the same, its test is not
        engine.refresh_once(cfg, conn)
        after = runs()
        assert after["relationships_ref"][1] == "warn" and after["relationships_ref"][0] > first["relationships_ref"][0]
        docs.put(r("r3", "c"))  # r's own rows change: its tests run
        engine.refresh_once(cfg, conn)
        assert runs()["accepted_values_kind"][1] == "warn"


def test_counting_tests_read_their_failing_rows_only(
        pg: psycopg.Connection, cfg: Config, models: ModelsFile, docs: Docs) -> None:
    """not_null, accepted_values and casts keep a partial index of their failing rows, so a test
    reads its failures, not the table; changed or removed tests lose theirs; a condition Postgres
    cannot index (timestamptz as text depends on the session) is counted by a scan, as exactly."""
    tests = {"r": [{"test": "not_null", "column": "kind"},
                   {"test": "accepted_values", "column": "kind", "values": ["a", "b"]},
                   {"test": "accepted_values", "column": "at", "values": ["2026-01-01"], "name": "at_values"}],
             "f": [{"test": "casts"}, {"test": "casts", "column": "x", "name": "x_casts"}]}
    base(models, docs, tests)
    docs.put(*(r(f"ok{i}", "a") for i in range(3000)), r("bad1", "c"), r("bad2", None),
             report("f2", "five"))
    with psycopg.connect(pg.info.dsn, autocommit=True) as conn:
        conn.execute("SET search_path = v1")
        engine.apply(cfg, conn)
        engine.refresh_once(cfg, conn)

        def indexes(model: str) -> dict[str, str]:
            return {name: pred for name, pred in conn.execute(
                "SELECT i.relname, pg_get_expr(x.indpred, x.indrelid) FROM pg_index AS x"
                " JOIN pg_class AS i ON i.oid = x.indexrelid WHERE x.indrelid = %s::regclass"
                " AND x.indpred IS NOT NULL", (model,))}

        def results(model: str) -> dict[str, tuple[str, int]]:
            return {n: (s, f) for n, s, f in conn.execute(
                "SELECT name, status, failures FROM chtsync_model_tests WHERE model = %s", (model,))}

        assert results("r") == {"not_null_kind": ("warn", 1), "accepted_values_kind": ("warn", 1),
                                "at_values": ("warn", 3004)}
        assert results("f") == {"casts": ("warn", 1), "x_casts": ("warn", 1)}
        preds = sorted(indexes("r").values())
        assert len(preds) == 2 and "kind IS NULL" in preds[1] and "'{a,b}'" in preds[0], preds  # not `at`
        assert all(n.startswith("r_t") for n in indexes("r"))
        assert len(indexes("f")) == 2
        # the counts read the index, a handful of rows, not the table's 3,000
        for pred in preds:
            plan = "\n".join(row[0] for row in conn.execute(f"EXPLAIN SELECT count(*) FROM r WHERE {pred}"))
            assert "Index" in plan and "Seq Scan" not in plan, plan
        before = dict(indexes("r"))
        hostile = "O'Brien\\\"}'); DROP TABLE r; --"  # a value of the index predicate, as a literal
        tests["r"] = [{"test": "accepted_values", "column": "kind", "values": ["a", "b", "c", hostile, ""]}]
        base(models, docs, tests)  # one test changed its values, the other is gone
        engine.apply(cfg, conn)
        engine.refresh_once(cfg, conn, force=True)
        after = indexes("r")
        assert len(after) == 1 and not set(after) & set(before)
        docs.put(r("hostile", hostile), r("empty", ""))
        engine.refresh_once(cfg, conn)
        assert results("r") == {"accepted_values_kind": ("pass", 0)}
        docs.put(r("bad3", "d"))
        engine.refresh_once(cfg, conn)
        assert results("r") == {"accepted_values_kind": ("warn", 1)}


def test_a_relationship_to_a_missing_model(tmp_path: Path) -> None:
    """Found with the rest of the file, before `models apply` writes anything."""
    (tmp_path / "m.sql").write_text("SELECT 1 AS x")
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "m", "sql": "m.sql", "kind": "table", "tests": [
        {"test": "relationships", "column": "x", "to": "nosuch", "field": "uuid"}]}]}))
    with pytest.raises(ConfigError, match="model 'm' test 'relationships_x': 'to' names 'nosuch', which is neither"):
        graph.build(load_file(path))
