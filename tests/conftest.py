"""Shared fixtures: a fresh Postgres database per test (migrated template), and the CouchDB servers.

CouchDB servers: the real Apache CouchDB 3.4 (`couchdb_server`, the reference; unpacked from
../shared/couchdb/ or CHTSYNC_TEST_COUCHDB_URL) and pouchdb-server (`pouch_server`). `couch` and
`cfg_factory` use the real CouchDB; a test marked `both_servers` runs once on each.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from pytest_postgresql import factories

from chtsync import config as config_mod
from chtsync import migrate
from tests.pipeline_helpers import Docs, ModelsFile
from tests.servers import ADMIN, COUCHDB_TARBALL, CouchAdmin, CouchDBServer, ExternalCouchDB, PouchServer

PG_HOST = os.environ.get("TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("TEST_PG_USER", "postgres")
# One database name per pytest process, so parallel runs never share a database.
TEST_DB = f"chtsync_test_{os.getpid()}"


def make_config(dbname: str, couch_url: str = "http://127.0.0.1:9", **env: str) -> config_mod.Config:
    """A Config for a test database; extra keyword arguments are environment variables."""
    base = {
        "COUCHDB_URL": couch_url,
        "COUCHDB_USER": ADMIN[0],
        "COUCHDB_PASSWORD": ADMIN[1],
        "COUCHDB_DBS": "medic",
        "POSTGRES_HOST": PG_HOST,
        "POSTGRES_PORT": str(PG_PORT),
        "POSTGRES_USER": PG_USER,
        "POSTGRES_DB": dbname,
    }
    base.update(env)
    return config_mod.load(env=base, search=False)


def _load_template(host: str, port: int, user: str, dbname: str, password: str | None, **_: object) -> None:
    """Migrate the template once; every test database is a clone of it."""
    migrate.apply(make_config(dbname))


postgresql_noproc = factories.postgresql_noproc(
    host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=TEST_DB, load=[_load_template]
)
postgresql = factories.postgresql("postgresql_noproc")


@pytest.fixture
def pg(postgresql: psycopg.Connection) -> psycopg.Connection:
    """An autocommit connection to this test's fresh, migrated database (schema v1)."""
    postgresql.autocommit = True
    postgresql.execute("SET search_path = v1, public")
    return postgresql


@pytest.fixture
def dbname(pg: psycopg.Connection) -> str:
    return pg.info.dbname


@pytest.fixture(scope="session")
def pouch_server() -> Iterator[PouchServer]:
    server = PouchServer().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def couchdb_server() -> Iterator[CouchDBServer | ExternalCouchDB]:
    """The real Apache CouchDB 3 of the whole test run.

    CHTSYNC_TEST_COUCHDB_URL when set (any CouchDB 3 you run, e.g. in Docker:
    http://admin:pass@127.0.0.1:5984), else the release from ../shared/couchdb/ started on a free
    loopback port, else skip; under CI=true a missing CouchDB fails instead of skipping.
    """
    if os.environ.get("CHTSYNC_TEST_COUCHDB_URL"):
        server: CouchDBServer | ExternalCouchDB = ExternalCouchDB(os.environ["CHTSYNC_TEST_COUCHDB_URL"]).start()
    elif COUCHDB_TARBALL.exists():
        server = CouchDBServer().start()
    else:
        reason = f"no real CouchDB: {COUCHDB_TARBALL} is absent and CHTSYNC_TEST_COUCHDB_URL is unset"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    # As on every CHT server: the system databases exist before any test. A single node creates
    # them itself a moment after it answers /_up (or not, after a slow first boot); a test that
    # created one first would have it dropped after it, as a database it made.
    admin = server.client()
    for db in ("_users", "_replicator"):
        admin.create_db(db)
    yield server
    server.close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "couch_impl" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_servers"):
        metafunc.parametrize("couch_impl", ["couchdb", "pouchdb"])


@pytest.fixture
def couch_impl() -> str:
    """Which CouchDB a test talks to; `@pytest.mark.both_servers` parametrizes it over both."""
    return "couchdb"


@pytest.fixture
def couch_server(couch_impl: str, request: pytest.FixtureRequest) -> CouchDBServer | ExternalCouchDB | PouchServer:
    return request.getfixturevalue("couchdb_server" if couch_impl == "couchdb" else "pouch_server")


@pytest.fixture
def couch(couch_server) -> Iterator[CouchAdmin]:
    """Admin client on the test's server; databases made by the test are dropped after, and
    users it added to the shared `_users` database are deleted (the next test may add them again)."""
    admin = couch_server.client()
    before = set(admin.http.get("/_all_dbs").json())
    users_before = _user_docs(admin) if "_users" in before else {}
    yield admin
    for db in set(admin.http.get("/_all_dbs").json()) - before:
        admin.delete_db(db)
    if "_users" in before:
        for doc_id, rev in _user_docs(admin).items():
            if users_before.get(doc_id) != rev:
                admin.http.delete(f"/_users/{quote(doc_id, safe='')}", params={"rev": rev})


def _user_docs(admin: CouchAdmin) -> dict[str, str]:
    r = admin.http.get("/_users/_all_docs", params={"startkey": '"org.couchdb.user:"', "endkey": '"org.couchdb.user;"'})
    return {row["id"]: row["value"]["rev"] for row in r.json().get("rows", [])} if r.status_code == 200 else {}


@pytest.fixture
def cfg_factory(dbname: str, couch_server):
    """Build a Config for this test's databases: cfg_factory(dbs="a,b", **env)."""

    def build(dbs: str = "medic", url: str | None = None, **env: str) -> config_mod.Config:
        auth = {"COUCHDB_USER": couch_server.auth[0], "COUCHDB_PASSWORD": couch_server.auth[1]}
        return make_config(dbname, url or couch_server.url, COUCHDB_DBS=dbs, **{**auth, **env})

    return build


__all__ = ["make_config", "replace"]


# The pipeline tests' fixtures (test_pipeline, test_datatests, ...): a models file, a config
# reading it, documents written as the ingest writes them.
@pytest.fixture
def models(tmp_path: Path) -> ModelsFile:
    return ModelsFile(tmp_path)


@pytest.fixture
def cfg(dbname: str, models: ModelsFile) -> config_mod.Config:
    return make_config(dbname, CHTSYNC_MODELS=str(models.path))


@pytest.fixture
def docs(pg: psycopg.Connection) -> Docs:
    return Docs(pg)
