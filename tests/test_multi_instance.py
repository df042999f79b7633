"""Several CHT instances in one process: config.yaml `sources:`, two CouchDB servers (the session's
CouchDB 3.4 and a second one of its own), one raw table kept apart by `source`, every instance
visible in the models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import yaml

from chtsync import config as config_mod
from chtsync import db, pipeline
from tests.conftest import PG_HOST, PG_PORT, PG_USER
from tests.servers import CouchAdmin, CouchDBServer, PouchServer
from tests.syncutil import assert_equal, sync_once


@pytest.fixture
def second_server(couchdb_server) -> Iterator[CouchDBServer | PouchServer]:
    """A second CHT instance: another real CouchDB when the release is here (an external
    CHTSYNC_TEST_COUCHDB_URL gives only one), else pouchdb-server."""
    server = CouchDBServer() if isinstance(couchdb_server, CouchDBServer) else PouchServer()
    server.start()
    yield server
    server.close()


def test_two_cht_instances_into_one_table(
    pg: psycopg.Connection, dbname: str, couch: CouchAdmin, couch_server, second_server, tmp_path: Path,
) -> None:
    north, south = couch, second_server.client()
    for server, prefix in ((north, "n"), (south, "s")):
        server.create_db("medic")
        server.create_db("medic-users-meta")
        server.bulk("medic", [{"_id": f"{prefix}-hc", "type": "health_center", "name": "HC"}]
                    + [{"_id": f"{prefix}-p{i}", "type": "person", "parent": {"_id": f"{prefix}-hc"}}
                       for i in range(20)])
        # The same _id on both instances (CHT's settings doc is in every medic database).
        server.put("medic", {"_id": "settings", "type": "settings", "instance": prefix})
        server.put("medic-users-meta", {"_id": f"{prefix}-fb", "type": "feedback"})
    (tmp_path / "south-password").write_text(second_server.auth[1] + "\n")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "sources": [
            {"url": couch_server.url, "user": couch_server.auth[0], "password": couch_server.auth[1],
             "dbs": ["medic", "medic-users-meta"], "instance": "north.cht.org"},
            {"host": "127.0.0.1", "port": second_server.port, "secure": False, "user": second_server.auth[0],
             "password_file": str(tmp_path / "south-password"), "dbs": "medic, medic-users-meta",
             "instance": "south.cht.org"},
        ],
        "postgres": {"host": PG_HOST, "port": PG_PORT, "user": PG_USER, "db": dbname},
    }))
    # No COUCHDB_* in the environment: the environment form is the one-instance shortcut.
    cfg = config_mod.load(tmp_path / "config.yaml", env={})
    assert [(s.instance, s.dbs) for s in cfg.sources] == [
        ("north.cht.org", ("medic", "medic-users-meta")), ("south.cht.org", ("medic", "medic-users-meta"))]
    assert cfg.sources[1].password == second_server.auth[1]

    stats = sync_once(cfg)
    assert sorted((s.source, s.state) for s in stats) == [
        ("north.cht.org/medic", "caught up"), ("north.cht.org/medic-users-meta", "caught up"),
        ("south.cht.org/medic", "caught up"), ("south.cht.org/medic-users-meta", "caught up")]
    assert assert_equal(pg, north, "medic", "north.cht.org/medic") == 22
    assert assert_equal(pg, south, "medic", "south.cht.org/medic") == 22
    assert assert_equal(pg, south, "medic-users-meta", "south.cht.org/medic-users-meta") == 1
    settings = dict(pg.execute("SELECT source, doc->>'instance' FROM couchdb WHERE _id = 'settings'").fetchall())
    assert settings == {"north.cht.org/medic": "n", "south.cht.org/medic": "s"}
    progress = {r[0] for r in pg.execute("SELECT source FROM couchdb_progress")}
    assert progress == {s.source for s in stats}

    with db.connect(cfg, autocommit=True) as conn:
        pipeline.apply(cfg, conn)
        pipeline.refresh_once(cfg, conn, force=True)
        meta = conn.execute("SELECT instance, dbname, count(*) FROM document_metadata"
                            " GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
        assert meta == [("north.cht.org", "medic", 22), ("north.cht.org", "medic-users-meta", 1),
                        ("south.cht.org", "medic", 22), ("south.cht.org", "medic-users-meta", 1)]
        both = conn.execute("SELECT instance FROM document_metadata WHERE uuid = 'settings' ORDER BY 1").fetchall()
        assert both == [("north.cht.org",), ("south.cht.org",)]

    # A change on one instance reaches only its own rows.
    doc = south.get("medic", "s-p3")
    doc["name"] = "moved"
    south.put("medic", doc)
    sync_once(cfg)
    assert pg.execute("SELECT source FROM couchdb WHERE doc->>'name' = 'moved'").fetchall() == [
        ("south.cht.org/medic",)]


def test_default_instance_is_the_host_name(tmp_path: Path) -> None:
    """Without `instance`, each source is named after its host, as CHT Sync's source column."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"sources": [
        {"url": "https://cht-a.example.org", "dbs": ["medic"]},
        {"host": "cht-b.example.org", "port": 443, "secure": True, "dbs": ["medic"]},
    ]}))
    cfg = config_mod.load(tmp_path / "config.yaml", env={})
    assert [s.source_name("medic") for s in cfg.sources] == ["cht-a.example.org/medic", "cht-b.example.org/medic"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"sources": [
        {"url": "https://cht.example.org", "dbs": ["medic"]},
        {"url": "https://cht.example.org:8443", "dbs": ["medic"]},
    ]}))
    with pytest.raises(config_mod.ConfigError, match="share an instance label"):
        config_mod.load(tmp_path / "config.yaml", env={})
