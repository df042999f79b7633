"""The pipeline engine on the real Postgres: models.yaml checks, dependency order, plan/apply
(create, replace, drop, atomicity, object identity, adoption), refresh (skip when unchanged,
failures, concurrent readers), incremental tables, the CLI and the service loop."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql

from chtsync import cli, db, migrate, pipeline
from chtsync.config import Config, ConfigError
from chtsync.errors import ModelBuildError, PlanConflict
from chtsync.pipeline import graph
from chtsync.pipeline.models import load_file
from tests.conftest import make_config
from tests.pipeline_helpers import Docs, ModelsFile
from tests.syncutil import wait_until

# --- helpers (the property test uses them too) -----------------------------------------------


def oids(conn: psycopg.Connection, *names: str) -> dict[str, int | None]:
    return {n: conn.execute("SELECT to_regclass(%s)::oid", (f"v1.{n}",)).fetchone()[0] for n in names}


def records(conn: psycopg.Connection) -> dict[str, dict[str, Any]]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return {r["name"]: r for r in cur.execute("SELECT * FROM chtsync_models")}


def diff_with_rebuild(conn: psycopg.Connection, model: graph.Model) -> int:
    """Rows that differ between the model's table and a full recomputation of its SQL."""
    name, body = sql.Identifier(model.name), sql.SQL(model.sql)
    return conn.execute(sql.SQL(
        "SELECT count(*) FROM ((TABLE {} EXCEPT ALL ({})) UNION ALL (({}) EXCEPT ALL TABLE {})) AS d"
    ).format(name, body, body, name)).fetchone()[0]


def by_name(results: list[pipeline.RefreshResult]) -> dict[str, pipeline.RefreshResult]:
    return {r.name: r for r in results}


def build(cfg: Config, conn: psycopg.Connection) -> None:
    """apply, then the first refresh: it fills the incremental models apply created empty."""
    pipeline.apply(cfg, conn)
    pipeline.refresh_once(cfg, conn)


# --- models.yaml and the graph (no database) ------------------------------------------------


def order_of(models: ModelsFile, table: str = "couchdb") -> list[str]:
    return list(graph.build(load_file(models.path), table).models)


def test_order_from_inferred_and_explicit_dependencies(models: ModelsFile) -> None:
    models.set("c", "SELECT * FROM b JOIN a USING (x)")
    models.set("b", "WITH a AS (SELECT 1 AS x) SELECT x FROM a")  # a CTE, not the model a
    models.set("a", "SELECT _id AS x FROM couchdb")
    models.set("d", "SELECT 1 AS y FROM pg_catalog.pg_class LIMIT 1", depends_on=["c"])
    order = order_of(models)
    assert order.index("a") < order.index("c") and order.index("b") < order.index("c") < order.index("d")
    built = graph.build(load_file(models.path))
    assert built.models["b"].deps == () and not built.models["b"].raw
    assert built.models["a"].raw and built.models["d"].external
    assert built.models["c"].deps == ("b", "a")


@pytest.mark.parametrize(("files", "message"), [
    ({"a": "SELECT * FROM b", "b": "SELECT * FROM c", "c": "SELECT * FROM a"}, "cycle: "),
    ({"a": "SELECT * FROM nowhere"}, "model 'a': the SQL reads 'nowhere', which is neither a model"),
    ({"a": "SELECT * FROM a"}, "reads the model itself"),
    ({"a": "SELECT 1; SELECT 2"}, "exactly one SELECT"),
    ({"a": "SELEC 1"}, "model 'a': 'sql' is not valid SQL"),
    ({"a": "DELETE FROM couchdb"}, "exactly one SELECT"),
])
def test_graph_errors(models: ModelsFile, files: dict[str, str], message: str) -> None:
    for name, body in files.items():
        models.set(name, body)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as err:
        order_of(models)
    if message == "cycle: ":
        assert all(n in str(err.value) for n in "abc")


def test_unknown_explicit_dependency_and_disabled_model(models: ModelsFile) -> None:
    models.set("a", "SELECT 1 AS x", depends_on=["ghost"])
    with pytest.raises(ConfigError, match="model 'a': 'depends_on' names 'ghost'"):
        order_of(models)
    models.set("a", "SELECT * FROM b")
    models.set("b", "SELECT 1 AS x", enabled=False)
    with pytest.raises(ConfigError, match="'b', which is disabled"):
        order_of(models)


@pytest.mark.parametrize(("props", "message"), [
    ({"kind": "table", "colour": "red"}, "model 'm': unknown key 'colour'"),
    ({"kind": "mview"}, "model 'm': 'kind' must be one of"),
    ({"kind": "incremental"}, "model 'm': 'unique_key' is required"),
    ({"kind": "table", "sql": "missing.sql"}, "model 'm': 'sql': cannot read"),
    ({"kind": "table", "indexes": [{"columns": ["x"], "method": "rtree"}]}, r"model 'm' indexes\[0\]: 'method'"),
    ({"kind": "table", "indexes": [{"cols": ["x"]}]}, r"indexes\[0\]: unknown key 'cols'"),
    ({"kind": "view", "indexes": [{"columns": ["x"]}]}, "a view cannot have indexes"),
    ({"kind": "table", "interval": "often"}, "'interval' must be a positive number"),
    ({"kind": "table", "interval": float("nan")}, "'interval' must be a positive number"),
    ({"kind": "table", "interval": float("inf")}, "'interval' must be a positive number"),
    ({"kind": "table", "name": "Bee"}, "model 'Bee': 'name' has capital letters.*use 'bee'"),
    ({"kind": "table", "depends_on": "a"}, "'depends_on' must be a list"),
    ({"kind": "table", "name": "chtsync_models"}, "reserved"),
])
def test_models_file_errors(models: ModelsFile, props: dict[str, Any], message: str) -> None:
    models.set("m", "SELECT 1 AS x")
    models.models["m"].update(props)
    models.write()
    with pytest.raises(ConfigError, match=message):
        load_file(models.path)


def test_duplicate_names_and_file_shape(models: ModelsFile) -> None:
    models.set("m", "SELECT 1 AS x")
    models.path.write_text(yaml.safe_dump({"models": [models.models["m"], models.models["m"]]}))
    with pytest.raises(ConfigError, match="model 'm': 'name' is used by two models"):
        load_file(models.path)
    models.path.write_text("model:\n  - name: m\n")
    with pytest.raises(ConfigError, match="top-level key 'models'"):
        load_file(models.path)


def test_definition_hash_cascades_and_ignores_formatting(models: ModelsFile) -> None:
    models.set("a", "SELECT _id FROM couchdb")
    models.set("b", "SELECT * FROM a", kind="materialized_view")
    models.set("c", "SELECT 1 AS one", tags=["x"])
    before = {n: m.hash for n, m in graph.build(load_file(models.path)).models.items()}
    models.set("a", "-- a comment\nselect   _id\n  from couchdb")
    models.set("c", "SELECT 1 AS one", tags=["y"], interval=60, description="changed")
    assert {n: m.hash for n, m in graph.build(load_file(models.path)).models.items()} == before
    models.set("a", "SELECT _id, _rev FROM couchdb")
    after = {n: m.hash for n, m in graph.build(load_file(models.path)).models.items()}
    assert after["a"] != before["a"] and after["b"] != before["b"] and after["c"] == before["c"]


# --- plan / apply ---------------------------------------------------------------------------


def base_models(models: ModelsFile) -> None:
    models.set("live", "SELECT _id, doc ->> 'type' AS type FROM couchdb WHERE NOT _deleted")
    models.set("by_type", "SELECT type, count(*) AS n FROM live GROUP BY type", kind="materialized_view",
               indexes=[{"columns": ["type"], "unique": True}])
    models.set("snapshot", "SELECT _id, _rev FROM couchdb", kind="table",
               indexes=[{"columns": ["_id"], "method": "hash"}])
    models.set("person", "SELECT _id AS uuid, doc ->> 'name' AS name FROM couchdb"
               " WHERE NOT _deleted AND doc ->> 'type' = 'person'", kind="incremental", unique_key=["uuid"])


def test_rounds_during_the_initial_sync_leave_first_builds_for_its_end(
        pg: psycopg.Connection, cfg: Config, models: ModelsFile, docs: Docs) -> None:
    """A round forced during the initial sync (first_builds=False) refreshes models already built
    and leaves a model never built, and the models reading it, for after the sync: built then
    once from the whole raw table, instead of half now and the rest caught up by id."""
    docs.put({"_id": "p1", "type": "person", "name": "Ann"}, {"_id": "x1", "type": "clinic"})
    base_models(models)
    models.set("names", "SELECT name, count(*) AS n FROM person GROUP BY name", kind="aggregate",
               unique_key=["name"])
    pipeline.apply(cfg, pg)
    docs.put({"_id": "p2", "type": "person", "name": "Bob"})
    results = by_name(pipeline.refresh_once(cfg, pg, first_builds=False))
    assert (results["person"].status, results["names"].status) == ("waiting", "waiting")
    assert results["snapshot"].status == "ok" and results["snapshot"].rows == 3  # built at apply
    assert records(pg)["person"]["snapshot"] is None and pg.execute("SELECT count(*) FROM person").fetchone() == (0,)
    results = by_name(pipeline.refresh_once(cfg, pg))  # the sync is done
    assert (results["person"].status, results["person"].rows, results["person"].changed) == ("ok", 2, None)
    assert pg.execute("SELECT name, n FROM names ORDER BY name").fetchall() == [("Ann", 1), ("Bob", 1)]
    docs.put({"_id": "p3", "type": "person", "name": "Bob"})
    results = by_name(pipeline.refresh_once(cfg, pg, first_builds=False))  # built: refreshed as usual
    assert (results["person"].changed, results["names"].status) == (1, "ok")
    assert pg.execute("SELECT n FROM names WHERE name = 'Bob'").fetchone() == (2,)


def test_plan_apply_create_replace_drop(pg: psycopg.Connection, cfg: Config, models: ModelsFile,
                                         docs: Docs) -> None:
    docs.put({"_id": "p1", "type": "person", "name": "Ann"}, {"_id": "x1", "type": "clinic"})
    base_models(models)
    plan = pipeline.plan(cfg, pg)
    assert [(s.name, s.action) for s in plan.steps] == [
        ("live", "create"), ("snapshot", "create"), ("person", "create"), ("by_type", "create")]
    assert pipeline.apply(cfg, pg).changed
    assert pg.execute("SELECT * FROM by_type ORDER BY type").fetchall() == [("clinic", 1), ("person", 1)]
    # An incremental model is created empty, then built by the refresh (in batches).
    assert pg.execute("SELECT uuid, name FROM person").fetchall() == []
    assert pg.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'person'").fetchall() != []
    rec = records(pg)
    assert rec["person"]["last_status"] == "created" and rec["person"]["snapshot"] is None
    assert rec["snapshot"]["last_rows"] == 2 and rec["live"]["last_rows"] is None
    assert by_name(pipeline.refresh_once(cfg, pg))["person"].rows == 1
    assert pg.execute("SELECT uuid, name FROM person").fetchall() == [("p1", "Ann")]
    rec = records(pg)

    # Nothing changed: nothing touched.
    first = oids(pg, "live", "by_type", "snapshot", "person")
    assert not pipeline.apply(cfg, pg).changed
    assert records(pg)["person"]["created_at"] == rec["person"]["created_at"]

    # A changed model is replaced with everything downstream; the others keep their identity.
    models.set("live", "SELECT _id, doc ->> 'type' AS type FROM couchdb")
    models.remove("snapshot")
    plan = pipeline.plan(cfg, pg)
    assert {s.name: s.action for s in plan.steps} == {
        "live": "replace", "by_type": "replace", "person": "unchanged", "snapshot": "drop"}
    assert "upstream live" in next(s.reason for s in plan.steps if s.name == "by_type")
    pipeline.apply(cfg, pg)
    second = oids(pg, "live", "by_type", "snapshot", "person")
    assert second["person"] == first["person"]
    assert second["live"] != first["live"] and second["by_type"] != first["by_type"]
    assert second["snapshot"] is None and "snapshot" not in records(pg)


def test_apply_is_atomic(pg: psycopg.Connection, cfg: Config, models: ModelsFile, docs: Docs) -> None:
    docs.put({"_id": "p1", "type": "person", "name": "Ann"})
    base_models(models)
    pipeline.apply(cfg, pg)
    before, recorded = oids(pg, "live", "by_type", "snapshot", "person"), records(pg)
    models.set("live", "SELECT _id FROM couchdb")  # by_type's GROUP BY type now fails
    models.set("extra", "SELECT 1 AS x", kind="table")
    with pytest.raises(ModelBuildError, match="model 'by_type': column \"type\" does not exist"):
        pipeline.apply(cfg, pg)
    assert oids(pg, "live", "by_type", "snapshot", "person", "extra") == {**before, "extra": None}
    assert records(pg) == recorded
    assert pg.execute("SELECT type FROM live").fetchall() == [("person",)]


def test_foreign_objects_are_refused_then_adopted(pg: psycopg.Connection, cfg: Config, models: ModelsFile,
                                                   docs: Docs) -> None:
    docs.put({"_id": "p1", "type": "person", "name": "Ann"})
    # As CHT Sync's dbt leaves it: a table of a model's name, with a dashboard view on it.
    pg.execute("CREATE TABLE person AS SELECT 'old'::varchar AS uuid, 'Old'::text AS name")
    pg.execute("CREATE SCHEMA dash")
    pg.execute("CREATE VIEW dash.people AS SELECT uuid, name FROM v1.person")
    pg.execute("GRANT SELECT ON dash.people TO PUBLIC")
    base_models(models)
    plan = pipeline.plan(cfg, pg)
    assert plan.conflicts == ["person"]
    with pytest.raises(PlanConflict, match=r"not created by chtsync.*: person.*--adopt"):
        pipeline.apply(cfg, pg)
    assert oids(pg, "live")["live"] is None  # nothing was done
    pipeline.apply(cfg, pg, adopt=True)
    pipeline.refresh_once(cfg, pg)
    assert pg.execute("SELECT * FROM dash.people").fetchall() == [("p1", "Ann")]
    assert pg.execute("SELECT has_table_privilege('public', 'dash.people', 'SELECT')").fetchone() == (True,)
    assert records(pg)["person"]["kind"] == "incremental"
    # Owned now: a change replaces it, the dashboard view is carried over again.
    models.set("person", "SELECT _id AS uuid, upper(doc ->> 'name') AS name FROM couchdb"
               " WHERE doc ->> 'type' = 'person'", kind="incremental", unique_key=["uuid"])
    assert pipeline.plan(cfg, pg).conflicts == []
    build(cfg, pg)
    assert pg.execute("SELECT * FROM dash.people").fetchall() == [("p1", "ANN")]
    # A view that cannot survive the change stops the apply with its name.
    models.set("person", "SELECT _id AS uuid FROM couchdb", kind="incremental", unique_key=["uuid"])
    with pytest.raises(ModelBuildError, match=r"cannot recreate dash\.people"):
        pipeline.apply(cfg, pg)


def test_other_schema_and_raw_table_name(pg: psycopg.Connection, dbname: str, models: ModelsFile) -> None:
    cfg = make_config(dbname, POSTGRES_SCHEMA="alt", POSTGRES_TABLE="docs", CHTSYNC_MODELS=str(models.path))
    migrate.apply(cfg)
    Docs(pg, "alt.docs").put({"_id": "p1", "type": "person", "name": "Ann"})
    models.set("names", "SELECT couchdb._id, c.doc ->> 'name' AS name FROM couchdb"
               " JOIN couchdb AS c USING (_id)", kind="materialized_view")
    with db.connect(cfg) as conn:
        pipeline.apply(cfg, conn)
        assert conn.execute("SELECT * FROM alt.names").fetchall() == [("p1", "Ann")]
        conn.commit()
        assert pipeline.refresh_once(cfg, conn, force=True)[0].status == "ok"
    assert oids(pg, "names")["names"] is None  # nothing in v1


# --- refresh --------------------------------------------------------------------------------


def test_refresh_skips_unchanged_models(pg: psycopg.Connection, cfg: Config, models: ModelsFile,
                                        docs: Docs) -> None:
    docs.put({"_id": "p1", "type": "person", "name": "Ann"})
    base_models(models)
    models.set("names", "SELECT count(*) AS n FROM person", kind="materialized_view")  # over a table
    models.set("hourly", "SELECT count(*) AS n FROM couchdb", kind="materialized_view", interval=3600)
    build(cfg, pg)
    created = records(pg)
    results = by_name(pipeline.refresh_once(cfg, pg))
    assert {r.status for n, r in results.items() if n != "hourly"} == {"skipped"}
    assert results["hourly"].status == "waiting"
    assert "live" not in results  # views are always live
    assert records(pg) == created  # an idle refresh writes nothing

    docs.put({"_id": "p2", "type": "person", "name": "Bob"})
    results = by_name(pipeline.refresh_once(cfg, pg))
    assert {n: r.status for n, r in results.items()} == {
        "snapshot": "ok", "person": "ok", "by_type": "ok", "names": "ok", "hourly": "waiting"}
    assert results["person"].changed == 1 and results["person"].rows == 2
    after = records(pg)
    assert after["names"]["last_refresh_at"] > created["names"]["last_refresh_at"]
    assert after["names"]["last_rows"] == 1 and after["person"]["last_status"] == "ok"
    assert pg.execute("SELECT n FROM names").fetchone() == (2,)
    assert pg.execute("SELECT n FROM by_type").fetchone() == (2,)

    # Again with nothing new: all skipped, records unchanged.
    assert {r.status for r in pipeline.refresh_once(cfg, pg) if r.name != "hourly"} == {"skipped"}
    assert records(pg) == after
    forced = by_name(pipeline.refresh_once(cfg, pg, force=True))
    assert {r.status for r in forced.values()} == {"ok"}
    assert pg.execute("SELECT n FROM hourly").fetchone() == (2,)


def test_models_reading_an_unchanged_model_are_not_rerun(pg: psycopg.Connection, cfg: Config,
                                                          models: ModelsFile, docs: Docs) -> None:
    """A write that changes no row of a model (a report, for a model of persons) does not re-run
    the models reading it; they catch up with every document written meanwhile on their next run."""
    docs.put({"_id": "p1", "type": "person", "name": "Ann"})
    base_models(models)
    models.set("named", "SELECT uuid, upper(name) AS name FROM person", kind="incremental", unique_key=["uuid"])
    models.set("names", "SELECT count(*) AS n FROM person", kind="materialized_view")
    build(cfg, pg)
    assert pg.execute("SELECT name FROM named").fetchall() == [("ANN",)]

    docs.put({"_id": "r1", "type": "report"})
    results = by_name(pipeline.refresh_once(cfg, pg))
    assert results["person"].status == "ok" and results["person"].changed == 1  # ran, found no person
    assert results["named"].status == "skipped" and results["names"].status == "skipped"
    assert {r.status for r in pipeline.refresh_once(cfg, pg) if r.name in ("named", "names")} == {"skipped"}

    docs.put({"_id": "p1", "type": "person", "name": "Anna"}, {"_id": "p2", "type": "person", "name": "Bob"})
    results = by_name(pipeline.refresh_once(cfg, pg))
    assert results["named"].status == "ok" and results["named"].changed == 3  # r1 too: written since its run
    assert results["names"].status == "ok"
    assert pg.execute("SELECT uuid, name FROM named ORDER BY uuid").fetchall() == [("p1", "ANNA"), ("p2", "BOB")]
    assert pg.execute("SELECT n FROM names").fetchone() == (2,)
    assert {r.status for r in pipeline.refresh_once(cfg, pg) if r.name in ("named", "names")} == {"skipped"}
    for name in ("person", "named"):
        assert diff_with_rebuild(pg, pipeline.load(cfg).models[name]) == 0


def test_an_empty_model_fills_before_its_interval(pg: psycopg.Connection, cfg: Config, models: ModelsFile,
                                                  docs: Docs) -> None:
    models.set("forms", "SELECT doc->>'form' AS form, count(*) AS n FROM couchdb GROUP BY 1",
               kind="materialized_view", interval=3600)
    pipeline.apply(cfg, pg)
    assert by_name(pipeline.refresh_once(cfg, pg))["forms"].status in ("skipped", "ok")
    docs.put({"_id": "r1", "type": "data_record", "form": "delivery"})
    assert by_name(pipeline.refresh_once(cfg, pg))["forms"].status == "ok"  # empty: not throttled
    assert pg.execute("SELECT form, n FROM forms").fetchall() == [("delivery", 1)]
    docs.put({"_id": "r2", "type": "data_record", "form": "delivery"})
    assert by_name(pipeline.refresh_once(cfg, pg))["forms"].status == "waiting"  # holds data: throttled


def test_failing_model_blocks_dependents_only(pg: psycopg.Connection, cfg: Config, models: ModelsFile,
                                              docs: Docs) -> None:
    docs.put({"_id": "a", "n": "1"})
    models.set("numbers", "SELECT _id, (doc ->> 'n')::int AS n FROM couchdb", kind="table")
    models.set("total", "SELECT sum(n) AS n FROM numbers", kind="materialized_view")
    models.set("ids", "SELECT _id FROM couchdb", kind="incremental", unique_key=["_id"])
    pipeline.apply(cfg, pg)
    docs.put({"_id": "b", "n": "not a number"})
    results = by_name(pipeline.refresh_once(cfg, pg))
    assert results["numbers"].status == "error" and "invalid input syntax" in results["numbers"].error
    assert results["total"].status == "blocked" and "numbers" in results["total"].error
    assert results["ids"].status == "ok" and results["ids"].rows == 2
    rec = records(pg)
    assert rec["numbers"]["last_status"] == "error" and "invalid input" in rec["numbers"]["last_error"]
    assert rec["total"]["last_status"] == "blocked"
    assert pg.execute("SELECT count(*) FROM numbers").fetchone() == (1,)  # old data kept
    docs.put({"_id": "b", "n": "2"})
    results = by_name(pipeline.refresh_once(cfg, pg))
    assert results["numbers"].status == results["total"].status == "ok"
    assert pg.execute("SELECT n FROM total").fetchone() == (3,)
    assert records(pg)["numbers"]["last_error"] is None


def test_concurrent_refresh_does_not_block_a_reader(pg: psycopg.Connection, cfg: Config,
                                                    models: ModelsFile, docs: Docs) -> None:
    docs.put({"_id": "p1", "type": "person"})
    base_models(models)
    pipeline.apply(cfg, pg)
    docs.put({"_id": "c1", "type": "clinic"})
    reading, done = threading.Event(), threading.Event()

    def reader() -> None:
        with db.connect(cfg) as conn:  # one transaction until the end of the block
            conn.execute("SELECT count(*) FROM by_type").fetchone()
            reading.set()
            conn.execute("SELECT pg_sleep(3)")
        done.set()

    thread = threading.Thread(target=reader)
    thread.start()
    assert reading.wait(10)
    started = time.monotonic()
    result = by_name(pipeline.refresh_once(cfg, pg))["by_type"]
    still_reading = not done.is_set()
    thread.join()
    assert result.status == "ok" and still_reading, time.monotonic() - started
    assert dict(pg.execute("SELECT type, n FROM by_type").fetchall()) == {"person": 1, "clinic": 1}


def test_incremental_follows_edits_deletes_and_filters(pg: psycopg.Connection, cfg: Config,
                                                       models: ModelsFile, docs: Docs) -> None:
    models.set("person", "SELECT _id AS uuid, source, doc ->> 'name' AS name FROM couchdb"
               " WHERE NOT _deleted AND doc ->> 'type' = 'person'", kind="incremental",
               unique_key=["uuid", "source"])
    models.set("tag", "SELECT p.uuid, t AS tag FROM person AS p JOIN couchdb AS c ON c._id = p.uuid,"
               " jsonb_array_elements_text(c.doc -> 'tags') AS t", kind="incremental", unique_key=["uuid"])
    docs.put({"_id": "p1", "type": "person", "name": "Ann", "tags": ["a", "b"]},
             {"_id": "p2", "type": "person", "name": "Bob", "tags": []})
    docs.put({"_id": "p1", "type": "person", "name": "Ann (other)", "tags": ["c"]}, source="host/other")
    build(cfg, pg)
    built = graph.load(cfg).models
    docs.put({"_id": "p2", "type": "clinic", "name": "Bob"}, {"_id": "p3", "type": "person", "name": "Cy",
                                                              "tags": ["x"]})
    docs.put({"_id": "p1", "type": "person", "name": "Annie", "tags": ["b"]})
    docs.delete("p3")
    results = by_name(pipeline.refresh_once(cfg, pg))
    assert results["person"].changed == 3
    assert sorted(pg.execute("SELECT uuid, source, name FROM person").fetchall()) == [
        ("p1", "host/medic", "Annie"), ("p1", "host/other", "Ann (other)")]
    assert sorted(pg.execute("SELECT * FROM tag").fetchall()) == [("p1", "b"), ("p1", "b"), ("p1", "c"), ("p1", "c")]
    assert diff_with_rebuild(pg, built["person"]) == diff_with_rebuild(pg, built["tag"]) == 0
    assert records(pg)["person"]["last_rows"] == 2
    # rebuild NAME recomputes from scratch (here: after someone damaged the table).
    pg.execute("DELETE FROM person")
    result = pipeline.rebuild(cfg, pg, "person")
    assert result.rows == 2 and diff_with_rebuild(pg, built["person"]) == 0
    with pytest.raises(ConfigError, match="'nope' is not an enabled model"):
        pipeline.rebuild(cfg, pg, "nope")


def analyze_counts(conn: psycopg.Connection, *names: str) -> dict[str, int]:
    conn.execute("SELECT pg_stat_force_next_flush()")  # this session's counts, now
    return dict(conn.execute("SELECT relname::text, analyze_count FROM pg_stat_user_tables"
                             " WHERE schemaname = 'v1' AND relname = ANY(%s)", (list(names),)).fetchall())


def test_statistics_are_kept_by_chtsync(pg: psycopg.Connection, cfg: Config, models: ModelsFile,
                                        docs: Docs) -> None:
    # autovacuum is off on the test server: only chtsync analyzes here.
    models.set("person", "SELECT _id AS uuid, doc ->> 'name' AS name FROM couchdb WHERE doc ->> 'type' = 'person'",
               kind="incremental", unique_key=["uuid"])
    pipeline.apply(cfg, pg)
    assert analyze_counts(pg, "couchdb", "person") == {"couchdb": 0, "person": 0}  # created empty
    docs.put(*({"_id": f"p{i}", "type": "person", "name": "Ann"} for i in range(200)))
    analyze_counts(pg)
    assert by_name(pipeline.refresh_once(cfg, pg))["person"].rows == 200  # its first build
    # The raw table before the models (200 rows written > 50 + 10 % of 0), the model once built.
    assert analyze_counts(pg, "couchdb", "person") == {"couchdb": 1, "person": 1}
    docs.put(*({"_id": f"p{i}", "type": "person", "name": "Ann"} for i in range(200, 400)))
    analyze_counts(pg)
    assert by_name(pipeline.refresh_once(cfg, pg))["person"].changed == 200
    # The model's 200 new rows count once this session's statistics reach the server (a write
    # counted after an ANALYZE may cause one more).
    for _ in range(2):
        analyze_counts(pg)
        pipeline.refresh_once(cfg, pg)
    settled = analyze_counts(pg, "couchdb", "person")
    assert settled["couchdb"] == 2 and settled["person"] >= 2
    # Few writes since (20 raw, 40 in the model): below 50 + 10 % of 400 rows, nothing analyzed.
    docs.put(*({"_id": f"p{i}", "type": "person", "name": "Bob"} for i in range(20)))
    for _ in range(2):
        analyze_counts(pg)
        pipeline.refresh_once(cfg, pg)
    assert analyze_counts(pg, "couchdb", "person") == settled
    # rebuild analyzes what it rebuilt (a new table, swapped in for the old one).
    pipeline.rebuild(cfg, pg, "person")
    assert analyze_counts(pg, "person") == {"person": 1}


def test_statistics_lost_are_taken_again(pg: psycopg.Connection, cfg: Config, models: ModelsFile,
                                         docs: Docs) -> None:
    """A raw table full of rows that was never analyzed, its write counters gone (a crash, a
    restored or copied database): analyzed before the models are refreshed. An empty one is not,
    round after round."""
    models.set("person", "SELECT _id AS uuid FROM couchdb WHERE doc ->> 'type' = 'person'",
               kind="incremental", unique_key=["uuid"])
    pipeline.apply(cfg, pg)
    for _ in range(2):
        pipeline.refresh_once(cfg, pg)
    assert analyze_counts(pg, "couchdb") == {"couchdb": 0}  # empty: nothing to analyze
    docs.put(*({"_id": f"p{i}", "type": "person"} for i in range(10)))  # below the threshold of 50
    pg.execute("SELECT pg_stat_reset_single_table_counters('couchdb'::regclass)")
    assert pg.execute("SELECT reltuples FROM pg_class WHERE oid = 'couchdb'::regclass").fetchone() == (-1,)
    pipeline.refresh_once(cfg, pg)
    assert analyze_counts(pg, "couchdb") == {"couchdb": 1}
    assert pg.execute("SELECT reltuples FROM pg_class WHERE oid = 'couchdb'::regclass").fetchone() == (10,)
    pipeline.refresh_once(cfg, pg)
    assert analyze_counts(pg, "couchdb") == {"couchdb": 1}  # known now: by the threshold again


def test_change_probe_ignores_missing_statistics(pg: psycopg.Connection, docs: Docs) -> None:
    docs.put(*({"_id": f"r{i}", "type": "report"} for i in range(2000)))  # never analyzed
    snapshot = pg.execute("SELECT pg_current_snapshot()::text").fetchone()[0]

    def probe() -> tuple[bool, list[str], int, int]:
        with pg.transaction():  # this transaction's own scan counts
            changed = pg.execute("SELECT chtsync_raw_changed_v1('couchdb', %s::pg_snapshot)", (snapshot,)).fetchone()[0]
            ids = sorted(r[0] for r in pg.execute("SELECT * FROM chtsync_changed_ids_v1('couchdb', %s::pg_snapshot)",
                                                  (snapshot,)))
            seq, idx = pg.execute("SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables"
                                  " WHERE relid = 'couchdb'::regclass").fetchone()
        return changed, ids, seq, idx

    changed, ids, seq, idx = probe()
    assert (changed, ids, seq) == (False, [], 0) and idx >= 3  # index probes, no scan of 2000 rows
    docs.put({"_id": "r1", "type": "report"}, {"_id": "new", "type": "report"})
    changed, ids, seq, idx = probe()
    assert (changed, ids, seq) == (True, ["new", "r1"], 0) and idx >= 3


def test_reference_keys_rederive_rows_of_other_documents(pg: psycopg.Connection, cfg: Config,
                                                         models: ModelsFile, docs: Docs) -> None:
    models.set("node", "SELECT _id AS uuid, doc ->> 'name' AS name, doc ->> 'parent' AS parent FROM couchdb"
               " WHERE NOT _deleted", kind="incremental", unique_key=["uuid"])
    models.set("chain", "SELECT c.uuid, c.name, c.parent AS p1, a1.name AS p1_name, a1.parent AS p2,"
               " a2.name AS p2_name FROM node AS c LEFT JOIN node AS a1 ON a1.uuid = c.parent"
               " LEFT JOIN node AS a2 ON a2.uuid = a1.parent",
               kind="incremental", unique_key=["uuid"], reference_keys=["p1", "p2"],
               indexes=[{"columns": ["uuid"]}, {"columns": ["p1"]}, {"columns": ["p2"]}])
    docs.put({"_id": "district", "name": "D"}, {"_id": "hc", "name": "H", "parent": "district"},
             {"_id": "chw", "name": "C", "parent": "hc"}, {"_id": "other", "name": "O"})
    build(cfg, pg)
    built = graph.load(cfg).models
    docs.put({"_id": "district", "name": "D2"})  # renames show two levels down
    results = by_name(pipeline.refresh_once(cfg, pg))
    assert results["chain"].changed == 3  # district, hc, chw; not other
    assert pg.execute("SELECT p2_name FROM chain WHERE uuid = 'chw'").fetchone() == ("D2",)
    docs.put({"_id": "hc", "name": "H", "parent": "other"})  # a move re-derives the subtree
    docs.delete("district")
    pipeline.refresh_once(cfg, pg)
    assert pg.execute("SELECT p1_name, p2 FROM chain WHERE uuid = 'chw'").fetchone() == ("H", "other")
    docs.put({"_id": "missing-parent-child", "name": "M", "parent": "late"})
    pipeline.refresh_once(cfg, pg)
    docs.put({"_id": "late", "name": "L"})  # a parent arriving after its child
    pipeline.refresh_once(cfg, pg)
    assert pg.execute("SELECT p1_name FROM chain WHERE uuid = 'missing-parent-child'").fetchone() == ("L",)
    assert diff_with_rebuild(pg, built["chain"]) == 0
    with pytest.raises(ConfigError, match="'reference_keys' applies to incremental models only"):
        models.set("v", "SELECT 1 AS x", kind="table", reference_keys=["x"])
        graph.load(cfg)


def test_aggregate_recounts_only_touched_groups(pg: psycopg.Connection, cfg: Config, models: ModelsFile,
                                                docs: Docs) -> None:
    models.set("report", "SELECT _id AS uuid, doc ->> 'form' AS form, (doc ->> 'day')::date AS day"
               " FROM couchdb WHERE NOT _deleted", kind="incremental", unique_key=["uuid"],
               indexes=[{"columns": ["uuid"]}, {"columns": ["form", "day"]}])
    # counts only: changes are added (groups with a NULL key recounted)
    models.set("daily", "SELECT form, day, count(*) AS n FROM report GROUP BY form, day",
               kind="aggregate", unique_key=["form", "day"], indexes=[{"columns": ["form", "day"], "unique": True}])
    models.set("slow", "SELECT form, count(*) AS n FROM report GROUP BY form", kind="aggregate",
               unique_key=["form"], interval=3600)
    # max(): its touched groups are recounted
    models.set("latest", "SELECT form, max(day) AS day FROM report GROUP BY form", kind="aggregate",
               unique_key=["form"])
    docs.put(*({"_id": f"a{i}", "form": "A", "day": "2026-01-01"} for i in range(3)),
             {"_id": "b1", "form": "B", "day": "2026-01-02"}, {"_id": "x", "form": None, "day": None})
    build(cfg, pg)
    built = graph.load(cfg).models
    assert (built["daily"].counts, built["slow"].counts, built["latest"].counts) == (("n",), ("n",), ())
    docs.put({"_id": "a0", "form": "B", "day": "2026-01-02"})  # leaves (A, 1st), joins (B, 2nd)
    docs.put({"_id": "x", "form": "C", "day": None})  # leaves (NULL, NULL), joins (C, NULL)
    docs.delete("b1")
    results = by_name(pipeline.refresh_once(cfg, pg))
    # (A, 1st) -1; (B, 2nd) +1 -1 cancels out; (NULL, NULL) and (C, NULL) recounted
    assert results["daily"].status == "ok" and results["daily"].changed == 3
    assert results["latest"].changed == 4  # A, B, C and NULL: recounted
    assert sorted(pg.execute("SELECT form, day::text, n FROM daily").fetchall(), key=str) == [
        ("A", "2026-01-01", 2), ("B", "2026-01-02", 1), ("C", None, 1)]
    assert results["slow"].status == "waiting"
    for i in range(3):  # the upstream refreshes while `slow` waits: its counts accumulate
        docs.put({"_id": f"c{i}", "form": "C", "day": "2026-01-03"})
        pipeline.refresh_once(cfg, pg)
    assert pg.execute("SELECT count(*) FROM chtsync_model_deltas WHERE model = 'slow'").fetchone()[0] > 0
    assert diff_with_rebuild(pg, built["slow"]) > 0  # still waiting
    pipeline.refresh_once(cfg, pg, force=True)
    for name in ("slow", "daily", "latest"):
        assert diff_with_rebuild(pg, built[name]) == 0, name
    assert pg.execute("SELECT (SELECT count(*) FROM chtsync_model_pending)"
                      " + (SELECT count(*) FROM chtsync_model_deltas)").fetchone() == (0,)
    pipeline.rebuild(cfg, pg, "report")  # a full build of the upstream recounts every group
    assert {r.name: r.changed for r in pipeline.refresh_once(cfg, pg, force=True)}["daily"] is None
    assert diff_with_rebuild(pg, built["daily"]) == 0

    # The cost follows the change, not the group: one report moved out of a group of 2,000 reads
    # a few rows of the upstream (its own old and new rows), not the group's 2,000.
    docs.put(*({"_id": f"big{i}", "form": "BIG", "day": "2026-02-01"} for i in range(2000)))
    pipeline.refresh_once(cfg, pg, force=True)
    read = ("SELECT pg_stat_force_next_flush(), (SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)"
            " FROM pg_stat_user_tables WHERE relid = 'report'::regclass)")
    pg.execute("SELECT pg_stat_force_next_flush()")
    pg.execute("SELECT pg_stat_clear_snapshot()")
    before = pg.execute(read).fetchone()[1]
    docs.put({"_id": "big7", "form": "BIG", "day": "2026-02-02"})
    results = by_name(pipeline.refresh_once(cfg, pg, force=True))
    pg.execute("SELECT pg_stat_force_next_flush()")
    pg.execute("SELECT pg_stat_clear_snapshot()")
    assert results["daily"].changed == 2 and results["latest"].changed == 1
    assert pg.execute("SELECT n FROM daily WHERE form = 'BIG' ORDER BY day").fetchall() == [(1999,), (1,)]
    # `latest` recounts BIG (2,000 rows); the counts of `daily` and `slow` read none
    assert pg.execute(read).fetchone()[1] - before < 2000 + 100
    for name in ("slow", "daily", "latest"):
        assert diff_with_rebuild(pg, built[name]) == 0, name


@pytest.mark.parametrize(("sql_text", "message"), [
    ("SELECT form, count(*) AS n FROM couchdb GROUP BY form", "reads exactly one other model"),
    ("SELECT form, count(*) AS n FROM report GROUP BY form HAVING count(*) > 1", "without HAVING"),
    ("SELECT n AS form, count(*) FROM total GROUP BY n", "must read an incremental model"),
])
def test_aggregate_checks(models: ModelsFile, cfg: Config, sql_text: str, message: str) -> None:
    models.set("report", "SELECT _id AS uuid, doc ->> 'form' AS form FROM couchdb", kind="incremental",
               unique_key=["uuid"])
    models.set("total", "SELECT count(*) AS n FROM report", kind="table")
    models.set("agg", sql_text, kind="aggregate", unique_key=["form"])
    with pytest.raises(ConfigError, match=message):
        graph.load(cfg)
    with pytest.raises(ConfigError, match="'unique_key' is required for an aggregate model"):
        models.set("agg", sql_text, kind="aggregate")
        graph.load(cfg)


def test_refresh_needs_applied_definitions(pg: psycopg.Connection, cfg: Config, models: ModelsFile) -> None:
    base_models(models)
    pipeline.apply(cfg, pg)
    models.set("snapshot", "SELECT _id FROM couchdb", kind="table")
    result = by_name(pipeline.refresh_once(cfg, pg, force=True))["snapshot"]
    assert result.status == "unapplied" and "models apply" in result.error
    with pytest.raises(ConfigError, match="run `chtsync models apply` first"):
        pipeline.rebuild(cfg, pg, "snapshot")


def test_pipeline_lock_excludes_a_second_refresh(pg: psycopg.Connection, cfg: Config, models: ModelsFile) -> None:
    base_models(models)
    pipeline.apply(cfg, pg)
    with db.connect(cfg, autocommit=True) as other:
        key = (db.LOCK_CLASS, db.lock_key(cfg, "pipeline"))
        other.execute("SELECT pg_advisory_lock(%s, %s)", key)
        assert pipeline.refresh_once(cfg, pg, wait=False) == []
        other.execute("SELECT pg_advisory_unlock(%s, %s)", key)
    assert pipeline.refresh_once(cfg, pg, wait=False) != []


def test_a_round_commits_without_waiting_for_the_wal_flush(pg: psycopg.Connection, cfg: Config,
                                                            models: ModelsFile, docs: Docs) -> None:
    """Models are derived: a round's commits need not wait for the disk (a crash loses only the
    last ones, with the snapshots they recorded). Only the round's own session is changed: a
    connection that refreshed nothing keeps the server's default."""
    base_models(models)
    pipeline.apply(cfg, pg)
    docs.put({"_id": "p1", "type": "person", "name": "Ann"})
    with db.connect(cfg, autocommit=True) as conn:
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        assert by_name(pipeline.refresh_once(cfg, conn))["person"].status == "ok"
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("off",)
        assert conn.execute("SELECT count(*) FROM person").fetchone() == (1,)
    assert pg.execute("SHOW synchronous_commit").fetchone() == ("on",)


def test_refresh_loop_wakes_on_new_data(pg: psycopg.Connection, cfg: Config, models: ModelsFile,
                                        docs: Docs) -> None:
    base_models(models)
    pipeline.apply(cfg, pg)
    slow = make_config(pg.info.dbname, CHTSYNC_MODELS=str(models.path), DATAEMON_INTERVAL="3600")

    async def scenario() -> None:
        stop, wake = asyncio.Event(), asyncio.Event()
        loop = asyncio.create_task(pipeline.refresh_loop(slow, stop, wake))
        # The first round has run (and found nothing to do): its session released the lock.
        await asyncio.to_thread(wait_until, lambda: pg.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND state = 'idle' AND query LIKE '%pg_advisory_unlock%')"
        ).fetchone()[0], 30, "the first refresh round")
        await asyncio.to_thread(docs.put, {"_id": "p9", "type": "person", "name": "Zoe"})
        started = time.monotonic()
        wake.set()
        while (await asyncio.to_thread(pg.execute, "SELECT count(*) FROM person")).fetchone() == (0,):
            assert time.monotonic() - started < 10
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(loop, 10)

    asyncio.run(scenario())  # filled well before the 3600 s interval: the wake did it


def test_cli(pg: psycopg.Connection, cfg: Config, models: ModelsFile, docs: Docs,
             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for key, value in {"POSTGRES_HOST": cfg.postgres.host, "POSTGRES_PORT": str(cfg.postgres.port),
                       "POSTGRES_USER": cfg.postgres.user, "POSTGRES_DB": cfg.postgres.dbname,
                       "COUCHDB_URL": "http://127.0.0.1:9", "CHTSYNC_MODELS": str(models.path)}.items():
        monkeypatch.setenv(key, value or "")
    monkeypatch.chdir(models.folder)
    base_models(models)
    pg.execute("CREATE TABLE snapshot (x int)")
    assert cli.main(["models", "plan"]) == 0
    out = capsys.readouterr().out
    assert "create     live" in out and "apply needs --adopt): snapshot" in out
    assert cli.main(["models", "apply"]) == 2
    assert "--adopt" in capsys.readouterr().err
    assert cli.main(["models", "apply", "--adopt"]) == 0
    assert "applied: 3 to create, 1 to replace" in capsys.readouterr().out
    assert cli.main(["models", "refresh"]) == 0  # the first build
    capsys.readouterr()
    docs.put({"_id": "p1", "type": "person"})
    assert cli.main(["models", "refresh"]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "1 document(s) re-derived" in out
    assert cli.main(["models", "rebuild", "person"]) == 0
    assert "rebuilt person (incremental): 1 rows" in capsys.readouterr().out


def test_idle_despite_a_long_transaction_elsewhere(pg: psycopg.Connection, cfg: Config, models: ModelsFile,
                                                   docs: Docs) -> None:
    """A transaction left open anywhere in the cluster holds the snapshot's xmin back; rows
    committed after it started must still count as seen once a refresh has read them."""
    base_models(models)
    pipeline.apply(cfg, pg)
    with db.connect(cfg) as other:
        other.execute("SELECT pg_current_xact_id()")  # holds an xid until the end of the block
        docs.put({"_id": "p1", "type": "person", "name": "Ann"})
        assert by_name(pipeline.refresh_once(cfg, pg))["person"].status == "ok"
        before = records(pg)
        assert {r.status for r in pipeline.refresh_once(cfg, pg)} == {"skipped"}
        assert records(pg) == before
