"""Test helpers for the CHT base models: a fake CouchDB feed into the real ingest function, and a
way to build and refresh sql/models.yaml (the pipeline engine when it exists, else a small local
stand-in that follows the same contract: incremental = delete and re-insert changed documents)."""

from __future__ import annotations

import copy
import datetime as dt
import graphlib
import itertools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
MODELS_YAML = ROOT / "sql" / "models.yaml"
MEDIC = "localhost/medic"
USERS = "localhost/_users"
META = "localhost/medic-users-meta"

UTC = dt.UTC


def ts(seconds: float) -> dt.datetime:
    """An aware UTC datetime from seconds since the epoch."""
    return dt.datetime.fromtimestamp(seconds, UTC)


class Feed:
    """Writes documents the way the sync engine does: a CouchDB _changes page per call, through
    chtsync_ingest_v1, with revisions that grow per document so edits replace older rows."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.revs: dict[tuple[str, str], int] = {}
        self.seq = itertools.count(1)

    def _rev(self, source: str, doc_id: str) -> str:
        n = self.revs.get((source, doc_id), 0) + 1
        self.revs[(source, doc_id)] = n
        return f"{n}-{abs(hash((source, doc_id, n))) % 10**8:08x}"

    def _page(self, source: str, results: list[dict[str, Any]]) -> None:
        page = {"results": results, "last_seq": str(results[-1]["seq"]) if results else "0"}
        row = self.conn.execute(
            "SELECT * FROM chtsync_ingest_v1('v1.couchdb'::regclass, %s, %s::jsonb, 1000)",
            (source, json.dumps(page)),
        ).fetchone()
        assert row is not None and row[3] == len(results), row

    def put(self, docs: Iterable[Mapping[str, Any]], source: str = MEDIC) -> None:
        results = []
        for doc in docs:
            body = copy.deepcopy(dict(doc))
            body["_rev"] = self._rev(source, body["_id"])
            results.append({"seq": next(self.seq), "id": body["_id"],
                            "changes": [{"rev": body["_rev"]}], "doc": body})
        self._page(source, results)

    def delete(self, ids: Iterable[str], source: str = MEDIC) -> None:
        results = []
        for doc_id in ids:
            rev = self._rev(source, doc_id)
            results.append({"seq": next(self.seq), "id": doc_id, "deleted": True,
                            "changes": [{"rev": rev}],
                            "doc": {"_id": doc_id, "_rev": rev, "_deleted": True}})
        self._page(source, results)


# --- models.yaml ---------------------------------------------------------------------------

def load_models(path: Path = MODELS_YAML) -> list[dict[str, Any]]:
    return yaml.safe_load(path.read_text())["models"]


def model_sql(model: Mapping[str, Any], path: Path = MODELS_YAML) -> str:
    return (path.parent / model["sql"]).read_text()


def ordered(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Models in dependency order (from their declared depends_on)."""
    by_name = {m["name"]: m for m in models}
    graph = {m["name"]: [d for d in m.get("depends_on", []) if d in by_name] for m in models}
    return [by_name[n] for n in graphlib.TopologicalSorter(graph).static_order()]


class LocalPipeline:
    """Stand-in for chtsync.pipeline until it lands: same objects, same refresh contract."""

    KIND = {"incremental": "TABLE", "table": "TABLE", "view": "VIEW",
            "materialized_view": "MATERIALIZED VIEW"}

    def __init__(self, conn: psycopg.Connection, path: Path = MODELS_YAML) -> None:
        self.conn = conn
        self.path = path
        self.models = ordered(load_models(path))
        self.watermark: int | None = None

    def _max_xid(self) -> int:
        row = self.conn.execute("SELECT max(_xid::text::bigint) FROM couchdb").fetchone()
        return int(row[0] or 0)

    def apply(self) -> None:
        with self.conn.transaction():
            self.watermark = self._max_xid()
            for m in self.models:
                name = sql.Identifier(m["name"])
                body = sql.SQL(model_sql(m, self.path))  # type: ignore[arg-type]
                self.conn.execute(sql.SQL("CREATE {} {} AS ").format(
                    sql.SQL(self.KIND[m["kind"]]), name) + body)
                for i, ix in enumerate(m.get("indexes", [])):
                    self.conn.execute(sql.SQL("CREATE {}INDEX {} ON {} USING {} ({})").format(
                        sql.SQL("UNIQUE " if ix.get("unique") else ""),
                        sql.Identifier(f"{m['name']}_ix{i}"), name,
                        sql.SQL(ix.get("method", "btree")),
                        sql.SQL(", ").join(map(sql.Identifier, ix["columns"]))))

    def refresh(self) -> None:
        """Incremental tables: delete and re-insert the rows of documents written since the last
        run; materialized views: REFRESH CONCURRENTLY; views: nothing to do."""
        with self.conn.transaction():
            changed = [r[0] for r in self.conn.execute(
                "SELECT DISTINCT _id FROM couchdb WHERE _xid::text::bigint > %s",
                (self.watermark,))]
            self.watermark = self._max_xid()
            for m in self.models:
                name = sql.Identifier(m["name"])
                if m["kind"] == "incremental":
                    key = sql.Identifier(m["unique_key"][0])
                    self.conn.execute(sql.SQL("DELETE FROM {} WHERE {} = ANY(%s)").format(
                        name, key), (changed,))
                    self.conn.execute(sql.SQL(
                        "INSERT INTO {} SELECT * FROM ({}) AS m WHERE m.{} = ANY(%s)").format(
                        name, sql.SQL(model_sql(m, self.path)), key), (changed,))  # type: ignore[arg-type]
                elif m["kind"] == "materialized_view":
                    self.conn.execute(sql.SQL(
                        "REFRESH MATERIALIZED VIEW CONCURRENTLY {}").format(name))


def engine_available() -> bool:
    try:
        from chtsync import pipeline
    except ImportError:
        return False
    return hasattr(pipeline, "apply") and hasattr(pipeline, "refresh_once")
