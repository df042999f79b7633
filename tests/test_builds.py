"""Builds at scale on the real Postgres: first builds by raw-table block ranges (resumable, exact
under concurrent writes, equal to the one-statement build), and rebuilds into a shadow table
swapped in at the end (readers keep the old version, a killed build resumes, views over the
model keep working)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from chtsync import db, pipeline, state
from chtsync.config import Config
from chtsync.pipeline import graph
from chtsync.pipeline import refresh as refresh_mod
from chtsync.pipeline import shadow as shadow_mod
from tests.conftest import make_config
from tests.test_pipeline import Docs, ModelsFile, by_name, diff_with_rebuild, records

PAD = "x" * 1500  # about five documents per 8 kB block: a few dozen documents span many blocks


@pytest.fixture
def models(tmp_path: Path) -> ModelsFile:
    m = ModelsFile(tmp_path)
    # Read by block range: the raw table once, leftmost, no grouping.
    m.set("person", "SELECT _id AS uuid, source, doc ->> 'name' AS name, doc ->> 'parent' AS parent"
          " FROM couchdb WHERE NOT _deleted AND doc ->> 'type' = 'person'", kind="incremental",
          unique_key=["uuid", "source"])
    # Reads the raw table twice: built by the ids found in each block range instead.
    m.set("with_parent", "SELECT c._id AS uuid, c.doc ->> 'name' AS name, p.doc ->> 'name' AS parent_name,"
          " c.doc ->> 'parent' AS parent FROM couchdb AS c LEFT JOIN couchdb AS p ON p._id = c.doc ->> 'parent'"
          " AND p.source = c.source WHERE NOT c._deleted AND c.doc ->> 'type' = 'person'",
          kind="incremental", unique_key=["uuid"], reference_keys=["parent"])
    m.set("by_name", "SELECT name, count(*) AS n FROM person GROUP BY name", kind="aggregate", unique_key=["name"])
    return m


@pytest.fixture
def cfg(dbname: str, models: ModelsFile) -> Config:
    return make_config(dbname, CHTSYNC_MODELS=str(models.path))


@pytest.fixture
def docs(pg: psycopg.Connection) -> Docs:
    return Docs(pg)


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    """Thresholds low enough for a few dozen documents: batched builds, one block per batch."""
    monkeypatch.setattr(refresh_mod, "ONE_STATEMENT_BUILD", 0)
    monkeypatch.setattr(refresh_mod, "BUILD_ROWS", 1)
    monkeypatch.setattr(refresh_mod, "SHARED_BUILD_ROWS", 1)


def person(i: int, name: str = "Ann", parent: int | None = None) -> dict:
    return {"_id": f"p{i:03}", "type": "person", "name": name, "pad": PAD,
            **({"parent": f"p{parent:03}"} if parent is not None else {})}


def set_people(models: ModelsFile) -> None:
    """An incremental model of persons; about five rows per block (their pads)."""
    models.set("people", "SELECT _id AS uuid, source, doc ->> 'name' AS name, doc ->> 'parent' AS parent,"
               " doc ->> 'pad' AS pad FROM couchdb WHERE NOT _deleted AND doc ->> 'type' = 'person'",
               kind="incremental", unique_key=["uuid", "source"])


def set_tree(models: ModelsFile, name: str = "tree") -> None:
    """An incremental model reading `people`: each person with its parent's name."""
    models.set(name, "SELECT c.uuid, c.source, c.name, c.parent, p.name AS parent_name FROM people AS c"
               " LEFT JOIN people AS p ON p.uuid = c.parent AND p.source = c.source",
               kind="incremental", unique_key=["uuid", "source"], reference_keys=["parent"])


def built(cfg: Config) -> list[graph.Model]:
    return [m for m in graph.load(cfg).models.values()]


def assert_exact(pg: psycopg.Connection, cfg: Config) -> None:
    for m in built(cfg):
        assert diff_with_rebuild(pg, m) == 0, m.name


def test_model_sql_for_block_ranges(cfg: Config, models: ModelsFile) -> None:
    m = graph.load(cfg).models
    assert "current_setting('chtsync.build_from')" in m["person"].block_sql
    assert "FROM chtsync_build_source AS couchdb" in m["person"].shared_sql
    assert m["with_parent"].block_sql == m["with_parent"].shared_sql == ""  # two references: not by range
    assert m["by_name"].block_sql == ""
    # a plain SELECT in FROM, leftmost: read by range inside it; one that groups: not
    models.set("sub", "SELECT s.uuid, upper(s.name) AS name FROM (SELECT _id AS uuid, doc ->> 'name' AS name"
               " FROM couchdb WHERE doc ->> 'type' = 'person') AS s LEFT JOIN person AS p USING (uuid)",
               kind="incremental", unique_key=["uuid"])
    models.set("sub_grouped", "SELECT s.uuid FROM (SELECT _id AS uuid FROM couchdb GROUP BY _id) AS s",
               kind="incremental", unique_key=["uuid"])
    # the shared build's source name taken by a CTE of the model: by range, but never shared
    models.set("named", "WITH chtsync_build_source AS (SELECT 1 AS one) SELECT c._id AS uuid FROM couchdb AS c"
               " JOIN chtsync_build_source AS s ON true", kind="incremental", unique_key=["uuid"])
    m = graph.load(cfg, models.path).models
    assert "current_setting('chtsync.build_from')" in m["sub"].block_sql and m["sub_grouped"].block_sql == ""
    assert ("FROM (SELECT _id AS uuid, doc ->> 'name' AS name FROM chtsync_build_source AS couchdb"
            in m["sub"].shared_sql)
    assert m["named"].block_sql and m["named"].shared_sql == ""
    # An upstream first in FROM: walked when it is an incremental model read by that name; not
    # when it is a view, a CTE of the same name, or a relation qualified with a schema.
    models.set("person_view", "SELECT * FROM person", kind="view")
    models.set("over_view", "SELECT v.uuid FROM person_view AS v", kind="incremental", unique_key=["uuid"])
    models.set("over_cte", "WITH person AS (SELECT _id AS uuid FROM couchdb) SELECT p.uuid FROM person AS p"
               " JOIN by_name AS b ON true", kind="incremental", unique_key=["uuid"])
    models.set("over_schema", "SELECT p.uuid FROM public.person AS p JOIN person AS q USING (uuid)",
               kind="incremental", unique_key=["uuid"])
    models.set("over_person", "SELECT p.uuid, q.name FROM person AS p LEFT JOIN person AS q ON q.uuid = p.parent",
               kind="incremental", unique_key=["uuid"])
    m = graph.load(cfg, models.path).models
    assert [m[n].block_from for n in ("over_view", "over_cte", "over_schema", "over_person")] == ["", "", "", "person"]
    assert m["over_person"].shared_sql == ""  # the shared read is the raw table's
    models.models["person"]["indexes"] = [{"columns": ["uuid", "source"], "unique": True}]
    assert graph.load(cfg, models.write().path).models["person"].block_sql == ""  # a row read twice would fail


def indexes(pg: psycopg.Connection, table: str) -> set[str]:
    return {r[0] for r in pg.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s", (table,))}


def test_first_build_by_block_ranges_under_concurrent_writes(
        pg: psycopg.Connection, cfg: Config, models: ModelsFile, docs: Docs, small: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    models.models["person"]["indexes"] = [{"columns": ["name"]}, {"expression": "upper(name)"}]
    models.set("sub", "SELECT s.uuid, s.source, upper(s.name) AS name FROM (SELECT _id AS uuid, source,"
               " doc ->> 'name' AS name FROM couchdb WHERE NOT _deleted AND doc ->> 'type' = 'person') AS s",
               kind="incremental", unique_key=["uuid", "source"])  # by range, inside the subquery
    monkeypatch.setattr(refresh_mod, "BUILD_WORKERS", 1)  # one build at a time: the steps below are person's
    docs.put(*(person(i, parent=i - 1 if i % 3 else None) for i in range(40)))
    docs.put(person(5, "Cy"), source="host/other")  # the same id in another source
    pg.execute("ANALYZE couchdb")
    pipeline.apply(cfg, pg)
    assert indexes(pg, "person") == {"person_ix0", "person_ix1", "person_key"}
    blocks = pg.execute("SELECT pg_relation_size('couchdb') / 8192").fetchone()[0]
    assert blocks >= 8
    steps: list[int | None] = []
    with db.connect(cfg) as late:  # a writer whose transaction commits after the build
        docs.put(person(7, "Late"), source="host/late", conn=late)  # its own source: locks no row the others write

        def writes_between_batches() -> bool:
            done = pg.execute("SELECT build_block FROM chtsync_models WHERE name = 'person'").fetchone()[0]
            steps.append(done)
            if done == 2:  # rows in blocks done and not yet done move to the end of the table
                docs.put(person(0, "Bob"), person(39, "Bob"), person(100, "New", parent=0))
                docs.delete("p001")
            return done == 4

        results = by_name(pipeline.refresh_once(cfg, pg, should_stop=writes_between_batches))
        assert results["person"].status == "building"
        assert steps[:3] == [0, 1, 2]  # one transaction per block, progress recorded by each
        progress = next(m for m in state.gather(cfg, pg, counts=False)["models"] if m["name"] == "person")["build"]
        assert 0 < progress["docs"] < progress["total"] == 41
        assert indexes(pg, "person") == set()  # built once the rows are in: a build by range only inserts
        # Resumed where it stopped; the writes since the build began are derived again at its end.
        results = by_name(pipeline.refresh_once(cfg, pg))
        assert {r.status for r in results.values()} == {"ok"}
        assert records(pg)["person"]["build_block"] is None
        assert indexes(pg, "person") == {"person_ix0", "person_ix1", "person_key"}
        assert_exact(pg, cfg)
        late.commit()
    pipeline.refresh_once(cfg, pg)
    assert_exact(pg, cfg)
    batched = {m: pg.execute(f"SELECT * FROM {m} ORDER BY 1, 2").fetchall() for m in ("person", "with_parent")}
    # The same models built in one statement hold the same rows.
    refresh_mod.ONE_STATEMENT_BUILD = 1_000_000
    for m in ("person", "with_parent"):
        pipeline.rebuild(cfg, pg, m)
        assert pg.execute(f"SELECT * FROM {m} ORDER BY 1, 2").fetchall() == batched[m]
    assert indexes(pg, "person") == {"person_ix0", "person_ix1", "person_key"}


def test_build_starts_over_when_the_raw_table_is_rewritten(
        pg: psycopg.Connection, cfg: Config, docs: Docs, small: None) -> None:
    docs.put(*(person(i) for i in range(30)))
    pg.execute("ANALYZE couchdb")
    pipeline.apply(cfg, pg)
    pipeline.refresh_once(cfg, pg, should_stop=lambda: (pg.execute(
        "SELECT build_block FROM chtsync_models WHERE name = 'person'").fetchone()[0] or 0) >= 3)
    docs.put(*(person(i, "Bob") for i in range(0, 30, 2)))
    pg.execute("VACUUM FULL couchdb")  # every row moves: the blocks done mean nothing now
    pipeline.refresh_once(cfg, pg)
    assert_exact(pg, cfg)


def rows(conn: psycopg.Connection, model: str = "person") -> int:
    return conn.execute(f"SELECT count(*) FROM {model}").fetchone()[0]


def test_rebuild_readers_keep_the_old_version_until_the_swap(
        pg: psycopg.Connection, cfg: Config, docs: Docs, small: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    docs.put(*(person(i) for i in range(30)))
    pg.execute("ANALYZE couchdb")
    pipeline.apply(cfg, pg)
    pipeline.refresh_once(cfg, pg)
    pg.execute("DELETE FROM person WHERE uuid < 'p010'")  # damaged: the rebuild repairs it
    monkeypatch.setattr(shadow_mod, "SWAP_PAUSE", 0.1)
    seen: list[int] = []
    with db.connect(cfg) as reader, db.connect(cfg, autocommit=True) as fresh:
        reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        seen.append(rows(reader))
        halfway = threading.Event()

        def stop_never() -> bool:
            done = pg.execute("SELECT build_block FROM chtsync_models WHERE name = 'person'").fetchone()[0]
            if done == 3:
                halfway.set()
            return False

        result: list[pipeline.RefreshResult] = []
        worker = threading.Thread(target=lambda: result.append(pipeline.rebuild(cfg, rebuilder, "person",
                                                                                should_stop=stop_never)))
        with db.connect(cfg, autocommit=True) as rebuilder:
            worker.start()
            assert halfway.wait(60)
            seen.append(rows(reader))  # the reader's transaction: still the old table, whole
            seen.append(rows(fresh))  # a new statement too: the shadow is not the model yet
            # The swap waits for the reader's lock (retrying), never showing an empty table.
            seen.append(rows(reader))
            reader.commit()
            worker.join(60)
        assert not worker.is_alive() and result[0].status == "ok"
    assert seen == [20, 20, 20, 20]
    assert rows(pg) == 30
    assert_exact(pg, cfg)
    assert pg.execute("SELECT to_regclass('person__chtsync_new')").fetchone() == (None,)


def test_rebuild_killed_midway_resumes_and_equals_a_fresh_build(
        pg: psycopg.Connection, cfg: Config, docs: Docs, small: None) -> None:
    docs.put(*(person(i, parent=i - 1 if i % 2 else None) for i in range(30)))
    pg.execute("ANALYZE couchdb")
    pipeline.apply(cfg, pg)
    pipeline.refresh_once(cfg, pg)
    for model in ("person", "with_parent"):
        with db.connect(cfg, autocommit=True) as victim:
            pid = victim.info.backend_pid

            def kill_after_three(model: str = model, pid: int = pid) -> bool:
                done = pg.execute("SELECT build_block FROM chtsync_models WHERE name = %s", (model,)).fetchone()[0]
                if done == 3:
                    docs.put(person(2, "Moved"), person(29, "Moved"))  # during the build
                    pg.execute("SELECT pg_terminate_backend(%s)", (pid,))
                return False

            with pytest.raises(psycopg.OperationalError):
                pipeline.rebuild(cfg, victim, model, should_stop=kill_after_three)
        rec = records(pg)[model]
        assert rec["build_into"] == f"{model}__chtsync_new" and rec["build_block"] == 3
        progress = next(m for m in state.gather(cfg, pg, counts=False)["models"] if m["name"] == model)["build"]
        assert progress["shadow"] and 0 < progress["docs"] < progress["total"]  # `status`: rebuilding
        docs.put(person(3, "Later"), person(40, "New", parent=3))  # after the crash
        with db.connect(cfg, autocommit=True) as again:
            assert pipeline.rebuild(cfg, again, model).status == "ok"
        assert records(pg)[model]["build_into"] is None
        assert diff_with_rebuild(pg, graph.load(cfg).models[model]) == 0
    pipeline.refresh_once(cfg, pg)
    assert_exact(pg, cfg)


def test_rebuild_keeps_views_grants_and_comment(pg: psycopg.Connection, cfg: Config, models: ModelsFile,
                                                 docs: Docs, small: None) -> None:
    models.set("named", "SELECT uuid, name FROM person WHERE name IS NOT NULL")  # chtsync's view
    models.set("names", "SELECT name, count(*) AS n FROM named GROUP BY name", kind="materialized_view")
    docs.put(*(person(i) for i in range(20)))
    pg.execute("ANALYZE couchdb")
    pipeline.apply(cfg, pg)
    pipeline.refresh_once(cfg, pg)
    pg.execute("CREATE SCHEMA IF NOT EXISTS dash")
    pg.execute("CREATE VIEW dash.people AS SELECT count(*) AS n FROM v1.named")  # someone else's
    pg.execute("DROP ROLE IF EXISTS chtsync_test_reader")
    pg.execute("CREATE ROLE chtsync_test_reader")
    pg.execute("GRANT SELECT ON person TO chtsync_test_reader")
    pg.execute("COMMENT ON TABLE person IS 'people'")
    try:
        oid = pg.execute("SELECT 'person'::regclass::oid").fetchone()[0]
        docs.put(person(50, "Zed"))
        assert pipeline.rebuild(cfg, pg, "person").status == "ok"
        assert pg.execute("SELECT 'person'::regclass::oid").fetchone()[0] != oid  # a new table
        assert pg.execute("SELECT n FROM dash.people").fetchone() == (21,)
        assert pg.execute("SELECT n FROM names WHERE name = 'Zed'").fetchone() == (1,)
        assert pg.execute("SELECT has_table_privilege('chtsync_test_reader', 'person', 'SELECT'),"
                          " obj_description('person'::regclass, 'pg_class')").fetchone() == (True, "people")
        indexes = {r[0] for r in pg.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'person'")}
        assert indexes == {"person_key"}
        # The pipeline goes on with the new table: incremental runs, the aggregate recounted.
        docs.put(person(51, "Zed"))
        assert {r.status for r in pipeline.refresh_once(cfg, pg)} <= {"ok", "skipped"}
        assert_exact(pg, cfg)
        assert pg.execute("SELECT n FROM by_name WHERE name = 'Zed'").fetchone() == (2,)
    finally:
        pg.execute("DROP SCHEMA dash CASCADE")
        pg.execute("DROP OWNED BY chtsync_test_reader")
        pg.execute("DROP ROLE chtsync_test_reader")


def test_rebuild_of_a_table_and_a_matview_swaps_too(pg: psycopg.Connection, cfg: Config, models: ModelsFile,
                                                    docs: Docs) -> None:
    models.set("snap", "SELECT _id, _rev FROM couchdb", kind="table", indexes=[{"columns": ["_id"]}])
    models.set("mv", "SELECT count(*) AS n FROM couchdb", kind="materialized_view")
    docs.put(*(person(i) for i in range(5)))
    pipeline.apply(cfg, pg)
    docs.put(person(9))
    before = {m: pg.execute("SELECT %s::regclass::oid", (m,)).fetchone()[0] for m in ("snap", "mv")}
    for m in ("snap", "mv"):
        assert pipeline.rebuild(cfg, pg, m).status == "ok"
        assert pg.execute("SELECT %s::regclass::oid", (m,)).fetchone()[0] != before[m]
    assert pg.execute("SELECT count(*) FROM snap").fetchone() == (6,)
    assert pg.execute("SELECT n FROM mv").fetchone() == (6,)
    assert {r[0] for r in pg.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'snap'")} == {"snap_ix0"}


def test_apply_builds_a_changed_model_beside_the_old_one(pg: psycopg.Connection, cfg: Config, models: ModelsFile,
                                                         docs: Docs, small: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    models.set("named", "SELECT uuid, name FROM person")  # a view over it, rebuilt by apply
    docs.put(*(person(i) for i in range(20)))
    pg.execute("ANALYZE couchdb")
    pipeline.apply(cfg, pg)
    pipeline.refresh_once(cfg, pg)
    oid = pg.execute("SELECT 'person'::regclass::oid").fetchone()[0]
    logged: list[str] = []
    original = refresh_mod._build

    def spy(*args: Any, **kwargs: Any) -> Any:  # the real _build, watched
        logged.append(args[3])
        seen = pg.execute("SELECT count(*) FROM person").fetchone()[0]  # readers: the old table
        assert seen == 20
        return original(*args, **kwargs)

    # chtsync.pipeline.apply is also the name of the function the package exports
    monkeypatch.setattr(sys.modules["chtsync.pipeline.apply"], "_build", spy)
    models.set("person", "SELECT _id AS uuid, source, upper(doc ->> 'name') AS name, doc ->> 'parent' AS parent"
               " FROM couchdb WHERE NOT _deleted AND doc ->> 'type' = 'person'", kind="incremental",
               unique_key=["uuid", "source"])
    docs.put(person(60, "New"))
    plan = pipeline.apply(cfg, pg)
    assert logged == ["person__chtsync_new"]  # built in batches before the apply transaction
    assert {s.name: s.action for s in plan.steps}["person"] == "replace"
    assert pg.execute("SELECT 'person'::regclass::oid").fetchone()[0] != oid
    assert pg.execute("SELECT to_regclass('person__chtsync_new')").fetchone() == (None,)
    assert records(pg)["person"]["build_into"] is None
    assert pg.execute("SELECT count(*) FROM named WHERE name = 'NEW'").fetchone() == (1,)
    assert diff_with_rebuild(pg, graph.load(cfg).models["person"]) == 0
    docs.put(person(61, "Newer"))
    assert by_name(pipeline.refresh_once(cfg, pg))["person"].changed == 1  # incremental from here on
    assert_exact(pg, cfg)


@pytest.mark.parametrize("batched", [True, False])
def test_builds_read_compressed_and_out_of_line_documents_exactly(
        pg: psycopg.Connection, cfg: Config, models: ModelsFile, docs: Docs, monkeypatch: pytest.MonkeyPatch,
        batched: bool) -> None:
    """A build reads each document decompressed once (`doc #> '{}'` in the block source): the
    rows equal the model's own SQL for small, compressed in-line and out-of-line (TOAST)
    documents, in batches and in one statement."""
    import random
    rnd = random.Random(7)

    def noise(n: int) -> str:  # does not compress: stored out of line
        return "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(n))

    models.set("wide", "SELECT _id AS uuid, doc ->> 'name' AS name, doc #>> '{a,b}' AS ab, doc -> 'list' AS list,"
               " length(doc ->> 'pad') AS pad, couchdb.doc ->> 'type' AS type FROM couchdb"
               " WHERE NOT _deleted AND doc ->> 'type' IN ('person', 'big')", kind="incremental", unique_key=["uuid"])
    small_docs = [person(i) for i in range(10)]
    compressed = [{"_id": f"c{i:03}", "type": "big", "name": f"C{i}", "a": {"b": i}, "list": [i, "x"],
                   "pad": "abc" * 1500} for i in range(10)]
    external = [{"_id": f"e{i:03}", "type": "big", "name": f"E{i}", "a": {"b": [i]}, "list": [],
                 "pad": noise(12000)} for i in range(5)]
    docs.put(*small_docs, *compressed, *external)
    docs.delete("c003")
    stored = dict(pg.execute("SELECT left(_id, 1), count(*) FILTER (WHERE pg_column_compression(doc) IS NOT NULL)"
                             " FROM couchdb GROUP BY 1").fetchall())
    assert stored["c"] == 9 and stored["p"] == 0
    assert pg.execute("SELECT pg_relation_size(reltoastrelid) > 8192 FROM pg_class WHERE relname = 'couchdb'"
                      ).fetchone()[0]  # the noise went out of line
    if batched:
        monkeypatch.setattr(refresh_mod, "ONE_STATEMENT_BUILD", 0)
        monkeypatch.setattr(refresh_mod, "BUILD_ROWS", 1)
    pipeline.apply(cfg, pg)
    assert {r.status for r in pipeline.refresh_once(cfg, pg)} == {"ok"}
    assert pg.execute("SELECT count(*) FROM wide").fetchone()[0] == 24
    assert_exact(pg, cfg)


def test_a_model_built_by_the_block_ranges_of_the_model_it_reads(
        pg: psycopg.Connection, cfg: Config, models: ModelsFile, docs: Docs, small: None) -> None:
    """A model whose leftmost FROM item is an incremental model (as contact_hierarchy reads
    contact) walks that model's blocks: one TID range scan per batch, not the ids of a raw range
    joined to the whole upstream. Writes between batches, an upstream refreshed in between (its
    rows move) and a renamed parent end exact."""
    set_people(models)
    docs.put(*(person(i, f"N{i}", parent=i - 1 if i % 3 else None) for i in range(40)))
    pg.execute("ANALYZE couchdb")
    pipeline.apply(cfg, pg)
    assert {r.status for r in pipeline.refresh_once(cfg, pg)} == {"ok"}
    # added once people is built: built in its turn, so people can refresh between its batches
    set_tree(models)
    m = graph.load(cfg, models.path).models
    assert (m["tree"].block_from, m["people"].block_from, m["by_name"].block_from) == ("people", "couchdb", "")
    assert "current_setting('chtsync.build_from')" in m["tree"].block_sql
    pipeline.apply(cfg, pg)

    def tree_at(block: int) -> Callable[[], bool]:
        return lambda: (pg.execute("SELECT build_block FROM chtsync_models WHERE name = 'tree'").fetchone()[0]
                        or 0) >= block

    results = by_name(pipeline.refresh_once(cfg, pg, should_stop=tree_at(2)))
    assert results["tree"].status == "building"
    assert records(pg)["tree"]["build_blocks"] >= 7  # people's blocks, not the raw table's
    # renamed parents (their children's rows change), a moved and a deleted row, a new child
    docs.put(person(0, "Bob"), person(4, "Cy", parent=3), person(39, "Dee", parent=38),
             person(100, "New", parent=0))
    docs.delete("p001")
    results = by_name(pipeline.refresh_once(cfg, pg, should_stop=tree_at(4)))  # people refreshed: rows move
    assert results["tree"].status == "building"
    docs.put(person(2, "Eve", parent=1))
    assert {r.status for r in pipeline.refresh_once(cfg, pg)} == {"ok"}
    assert_exact(pg, cfg)
    assert pg.execute("SELECT parent_name FROM tree WHERE uuid = 'p100'").fetchone() == ("Bob",)


def test_first_builds_of_raw_models_run_side_by_side(
        pg: psycopg.Connection, cfg: Config, models: ModelsFile, docs: Docs, small: None) -> None:
    """The models reading only the raw table are built two at a time, each on its own
    connection; a stop leaves both resumable, a model failing there is recorded in its turn."""
    models.set("bad", "SELECT _id AS uuid, 1 / (length(doc ->> 'name') - 3) AS x FROM couchdb"
               " WHERE doc ->> 'type' = 'person'", kind="incremental", unique_key=["uuid"])
    docs.put(*(person(i) for i in range(40)))
    pg.execute("ANALYZE couchdb")
    pipeline.apply(cfg, pg)
    building: list[set[str]] = []  # the models under way, at each look
    threads: set[str] = set()

    def stop_at_person_3() -> bool:
        rows = dict(pg.execute("SELECT name, build_block FROM chtsync_models WHERE build_block IS NOT NULL"))
        building.append(set(rows))
        threads.add(threading.current_thread().name)
        return rows.get("person", 0) >= 3

    results = by_name(pipeline.refresh_once(cfg, pg, should_stop=stop_at_person_3))
    assert results["person"].status == "building"
    assert any({"person", "with_parent"} <= names for names in building)  # both under way at once
    assert {"chtsync-build_0", "chtsync-build_1"} <= threads  # on connections of their own
    results = by_name(pipeline.refresh_once(cfg, pg))
    assert results["bad"].status == "error" and "division by zero" in (results["bad"].error or "")
    assert {r.status for n, r in results.items() if n != "bad"} == {"ok"}
    models.remove("bad")
    assert_exact(pg, cfg)


def test_first_builds_share_one_read_of_each_range(
        pg: psycopg.Connection, cfg: Config, models: ModelsFile, docs: Docs, small: None,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """First builds of the models reading the raw table by range read each range once for all
    of them, in BUILD_WORKERS groups: progress moves together in one transaction per range,
    writes between ranges, a stop and a resume (alone) end exact; a model that fails goes
    unshared and is recorded, a model whose CTE takes the shared source's name builds alone."""
    models.set("names", "SELECT _id AS uuid, source, upper(doc ->> 'name') AS name, length(doc ->> 'pad') AS pad"
               " FROM couchdb WHERE NOT _deleted AND doc ->> 'type' = 'person' AND doc ->> 'name' <> 'Bob'",
               kind="incremental", unique_key=["uuid", "source"])
    models.set("sub", "SELECT s.uuid, s.source, s.name FROM (SELECT _id AS uuid, source, doc ->> 'name' AS name"
               " FROM couchdb WHERE doc ->> 'type' = 'person') AS s", kind="incremental", unique_key=["uuid", "source"])
    models.set("docs", "SELECT _id AS uuid, source, _deleted, doc ->> 'type' AS type FROM couchdb",
               kind="incremental", unique_key=["uuid", "source"])
    models.set("bad", "SELECT _id AS uuid, 1 / (length(doc ->> 'name') - 3) AS x FROM couchdb"
               " WHERE doc ->> 'type' = 'person'", kind="incremental", unique_key=["uuid"])
    models.set("named", "WITH chtsync_build_source AS (SELECT 1 AS one) SELECT c._id AS uuid FROM couchdb AS c"
               " JOIN chtsync_build_source AS s ON true", kind="incremental", unique_key=["uuid"])
    docs.put(*(person(i, parent=i - 1 if i % 3 else None) for i in range(40)))
    docs.put({"_id": "settings", "type": "settings", "pad": PAD})
    pg.execute("ANALYZE couchdb")
    pipeline.apply(cfg, pg)
    caplog.set_level("INFO", logger="chtsync.pipeline")
    looks: list[dict[str, int]] = []

    wrote: list[bool] = []

    def writes_then_stop() -> bool:  # called by both groups, between their ranges
        at = dict(pg.execute("SELECT name, build_block FROM chtsync_models WHERE build_block IS NOT NULL"))
        looks.append(at)
        done = min(at.get(n) or 0 for n in ("person", "names", "sub", "docs"))
        if done >= 2 and not wrote:
            wrote.append(True)
            docs.put(person(0, "Bob"), person(39, "Bob"), person(100, "New"))
            docs.delete("p001")
        return done >= 4

    results = by_name(pipeline.refresh_once(cfg, pg, should_stop=writes_then_stop))
    shared = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model builds shared groups=")]
    assert len(shared) == 1
    groups = [set(g.split(",")) for g in shared[0].split(" sampled_ms=")[0].split("=", 1)[1].split()]
    # two groups of the four shareable models that work; bad fails its sample, named has no shared SQL
    assert len(groups) == 2 and set().union(*groups) == {"person", "names", "sub", "docs"}
    assert wrote and any(r.status == "building" for r in results.values())
    together = sorted(next(g for g in groups if len(g) > 1))  # 4 models in 2 groups: one has two or more
    assert any(len({at.get(n) for n in together}) == 1 and (at.get(together[0]) or 0) >= 3 for at in looks)
    # Resumed alone, each where the shared build left it; the writes since it began derived again.
    results = by_name(pipeline.refresh_once(cfg, pg))
    assert results["bad"].status == "error" and "division by zero" in (results["bad"].error or "")
    assert {r.status for n, r in results.items() if n != "bad"} == {"ok"}
    models.remove("bad")
    assert_exact(pg, cfg)
    assert pg.execute("SELECT name FROM names WHERE uuid = 'p100'").fetchone() == ("NEW",)
    assert pg.execute("SELECT count(*) FROM names WHERE uuid IN ('p000', 'p001', 'p039')").fetchone() == (0,)
    assert pg.execute("SELECT count(*) FROM named").fetchone() == (42,)
    # Built whole by the shared reads, then rebuilt alone: the same rows.
    shared_rows = {m: pg.execute(f"SELECT * FROM {m} ORDER BY 1, 2").fetchall() for m in ("names", "sub", "docs")}
    for m in ("names", "sub", "docs"):
        pg.execute("UPDATE chtsync_models SET snapshot = NULL WHERE name = %s", (m,))
    monkeypatch.setattr(refresh_mod, "BUILD_WORKERS", 1)
    caplog.clear()
    results = by_name(pipeline.refresh_once(cfg, pg))
    assert {results[m].status for m in shared_rows} == {"ok"}
    assert any(r.getMessage().startswith("model build shared done names=names,sub,docs ") for r in caplog.records)
    assert {m: pg.execute(f"SELECT * FROM {m} ORDER BY 1, 2").fetchall() for m in shared_rows} == shared_rows
    assert_exact(pg, cfg)


def test_models_reading_models_are_built_side_by_side_once_their_upstream_is(
        pg: psycopg.Connection, cfg: Config, models: ModelsFile, docs: Docs, small: None,
        caplog: pytest.LogCaptureFixture) -> None:
    """A model reading an incremental model (as contact_hierarchy reads contact) is built on a
    build connection as soon as that model is built and analyzed, beside the other builds, and
    ends exact after writes in the middle of its build. One whose upstream failed, or whose
    upstream has a test of severity error (it could hold it back), is built in its turn."""
    set_people(models)
    set_tree(models)
    models.set("bad", "SELECT _id AS uuid, 1 / (length(doc ->> 'name') - 3) AS x FROM couchdb"
               " WHERE doc ->> 'type' = 'person'", kind="incremental", unique_key=["uuid"])
    models.set("over_bad", "SELECT b.uuid, b.x FROM bad AS b", kind="incremental", unique_key=["uuid"])
    models.set("checked", "SELECT _id AS uuid, doc ->> 'name' AS name FROM couchdb WHERE doc ->> 'type' = 'person'",
               kind="incremental", unique_key=["uuid"],
               tests=[{"test": "not_null", "column": "name", "severity": "error"}])
    models.set("over_checked", "SELECT c.uuid, lower(c.name) AS name FROM checked AS c", kind="incremental",
               unique_key=["uuid"])
    docs.put(*(person(i, f"N{i}", parent=i - 1 if i % 3 else None) for i in range(40)))
    pg.execute("ANALYZE couchdb")
    pipeline.apply(cfg, pg)
    caplog.set_level("INFO", logger="chtsync.pipeline")
    wrote: list[bool] = []

    def write_during_tree() -> bool:
        if not wrote and (pg.execute("SELECT build_block FROM chtsync_models WHERE name = 'tree'").fetchone()[0]
                          or 0) >= 2:
            wrote.append(True)  # a renamed parent, a moved child, a new child, a deleted one
            docs.put(person(0, "Bob"), person(4, "Cy", parent=3), person(100, "New", parent=0))
            docs.delete("p001")
        return False

    results = by_name(pipeline.refresh_once(cfg, pg, should_stop=write_during_tree))
    assert wrote
    records = [(r.getMessage(), r.threadName) for r in caplog.records]

    def first(start: str) -> int:
        return next(i for i, (message, _) in enumerate(records) if message.startswith(start))

    # tree: on a build connection, after people was built (shared) and analyzed there
    tree_built = first("model indexes built name=tree ")
    assert records[tree_built][1].startswith("chtsync-build")
    people_done = next(i for i, (m, _) in enumerate(records)  # alone, or in a shared group
                       if m.startswith("model indexes built name=people ")
                       or (m.startswith("model build shared done names=") and "people" in m.split()[4][6:].split(",")))
    analyzed = first("analyzed name=people ")
    assert people_done < analyzed < first("model building name=tree ") < tree_built
    assert records[analyzed][1].startswith("chtsync-build")
    # over_checked and over_bad: in their turn, on the round's own connection
    assert not records[first("model indexes built name=over_checked ")][1].startswith("chtsync-build")
    assert results["bad"].status == "error" and results["over_bad"].status == "blocked"
    assert not any(m.startswith("model building name=over_bad ") for m, _ in records)
    assert {r.status for n, r in results.items() if n not in ("bad", "over_bad")} == {"ok"}
    models.remove("over_bad").remove("bad")
    assert_exact(pg, cfg)
    assert pg.execute("SELECT parent_name FROM tree WHERE uuid = 'p100'").fetchone() == ("Bob",)
    assert pg.execute("SELECT count(*) FROM tree WHERE uuid = 'p001' OR parent = 'p001' AND parent_name IS NOT NULL"
                      ).fetchone() == (0,)
    # Added later, beside a new model of the raw table: built at once on a build connection from
    # people as it stands (written to since its last round), then caught up by the round.
    docs.put(person(5, "Flo", parent=100), person(101, "Gus", parent=5))
    set_tree(models, "tree2")
    models.set("names", "SELECT _id AS uuid, doc ->> 'name' AS name FROM couchdb", kind="incremental",
               unique_key=["uuid"])
    pipeline.apply(cfg, pg)
    caplog.clear()
    assert {r.status for r in pipeline.refresh_once(cfg, pg)} == {"ok"}
    assert next(r.threadName for r in caplog.records
                if r.getMessage().startswith("model indexes built name=tree2 ")).startswith("chtsync-build")
    assert_exact(pg, cfg)
    assert pg.execute("SELECT parent_name FROM tree2 WHERE uuid = 'p101'").fetchone() == ("Flo",)


def test_a_model_built_in_one_statement_from_a_model_the_round_then_refreshes_is_caught_up(
        pg: psycopg.Connection, cfg: Config, models: ModelsFile, docs: Docs) -> None:
    """Built side by side in one statement (a small upstream) from a model with writes still to
    refresh: the round refreshes the upstream after, and the model derives those documents
    again, instead of keeping the upstream's old rows until its next change."""
    set_people(models)
    docs.put(*(person(i, f"N{i}", parent=i - 1 if i % 3 else None) for i in range(40)))
    pg.execute("ANALYZE couchdb")
    pipeline.apply(cfg, pg)
    assert {r.status for r in pipeline.refresh_once(cfg, pg)} == {"ok"}
    docs.put(person(0, "Bob"))  # p001's parent renamed; people has not seen it yet
    docs.delete("p002")
    set_tree(models)
    models.set("names", "SELECT _id AS uuid, doc ->> 'name' AS name FROM couchdb", kind="incremental",
               unique_key=["uuid"])
    pipeline.apply(cfg, pg)
    results = by_name(pipeline.refresh_once(cfg, pg))
    assert {r.status for r in results.values()} == {"ok"}
    assert pg.execute("SELECT parent_name FROM tree WHERE uuid = 'p001'").fetchone() == ("Bob",)
    assert pg.execute("SELECT count(*) FROM tree WHERE uuid = 'p002'").fetchone() == (0,)
    assert_exact(pg, cfg)


def test_a_shared_build_stopped_by_a_rewritten_table_starts_over_alone(
        pg: psycopg.Connection, cfg: Config, models: ModelsFile, docs: Docs, small: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    models.set("names", "SELECT _id AS uuid, source, upper(doc ->> 'name') AS name FROM couchdb"
               " WHERE NOT _deleted AND doc ->> 'type' = 'person'", kind="incremental", unique_key=["uuid", "source"])
    monkeypatch.setattr(refresh_mod, "BUILD_WORKERS", 1)  # person and names in one group
    docs.put(*(person(i) for i in range(30)))
    pg.execute("ANALYZE couchdb")
    pipeline.apply(cfg, pg)
    rewritten: list[bool] = []

    def rewrite_at_3() -> bool:
        if not rewritten and (pg.execute("SELECT build_block FROM chtsync_models WHERE name = 'names'"
                                         ).fetchone()[0] or 0) >= 3:
            docs.put(*(person(i, "Bob") for i in range(0, 30, 2)))
            pg.execute("VACUUM FULL couchdb")  # every row moves: the blocks done mean nothing now
            rewritten.append(True)
        return False

    results = by_name(pipeline.refresh_once(cfg, pg, should_stop=rewrite_at_3))
    assert rewritten and {r.status for r in results.values()} == {"ok"}
    assert_exact(pg, cfg)


def test_a_model_failing_in_a_shared_build_fails_alone(
        pg: psycopg.Connection, cfg: Config, models: ModelsFile, docs: Docs, small: None,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A document that one model's SQL refuses, in a range the cost samples did not read: the
    shared build stops there, every model resumes alone, the one that fails is recorded."""
    models.set("late_bad", "SELECT _id AS uuid, 1 / (length(doc ->> 'name') - 4) AS x FROM couchdb"
               " WHERE doc ->> 'type' = 'person'", kind="incremental", unique_key=["uuid"])
    monkeypatch.setattr(refresh_mod, "BUILD_WORKERS", 1)
    monkeypatch.setattr(refresh_mod, "SAMPLE_RANGES", 1)  # the first range only
    docs.put(*(person(i) for i in range(30)))
    docs.put(person(30, "Dave"))  # last in the table
    pg.execute("ANALYZE couchdb")
    pipeline.apply(cfg, pg)
    caplog.set_level("INFO", logger="chtsync.pipeline")
    results = by_name(pipeline.refresh_once(cfg, pg))
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("model build side by side failed names=person,late_bad error=division by zero")
               for m in messages), messages
    assert results["late_bad"].status == "error" and "division by zero" in (results["late_bad"].error or "")
    assert results["person"].status == "ok"
    models.remove("late_bad")
    assert_exact(pg, cfg)
