"""Upgrading a running installation: the previous release's wheel syncs and builds models on a real
CouchDB, then the new wheel replaces it in the same virtualenv and `chtsync run` (two replicas at
once, as a rolling deploy starts them) is pointed at the same database. Migrations apply once,
under the lock; models whose definition did not change keep their relation (same OID); no row is
lost; a dashboard view answers all along."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import venv
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import PG_HOST, PG_PORT, PG_USER
from tests.servers import CouchAdmin
from tests.syncutil import assert_equal, wait_until
from tests.test_adopt import cht_docs

ROOT = Path(__file__).resolve().parent.parent
# The last commit before the complete wheel (issue 15): the release users upgrade from. Its wheel
# carries no migrations or models: it ran with CHTSYNC_HOME pointing at a copy of the repository
# (the Docker image's /app), and so does the old run here.
PREVIOUS = "67fb111"
SOURCE = "127.0.0.1/medic"
DASHBOARD = "SELECT form, count(*) FROM v1.data_record GROUP BY form ORDER BY form"


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    return proc


def _wheel(src: Path, out: Path) -> Path:
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(src)],
         env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    (wheel,) = out.glob("chtsync-*.whl")
    return wheel


@pytest.fixture(scope="session")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The previous release (its source tree and wheel) and this one's wheel, built once per run."""
    base = tmp_path_factory.mktemp("releases")
    found = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{PREVIOUS}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        pytest.fail(f"commit {PREVIOUS} (the previous release) is not in this clone:"
                    " run `git fetch --unshallow` (CI needs the history)")
    archive = base / "previous.tar"
    _run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), PREVIOUS])
    src = base / "previous"
    with tarfile.open(archive) as tar:
        tar.extractall(src, filter="tar")
    return {"previous_src": src, "previous": _wheel(src, base / "previous-dist"),
            "current": _wheel(ROOT, base / "current-dist")}


@pytest.fixture
def upgrade_db() -> Any:
    """A new, empty database: the previous release creates everything in it."""
    name = f"chtsync_upgrade_{os.getpid()}"
    admin = dict(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True)
    with psycopg.connect(**admin) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=name, autocommit=True) as conn:
        yield name, conn
    with psycopg.connect(**admin) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def models(conn: psycopg.Connection) -> dict[str, tuple[str, str, int]]:
    """Each model: (kind, definition hash, OID of its relation)."""
    return {r[0]: (r[1], r[2], r[3]) for r in conn.execute(
        "SELECT name, kind, definition_hash, to_regclass('v1.' || quote_ident(name))::oid::bigint"
        " FROM v1.chtsync_models")}


def applied_log(conn: psycopg.Connection) -> list[str]:
    """Every migration yoyo applied, once per application."""
    return sorted(r[0] for r in conn.execute(
        "SELECT migration_id FROM v1._yoyo_log WHERE operation = 'apply'"))


def test_upgrade_from_the_previous_release(
    releases: dict[str, Path], upgrade_db: Any, couch: CouchAdmin, couchdb_server: Any, tmp_path: Path,
) -> None:
    dbname, pg = upgrade_db
    couch.create_db("medic")
    couch.bulk("medic", cht_docs(4, 200))

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=True).create(env_dir)
    py, chtsync = str(env_dir / "bin" / "python"), str(env_dir / "bin" / "chtsync")
    pip = [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _run([*pip, str(releases["previous"])])
    env = dict(os.environ, COUCHDB_URL=couchdb_server.url, COUCHDB_USER=couchdb_server.auth[0],
               COUCHDB_PASSWORD=couchdb_server.auth[1], COUCHDB_DBS="medic", POSTGRES_HOST=PG_HOST,
               POSTGRES_PORT=str(PG_PORT), POSTGRES_USER=PG_USER, POSTGRES_DB=dbname,
               CHTSYNC_CONFIG=os.devnull, CHTSYNC_INTERVAL="1", PATH=f"{env_dir / 'bin'}:{os.environ['PATH']}")
    old_env = dict(env, CHTSYNC_HOME=str(releases["previous_src"]))
    env.pop("CHTSYNC_HOME", None)
    running: list[tuple[subprocess.Popen[bytes], Any]] = []

    def start(run_env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen([chtsync, "run"], env=run_env, cwd=tmp_path, stdout=log, stderr=log)
        running.append((proc, log))
        return proc

    def stop(proc: subprocess.Popen[bytes]) -> int:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(30)

    def data_records() -> int:
        try:
            return pg.execute("SELECT count(*) FROM v1.data_record").fetchone()[0]
        except psycopg.errors.UndefinedTable:
            return -1

    def built_and_following() -> bool:
        try:
            states = pg.execute("SELECT state FROM v1.chtsync_sources").fetchall()
            pending = pg.execute("SELECT count(*) FROM v1.chtsync_models"
                                 " WHERE last_status NOT IN ('ok', 'created')").fetchone()[0]
        except psycopg.errors.UndefinedTable:
            return False
        return states == [("following",)] and pending == 0

    answers: list[tuple[float, list[Any]]] = []
    failures: list[BaseException] = []
    done = threading.Event()
    try:
        old = start(old_env, "previous")
        wait_until(lambda: data_records() == 100 and built_and_following(), timeout=180,
                   what="the previous release synced and built its models")
        pg.execute(f"CREATE VIEW v1.chw_dashboard AS {DASHBOARD}")  # what Superset reads
        before_models, before_log = models(pg), applied_log(pg)
        assert before_models and "0012.dbt-results" not in before_log

        def reader() -> None:
            with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname,
                                 autocommit=True) as conn:
                while not done.is_set():
                    try:
                        answers.append((time.monotonic(), conn.execute(
                            "SELECT * FROM v1.chw_dashboard").fetchall()))
                    except psycopg.Error as exc:
                        failures.append(exc)
                    time.sleep(0.02)  # a busy dashboard, not a spinning one

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        wait_until(lambda: len(answers) > 5, timeout=30, what="dashboard answers")
        assert stop(old) == 0
        # Written while no chtsync runs: the new release must pick them up from the checkpoint.
        couch.bulk("medic", [{"_id": f"late-{i}", "type": "data_record", "form": "late",
                              "reported_date": 1700000000000 + i} for i in range(7)])
        _run([*pip, "--no-deps", "--force-reinstall", str(releases["current"])])
        probe = _run([py, "-c", "import chtsync; print(chtsync.__file__)"], cwd=tmp_path)
        assert probe.stdout.startswith(str(env_dir)), probe.stdout
        upgrading = time.monotonic()
        new = [start(env, "current-a"), start(env, "current-b")]  # two replicas, one lock
        wait_until(lambda: data_records() == 107 and built_and_following(), timeout=180,
                   what="the new release caught up and refreshed")
        # The reader's last answer must be one asked after that, not one in flight before it.
        caught_up = time.monotonic()
        wait_until(lambda: answers[-1][0] > caught_up + 0.1, timeout=30, what="a dashboard answer after that")
        done.set()
        thread.join(10)

        assert not failures, failures[:3]
        assert any(t < upgrading for t, _ in answers) and any(t > upgrading + 1 for t, _ in answers)
        assert answers[-1][1] == pg.execute(DASHBOARD).fetchall()
        # Migrations: the old ids still count as applied (not run again); the new ones ran once.
        after_log = applied_log(pg)
        shipped = sorted(p.stem for p in (ROOT / "migrations").glob("*.sql"))
        assert sorted(set(after_log)) == shipped and len(after_log) == len(shipped), after_log
        assert set(before_log) <= set(after_log)
        # Nothing rebuilt that did not change: same definition hash, same relation.
        after_models = models(pg)
        kept = [m for m, (kind, digest, _) in before_models.items()
                if after_models.get(m, (None, None, None))[:2] == (kind, digest)]
        assert kept, "every model changed definition: nothing left to check"
        for name in kept:
            assert after_models[name][2] == before_models[name][2], f"{name} was rebuilt"
        # No row lost: Postgres equals CouchDB, and the models have every report.
        assert_equal(pg, couch, "medic", SOURCE)
        assert pg.execute("SELECT count(*) FROM v1.data_record WHERE form = 'late'").fetchone() == (7,)
        for proc in new:
            assert proc.poll() is None
            assert stop(proc) == 0
        logs = "".join((tmp_path / f"current-{x}.log").read_text() for x in "ab")
        assert "migration applied id=0012.dbt-results" in logs
    finally:
        done.set()
        for proc, log in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            log.close()
