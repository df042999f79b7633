"""The test bed itself: which CouchDB the suite uses, and what happens when there is none."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.servers import ROOT, CouchDBServer, ExternalCouchDB, free_port

ONE_TEST = "tests/test_sync.py::test_same_id_in_two_databases_kept_apart[couchdb]"


def pytest_run(**env: str) -> subprocess.CompletedProcess[str]:
    """Run one CouchDB test in a child pytest with the given environment."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("CI", "CHTSYNC_TEST_COUCHDB_URL", "CHTSYNC_TEST_COUCHDB_TARBALL")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", ONE_TEST],
                          cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=300)


def test_missing_couchdb_skips_with_a_reason_and_fails_under_ci(tmp_path) -> None:
    missing = str(tmp_path / "absent.tar.gz")
    skipped = pytest_run(CHTSYNC_TEST_COUCHDB_TARBALL=missing)
    assert skipped.returncode == 0, skipped.stdout
    assert "1 skipped" in skipped.stdout
    assert f"no real CouchDB: {missing} is absent and CHTSYNC_TEST_COUCHDB_URL is unset" in skipped.stdout
    failed = pytest_run(CHTSYNC_TEST_COUCHDB_TARBALL=missing, CI="true")
    assert failed.returncode == 1, failed.stdout
    assert "1 error" in failed.stdout and "no real CouchDB" in failed.stdout


def test_a_couchdb_of_your_own_by_url(couchdb_server) -> None:
    """CHTSYNC_TEST_COUCHDB_URL (as for a CouchDB in Docker) is used instead of the release."""
    if not isinstance(couchdb_server, CouchDBServer):
        pytest.skip("this run already uses CHTSYNC_TEST_COUCHDB_URL")
    user, password = couchdb_server.auth
    url = f"http://{user}:{password}@127.0.0.1:{couchdb_server.port}"
    ran = pytest_run(CHTSYNC_TEST_COUCHDB_URL=url, CHTSYNC_TEST_COUCHDB_TARBALL="/nonexistent.tar.gz", CI="true")
    assert ran.returncode == 0 and "1 passed" in ran.stdout, ran.stdout + ran.stderr


def test_an_unreachable_or_non_admin_url_is_one_line() -> None:
    with pytest.raises(RuntimeError, match=r"^CHTSYNC_TEST_COUCHDB_URL http://127.0.0.1:\d+ is unreachable"):
        ExternalCouchDB(f"http://admin:x@127.0.0.1:{free_port()}").start()


def test_non_admin_url_is_refused(couchdb_server) -> None:
    url = couchdb_server.url.replace("http://", "http://admin:wrong-password@")
    with pytest.raises(RuntimeError, match="the URL's user is not a server admin") as err:
        ExternalCouchDB(url).start()
    assert "wrong-password" not in str(err.value)
