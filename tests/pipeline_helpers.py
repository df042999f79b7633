"""Helpers of the pipeline tests (test_pipeline, test_datatests, the property test, ...): documents
written as the sync engine writes them, and a models file in a temporary folder. Their fixtures
(`models`, `cfg`, `docs`) are in conftest.py."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import psycopg
import yaml

MEDIC = "host/medic"


class Docs:
    """Writes documents as the sync engine does: a _changes page through chtsync_ingest_v2."""

    def __init__(self, conn: psycopg.Connection, table: str = "v1.couchdb") -> None:
        self.conn = conn
        self.table = table
        self.revs: dict[tuple[str, str], int] = defaultdict(int)
        self.seq = 0

    def _page(self, results: list[dict[str, Any]], source: str, conn: psycopg.Connection | None) -> None:
        self.seq += 1
        page = {"results": results, "last_seq": str(self.seq)}
        (conn or self.conn).execute(
            "SELECT * FROM chtsync_ingest_v2(%s::regclass, %s, %s::jsonb, 1000)",
            (self.table, source, json.dumps(page)))

    def _rev(self, source: str, doc_id: str) -> str:
        self.revs[(source, doc_id)] += 1
        return f"{self.revs[(source, doc_id)]}-abc"

    def put(self, *docs: dict[str, Any], source: str = MEDIC, conn: psycopg.Connection | None = None) -> None:
        results = []
        for doc in docs:
            body = dict(doc, _rev=self._rev(source, doc["_id"]))
            results.append({"seq": self.seq, "id": body["_id"], "changes": [{"rev": body["_rev"]}], "doc": body})
        self._page(results, source, conn)

    def delete(self, *ids: str, source: str = MEDIC, conn: psycopg.Connection | None = None) -> None:
        results = []
        for doc_id in ids:
            rev = self._rev(source, doc_id)
            results.append({"seq": self.seq, "id": doc_id, "deleted": True, "changes": [{"rev": rev}],
                            "doc": {"_id": doc_id, "_rev": rev, "_deleted": True}})
        self._page(results, source, conn)


class ModelsFile:
    """A models.yaml with its .sql files in a temporary folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.models: dict[str, dict[str, Any]] = {}
        self.path = folder / "models.yaml"

    def set(self, name: str, body: str, kind: str = "view", **props: Any) -> ModelsFile:
        (self.folder / f"{name}.sql").write_text(body)
        self.models[name] = {"name": name, "sql": f"{name}.sql", "kind": kind, **props}
        return self.write()

    def remove(self, name: str) -> ModelsFile:
        del self.models[name]
        return self.write()

    def write(self) -> ModelsFile:
        self.path.write_text(yaml.safe_dump({"models": list(self.models.values())}, sort_keys=False))
        return self
