"""The error tree and the one place that maps it to exit codes (the command line)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import types

import httpx
import pytest

from chtsync import __main__ as entry
from chtsync import cli, errors
from chtsync.cli import sync as commands
from chtsync.config import load
from chtsync.couch import CouchClient
from chtsync.errors import CouchBadSince, CouchError


@pytest.mark.parametrize(("exc", "code"), [
    (errors.ConfigError("COUCHDB_HOST is not set"), 2),
    (errors.ModelsFileError("model 'a': bad"), 2),
    (errors.PrivilegeError("POSTGRES_USER: role x may not create schema v1"), 2),
    (errors.NotMigrated("run `chtsync migrate` first"), 2),
    (errors.PostgresUnavailable("cannot connect to Postgres at h:5432/db", permanent=True), 2),
    (errors.PlanConflict("models apply: not created by chtsync"), 2),
    (errors.ModelBuildError("model 'a': column x does not exist"), 2),
    (errors.AdoptError("not a CHT Sync table"), 2),
    (errors.CouchAuthError("CouchDB at h: wrong credentials", 401), 1),
    (errors.ChtsyncError("something else"), 1),
])
def test_cli_maps_each_error_to_its_exit_code_and_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], exc: errors.ChtsyncError,
        code: int) -> None:
    def fail(args: argparse.Namespace) -> int:
        raise exc

    monkeypatch.setattr(commands, "cmd_migrate", fail)
    assert cli.main(["migrate"]) == code
    assert capsys.readouterr().err == f"chtsync: {exc}\n"


def test_the_tree() -> None:
    assert issubclass(errors.ModelsFileError, errors.ConfigError)
    assert not issubclass(errors.PostgresUnavailable, errors.ConfigError)  # the service waits for it
    for name in ("CouchError", "CouchAuthError", "CouchNotFound", "CouchBadSince"):
        assert getattr(errors, name) is getattr(__import__("chtsync.couch").couch, name)
    assert errors.first_line(ValueError("one\nDETAIL: two")) == "one"
    assert errors.first_line(ValueError()) == "ValueError"


def test_http_400_is_a_bad_since_on_changes_only() -> None:
    """A 400 on _changes means the stored seq is foreign to the database (recreated?); on any
    other request it is a refused request, not a reason to start the feed over."""
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": "bad_request", "reason": "refused"})

    source = load(env={"COUCHDB_URL": "http://couch.example:5984"}, search=False).sources[0]

    async def main() -> None:
        client = CouchClient(source, transport=httpx.MockTransport(handler))
        try:
            with pytest.raises(CouchBadSince):
                await client.changes("medic", "0", 10)
            with pytest.raises(CouchError) as info:
                await client.all_docs_page("medic", "a", 10)
            assert not isinstance(info.value, CouchBadSince)
            assert info.value.status == 400 and not info.value.transient and "refused the request" in str(info.value)
            assert await client.purged_ids("medic") is None  # no _purged_infos on this server
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_negative_sample_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["models", "fields", "delivery", "--sample-rows", "-1"])
    assert info.value.code == 2
    assert "--sample-rows: expected a whole number of rows, at least 1, got '-1'" in capsys.readouterr().err


def test_ctrl_c_while_the_command_line_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The imports take about a second: a Ctrl-C then ends with 130, not a traceback."""
    loading = types.ModuleType("chtsync.cli")

    def interrupted(name: str) -> object:
        raise KeyboardInterrupt

    loading.__getattr__ = interrupted  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "chtsync.cli", loading)
    assert entry.run() == 130
