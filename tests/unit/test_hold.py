"""When the models wait for an initial sync (pipeline.initial_sync), and the setting that says how
much pending is an initial sync."""

from __future__ import annotations

import pytest

from chtsync.config import ConfigError, load
from chtsync.pipeline import initial_sync

ENV = {"COUCHDB_URL": "http://couch:5984", "COUCHDB_DBS": "medic", "POSTGRES_HOST": "db"}


def test_models_wait_while_a_source_has_much_pending() -> None:
    assert initial_sync(1000, [("a/medic", "following", 0), ("a/meta", "catching up", 5000)]) == (
        "models wait for the initial sync (a/meta: 5,000 changes pending)")
    # Not yet known (before the first page) or the follower not yet started: wait too.
    assert "pending not known yet" in initial_sync(1000, [("a/medic", "catching up", None)])
    assert initial_sync(1000, [("a/medic", "starting", None)]) is not None


@pytest.mark.parametrize("sources", [
    [("a/medic", "catching up", 1000)],  # little left: refresh as usual
    [("a/medic", "following", 0)],
    [("a/medic", "retrying", None), ("a/meta", "error", None)],  # CouchDB down: models go on
    [("a/medic", "standby", None)],  # another replica follows it
    [],
])
def test_models_refresh_otherwise(sources: list[tuple[str, str, int | None]]) -> None:
    assert initial_sync(1000, sources) is None


def test_zero_never_waits_and_the_setting() -> None:
    assert initial_sync(0, [("a/medic", "catching up", 10**9)]) is None
    assert load(env=ENV, search=False).hold_pending == 10_000
    assert load(env={**ENV, "CHTSYNC_HOLD_PENDING": "0"}, search=False).hold_pending == 0
    with pytest.raises(ConfigError, match="CHTSYNC_HOLD_PENDING"):
        load(env={**ENV, "CHTSYNC_HOLD_PENDING": "lots"}, search=False)
