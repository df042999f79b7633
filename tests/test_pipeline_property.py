"""Property: after any sequence of inserts, edits, type changes and deletions written through the
ingest function, interleaved with incremental runs and with a writer whose transaction commits
only after a run, every incremental and aggregate table equals a full recomputation of its SQL:
incremental tables keyed by the document, one following references to other documents (a
hierarchy), and aggregates recounting only the groups touched or adding the changes' counts."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chtsync import db, pipeline
from chtsync.pipeline import graph
from tests.conftest import make_config
from tests.pipeline_helpers import Docs, ModelsFile
from tests.test_pipeline import diff_with_rebuild

IDS = [f"d{i}" for i in range(6)]
SOURCES = ["host/medic", "host/other"]
REFERENCES = ["p1", "p2"]
LATE = "host/late"  # the late writer's own source: its open transaction locks no row the others write

doc = st.fixed_dictionaries({
    "type": st.sampled_from(["person", "clinic", "report"]),
    "name": st.sampled_from(["Ann", "Bob", None]),
    "tags": st.lists(st.sampled_from(["a", "b", "c"]), max_size=3),
    "parent": st.sampled_from([*IDS, None]),
})
op = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(IDS), st.sampled_from(SOURCES), doc),
    st.tuples(st.just("delete"), st.sampled_from(IDS), st.sampled_from(SOURCES)),
    st.tuples(st.just("run")),
    st.tuples(st.just("late"), st.sampled_from(IDS), doc),
)


@pytest.fixture
def setup(pg: psycopg.Connection, tmp_path: Path) -> tuple:
    models = ModelsFile(tmp_path)
    models.set("person", "SELECT _id AS uuid, source, doc ->> 'name' AS name, doc #>> '{parent}' AS parent"
               " FROM couchdb WHERE NOT _deleted AND doc ->> 'type' = 'person'",
               kind="incremental", unique_key=["uuid", "source"])
    models.set("tag", "SELECT _id AS uuid, t AS tag FROM couchdb, jsonb_array_elements_text("
               " CASE WHEN jsonb_typeof(doc -> 'tags') = 'array' THEN doc -> 'tags' ELSE '[]' END) AS t"
               " WHERE NOT _deleted", kind="incremental", unique_key=["uuid"])
    # Keyed by the person: reads its upstream incremental model and the raw table.
    models.set("person_tags", "SELECT p.uuid, p.name, count(t.tag) AS tags FROM person AS p"
               " LEFT JOIN tag AS t USING (uuid) GROUP BY p.uuid, p.name",
               kind="incremental", unique_key=["uuid"])
    # Each row derived from the person and its ancestors two levels up (cycles included): a change
    # to an ancestor re-derives it through reference_keys.
    models.set("chain", "SELECT c.uuid, c.source, c.name, c.parent AS p1, a1.name AS p1_name,"
               " a1.parent AS p2, a2.name AS p2_name, a2.parent AS p3"
               " FROM person AS c LEFT JOIN person AS a1 ON a1.uuid = c.parent"
               " LEFT JOIN person AS a2 ON a2.uuid = a1.parent",
               kind="incremental", unique_key=["uuid"], reference_keys=REFERENCES)
    # Aggregates: NULL groups, an expression as a group, two group columns, min/max (not
    # maintainable by adding and subtracting).
    models.set("by_name", "SELECT source, upper(name) AS name, count(*) AS n, min(uuid) AS first"
               " FROM person GROUP BY source, upper(name)", kind="aggregate", unique_key=["source", "name"])
    models.set("by_tag", "SELECT tag, count(*) AS n, max(uuid) AS last FROM tag WHERE tag <> 'c' GROUP BY tag",
               kind="aggregate", unique_key=["tag"])
    # Aggregates of counts only: changes added (FILTER, a group by position, NULL keys recounted)
    models.set("count_by_name", "SELECT source, upper(name) AS name, count(*) AS n,"
               " count(parent) FILTER (WHERE uuid > 'd2') AS late FROM person GROUP BY source, upper(name)",
               kind="aggregate", unique_key=["source", "name"])
    models.set("count_by_tag", "SELECT tag, count(*) FROM tag WHERE tag <> 'c' GROUP BY 1",
               kind="aggregate", unique_key=["tag"])
    cfg = make_config(pg.info.dbname, CHTSYNC_MODELS=str(models.path))
    pipeline.apply(cfg, pg)
    built = graph.load(cfg)
    counts = [built.models[m].counts for m in ("by_name", "count_by_name", "count_by_tag")]
    assert counts == [(), ("n", "late"), ("count",)]
    return cfg, built


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, max_size=25))
def test_incremental_equals_rebuild(pg: psycopg.Connection, setup: tuple, ops: list[tuple]) -> None:
    cfg, built = setup
    incremental = [m for m in built.models.values() if m.kind in ("incremental", "aggregate")]
    pg.execute("TRUNCATE couchdb")
    for m in incremental:  # start every example from empty models with fresh watermarks
        pipeline.rebuild(cfg, pg, m.name)
    docs = Docs(pg)
    with db.connect(cfg) as late:  # not autocommit: its writes stay open until committed
        open_late = False

        def run() -> None:
            results = pipeline.refresh_once(cfg, pg)
            assert all(r.status in ("ok", "skipped") for r in results), results
            for m in incremental:
                assert diff_with_rebuild(pg, m) == 0, m.name

        for o in ops:
            if o[0] == "put":
                docs.put({"_id": o[1], **o[3]}, source=o[2])
            elif o[0] == "delete":
                docs.delete(o[1], source=o[2])
            elif o[0] == "late":
                docs.put({"_id": o[1], **o[2]}, source=LATE, conn=late)
                open_late = True
            else:
                run()
                if open_late:  # committed after the run: a later run must still see it
                    late.commit()
                    open_late = False
        late.commit()
    run()
