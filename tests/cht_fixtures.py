"""Test helpers for the CHT base models: a fake CouchDB feed into the real ingest function, and a
way to build and refresh sql/models.yaml (the pipeline engine when it exists, else a small local
stand-in that follows the same contract: incremental = delete and re-insert changed documents)."""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import psycopg
import yaml

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
    chtsync_ingest_v2, with revisions that grow per document so edits replace older rows."""

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
            "SELECT * FROM chtsync_ingest_v2('v1.couchdb'::regclass, %s, %s::jsonb, 1000)",
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
