"""Every configuration and environment mistake, made as a careless or hostile admin would: one line
on stderr naming the setting, exit 2, no traceback, no password, and Postgres untouched."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.conftest import PG_HOST, PG_PORT, PG_USER

COUCH_SECRET = "couch-secret-4711"
PG_SECRET = "pg-secret-4712"
SECRETS = (COUCH_SECRET, PG_SECRET, "hostpw-4713")
_serial = itertools.count()


def admin(dbname: str = "postgres") -> psycopg.Connection:
    return psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname, autocommit=True)


def user_objects(dbname: str) -> list[str]:
    """Every schema and relation a run could have created (public itself is there from the start)."""
    with admin(dbname) as conn:
        return [r[0] for r in conn.execute(
            "SELECT 'schema ' || nspname FROM pg_namespace"
            " WHERE nspname NOT LIKE 'pg\\_%' AND nspname NOT IN ('information_schema', 'public')"
            " UNION ALL SELECT 'relation ' || c.oid::regclass::text FROM pg_class AS c"
            " JOIN pg_namespace AS n ON n.oid = c.relnamespace"
            " WHERE n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'")]


@dataclass
class Case:
    id: str
    args: list[str]
    named: str  # what the one line must contain: the setting (and its fix)
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # written to tmp_path; {tmp} in env/yaml
    yaml: str | None = None
    setup: Callable[[str, Path], Iterator[dict[str, str]]] | None = None  # extra env while it runs


def no_create_role(dbname: str, tmp: Path) -> Iterator[dict[str, str]]:
    role = f"chtsync_nocreate_{os.getpid()}_{next(_serial)}"
    with admin() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        yield {"POSTGRES_USER": role}
    finally:
        with admin() as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def port_in_use(dbname: str, tmp: Path) -> Iterator[dict[str, str]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield {"METRICS_HOST": "127.0.0.1", "METRICS_PORT": str(s.getsockname()[1])}


NOT_UTF8 = "pässwörd".encode("latin-1")

CASES = [
    # The settings of tests/test_config.py, now end to end.
    Case("couchdb-host-unset", ["sync", "--once"], "COUCHDB_HOST is not set", env={"COUCHDB_URL": ""}),
    Case("couchdb-port-word", ["sync", "--once"], "COUCHDB_PORT: expected a whole number",
         env={"COUCHDB_URL": "", "COUCHDB_HOST": "h", "COUCHDB_PORT": "abc"}),
    Case("couchdb-port-99999", ["sync", "--once"], "COUCHDB_PORT: must be between 1 and 65535",
         env={"COUCHDB_URL": "", "COUCHDB_HOST": "h", "COUCHDB_PORT": "99999"}),
    Case("couchdb-secure-maybe", ["sync", "--once"], "COUCHDB_SECURE: expected true or false",
         env={"COUCHDB_URL": "", "COUCHDB_HOST": "h", "COUCHDB_SECURE": "maybe"}),
    Case("couchdb-dbs-empty", ["run"], "COUCHDB_DBS: list at least one", env={"COUCHDB_DBS": " , "}),
    Case("couchdb-dbs-capital", ["run"], "COUCHDB_DBS: 'Medic' is not a valid", env={"COUCHDB_DBS": "Medic"}),
    Case("schema-injection", ["migrate"], "POSTGRES_SCHEMA: 'v1; drop' is not a plain SQL name",
         env={"POSTGRES_SCHEMA": "v1; drop"}),
    Case("batch-size-0", ["run"], "BATCH_SIZE: must be between 1 and 10000", env={"BATCH_SIZE": "0"}),
    Case("first-sync-readers", ["run"], "FIRST_SYNC_READERS: must be between 1 and 16",
         env={"FIRST_SYNC_READERS": "100"}),
    Case("couchdb-url-ftp", ["run"], "COUCHDB_URL: expected http(s)://host:port", env={"COUCHDB_URL": "ftp://x"}),
    Case("log-level", ["run"], "LOG_LEVEL: expected DEBUG", env={"LOG_LEVEL": "loud"}),
    # The cases of issue 14.
    Case("couchdb-url-port-99999", ["run"], "COUCHDB_URL: the port must be a number between 1 and 65535",
         env={"COUCHDB_URL": f"http://admin:{COUCH_SECRET}@127.0.0.1:99999"}),
    Case("password-file-not-utf8", ["run"], "COUCHDB_PASSWORD_FILE:",
         env={"COUCHDB_PASSWORD_FILE": "{tmp}/pw"}, files={"pw": NOT_UTF8}),
    Case("postgres-password-file-missing", ["migrate"], "POSTGRES_PASSWORD_FILE: cannot read",
         env={"POSTGRES_PASSWORD_FILE": "{tmp}/missing"}),
    Case("ca-file-missing", ["run"], "COUCHDB_CA_FILE:", env={"COUCHDB_CA_FILE": "{tmp}/ca.pem"}),
    Case("ca-file-not-pem", ["sync", "--once"], "COUCHDB_CA_FILE:", env={"COUCHDB_CA_FILE": "{tmp}/ca.pem"},
         files={"ca.pem": b"not a certificate\n"}),
    Case("models-file-missing", ["run"], "CHTSYNC_MODELS", env={"CHTSYNC_MODELS": "{tmp}/models.yaml"}),
    Case("models-file-bad", ["run"], "model 'a': 'sql': cannot read", env={"CHTSYNC_MODELS": "{tmp}/models.yaml"},
         files={"models.yaml": b"models:\n  - {name: a, kind: view, sql: a.sql}\n"}),
    Case("metrics-port-in-use", ["run"], "METRICS_PORT:", setup=port_in_use),
    Case("metrics-host-unresolvable", ["run"], "METRICS_HOST:",
         env={"METRICS_HOST": "no-such-host.invalid", "METRICS_PORT": "9"}),
    Case("yaml-host-list", ["run"], "couchdb.host: expected a single value",
         env={"COUCHDB_URL": ""}, yaml="couchdb: {host: [a, b], dbs: [medic]}\n"),
    Case("yaml-models-list", ["run"], "pipeline.models: expected a single value", yaml="pipeline: {models: [a]}\n"),
    Case("config-not-utf8", ["run"], "not UTF-8", files={"c.yaml": b"couchdb: {host: " + NOT_UTF8 + b"}\n"},
         env={"CHTSYNC_CONFIG": "{tmp}/c.yaml"}),
    Case("role-without-create", ["migrate"], "POSTGRES_USER: role", setup=no_create_role),
    Case("run-role-without-create", ["run"], "may not create schema v1", setup=no_create_role),
    Case("grant-reader-unmigrated", ["grant-reader", "reader_x"], "run `chtsync migrate` first"),
    Case("models-refresh-unmigrated", ["models", "refresh"], "run `chtsync migrate` first"),
    Case("models-apply-unmigrated", ["models", "apply"], "POSTGRES_SCHEMA: schema v1"),
    Case("schema-capitals", ["run"], "POSTGRES_SCHEMA: 'V1' has capital letters", env={"POSTGRES_SCHEMA": "V1"}),
    Case("table-capitals", ["sync", "--once"], "POSTGRES_TABLE: 'CouchDB' has capital letters",
         env={"POSTGRES_TABLE": "CouchDB"}),
    Case("interval-nan", ["run"], "DATAEMON_INTERVAL: expected a finite number", env={"DATAEMON_INTERVAL": "nan"}),
    Case("lease-inf", ["run"], "LEASE_SECONDS: expected a finite number", env={"LEASE_SECONDS": "inf"}),
    Case("verify-interval-inf", ["run"], "VERIFY_INTERVAL: expected a finite number",
         env={"VERIFY_INTERVAL": "inf"}),
    Case("couchdb-host-credentials", ["run"], "COUCHDB_HOST: holds credentials",
         env={"COUCHDB_URL": "", "COUCHDB_HOST": "admin:hostpw-4713@couch.example"}),
    Case("postgres-host-credentials", ["migrate"], "POSTGRES_HOST: holds credentials",
         env={"POSTGRES_HOST": "admin:hostpw-4713@db.example"}),
    Case("postgres-unreachable", ["migrate"], "cannot connect to Postgres at 127.0.0.1:1",
         env={"POSTGRES_PORT": "1"}),
    # A '/' in a password cut the URL's host part short: the password became a path and was shown.
    Case("couchdb-url-slash-in-password", ["run"], "COUCHDB_URL: the user name or password holds",
         env={"COUCHDB_URL": f"http://admin:12/{COUCH_SECRET}@127.0.0.1:5984"}),
    Case("postgres-url-slash-in-password", ["migrate"], "POSTGRES_URL: the user name or password holds",
         env={"POSTGRES_URL": f"postgresql://postgres:12/{PG_SECRET}@127.0.0.1/x"}),
    Case("schema-pg-catalog", ["migrate"], "POSTGRES_SCHEMA: 'pg_catalog' is one of Postgres's own",
         env={"POSTGRES_SCHEMA": "pg_catalog"}),
    Case("password-file-empty", ["run"], "COUCHDB_PASSWORD_FILE:", env={"COUCHDB_PASSWORD_FILE": "{tmp}/pw"},
         files={"pw": b"\n"}),
    Case("config-nested-too-deeply", ["run"], "nested too deeply", env={"CHTSYNC_CONFIG": "{tmp}/c.yaml"},
         files={"c.yaml": b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n"}),
    Case("grant-reader-public", ["grant-reader", "public"], "role name 'public' is reserved"),
    Case("grant-reader-pg-role", ["grant-reader", "pg_monitor"], "role name 'pg_monitor' is reserved"),
]


@pytest.fixture
def fresh_db() -> Iterator[str]:
    """An empty database (from template0): nothing chtsync could have created is in it."""
    name = f"chtsync_pre_{os.getpid()}_{next(_serial)}"
    with admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    yield name
    with admin() as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def base_env(dbname: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("COUCHDB_", "POSTGRES_", "CHTSYNC_", "METRICS_", "LOG_", "BATCH_",
                                 "DATAEMON_", "LEASE_", "VERIFY_"))}
    return keep | {
        "CHTSYNC_CONFIG": os.devnull, "COUCHDB_URL": "http://127.0.0.1:9", "COUCHDB_USER": "admin",
        "COUCHDB_PASSWORD": COUCH_SECRET, "POSTGRES_HOST": PG_HOST, "POSTGRES_PORT": str(PG_PORT),
        "POSTGRES_USER": PG_USER, "POSTGRES_PASSWORD": PG_SECRET, "POSTGRES_DB": dbname,
    }


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_before_anything_is_written(case: Case, fresh_db: str, tmp_path: Path) -> None:
    env = base_env(fresh_db)
    for name, content in case.files.items():
        (tmp_path / name).write_bytes(content)
    if case.yaml is not None:
        (tmp_path / "config.yaml").write_text(case.yaml)
        env["CHTSYNC_CONFIG"] = str(tmp_path / "config.yaml")
    env.update({k: v.replace("{tmp}", str(tmp_path)) for k, v in case.env.items()})
    roles_before = roles()
    setup = case.setup(fresh_db, tmp_path) if case.setup else iter([{}])
    extra = next(setup)
    try:
        r = subprocess.run([sys.executable, "-m", "chtsync", *case.args], env=env | extra, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    finally:
        next(setup, None)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("chtsync: ") and case.named in lines[0], lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    for secret in SECRETS:
        assert secret not in r.stderr + r.stdout
    assert user_objects(fresh_db) == []
    assert roles() == roles_before


def roles() -> set[str]:
    with admin() as conn:
        return {r[0] for r in conn.execute("SELECT rolname FROM pg_roles")}


def test_missing_privileges_on_chtsync_tables(fresh_db: str) -> None:
    """A role that may use the schema but not chtsync's tables in it (another role migrated them,
    or a grant was revoked): one line naming what Postgres refused, exit 2, no traceback."""
    env = base_env(fresh_db)
    subprocess.run([sys.executable, "-m", "chtsync", "migrate"], env=env, capture_output=True, check=True,
                   timeout=120)
    role = f"chtsync_limited_{os.getpid()}_{next(_serial)}"
    with admin() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        with admin(fresh_db) as conn:
            conn.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA v1 TO {}").format(sql.Identifier(role)))
        for args in (["sync", "--once"], ["status"], ["models", "apply"]):
            r = subprocess.run([sys.executable, "-m", "chtsync", *args], env=env | {"POSTGRES_USER": role},
                               capture_output=True, text=True, timeout=120)
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 2 and len(lines) == 1, r.stderr
            assert lines[0].startswith("chtsync: POSTGRES_USER: Postgres refused: permission denied for"), lines
            assert "Traceback" not in r.stderr + r.stdout
            assert not any(secret in r.stderr + r.stdout for secret in SECRETS)
    finally:
        with admin(fresh_db) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        with admin() as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
