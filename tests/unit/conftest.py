"""The unit tier: no servers. A test here that asks for a server fixture is a collection error."""

from __future__ import annotations

import pytest

SERVER_FIXTURES = {"postgresql", "postgresql_noproc", "pg", "dbname", "couchdb_server", "pouch_server",
                   "couch_server", "couch", "cfg_factory"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if used and item.path.is_relative_to(__file__.rsplit("/", 1)[0]):
            raise pytest.UsageError(f"{item.nodeid} is a unit test but uses {', '.join(sorted(used))}")
