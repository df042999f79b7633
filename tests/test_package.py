"""The package as users install it: the sdist and the wheel carry every migration, base model and
Superset bundle file; an install without migrations refuses to migrate."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import psycopg
import pytest

from chtsync import __version__
from tests.conftest import PG_HOST, PG_PORT, PG_USER

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("migrations", "sql", "superset")


def shipped_files() -> set[str]:
    """Every file of the shipped folders, relative to the repository."""
    return {p.relative_to(ROOT).as_posix() for folder in SHIPPED for p in (ROOT / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`python -m build`: the sdist, then the wheel built from that sdist (as CI and PyPI do)."""
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_wheel_carries_every_migration_model_and_bundle_file(dists: dict[str, Path]) -> None:
    with zipfile.ZipFile(dists["wheel"]) as z:
        names = set(z.namelist())
    expected = {f"chtsync/_data/{f}" for f in shipped_files()}
    assert len(expected) > 40  # the folders were found at all
    assert expected - names == set()
    assert {f"chtsync/queries/{p.name}" for p in (ROOT / "chtsync" / "queries").glob("*.sql")} <= names
    assert dists["wheel"].name == f"chtsync-{__version__}-py3-none-any.whl"
    # The yoyo ids (file names) are the repository's: a database migrated before sees them applied.
    migrations = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("chtsync/_data/migrations/"))
    assert migrations == sorted(p.name for p in (ROOT / "migrations").glob("*.sql"))


def test_sdist_carries_them_at_the_top_level(dists: dict[str, Path]) -> None:
    with tarfile.open(dists["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert shipped_files() - names == set()


def _migrate(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chtsync", "migrate", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_migrate_refuses_without_migrations(pg: psycopg.Connection, dbname: str, tmp_path: Path) -> None:
    """A broken install (or a wrong CHTSYNC_HOME) is never reported as "up to date"."""
    (tmp_path / "home" / "migrations").mkdir(parents=True)
    env = dict(os.environ, CHTSYNC_HOME=str(tmp_path / "home"), CHTSYNC_CONFIG=os.devnull,
               COUCHDB_URL="http://127.0.0.1:9", POSTGRES_HOST=PG_HOST, POSTGRES_PORT=str(PG_PORT),
               POSTGRES_USER=PG_USER, POSTGRES_DB=dbname, POSTGRES_SCHEMA="fresh")
    for args in ((), ("--dry-run",)):
        proc = _migrate(env, *args)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.count("\n") == 1 and "no migrations found in" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
    # Found before anything was written: not even the schema.
    assert pg.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'fresh'").fetchone() == (0,)
    # The same command with the shipped migrations works (the override was the only difference).
    env.pop("CHTSYNC_HOME")
    proc = _migrate(env)
    assert proc.returncode == 0, proc.stderr
    assert pg.execute("SELECT to_regclass('fresh.dbt_results') IS NOT NULL").fetchone() == (True,)


def test_version_flag() -> None:
    proc = subprocess.run([sys.executable, "-m", "chtsync", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"chtsync {__version__}"
